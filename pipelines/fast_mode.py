"""Fast mode: channels_last, fused QKV projections and ``torch.compile`` of the U-Net and VAE decoder.

:class:`FastModeMixin` gives every pipeline of ours ``enable_fast_mode`` / ``disable_fast_mode``. Enabling it

1. stores the U-Net's and VAE's 4-D weights in ``channels_last`` (NHWC), the layout oneDNN and cuDNN convolutions
   are fastest in;
2. fuses each attention layer's query/key/value projections into one matmul (diffusers' ``fuse_projections`` and
   ``FusedAttnProcessor2_0``), except where that would change the images: a model whose attention layers use another
   backend than SDPA (xformers, sliced), hold trained weights (IP-Adapter, Custom Diffusion), added KV projections, or
   LoRA adapters (the fused projection would bypass them); the reason is logged and the rest of fast mode applies;
3. compiles the U-Net and the VAE decode (``post_quant_conv`` and the decoder, one graph) with ``torch.compile``,
   static shapes (``dynamic=False``: one graph per input shape, e.g. the guided batch and the unguided one) and
   ``fullgraph=True`` (one graph per call, no break; a model that cannot be one graph is compiled with breaks and a
   warning says so). On CUDA the default ``mode`` is ``"max-autotune"`` (autotuned kernels and CUDA graphs).

Compilation happens at the first call with each new input shape; its seconds are logged and summed in
:attr:`FastModeMixin.fast_mode_stats` (``compile_seconds``), apart from the per-image time. Inductor's on-disk caches
(FX graph cache, AOTAutograd cache) live in ``~/.cache/ldm-toolkit/inductor`` (``$XDG_CACHE_HOME`` is honoured)
unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so a second process reuses the compiled kernels.

``disable_fast_mode`` puts back the original processors, the unfused projections, the contiguous layout and the
uncompiled modules: the images are then bit-identical to those before enabling it. The state lives on the U-Net, so
the img2img / inpainting pipelines that share its components (``from_pipe``) see the same fast mode.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from ldm.errors import UserError

logger = logging.getLogger(__name__)

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes fast mode accepts."""
CUDA_DEFAULT_MODE = "max-autotune"
"""The mode on CUDA when none is given: autotuned matmul/conv kernels and CUDA graphs (the launch overhead of a
U-Net's few hundred kernels is gone); the first call per shape takes minutes."""
CPU_DEFAULT_MODE = "default"
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
MIN_RECOMPILE_LIMIT = 64
"""Each image size and batch is its own static graph (and ``_call_impl`` is one code object for every compiled
module), so dynamo's default limit of 8 graphs would send a long-running app back to eager mode."""
_FUSED_ATTRIBUTES = ("to_qkv", "to_kv", "to_added_qkv")
_STATE_ATTRIBUTE = "_ldm_fast_mode"


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ldm-toolkit/inductor`` (``~/.cache/ldm-toolkit/inductor`` when it is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ldm-toolkit" / "inductor"


def use_persistent_compile_cache() -> Path:
    """Turn on inductor's FX graph cache and the AOTAutograd cache, kept in :func:`default_compile_cache_dir`
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set to another folder than inductor's own default; returns the folder.
    """
    # inductor writes its own default (a /tmp folder, gone at reboot) into the variable when it first needs it: that
    # is not a choice of the user's.
    if os.environ.get(CACHE_DIR_ENV) in (None, "", os.path.abspath(default_cache_dir())):
        os.environ[CACHE_DIR_ENV] = str(default_compile_cache_dir())
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return Path(os.environ[CACHE_DIR_ENV])


@dataclass
class FastModeStats:
    """What fast mode did and what compiling cost, for logs and benchmarks.

    ``compile_seconds``: wall seconds of the calls that compiled a new graph (the first call per module and input
    shape: compilation plus that one run), summed over the U-Net and the VAE decode; the per-image time of later
    calls does not include it. ``compiles``: how many such calls. ``fused``: the models whose QKV projections were
    fused; ``skipped``: model -> why its projections were not fused; ``graph_breaks``: the modules that could not be
    compiled as one graph (compiled with breaks instead).
    """

    mode: str | None = None
    compiled: tuple[str, ...] = ()
    fused: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    compile_seconds: float = 0.0
    compiles: int = 0
    graph_breaks: list[str] = field(default_factory=list)


@dataclass
class _FusedModel:
    """A model whose QKV projections were fused, and the processors to put back."""

    model: torch.nn.Module
    processors: dict[str, Any]


@dataclass
class _FastModeState:
    """What ``enable_fast_mode`` changed, so ``disable_fast_mode`` can undo exactly that."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    fused: list[_FusedModel]
    compiled: bool
    stats: FastModeStats


def _compiles_done() -> int:
    """How many frames dynamo has compiled in this process (grows when a call compiles a new graph)."""
    return len(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", ()))


def _uses_cuda_graphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def _clone_outputs(output: Any) -> Any:
    """A copy of every tensor of ``output``: CUDA-graph outputs are overwritten by the next replay, and schedulers
    keep past model outputs."""
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)


def _compiled_call(
    function: Callable[..., Any], name: str, stats: FastModeStats, mode: str, fullgraph: bool, cuda_graphs: bool
) -> Callable[..., Any]:
    """``torch.compile(function)`` timing the calls that compile; a graph break under ``fullgraph`` is logged and
    the function is compiled again without ``fullgraph`` (so a model with breaks is slower, never wrong or failing)."""
    options: dict[str, Any] = {"mode": None if mode == "default" else mode, "dynamic": False}
    compiled = torch.compile(function, fullgraph=fullgraph, **options)

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        before, start = _compiles_done(), time.perf_counter()
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            output = compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as err:
            if not fullgraph:
                raise
            logger.warning(
                "fast mode: %s cannot be compiled as one graph (%s); compiling it with graph breaks (slower)",
                name,
                str(err).splitlines()[0],
            )
            stats.graph_breaks.append(name)
            compiled = torch.compile(function, fullgraph=False, **options)
            output = compiled(*args, **kwargs)
        if _compiles_done() != before:
            seconds = time.perf_counter() - start
            stats.compile_seconds += seconds
            stats.compiles += 1
            logger.info(
                "fast mode: compiled %s for new input shapes in %.1f s (once per shape; cached in %s)",
                name,
                seconds,
                os.environ.get(CACHE_DIR_ENV, "inductor's default folder"),
            )
        return _clone_outputs(output) if cuda_graphs else output

    return call


def _fusion_blocker(model: torch.nn.Module) -> str | None:
    """Why fusing ``model``'s QKV projections could change its outputs, or None when it is safe."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith("peft.") and hasattr(module, "lora_A"):
            return f"LoRA adapters are loaded ({name}); the fused projection would bypass them"
    processors = {type(processor) for processor in model.attn_processors.values()}
    if not processors:
        return "it has no attention layers"
    others = sorted(cls.__name__ for cls in processors - {AttnProcessor2_0})
    if others:
        return (
            f"its attention uses {', '.join(others)} (fusing would replace it by SDPA); fusing needs every layer on "
            "AttnProcessor2_0 (attention='sdpa', no IP-Adapter)"
        )
    return None


def _fuse(model: torch.nn.Module, name: str, stats: FastModeStats) -> _FusedModel | None:
    """Fuse ``model``'s QKV projections when :func:`_fusion_blocker` allows; the record to undo it, or None."""
    blocker = _fusion_blocker(model)
    if blocker is not None:
        stats.skipped[name] = blocker
        logger.info("fast mode: QKV projections of the %s not fused: %s", name, blocker)
        return None
    processors = model.attn_processors
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)
    model.set_attn_processor(FusedAttnProcessor2_0())
    stats.fused += (name,)
    return _FusedModel(model, processors)


