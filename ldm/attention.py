"""Choose how the U-Net's and VAE's attention layers compute attention: PyTorch SDPA, xFormers, or sliced.

All three give the same result (up to float rounding) as diffusers' explicit-softmax ``AttnProcessor``; they differ
in speed and peak memory:

* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` through diffusers' ``AttnProcessor2_0``.
  On CUDA, PyTorch dispatches it to flash / memory-efficient kernels; it works on every device.
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (an optional extra with CUDA kernels only).
* ``"sliced"``: diffusers' ``SlicedAttnProcessor``, which computes the attention matrix a few heads at a time to cap
  peak memory on small GPUs, at some cost in speed.

Only diffusers attention layers are switched (every sub-module with ``get_processor``/``set_processor``). Models
without them, such as the CLIP text encoder (whose attention transformers chooses via ``attn_implementation``), are
skipped. Processors that hold trained weights (IP-Adapter, Custom Diffusion) are converted with their weights kept
where diffusers has a variant for the backend, and refused otherwise, never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
    SlicedAttnAddedKVProcessor,
    SlicedAttnProcessor,
    XFormersAttnAddedKVProcessor,
    XFormersAttnProcessor,
)
from diffusers.utils import is_xformers_available

from ldm.errors import UserError

logger = logging.getLogger(__name__)

AttentionBackend = Literal["sdpa", "xformers", "sliced"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
SliceSize = int | Literal["auto", "max"] | None

XFORMERS_INSTALL_HINT = "pip install xformers (a wheel built for your torch version), or use attention='sdpa'"

# Which backend each known processor class implements, for ``attention_backend_of``.
_BACKEND_OF_PROCESSOR: dict[type, str] = {
    AttnProcessor2_0: "sdpa",
    AttnAddedKVProcessor2_0: "sdpa",
    FusedAttnProcessor2_0: "sdpa",
    IPAdapterAttnProcessor2_0: "sdpa",
    CustomDiffusionAttnProcessor2_0: "sdpa",
    XFormersAttnProcessor: "xformers",
    XFormersAttnAddedKVProcessor: "xformers",
    IPAdapterXFormersAttnProcessor: "xformers",
    CustomDiffusionXFormersAttnProcessor: "xformers",
    SlicedAttnProcessor: "sliced",
    SlicedAttnAddedKVProcessor: "sliced",
}
# Weight-free processors of plain (self/cross) attention: safe to replace by any backend's processor.
_PLAIN_PROCESSORS: tuple[type, ...] = (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    XFormersAttnProcessor,
    SlicedAttnProcessor,
)
# Processors with trained weights; diffusers' ``set_use_memory_efficient_attention_xformers`` converts them.
_WEIGHTED_PROCESSORS: tuple[type, ...] = (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
)


def set_attention_backend(
    models: torch.nn.Module | Iterable[torch.nn.Module],
    backend: str = "sdpa",
    *,
    slice_size: SliceSize = "auto",
) -> None:
    """Make every diffusers attention layer of ``models`` compute attention with ``backend``.

    Args:
        models: a model (``UNet2DConditionModel``, ``AutoencoderKL``, ...) or several, e.g. ``[pipe.unet, pipe.vae]``.
            Models without diffusers attention layers (a transformers text encoder) are skipped.
        backend: ``"sdpa"``, ``"xformers"`` or ``"sliced"`` (see the module docstring).
        slice_size: only for ``"sliced"``: the number of attention heads (times batch items) computed per slice.
            ``"auto"`` (or ``None``): half of each layer's heads, at least 1 (diffusers' choice, except that
            diffusers' gives 0, a crash, for the VAE's single-head layers); ``"max"``: 1, the least memory; an
            int >= 1, capped at each layer's head count so one value fits the U-Net and the VAE alike.

    Raises:
        ValueError: an unknown ``backend`` or a bad ``slice_size`` (the message lists the allowed values); xformers
            not installed, not usable on the model's device, or not matching this torch build (the message names
            the fix); a layer whose processor has no variant for ``backend``. Nothing is changed when it raises
            for a reason found before switching; a failed xformers switch restores the previous processors.
    """
    if backend not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}; choose one of {list(ATTENTION_BACKENDS)}")
    slice_size = _check_slice_size(slice_size)
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    with_attention = []
    for model in models:
        if _attention_layers(model):
            with_attention.append(model)
        else:
            logger.debug("%s has no diffusers attention layers; leaving it as it is", type(model).__name__)

    if backend == "xformers":
        _set_xformers(with_attention)
    else:
        # Plan every model before changing any, so that an unsupported layer leaves all models untouched.
        plans = [(model, _plan(model, backend, slice_size)) for model in with_attention]
        for model, plan in plans:
            _apply(model, plan)
    for model in with_attention:
        logger.info(
            "attention of %s: %s (%d layers)",
            type(model).__name__,
            attention_backend_of(model),
            len(_attention_layers(model)),
        )


def attention_backend_of(models: torch.nn.Module | Iterable[torch.nn.Module]) -> str:
    """The attention backend ``models`` currently use.

    Returns ``"sdpa"``, ``"xformers"`` or ``"sliced"`` when every attention layer uses that backend; the processor's
    class name (e.g. ``"AttnProcessor"``, the explicit-softmax reference) when all layers use one processor class
    that is none of them; ``"mixed"`` when the layers disagree; ``"none"`` when there are no diffusers attention
    layers (e.g. a text encoder).
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    names = {
        _BACKEND_OF_PROCESSOR.get(type(layer.get_processor()), type(layer.get_processor()).__name__)
        for model in models
        for layer in _attention_layers(model).values()
    }
    if not names:
        return "none"
    return names.pop() if len(names) == 1 else "mixed"


