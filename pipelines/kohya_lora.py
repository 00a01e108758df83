"""U-Net LoRA weights in kohya-ss's key layout, the one AUTOMATIC1111, ComfyUI and model sites read.

Each LoRA-adapted module ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` of the U-Net becomes three
entries named after its path with ``_`` for ``.``: ``lora_unet_<path>.lora_down.weight`` (peft's ``lora_A``, rank x
in), ``lora_unet_<path>.lora_up.weight`` (``lora_B``, out x rank) and ``lora_unet_<path>.alpha``, a scalar with
``alpha / rank`` the scale of the update ``W + (alpha / rank) * up @ down``. For SD 1.x kohya names the U-Net's
modules as diffusers does, so ``<path>`` is the diffusers module path; diffusers' ``load_lora_weights`` reads the
file back (``_convert_non_diffusers_lora_to_diffusers``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldm.errors import UserError
from pipelines.single_file import SAFETENSORS_SUFFIX, save_safetensors_atomically, stored

KOHYA_UNET_PREFIX = "lora_unet_"


def _adapter(unet: UNet2DConditionModel, adapter_name: str | None) -> str:
    """The adapter to export: ``adapter_name``, or the U-Net's only one.

    Raises:
        ValueError: no such adapter, or several and none named.
    """
    adapters = list(getattr(unet, "peft_config", {}) or {})
    if not adapters:
        raise UserError("the U-Net has no LoRA adapter; add one (training.models.add_lora) or load one first")
    if adapter_name is None:
        if len(adapters) > 1:
            raise UserError(f"the U-Net has several LoRA adapters {adapters}; pass adapter_name= one of them")
        return adapters[0]
    if adapter_name not in adapters:
        raise UserError(f"the U-Net has no LoRA adapter {adapter_name!r}; it has {adapters}")
    return adapter_name


def kohya_lora_state_dict(
    unet: UNet2DConditionModel, adapter_name: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The U-Net's peft LoRA ``adapter_name`` (default: its only adapter) as kohya ``lora_unet_*`` tensors, on the
    CPU, cast to ``dtype`` when given.

    Raises:
        ValueError: no such adapter, or a DoRA / LoRA-bias adapter (kohya's plain LoRA has no place for them).
    """
    from peft.tuners.lora import LoraLayer

    adapter = _adapter(unet, adapter_name)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter) or module.lora_bias.get(adapter):
            raise UserError(f"{name}: DoRA and LoRA-bias adapters have no kohya LoRA layout; export a plain LoRA")
        down, up = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        # peft scales by lora_alpha / r (or / sqrt(r) with rsLoRA); kohya by alpha / rank: store the same scale.
        alpha = torch.tensor(module.scaling[adapter] * module.r[adapter], dtype=torch.float32)
        key = KOHYA_UNET_PREFIX + name.replace(".", "_")
        for suffix, tensor in (("lora_down.weight", down), ("lora_up.weight", up), ("alpha", alpha)):
            state[f"{key}.{suffix}"] = stored(tensor, dtype)
    return state


def export_kohya_lora(
    unet: UNet2DConditionModel, path: str | Path, *, adapter_name: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write the U-Net's LoRA to ``path`` (``.safetensors``) in kohya's layout, atomically. Returns ``path``.

    Raises:
        ValueError: ``path`` is not ``.safetensors``, or the adapter cannot be written in this layout.
    """
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise UserError(f"the LoRA file must be a {SAFETENSORS_SUFFIX} file; got {path}")
    state = kohya_lora_state_dict(unet, adapter_name, dtype)
    return save_safetensors_atomically(state, path, metadata={"format": "pt", "ss_network_module": "networks.lora"})
