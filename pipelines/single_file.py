"""Single-file checkpoints in the original key layouts of Stable Diffusion 1.x (CompVis ``ldm``) and SDXL
(Stability's ``generative-models``).

A diffusers folder holds each component apart, under diffusers' module names; AUTOMATIC1111, ComfyUI and most model
sites trade *one* file in the module names of the original code: the U-Net under ``model.diffusion_model.``, the VAE
under ``first_stage_model.``, and the text encoders under ``cond_stage_model.transformer.`` (SD 1.x: CLIP ViT-L in
the Hugging Face names) or ``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.`` (SDXL:
CLIP ViT-L in the Hugging Face names, OpenCLIP ViT-bigG in open_clip's). This module writes that file
(:func:`export_single_file`): the inverse of diffusers' ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(``diffusers/loaders/single_file_utils.py``), kept as data: a :class:`SingleFileLayout` per family names each
component's :class:`ComponentLayout`, whose tables map diffusers module paths to original ones for any number of
levels, ``layers_per_block`` and text-encoder layers. Reading a single file back is diffusers' ``FromSingleFileMixin``
(``LatentDiffusionPipeline.from_single_file``, stock ``StableDiffusionXLPipeline.from_single_file``);
:func:`check_checkpoint_format` is the pickle gate in front of it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ldm.errors import UserError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
SAFETENSORS_SUFFIX = ".safetensors"

# Modules whose names differ inside a block: diffusers name -> original name.
UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# The original VAE attention projects with 1x1 convolutions where diffusers has linear layers.
VAE_CONV_ATTENTION = frozenset(("attn_1", layer, "weight") for layer in ("q", "k", "v", "proj_out"))

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's embedding of the pooled text embedding and the size / crop ids ("text_time"), added to the time one
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
VAE_TOP_LEVEL = {
    **{f"{coder}.{name}": f"{coder}.{name}" for coder in ("encoder", "decoder") for name in ("conv_in", "conv_out")},
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

# open_clip's names for a CLIP text transformer's modules (diffusers' convert_open_clip_checkpoint reads them).
OPEN_CLIP_TOP_LEVEL = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
OPEN_CLIP_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# Parameters stored bare in open_clip: diffusers key -> (original name, stored transposed).
OPEN_CLIP_PARAMETERS = {
    "embeddings.position_embedding.weight": ("positional_embedding", False),
    "text_projection.weight": ("text_projection", True),
}
OPEN_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")

ModuleMap = dict[str, str]
"""diffusers module path -> original module path; a parameter's key is renamed by its longest listed prefix."""


# --------------------------------------------------------------------------------------------------- key tables


def _add_block(table: ModuleMap, diffusers: str, original: str, renames: Mapping[str, str] | None = None) -> None:
    """Map the block ``diffusers`` to ``original``, and its sub-modules named in ``renames`` to their new names."""
    table[diffusers] = original
    for old, new in (renames or {}).items():
        table[f"{diffusers}.{old}"] = f"{original}.{new}"


def unet_module_map(config: Mapping[str, Any]) -> ModuleMap:
    """The module table of a ``UNet2DConditionModel`` config (SD 1.x/2.x and SDXL: CrossAttn/plain down and up
    blocks, a cross-attention mid block; SDXL's ``add_embedding`` is the original ``label_emb``, and its deeper
    transformers keep their inner names, so ``transformer_layers_per_block`` needs no table).

    Original layout: ``input_blocks.0`` is ``conv_in``; level ``b`` has ``L = layers_per_block`` input blocks
    ``1 + b(L+1) + l`` of [resnet, attention] and, below the last level, a downsampler ``1 + b(L+1) + L``; the
    ``middle_block`` is [resnet, attention, resnet]; up level ``b`` has ``L+1`` output blocks ``b(L+1) + l`` of
    [resnet, attention, upsampler], the upsampler on the level's last block at index 1 or, after an attention, 2.

    Raises:
        ValueError: a U-Net this layout has no place for.
    """
    layers, down, up = config["layers_per_block"], config["down_block_types"], config["up_block_types"]
    if not isinstance(layers, int):
        raise UserError(f"single-file export needs one layers_per_block for every level; this U-Net has {layers}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UserError(
            f"single-file export needs a UNetMidBlock2DCrossAttn mid block; got {config['mid_block_type']}"
        )
    table = dict(UNET_TOP_LEVEL)
    for b in range(len(down)):
        for i in range(layers):
            index = 1 + b * (layers + 1) + i
            _add_block(table, f"down_blocks.{b}.resnets.{i}", f"input_blocks.{index}.0", UNET_RESNET_RENAMES)
            table[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{index}.1"
        if b < len(down) - 1:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * (layers + 1) + layers}.0.op"
    _add_block(table, "mid_block.resnets.0", "middle_block.0", UNET_RESNET_RENAMES)
    table["mid_block.attentions.0"] = "middle_block.1"
    _add_block(table, "mid_block.resnets.1", "middle_block.2", UNET_RESNET_RENAMES)
    for b, block_type in enumerate(up):
        for i in range(layers + 1):
            index = b * (layers + 1) + i
            _add_block(table, f"up_blocks.{b}.resnets.{i}", f"output_blocks.{index}.0", UNET_RESNET_RENAMES)
            table[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{index}.1"
        if b < len(up) - 1:
            slot = 2 if block_type.startswith("CrossAttn") else 1
            table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * (layers + 1) + layers}.{slot}.conv"
    return table


