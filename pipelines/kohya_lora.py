"""LoRA weights in kohya-ss's key layout, the one AUTOMATIC1111, ComfyUI and model sites read.

Each LoRA-adapted module of a model becomes three entries named after its module path with ``_`` for ``.``, behind
the model's prefix (``lora_unet_``, ``lora_te_`` / ``lora_te1_``, ``lora_te2_``): ``<name>.lora_down.weight``
(peft's ``lora_A``, rank x in), ``<name>.lora_up.weight`` (``lora_B``, out x rank) and ``<name>.alpha``, a scalar
with ``alpha / rank`` the scale of the update ``W + (alpha / rank) * up @ down``. The file's metadata carries
kohya's ``ss_*`` keys (network module, rank, alpha, base model version).

Which module path a name is made of depends on the family, and is kept as data, one :class:`KohyaLayout` per
family: kohya trains SD 1.x/2.x on a U-Net built like diffusers', so ``<path>`` is the diffusers module path
(``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``), and its one text encoder is ``lora_te_``; it
trains SDXL on Stability's original (SGM) U-Net, so ``<path>`` is the original module path
(``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, the single-file layout's,
:func:`pipelines.single_file.unet_module_map`), and its two text encoders are ``lora_te1_`` and ``lora_te2_``. Text
encoder paths are those of transformers 4's CLIP models (``text_model.encoder.layers.0.self_attn.q_proj``).
diffusers' ``load_lora_weights`` reads either back (``_maybe_map_sgm_blocks_to_diffusers`` and
``_convert_non_diffusers_lora_to_diffusers`` in ``diffusers/loaders/lora_conversion_utils.py``: this module writes
their inverse).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from ldm.errors import UserError
from pipelines.families import FAMILIES, STABLE_DIFFUSION, STABLE_DIFFUSION_XL, ModelFamily
from pipelines.single_file import (
    SAFETENSORS_SUFFIX,
    rename_key,
    save_safetensors_atomically,
    stored,
    unet_module_map,
)

KOHYA_UNET_PREFIX = "lora_unet_"
NETWORK_MODULE = "networks.lora"
"""kohya's ``ss_network_module`` of a plain LoRA (``networks/lora.py`` of sd-scripts)."""
DYNAMIC = "Dynamic"
"""kohya's ``ss_network_dim`` / ``ss_network_alpha`` when the modules' ranks or alphas differ."""

LoraCarrier = UNet2DConditionModel | DiffusionPipeline
"""What a kohya file is exported from: a pipeline (its U-Net and text encoders) or a U-Net alone."""
ModuleNames = Callable[[torch.nn.Module], Callable[[str], str | None]]
"""Given a model, its map from a diffusers module path to the path kohya names the module by (None: no name)."""


def diffusers_names(model: torch.nn.Module) -> Callable[[str], str | None]:
    """Module paths as the model has them (kohya's SD 1.x/2.x U-Net)."""
    return lambda path: path


def clip_names(model: torch.nn.Module) -> Callable[[str], str | None]:
    """A CLIP text model's module paths in transformers 4's layout, which kohya names them by
    (``text_model.encoder.layers.0.self_attn.q_proj``): transformers >= 5.6 flattened ``CLIPTextModel``, whose
    paths lack the ``text_model.`` level (``CLIPTextModelWithProjection`` still has it)."""
    flattened = {name for name, _ in model.named_children()} - {"text_model", "text_projection"}
    return lambda path: f"text_model.{path}" if path.split(".")[0] in flattened else path


def original_unet_names(unet: torch.nn.Module) -> Callable[[str], str | None]:
    """A ``UNet2DConditionModel``'s module paths in the original (CompVis / SGM) U-Net layout (kohya's SDXL U-Net)."""
    table = unet_module_map(unet.config)

    def original(path: str) -> str | None:
        # rename_key renames parameter keys by their longest module prefix: give it one parameter of the module.
        renamed = rename_key(f"{path}.weight", table)
        return None if renamed is None else renamed.removesuffix(".weight")

    return original


@dataclass(frozen=True)
class KohyaComponent:
    """One pipeline model in a kohya file.

    Attributes:
        attribute: the pipeline's attribute (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``).
        prefix: the prefix of its keys (``"lora_unet_"``, ``"lora_te1_"``, ...).
        names: how kohya names its modules.
    """

    attribute: str
    prefix: str
    names: ModuleNames = diffusers_names


@dataclass(frozen=True)
class KohyaLayout:
    """One family's kohya LoRA layout.

    Attributes:
        components: the models a file of this family may hold, U-Net first.
        base_model_version: ``ss_base_model_version`` from the U-Net's config ("sd_v1", "sdxl_base_v1-0").
    """

    components: tuple[KohyaComponent, ...]
    base_model_version: Callable[[Mapping[str, Any]], str]