def _unfuse(fused: _FusedModel) -> None:
    """Put back the processors of layers still on the fused processor (one replaced since, e.g. by an IP-Adapter,
    is kept) and delete the fused projections."""
    current = fused.model.attn_processors
    restored = {
        name: fused.processors[name] if isinstance(processor, FusedAttnProcessor2_0) else processor
        for name, processor in current.items()
    }
    fused.model.set_attn_processor(restored)
    for module in fused.model.modules():
        if isinstance(module, Attention):
            for attribute in _FUSED_ATTRIBUTES:
                if hasattr(module, attribute):
                    delattr(module, attribute)
            module.fused_projections = False


class FastModeMixin:
    """``enable_fast_mode`` / ``disable_fast_mode`` for every pipeline of ours (see the module docstring). Reads the
    pipeline's ``unet`` and ``vae``."""

    @property
    def fast_mode_enabled(self) -> bool:
        """Whether fast mode is on (for this pipeline and every pipeline sharing its U-Net)."""
        return self._fast_mode_state() is not None

    @property
    def fast_mode_stats(self) -> FastModeStats | None:
        """What fast mode did and its compile seconds so far (:class:`FastModeStats`); None when it is off."""
        state = self._fast_mode_state()
        return None if state is None else state.stats

    def _fast_mode_state(self) -> _FastModeState | None:
        return getattr(self.unet, _STATE_ATTRIBUTE, None)

    def enable_fast_mode(self, compile: bool = True, mode: str | None = None, fullgraph: bool = True) -> None:
        """channels_last, fused QKV projections and (``compile``) ``torch.compile`` of the U-Net and VAE decode.

        Args:
            compile: compile the U-Net and VAE decode (the first call per input shape compiles; see
                :attr:`fast_mode_stats`). False: only the layout and the fused projections.
            mode: a ``torch.compile`` mode of :data:`COMPILE_MODES`; None: ``"max-autotune"`` on CUDA (CUDA graphs
                included), ``"default"`` elsewhere.
            fullgraph: compile each call as one graph (a model with a graph break, e.g. from a third-party patch,
                is compiled with breaks and a warning instead).

        Images stay within float rounding of the default mode's. Change LoRAs, adapters or weights with fast mode
        off (``disable_fast_mode``, change, ``enable_fast_mode``). Calling it again first undoes the previous call.

        Raises:
            UserError: an unknown ``mode``.
        """
        if mode is not None and mode not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.fast_mode_enabled:
            self.disable_fast_mode()
        unet, vae = self.unet, getattr(self, "vae", None)
        on_cuda = unet.device.type == "cuda"
        mode = mode or (CUDA_DEFAULT_MODE if on_cuda else CPU_DEFAULT_MODE)
        stats = FastModeStats(mode=mode if compile else None)
        models = {"U-Net": unet, **({"VAE": vae} if vae is not None else {})}

        for model in models.values():
            model.to(memory_format=torch.channels_last)
        fused = [record for name, model in models.items() if (record := _fuse(model, name, stats)) is not None]

        if compile:
            cache = use_persistent_compile_cache()
            if torch._dynamo.config.recompile_limit < MIN_RECOMPILE_LIMIT:
                torch._dynamo.config.recompile_limit = MIN_RECOMPILE_LIMIT
            cuda_graphs = on_cuda and _uses_cuda_graphs(mode)
            unet._compiled_call_impl = _compiled_call(unet._call_impl, "U-Net", stats, mode, fullgraph, cuda_graphs)
            compiled = ["U-Net"]
            if vae is not None:
                # post_quant_conv and the decoder in one graph; decode()'s offload hooks and slicing stay outside.
                vae._decode = _compiled_call(vae._decode, "VAE decoder", stats, mode, fullgraph, cuda_graphs)
                compiled.append("VAE decoder")
            stats.compiled = tuple(compiled)
            logger.info(
                "fast mode: compiling %s (mode %s, fullgraph=%s, static shapes) at the first call of each shape; "
                "compiled kernels are cached in %s",
                " and ".join(compiled),
                mode,
                fullgraph,
                cache,
            )
        setattr(unet, _STATE_ATTRIBUTE, _FastModeState(unet, vae, fused, compile, stats))

    def disable_fast_mode(self) -> None:
        """Undo :meth:`enable_fast_mode`: uncompiled modules, the original attention processors and projections,
        contiguous weights. The images are then bit-identical to those before fast mode. No-op when it is off."""
        state = self._fast_mode_state()
        if state is None:
            return
        if state.compiled:
            state.unet._compiled_call_impl = None
            if state.vae is not None:
                state.vae.__dict__.pop("_decode", None)
        for record in state.fused:
            _unfuse(record)
        for model in (state.unet, state.vae):
            if model is not None:
                model.to(memory_format=torch.contiguous_format)
        delattr(state.unet, _STATE_ATTRIBUTE)