def vae_module_map(config: Mapping[str, Any]) -> ModuleMap:
    """The module table of an ``AutoencoderKL`` config. The original decoder numbers its levels from the full
    resolution up (``decoder.up.0`` is the last one run), diffusers in the order they run."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    table = dict(VAE_TOP_LEVEL)
    for b in range(levels):
        for i in range(layers):
            _add_block(
                table, f"encoder.down_blocks.{b}.resnets.{i}", f"encoder.down.{b}.block.{i}", VAE_RESNET_RENAMES
            )
        for i in range(layers + 1):
            original = f"decoder.up.{levels - 1 - b}.block.{i}"
            _add_block(table, f"decoder.up_blocks.{b}.resnets.{i}", original, VAE_RESNET_RENAMES)
        table[f"encoder.down_blocks.{b}.downsamplers.0"] = f"encoder.down.{b}.downsample"
        table[f"decoder.up_blocks.{b}.upsamplers.0"] = f"decoder.up.{levels - 1 - b}.upsample"
    for coder in ("encoder", "decoder"):
        for i in range(2):
            _add_block(table, f"{coder}.mid_block.resnets.{i}", f"{coder}.mid.block_{i + 1}", VAE_RESNET_RENAMES)
        _add_block(table, f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", VAE_ATTENTION_RENAMES)
    return table


def open_clip_module_map(config: Any) -> ModuleMap:
    """The module table of a ``CLIPTextConfig``'s transformer in open_clip's names (``encoder.layers.i`` ->
    ``transformer.resblocks.i``); the fused attention input and the bare parameters are :class:`OpenCLIPLayout`'s."""
    table = dict(OPEN_CLIP_TOP_LEVEL)
    for i in range(config.num_hidden_layers):
        _add_block(table, f"encoder.layers.{i}", f"transformer.resblocks.{i}", OPEN_CLIP_LAYER_RENAMES)
    return table


def rename_key(key: str, table: ModuleMap) -> str | None:
    """``key`` with its longest prefix found in ``table`` replaced (``None`` when no prefix of it is there)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        original = table.get(".".join(parts[:cut]))
        if original is not None:
            return ".".join([original, *parts[cut:]])
    return None


def _lora_message(what: str) -> str:
    return (
        f"the {what} has LoRA layers loaded; fuse them first (pipe.fuse_lora(); pipe.unload_lora_weights()), or "
        "export the LoRA alone with pipelines.kohya_lora.export_kohya_lora"
    )


def _renamed(state_dict: Mapping[str, torch.Tensor], table: ModuleMap, prefix: str, what: str) -> dict:
    """``state_dict`` under its original names with ``prefix``.

    Raises:
        ValueError: LoRA layers are loaded (their weights would be written under the wrong names), or some weights
            have no original name (naming the first few), so the file would be incomplete.
    """
    if any(".base_layer." in key or ".lora_" in key for key in state_dict):
        raise UserError(_lora_message(what))
    renamed, unmapped = {}, []
    for key, tensor in state_dict.items():
        original = rename_key(key, table)
        if original is None:
            unmapped.append(key)
        else:
            renamed[prefix + original] = tensor
    if unmapped:
        raise UserError(
            f"{len(unmapped)} {what} weights have no place in the original Stable Diffusion layout (e.g. "
            f"{unmapped[:3]}); single-file export supports SD 1.x/2.x- and SDXL-shaped models"
        )
    return renamed


# ------------------------------------------------------------------------------------------- component layouts


class ComponentLayout(Protocol):
    """How one diffusers component is written into the single file: under which prefix, in which names."""

    prefix: str

    def to_original(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s weights under their original names, each key starting with :attr:`prefix`."""
        ...