def available_attention_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device``: ``sdpa`` and ``sliced`` everywhere, ``xformers`` only on CUDA.

    ``xformers`` is listed when the package is installed and ``device`` is an available CUDA device; whether the
    installed wheel matches this torch build is only found out by :func:`set_attention_backend`.
    """
    device = torch.device(device)
    xformers_ok = is_xformers_available() and device.type == "cuda" and torch.cuda.is_available()
    return [name for name in ATTENTION_BACKENDS if name != "xformers" or xformers_ok]


def _check_slice_size(slice_size: Any) -> int | Literal["auto", "max"]:
    """``slice_size`` validated (``None`` meaning ``"auto"``); a ``ValueError`` lists the allowed values."""
    if slice_size is None:
        return "auto"
    if slice_size in ("auto", "max"):
        return slice_size
    if isinstance(slice_size, int) and not isinstance(slice_size, bool) and slice_size >= 1:
        return slice_size
    raise UserError(f"slice_size must be 'auto', 'max' or an int >= 1 (heads per slice); got {slice_size!r}")


def _attention_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The diffusers attention layers of ``model`` by module name (what ``model.attn_processors`` enumerates)."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "get_processor") and hasattr(module, "set_processor")
    }


def _plan(model: torch.nn.Module, backend: str, slice_size: int | Literal["auto", "max"]) -> dict[str, Any]:
    """The processor each attention layer of ``model`` gets for ``backend`` (``"sdpa"`` or ``"sliced"``).

    A layer mapped to ``None`` holds trained weights and is converted by diffusers in :func:`_apply`.
    """
    plan: dict[str, Any] = {}
    for name, layer in _attention_layers(model).items():
        processor = layer.get_processor()
        added_kv = getattr(layer, "added_kv_proj_dim", None) is not None
        if isinstance(processor, _WEIGHTED_PROCESSORS):
            if backend == "sliced":
                raise UserError(
                    f"attention layer {name!r} of {type(model).__name__} uses {type(processor).__name__}, which holds"
                    " trained weights and has no sliced variant; use attention='sdpa', or unload the adapter first"
                )
            plan[name] = None
        elif not isinstance(processor, _PLAIN_PROCESSORS + ADDED_KV_ATTENTION_PROCESSORS):
            raise UserError(
                f"attention layer {name!r} of {type(model).__name__} uses {type(processor).__name__}, which"
                f" set_attention_backend cannot replace with {backend!r} without changing what it computes; only"
                " U-Net/VAE-style attention (AttnProcessor, AttnProcessor2_0, XFormers*, Sliced*, IP-Adapter)"
                " is supported"
            )
        elif backend == "sdpa":
            plan[name] = AttnAddedKVProcessor2_0() if added_kv else AttnProcessor2_0()
        else:
            heads = getattr(layer, "sliceable_head_dim", layer.heads)
            if slice_size == "auto":
                size = max(1, heads // 2)
            elif slice_size == "max":
                size = 1
            else:
                size = min(slice_size, heads)
            plan[name] = SlicedAttnAddedKVProcessor(size) if added_kv else SlicedAttnProcessor(size)
    return plan


def _apply(model: torch.nn.Module, plan: dict[str, Any]) -> None:
    """Give each attention layer its planned processor, through ``model.set_attn_processor`` when it has one."""
    layers = _attention_layers(model)
    for name, processor in plan.items():
        if processor is None:
            # Converts IP-Adapter / Custom Diffusion processors to their SDPA variants, keeping their weights.
            layers[name].set_use_memory_efficient_attention_xformers(False)
            plan[name] = layers[name].get_processor()
    if hasattr(model, "set_attn_processor") and "" not in layers:
        model.set_attn_processor({f"{name}.processor": processor for name, processor in plan.items()})
    else:
        for name, processor in plan.items():
            layers[name].set_processor(processor)


def _execution_device_types(model: torch.nn.Module) -> set[str]:
    """The device types ``model`` runs on: its offload hooks' execution devices if any, else its tensors' devices."""
    hooked = {
        torch.device(module._hf_hook.execution_device).type
        for module in model.modules()
        if getattr(getattr(module, "_hf_hook", None), "execution_device", None) is not None
    }
    if hooked:
        return hooked
    return {tensor.device.type for tensor in (*model.parameters(), *model.buffers())}


def _set_xformers(models: list[torch.nn.Module]) -> None:
    """Switch ``models`` to xFormers, after checking it is installed and the models are on CUDA."""
    if not models:
        return
    if not is_xformers_available():
        raise UserError(
            f"attention='xformers' needs the xformers package, which is not installed: {XFORMERS_INSTALL_HINT}"
        )
    for model in models:
        off_cuda = sorted(_execution_device_types(model) - {"cuda"})
        if off_cuda:
            raise UserError(
                f"xformers has no {'/'.join(t.upper() for t in off_cuda)} kernels and {type(model).__name__} is on"
                f" {', '.join(off_cuda)}; move the model to CUDA (model.to('cuda')) or use 'sdpa'"
            )
    previous = [
        (model, {name: layer.get_processor() for name, layer in _attention_layers(model).items()}) for model in models
    ]
    try:
        for model in models:
            if hasattr(model, "enable_xformers_memory_efficient_attention"):
                model.enable_xformers_memory_efficient_attention()
            else:
                for layer in _attention_layers(model).values():
                    layer.set_use_memory_efficient_attention_xformers(True)
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as err:
        for model, processors in previous:
            _apply(model, processors)
        raise UserError(
            f"xformers is installed but could not run ({type(err).__name__}: {err}); it is likely built for another"
            f" torch/CUDA version than this torch {torch.__version__}: {XFORMERS_INSTALL_HINT}"
        ) from err
