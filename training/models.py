"""Loading the models a training run starts from, and the trainable views of them (full, LoRA).

Fine-tuning starts from a pipeline folder or Hub id of a family the project runs (checked up front by
:func:`pipelines.families.require_supported_model`); training from scratch builds a U-Net of an ``ldm`` preset and
takes the (frozen) VAE and text encoders from given folders. The family (from ``model_index.json``, or the preset
U-Net's config) says which text encoders a run loads (:data:`TEXT_ENCODERS`: one CLIP encoder for Stable Diffusion
1.x/2.x; SDXL's two, ``text_encoder`` / ``tokenizer`` and ``text_encoder_2`` / ``tokenizer_2``). Either way the
training noise schedule is a ``DDPMScheduler`` and the sampler saved with the model keeps the same training schedule.

A module the optimizer updates is a :class:`TrainedModule`: its parameters and learning rate, what a checkpoint keeps
of it (the module, or a view such as :class:`LoraState`), and the module the forward pass calls once
``accelerator.prepare`` has wrapped it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedModel

from ldm.errors import UserError
from ldm.presets import build_unet, get_preset
from pipelines.families import (
    STABLE_DIFFUSION,
    STABLE_DIFFUSION_XL,
    ModelFamily,
    family_of_unet,
    require_supported_model,
)
from pipelines.publish import pickle_only_components
from training.checkpoint import Stateful

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
"""The U-Net's LoRA targets: the attention projections (diffusers' training scripts' choice)."""
TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
"""A CLIP text encoder's LoRA targets: its attention projections (diffusers' and kohya's choice)."""

TEXT_ENCODERS: dict[ModelFamily, tuple[tuple[str, type[CLIPTextModel] | type[CLIPTextModelWithProjection]], ...]] = {
    STABLE_DIFFUSION: (("text_encoder", CLIPTextModel),),
    STABLE_DIFFUSION_XL: (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)),
}
"""The text encoders of each family's pipeline: component name and class (its tokenizer is the component named
with ``tokenizer`` for ``text_encoder``)."""


@dataclass
class TrainingModels:
    """What a text-to-image run trains with. ``sampler`` is the scheduler saved with the final pipeline; the two
    sources are where the VAE and text encoders came from (``text_encoder_source`` is None for text encoders
    initialised here, which nothing can reload). ``family`` picks the conditioning and the pipeline class;
    ``text_encoder_2`` / ``tokenizer_2`` are SDXL's second encoder (None for a family with one)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampler: SchedulerMixin
    vae_source: str
    text_encoder_source: str | None
    family: ModelFamily = STABLE_DIFFUSION
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    def text_encoders(self) -> list[tuple[str, torch.nn.Module, CLIPTokenizer]]:
        """The family's text encoders as ``(component name, model, tokenizer)``, in :data:`TEXT_ENCODERS` order."""
        return [
            (name, getattr(self, name), getattr(self, tokenizer_name(name))) for name, _ in TEXT_ENCODERS[self.family]
        ]


@dataclass(eq=False)
class TrainedModule:
    """A module the optimizer updates.

    Attributes:
        name: its name in checkpoints (``unet``, ``text_encoder``).
        module: the module itself (unwrapped: what validation and the final save use).
        learning_rate: the peak learning rate of its parameter group.
        state: what a checkpoint holds of it: the module, or a view of the part that is trained (:class:`LoraState`).
        runner: what the forward pass calls: ``module`` until ``accelerator.prepare`` wraps it (DDP, autocast).
    """

    name: str
    module: torch.nn.Module
    learning_rate: float
    state: Stateful
    runner: torch.nn.Module = field(default=None)  # type: ignore[assignment]  # set to module after init

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = self.module

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (those that require gradients)."""
        return [p for p in self.module.parameters() if p.requires_grad]


def freeze(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
    """Make ``module`` a frozen, evaluation-mode part on ``device``, cast to ``dtype`` (a mixed-precision copy)."""
    module.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)


def _subfolder(path: str, name: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a component that is either ``path/name`` (a pipeline folder) or ``path``."""
    local = Path(path)
    if local.is_dir() and not (local / name).is_dir() and (local / "config.json").is_file():
        return {"pretrained_model_name_or_path": path}
    return {"pretrained_model_name_or_path": path, "subfolder": name}