def _sd_version(unet_config: Mapping[str, Any]) -> str:
    """SD 2.x conditions on OpenCLIP ViT-H's 1024-wide hidden states, SD 1.x on CLIP ViT-L's 768-wide ones."""
    return "sd_v2" if unet_config.get("cross_attention_dim") == 1024 else "sd_v1"


LAYOUTS: dict[ModelFamily, KohyaLayout] = {
    STABLE_DIFFUSION: KohyaLayout(
        components=(KohyaComponent("unet", KOHYA_UNET_PREFIX), KohyaComponent("text_encoder", "lora_te_", clip_names)),
        base_model_version=_sd_version,
    ),
    STABLE_DIFFUSION_XL: KohyaLayout(
        components=(
            KohyaComponent("unet", KOHYA_UNET_PREFIX, original_unet_names),
            KohyaComponent("text_encoder", "lora_te1_", clip_names),
            KohyaComponent("text_encoder_2", "lora_te2_", clip_names),
        ),
        base_model_version=lambda unet_config: "sdxl_base_v1-0",
    ),
}
"""The kohya layout of each family that has one."""


def layout_of(unet_config: Mapping[str, Any]) -> KohyaLayout:
    """The kohya layout of a U-Net's family, known by the config's ``addition_embed_type`` (what tells the
    families' U-Nets apart in :data:`pipelines.families.FAMILIES`).

    Raises:
        UserError: a U-Net of no family with a kohya layout.
    """
    embed_type = unet_config.get("addition_embed_type")
    for family in FAMILIES:
        if family.unet_addition_embed_type == embed_type and family in LAYOUTS:
            return LAYOUTS[family]
    names = ", ".join(family.name for family in LAYOUTS)
    raise UserError(
        f"a U-Net with addition_embed_type {embed_type!r} has no kohya LoRA layout; export a LoRA of {names}"
    )


def _models(model: LoraCarrier, layout: KohyaLayout) -> dict[KohyaComponent, torch.nn.Module]:
    """The layout's models in ``model``: a pipeline's components (those it has), or a U-Net alone."""
    if isinstance(model, UNet2DConditionModel):
        return {layout.components[0]: model}
    return {
        component: getattr(model, component.attribute)
        for component in layout.components
        if getattr(model, component.attribute, None) is not None
    }


def _adapter(models: Mapping[KohyaComponent, torch.nn.Module], adapter_name: str | None) -> str:
    """The adapter to export: ``adapter_name``, or the only one the models have.

    Raises:
        UserError: no such adapter, or several and none named.
    """
    layers = [module for m in models.values() for module in m.modules() if _adapter_names(module)]
    adapters = list(dict.fromkeys(name for layer in layers for name in _adapter_names(layer)))
    what = "the U-Net" if len(models) == 1 else "the pipeline"
    if not adapters:
        raise UserError(f"{what} has no LoRA adapter; add one (training.models.add_lora) or load one first")
    if adapter_name is None:
        if len(adapters) > 1:
            raise UserError(f"{what} has several LoRA adapters {adapters}; pass adapter_name= one of them")
        return adapters[0]
    if adapter_name not in adapters:
        raise UserError(f"{what} has no LoRA adapter {adapter_name!r}; it has {adapters}")
    return adapter_name


LYCORIS_PARAMETERS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
"""The LyCORIS parameters of a LoHa / LoKr layer, under the same names in peft and in LyCORIS's kohya-style files
(peft ported them from LyCORIS, shapes included: a convolution's ``w*_b`` is flattened to ``(rank, in * k * k)``)."""


