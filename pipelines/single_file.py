"""Single-file checkpoints in the original Stable Diffusion 1.x (CompVis ``ldm``) key layout.

A diffusers folder holds each component apart, under diffusers' module names; AUTOMATIC1111, ComfyUI and most model
sites trade *one* file with the U-Net under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the
CLIP text encoder under ``cond_stage_model.transformer.``, in the module names of the original code. This module writes
that file (:func:`export_single_file`): the inverse of diffusers' ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint`` and ``convert_ldm_clip_checkpoint`` (``diffusers/loaders/single_file_utils.py``), kept
as data: a table from diffusers module paths to original ones, built for any number of levels and
``layers_per_block``. Reading a single file back is diffusers' ``FromSingleFileMixin``
(``LatentDiffusionPipeline.from_single_file``); :func:`check_checkpoint_format` is the pickle gate in front of it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import CLIPTextModel

from ldm.errors import UserError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
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
VAE_CONV_ATTENTION = ("q", "k", "v", "proj_out")

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_TOP_LEVEL = {
    **{f"{coder}.{name}": f"{coder}.{name}" for coder in ("encoder", "decoder") for name in ("conv_in", "conv_out")},
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

ModuleMap = dict[str, str]
"""diffusers module path -> original module path; a parameter's key is renamed by its longest listed prefix."""


# --------------------------------------------------------------------------------------------------- key tables


def _add_block(table: ModuleMap, diffusers: str, original: str, renames: Mapping[str, str] | None = None) -> None:
    """Map the block ``diffusers`` to ``original``, and its sub-modules named in ``renames`` to their new names."""
    table[diffusers] = original
    for old, new in (renames or {}).items():
        table[f"{diffusers}.{old}"] = f"{original}.{new}"


def unet_module_map(config: Mapping[str, Any]) -> ModuleMap:
    """The module table of a ``UNet2DConditionModel`` config (SD 1.x/2.x layout: CrossAttn/plain down and up blocks,
    a cross-attention mid block).

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


def rename_key(key: str, table: ModuleMap) -> str | None:
    """``key`` with its longest prefix found in ``table`` replaced (``None`` when no prefix of it is there)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        original = table.get(".".join(parts[:cut]))
        if original is not None:
            return ".".join([original, *parts[cut:]])
    return None


def _renamed(state_dict: Mapping[str, torch.Tensor], table: ModuleMap, prefix: str, what: str) -> dict:
    """``state_dict`` under its original names with ``prefix``.

    Raises:
        ValueError: LoRA layers are loaded (their weights would be written under the wrong names), or some weights
            have no original name (naming the first few), so the file would be incomplete.
    """
    if any(".base_layer." in key or ".lora_" in key for key in state_dict):
        raise UserError(
            f"the {what} has LoRA layers loaded; fuse them first (pipe.fuse_lora(); pipe.unload_lora_weights()), or "
            "export the LoRA alone with pipelines.kohya_lora.export_kohya_lora"
        )
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
            f"{unmapped[:3]}); single-file export supports SD 1.x/2.x-shaped models"
        )
    return renamed


# ------------------------------------------------------------------------------------------------ state dicts


def unet_to_original(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel``'s weights under ``model.diffusion_model.`` in the original names."""
    return _renamed(unet.state_dict(), unet_module_map(unet.config), UNET_PREFIX, "U-Net")


def vae_to_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL``'s weights under ``first_stage_model.``; the mid-block attention's linear weights
    ``(C, C)`` become the original 1x1 convolution weights ``(C, C, 1, 1)``."""
    renamed = _renamed(vae.state_dict(), vae_module_map(vae.config), VAE_PREFIX, "VAE")
    for key, tensor in renamed.items():
        parts = key.split(".")
        if parts[-1] == "weight" and parts[-2] in VAE_CONV_ATTENTION and parts[-3] == "attn_1" and tensor.ndim == 2:
            renamed[key] = tensor[:, :, None, None]
    return renamed


def text_encoder_to_original(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel``'s weights under ``cond_stage_model.transformer.text_model.`` (transformers >= 5.6
    flattened the model, so its own keys may lack the ``text_model.`` level the original layout has).

    Raises:
        ValueError: another text encoder (an open_clip tower is SD 2's layout, not this one).
    """
    if not isinstance(text_encoder, CLIPTextModel):
        raise UserError(
            f"single-file export writes SD 1.x's CLIPTextModel layout; this pipeline's text encoder is a "
            f"{type(text_encoder).__name__}"
        )
    inner = "" if hasattr(text_encoder, "text_model") else "text_model."
    return {TEXT_ENCODER_PREFIX + inner + key: tensor for key, tensor in text_encoder.state_dict().items()}


def pipeline_to_original(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole checkpoint of a pipeline with ``unet``, ``vae`` and ``text_encoder``, under the original names (the
    tensors are the models' own, on their devices)."""
    return {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae), **text_encoder_to_original(pipe.text_encoder)}


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
    """Write ``pipe`` (a ``LatentDiffusionPipeline``, or any pipeline with ``unet``, ``vae`` and a ``CLIPTextModel``
    ``text_encoder``) to ``path`` as one ``.safetensors`` file in the original SD 1.x key layout; floating-point
    weights cast to ``dtype`` when given. Returns ``path``.

    The tokenizer and scheduler are not in such a file: loading it back takes a diffusers folder of the same
    architecture as ``config`` (``LatentDiffusionPipeline.from_single_file(path, config=FOLDER)``).

    Raises:
        UserError: ``path`` does not end in ``.safetensors``.
        ValueError: the pipeline has no such layout.
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