def check_pickle_weights(source: str | None, flag: str, allow_pickle: bool) -> None:
    """Refuse a local model folder whose weights are pickle files only (loading them can run code), unless
    ``allow_pickle``: a :class:`UserError` naming the folders and the two ways out."""
    local = Path(source).expanduser() if source else None
    if allow_pickle or local is None or not local.is_dir():
        return
    pickled = pickle_only_components(local)
    if pickled:
        raise UserError(
            f"{flag} {source} has pickle weights ({', '.join(pickled)}): loading them can run code; convert them to "
            "safetensors, or pass --allow-pickle if you trust the files"
        )


def load_component(cls: Any, path: str, name: str) -> Any:
    """``cls.from_pretrained`` of the ``name`` component in ``path`` (a pipeline folder, a folder with ``name/``, the
    component's own folder, or a Hub id); a failure is a :class:`UserError` naming what to pass."""
    try:
        return cls.from_pretrained(**_subfolder(path, name))
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load the {name} from {path!r} ({err}); pass a diffusers pipeline folder, a folder with "
            f"{name}/ in it, or a Hub id"
        ) from None


def load_training_models(
    *,
    pretrained_model: str | None,
    preset: str | None = None,
    vae: str | None = None,
    text_encoder: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
    fresh_text_encoder_seed: int | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
) -> TrainingModels:
    """Load (fine-tune) or build (from scratch) the models of a text-to-image run.

    ``vae`` / ``text_encoder`` override the pipeline's when fine-tuning, and are required when training from a
    preset (for an SDXL preset, ``text_encoder`` is a folder with both encoders' and tokenizers' subfolders, such as
    an SDXL pipeline folder). The family, from the pipeline's ``model_index.json`` or the preset U-Net's config,
    says which text encoders load (:data:`TEXT_ENCODERS`). ``prediction_type`` None keeps the model's (``epsilon``
    for a new one). ``zero_terminal_snr`` rescales the betas so the last step is pure noise (Lin et al. 2024), which
    needs v-prediction and trailing timesteps.
    ``fresh_text_encoder_seed``: replace the text encoder's weights by a fresh initialisation of its architecture
    from this seed (the same weights on every process; its tokenizer is kept; every encoder of the family).
    ``seed``: the initialisation of a preset's new U-Net (so a run, and its restart before the first checkpoint,
    start from the same weights); the caller's RNG is left alone.
    ``allow_pickle``: load folders whose weights are pickle files only (``.bin``, ``.ckpt``), as ``publish`` and
    ``convert`` do; without it they are refused before anything is loaded.

    Raises:
        UserError: a model of a family this version does not run, a component that cannot be loaded, or settings
            that do not fit together.
    """
    if (pretrained_model is None) == (preset is None):
        raise UserError("pass exactly one of --pretrained-model (fine-tune) and --preset (train from scratch)")
    if preset is not None and (vae is None or text_encoder is None):
        raise UserError("training from a preset needs --vae and --text-encoder folders (they stay frozen)")
    for flag, source in (("--pretrained-model", pretrained_model), ("--vae", vae), ("--text-encoder", text_encoder)):
        check_pickle_weights(source, flag, allow_pickle)
    if pretrained_model is not None:
        family = require_supported_model(pretrained_model, flag="--pretrained-model")
        unet = load_component(UNet2DConditionModel, pretrained_model, "unet")
        base_config = dict(load_component(DDPMScheduler, pretrained_model, "scheduler").config)
        sampler_cls = _sampler_class(pretrained_model)
    else:
        spec = get_preset(preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = build_unet(spec)
        family = family_of_unet(unet.config)
        base_config = dict(DDPMScheduler.from_config(vars(spec.scheduler)).config)
        sampler_cls = DDIMScheduler

    vae_source, text_source = vae or pretrained_model, text_encoder or pretrained_model
    vae_model = load_component(AutoencoderKL, vae_source, "vae")
    encoders = {
        name: (
            load_component(cls, text_source, name),
            load_component(CLIPTokenizer, text_source, tokenizer_name(name)),
        )
        for name, cls in TEXT_ENCODERS[family]
    }
    if fresh_text_encoder_seed is not None:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is left alone
            torch.manual_seed(fresh_text_encoder_seed)
            encoders = {name: (type(model)(model.config), tok) for name, (model, tok) in encoders.items()}
        text_source = None
    hidden_size = sum(model.config.hidden_size for model, _ in encoders.values())
    if unet.config.cross_attention_dim != hidden_size:
        raise UserError(
            f"the U-Net's cross_attention_dim ({unet.config.cross_attention_dim}) does not match the text encoders' "
            f"hidden size ({hidden_size}, {' + '.join(encoders)}); pick a preset or text encoder that agree"
        )

    prediction_type = prediction_type or base_config.get("prediction_type", "epsilon")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise UserError(
            "zero_terminal_snr makes the last timestep pure noise, where an epsilon target carries no information "
            "about the image; use --prediction-type v_prediction with it"
        )
    schedule = {"prediction_type": prediction_type, "clip_sample": False}
    if zero_terminal_snr:
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    noise_scheduler = DDPMScheduler.from_config(base_config, **schedule)
    sampler = sampler_cls.from_config(noise_scheduler.config)
    text_model, tokenizer = encoders["text_encoder"]
    text_model_2, tokenizer_2 = encoders.get("text_encoder_2", (None, None))
    return TrainingModels(
        vae_model,
        text_model,
        tokenizer,
        unet,
        noise_scheduler,
        sampler,
        vae_source,
        text_source,
        family=family,
        text_encoder_2=text_model_2,
        tokenizer_2=tokenizer_2,
    )


def tokenizer_name(text_encoder_name: str) -> str:
    """The tokenizer component of a text encoder component (``text_encoder_2`` -> ``tokenizer_2``)."""
    return text_encoder_name.replace("text_encoder", "tokenizer")


def _sampler_class(pretrained_model: str) -> type[SchedulerMixin]:
    """The scheduler class the pipeline ships with (its sampler), read from ``model_index.json`` when local."""
    import diffusers

    try:
        from diffusers import DiffusionPipeline

        config = DiffusionPipeline.load_config(pretrained_model)
        return getattr(diffusers, config["scheduler"][1])
    except (OSError, KeyError, AttributeError, TypeError):
        return DDIMScheduler


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA layers a run adds.

    Attributes:
        rank: the rank of the attention projections' layers.
        alpha: their alpha (the update is scaled by ``alpha / rank``; default: the rank, scale 1).
        dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): a trained magnitude per output feature as well.
        algo: ``"lora"``, or a LyCORIS network: ``"loha"`` (a Hadamard product of two low-rank products) or
            ``"lokr"`` (a Kronecker product), trained through peft.
        conv_rank: also LoRA layers on the U-Net's ResNet and resampler convolutions at this rank (kohya-ss's
            LoCon ``conv_dim``), or None.
        conv_alpha: their alpha (default: ``conv_rank``).
    """

    rank: int
    alpha: float | None = None
    dora: bool = False
    algo: Literal["lora", "loha", "lokr"] = "lora"
    conv_rank: int | None = None
    conv_alpha: float | None = None


def conv_targets(unet: torch.nn.Module) -> list[str]:
    """The U-Net convolutions LoCon adapts: those of its ResNet blocks and down/up-samplers."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d) and (".resnets." in name or "samplers." in name)
    ]