@dataclass(frozen=True)
class UNetLayout:
    """A ``UNet2DConditionModel`` in the original ``openaimodel.UNetModel`` names (:func:`unet_module_map`)."""

    prefix: str = UNET_PREFIX

    def to_original(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return _renamed(model.state_dict(), unet_module_map(model.config), self.prefix, "U-Net")


@dataclass(frozen=True)
class VAELayout:
    """An ``AutoencoderKL`` in the original names; the mid-block attention's linear weights ``(C, C)`` become the
    original 1x1 convolution weights ``(C, C, 1, 1)``."""

    prefix: str = VAE_PREFIX

    def to_original(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        renamed = _renamed(model.state_dict(), vae_module_map(model.config), self.prefix, "VAE")
        for key, tensor in renamed.items():
            if tuple(key.split(".")[-3:]) in VAE_CONV_ATTENTION and tensor.ndim == 2:
                renamed[key] = tensor[:, :, None, None]
        return renamed


def _text_model_state(model: torch.nn.Module, model_class: type, what: str) -> dict[str, torch.Tensor]:
    """``model``'s weights with the keys of its text transformer relative to it (transformers >= 5.6 flattened
    ``CLIPTextModel``, so its keys may lack the ``text_model.`` level ``CLIPTextModelWithProjection`` still has).

    Raises:
        UserError: ``model`` is not a ``model_class``.
    """
    if not isinstance(model, model_class):
        raise UserError(
            f"single-file export writes the {what} as a {model_class.__name__}; this pipeline's is a "
            f"{type(model).__name__}"
        )
    return {key.removeprefix("text_model."): tensor for key, tensor in model.state_dict().items()}


@dataclass(frozen=True)
class CLIPLayout:
    """A ``CLIPTextModel`` in transformers' own names under ``prefix + "text_model."`` (the original code wraps the
    Hugging Face model): SD 1.x's ``cond_stage_model.transformer.``, SDXL's
    ``conditioner.embedders.0.transformer.``."""

    prefix: str

    def to_original(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = _text_model_state(model, CLIPTextModel, "text encoder")
        if any(".base_layer." in key or ".lora_" in key for key in state):
            raise UserError(_lora_message("text encoder"))
        return {f"{self.prefix}text_model.{key}": tensor for key, tensor in state.items()}


@dataclass(frozen=True)
class OpenCLIPLayout:
    """A ``CLIPTextModelWithProjection`` in open_clip's names (SDXL's OpenCLIP ViT-bigG/14 text tower under
    ``conditioner.embedders.1.model.``): each layer's query, key and value projections fused into one
    ``attn.in_proj_weight`` / ``in_proj_bias`` (``nn.MultiheadAttention``'s ``[q; k; v]``), the position embedding
    as the bare parameter ``positional_embedding``, and ``text_projection`` a ``(width, projection_dim)`` matrix
    that multiplies from the right (the transpose of the ``nn.Linear`` weight).

    The inverse of diffusers' ``convert_open_clip_checkpoint``."""

    prefix: str

    def to_original(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = _text_model_state(model, CLIPTextModelWithProjection, "second text encoder")
        fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        rest: dict[str, torch.Tensor] = {}
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            projection = OPEN_CLIP_QKV.fullmatch(key)
            if projection is not None:
                layer, qkv, kind = projection.groups()
                fused.setdefault((layer, kind), {})[qkv] = tensor
            elif key in OPEN_CLIP_PARAMETERS:
                name, transposed = OPEN_CLIP_PARAMETERS[key]
                renamed[self.prefix + name] = tensor.T if transposed else tensor
            else:
                rest[key] = tensor
        renamed.update(_renamed(rest, open_clip_module_map(model.config), self.prefix, "second text encoder"))
        for (layer, kind), parts in fused.items():
            in_proj = torch.cat([parts["q"], parts["k"], parts["v"]])
            renamed[f"{self.prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = in_proj
        return renamed


@dataclass(frozen=True)
class SingleFileLayout:
    """One family's single-file layout: which pipeline components the file holds and how each is written.

    Attributes:
        name: the family, for messages ("Stable Diffusion 1.x", "SDXL base").
        components: pipeline attribute -> its layout, in the order they are written.
    """

    name: str
    components: Mapping[str, ComponentLayout]

    def to_original(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The whole checkpoint of ``pipe`` under the original names (the tensors are the models' own, on their
        devices; a fused or transposed one is a new tensor)."""
        state: dict[str, torch.Tensor] = {}
        for component, layout in self.components.items():
            state.update(layout.to_original(getattr(pipe, component)))
        return state


STABLE_DIFFUSION_LAYOUT = SingleFileLayout(
    name="Stable Diffusion 1.x",
    components={"unet": UNetLayout(), "vae": VAELayout(), "text_encoder": CLIPLayout(TEXT_ENCODER_PREFIX)},
)
SDXL_LAYOUT = SingleFileLayout(
    name="SDXL base",
    components={
        "unet": UNetLayout(),
        "vae": VAELayout(),
        "text_encoder": CLIPLayout(SDXL_TEXT_ENCODER_PREFIX),
        "text_encoder_2": OpenCLIPLayout(SDXL_TEXT_ENCODER_2_PREFIX),
    },
)
LAYOUTS: tuple[SingleFileLayout, ...] = (STABLE_DIFFUSION_LAYOUT, SDXL_LAYOUT)
"""The single-file layouts export writes; a pipeline's is the one whose components it has."""


def layout_of(pipe: Any) -> SingleFileLayout:
    """The layout of ``pipe``: the one whose components are exactly the pipeline's models that a layout writes
    (other components, such as a safety checker or an image encoder, are not in such files).

    Raises:
        UserError: no layout holds this set of components (e.g. an SDXL refiner, which has no first text encoder).
    """
    written = {component for layout in LAYOUTS for component in layout.components}
    present = {component for component in written if getattr(pipe, component, None) is not None}
    for layout in LAYOUTS:
        if present == set(layout.components):
            return layout
    known = "; ".join(f"{layout.name}: {', '.join(layout.components)}" for layout in LAYOUTS)
    has = ", ".join(sorted(present)) or "none of them"
    raise UserError(f"single-file export writes pipelines with these components ({known}); this one has {has}")


def pipeline_to_original(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole checkpoint of a pipeline (SD 1.x: ``unet``, ``vae``, ``text_encoder``; SDXL base: and
    ``text_encoder_2``) under the original names of its family's layout (:func:`layout_of`)."""
    return layout_of(pipe).to_original(pipe)


def stored(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` as a file stores it: detached, contiguous, on the CPU, cast to ``dtype`` if floating-point."""
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


# ------------------------------------------------------------------------------------------------------ files


def save_safetensors_atomically(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder renamed into place, so ``path`` is
    either the complete new file or what it was before (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_single_file(pipe: Any, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe`` (an SD 1.x pipeline with ``unet``, ``vae`` and a ``CLIPTextModel`` ``text_encoder``, or an SDXL
    base one with a ``CLIPTextModelWithProjection`` ``text_encoder_2`` too) to ``path`` as one ``.safetensors``
    file in its family's original key layout (:func:`layout_of`); floating-point weights cast to ``dtype`` when
    given. Returns ``path``; the file is complete or not written.

    The tokenizer and scheduler are not in such a file: loading it back takes a diffusers folder of the same
    architecture as ``config`` (``LatentDiffusionPipeline.from_single_file(path, config=FOLDER)``).

    Raises:
        UserError: ``path`` does not end in ``.safetensors``, or the pipeline has no such layout (the message says
            why).
    """
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise UserError(f"the single file must be a {SAFETENSORS_SUFFIX} file; got {path}")
    state = {key: stored(tensor, dtype) for key, tensor in pipeline_to_original(pipe).items()}
    return save_safetensors_atomically(state, path, metadata={"format": "pt"})


def check_checkpoint_format(path: str | Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint that is not ``.safetensors`` unless ``allow_pickle``: ``.ckpt``, ``.bin``, ``.pt`` and
    ``.pth`` files are pickles, and unpickling can run code.

    Raises:
        UserError: a pickle file without ``allow_pickle``.
    """
    if allow_pickle or str(path).lower().endswith(SAFETENSORS_SUFFIX):
        return
    raise UserError(
        f"{path} is not a {SAFETENSORS_SUFFIX} file: pickle checkpoints (.ckpt, .bin, .pt, .pth) can run code when "
        "loaded; convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the file"
    )