def _adapter_names(module: torch.nn.Module) -> list[str]:
    """The adapters a peft layer holds: a LoRA layer's, or a LoHa / LoKr (LyCORIS) layer's; none for other modules."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    if isinstance(module, LoraLayer):
        return list(module.lora_A)
    if isinstance(module, LycorisLayer):
        return list(module.scaling)
    return []


def _lycoris_tensors(
    module: torch.nn.Module, adapter: str, key: str, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """A LoHa / LoKr layer as LyCORIS stores it under ``key``. The layer's scale ``alpha / rank`` is multiplied
    into its second factor (``hada_w2_a``, ``lokr_w2`` or ``lokr_w2_a``) and ``alpha`` is written as the rank, so
    that every loader applies the trained update, also LyCORIS, which ignores alpha for full LoKr factors."""
    names = [name for names in LYCORIS_PARAMETERS.values() for name in names if adapter in getattr(module, name, {})]
    params = {name: getattr(module, name)[adapter] for name in names}
    scale = module.scaling[adapter]
    second = next(name for name in ("hada_w2_a", "lokr_w2", "lokr_w2_a") if name in params)
    state = {
        f"{key}.{name}": stored(param * (scale if name == second else 1.0), dtype) for name, param in params.items()
    }
    state[f"{key}.alpha"] = torch.tensor(float(module.r[adapter]))
    return state


def _lora_tensors(
    model: torch.nn.Module, component: KohyaComponent, adapter: str, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One model's LoRA layers of ``adapter`` as kohya tensors.

    Raises:
        UserError: a DoRA / LoRA-bias layer, or a module kohya has no name for.
    """
    from peft.tuners.lora import LoraLayer

    kohya_path = component.names(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if adapter not in _adapter_names(module):
            continue
        if not isinstance(module, LoraLayer):  # LoHa / LoKr
            path = kohya_path(name)
            if path is None:
                raise UserError(f"{component.attribute}.{name} has no kohya name; export a LoRA of its blocks' layers")
            state.update(_lycoris_tensors(module, adapter, component.prefix + path.replace(".", "_"), dtype))
            continue
        if module.use_dora.get(adapter) or module.lora_bias.get(adapter):
            raise UserError(f"{name}: DoRA and LoRA-bias adapters have no kohya LoRA layout; export a plain LoRA")
        path = kohya_path(name)
        if path is None:
            raise UserError(f"{component.attribute}.{name} has no kohya name; export a LoRA of its blocks' layers")
        down, up = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        # peft scales by lora_alpha / r (or / sqrt(r) with rsLoRA); kohya by alpha / rank: store the same scale.
        alpha = torch.tensor(module.scaling[adapter] * module.r[adapter], dtype=torch.float32)
        key = component.prefix + path.replace(".", "_")
        for suffix, tensor in (("lora_down.weight", down), ("lora_up.weight", up), ("alpha", alpha)):
            state[f"{key}.{suffix}"] = stored(tensor, dtype)
    return state


def _unet(model: LoraCarrier) -> UNet2DConditionModel:
    return model if isinstance(model, UNet2DConditionModel) else model.unet


def kohya_lora_state_dict(
    model: LoraCarrier, adapter_name: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The peft LoRA ``adapter_name`` (default: the only adapter) of a pipeline's U-Net and text encoders, or of a
    U-Net alone, as kohya tensors in its family's layout, on the CPU, cast to ``dtype`` when given.

    Raises:
        UserError: no such adapter, a DoRA / LoRA-bias adapter (kohya's plain LoRA has no place for them), or a
            model of a family with no kohya layout.
    """
    layout = layout_of(_unet(model).config)
    models = _models(model, layout)
    adapter = _adapter(models, adapter_name)
    state: dict[str, torch.Tensor] = {}
    for component, module in models.items():
        state.update(_lora_tensors(module, component, adapter, dtype))
    return state


def _one_value(values: list[float], show: Callable[[float], str]) -> str:
    return show(values[0]) if len(set(values)) == 1 else DYNAMIC


def kohya_metadata(state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """kohya's ``ss_*`` metadata of the tensors ``state`` for a U-Net of config ``unet_config``: the network module,
    its rank and alpha (``"Dynamic"`` when they differ between modules) and the base model version."""
    downs = [tensor for key, tensor in state.items() if key.endswith(".lora_down.weight")]
    alphas = [tensor.item() for key, tensor in state.items() if key.endswith(".alpha")]
    algo = (
        "loha" if any(".hada_" in key for key in state) else "lokr" if any(".lokr_" in key for key in state) else None
    )
    version = layout_of(unet_config).base_model_version(unet_config)
    metadata = {
        "format": "pt",
        "ss_network_module": NETWORK_MODULE if algo is None else "lycoris.kohya",
        "ss_network_dim": _one_value(
            [down.shape[0] for down in downs] or [int(alpha) for alpha in alphas], lambda rank: str(int(rank))
        ),
        "ss_network_alpha": _one_value(alphas, lambda alpha: str(float(alpha))),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
    }
    if algo is not None:
        metadata["ss_network_args"] = json.dumps({"algo": algo})
    return metadata


def export_kohya_lora(
    model: LoraCarrier, path: str | Path, *, adapter_name: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write the LoRA of a pipeline (U-Net and text encoders) or of a U-Net alone to ``path`` (``.safetensors``) in
    kohya's layout with its ``ss_*`` metadata, atomically. Returns ``path``.

    Raises:
        UserError: ``path`` is not ``.safetensors``, or the adapter cannot be written in this layout.
    """
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise UserError(f"the LoRA file must be a {SAFETENSORS_SUFFIX} file; got {path}")
    state = kohya_lora_state_dict(model, adapter_name, dtype)
    return save_safetensors_atomically(state, path, metadata=kohya_metadata(state, _unet(model).config))