def lora_config(model: torch.nn.Module, spec: LoraSpec) -> Any:
    """peft's ``LoraConfig`` of ``spec`` for ``model``: the attention projections of a U-Net
    (:data:`LORA_TARGET_MODULES`) or of a CLIP text encoder (:data:`TEXT_ENCODER_LORA_TARGET_MODULES`), plus a
    U-Net's convolutions at their own rank and alpha with ``spec.conv_rank``."""
    from peft import LoraConfig

    if isinstance(model, PreTrainedModel):
        targets, ranks, alphas = list(TEXT_ENCODER_LORA_TARGET_MODULES), {}, {}
    else:
        targets, ranks, alphas = list(LORA_TARGET_MODULES), {}, {}
        if spec.conv_rank is not None:
            convs = conv_targets(model)
            targets += convs
            ranks = dict.fromkeys(convs, spec.conv_rank)
            alphas = dict.fromkeys(convs, spec.conv_alpha or spec.conv_rank)
    if spec.algo != "lora":
        from peft import LoHaConfig, LoKrConfig

        lycoris = LoHaConfig if spec.algo == "loha" else LoKrConfig
        shared = {"target_modules": targets, "rank_pattern": ranks, "alpha_pattern": alphas}
        return lycoris(r=spec.rank, alpha=spec.alpha or spec.rank, **shared)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha or spec.rank,
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        use_dora=spec.dora,
    )


def add_lora(model: torch.nn.Module, spec: LoraSpec) -> None:
    """Freeze ``model`` (a U-Net or a CLIP text encoder) and add the trainable LoRA layers of ``spec`` (peft)."""
    text_encoder = isinstance(model, PreTrainedModel)
    config = lora_config(model, spec)
    model.requires_grad_(False)
    if not text_encoder:
        model.add_adapter(config)
        return
    # transformers' own add_adapter wants a newer peft than the registries have (0.22); inject the layers with peft
    # and record the adapter as add_adapter does, so that peft's state-dict helpers and diffusers see it.
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name="default")
    model.peft_config = {"default": config}
    model._hf_peft_config_loaded = True


def scale_baked_state_dict(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft's state dict of ``model``'s LoRA ``adapter`` with each layer's scale (``alpha / rank``) multiplied into
    its ``lora_B`` weight, so that the layers give the same update at scale 1 (alpha = rank)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    scales = {
        name: module.scaling[adapter]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.scaling
    }
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    suffix = ".lora_B.weight"
    return {
        key: value * scales[key.removesuffix(suffix)] if key.endswith(suffix) else value
        for key, value in state.items()
    }


class LoraState:
    """A checkpointable view of only a model's LoRA weights (what a LoRA run changes)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state_dict)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UserError(
                f"the checkpoint's LoRA weights do not fit this {type(self.model).__name__} (unexpected keys "
                f"{unexpected[:5]}); resume from a checkpoint of a run with the same --lora-rank and model"
            )


def save_lora(
    models: torch.nn.Module | Mapping[str, torch.nn.Module],
    folder: str | Path,
    pipeline_class: Any = None,
) -> Path:
    """Write the LoRA layers of ``models`` (a U-Net, or pipeline components by name: ``unet``, ``text_encoder``,
    ``text_encoder_2``; those with LoRA layers are saved) to ``pytorch_lora_weights.safetensors`` in diffusers'
    format, which stock ``load_lora_weights`` of ``pipeline_class`` (default: ``StableDiffusionPipeline``) reads.

    Each layer's scale ``alpha / rank`` is baked into its up weights, so the file holds no alpha and needs no
    adapter metadata: every loader applies the trained strength at scale 1 (ComfyUI ignores metadata; diffusers
    reads each layer's rank from its shapes and DoRA from its magnitude vectors). The keys are peft's
    (``lora_A`` / ``lora_B``), which diffusers reads as they are: with the older ``lora.down`` / ``lora.up`` names
    and convolution layers among them (LoCon), diffusers 0.42 drops the attention layers when it loads."""
    from diffusers import StableDiffusionPipeline

    if isinstance(models, torch.nn.Module):
        models = {"unet": models}
    layers: dict[str, Any] = {}
    for name, model in models.items():
        if not getattr(model, "peft_config", None):
            continue
        layers[f"{name}_lora_layers"] = scale_baked_state_dict(model)
    (pipeline_class or StableDiffusionPipeline).save_lora_weights(folder, safe_serialization=True, **layers)
    return Path(folder) / "pytorch_lora_weights.safetensors"
