"""Memory pre-flight of a text-to-image run: its peak memory, estimated before the first step, term by term.

:func:`estimate_memory` builds the run's models as fake tensors (``FakeTensorMode``: shapes and dtypes, no data) on
the run's device type, settles what is trained with :func:`training.methods.build_method` itself (full, LoRA, text
encoders, textual inversion, EMA, checkpointing, mixed precision), and runs one training forward of a fake batch. It
computes nothing and allocates nothing but Python objects, so it takes seconds even for SDXL. The terms
(:class:`MemoryEstimate`):

- parameters: trained (float32 master weights) and frozen (each in its dtype: the mixed-precision copy of the VAE
  and of reloadable text encoders, a LoRA run's float32 base U-Net), counted from the fake modules;
- gradients: one per trained parameter, in its dtype;
- optimizer state: per optimizer (:func:`optimizer_state_bytes`): AdamW two moments, 8-bit AdamW two uint8 moments
  with block-wise scales, Adafactor factored second moments, Prodigy four copies, Lion one;
- EMA: diffusers' ``EMAModel`` shadow copy of the trained parameters;
- activations: the bytes of the distinct storages autograd saves for backward in the training forward (caught by
  ``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, autocast's half-precision weight copies
  included), plus, with gradient checkpointing, the largest checkpointed block's own saved tensors, which backward
  recomputes while the rest is held (``recompute``);
- encoders: the peak of live tensors of the no-gradient forwards before it (the VAE encoding the images, frozen text
  encoders), when latents are not cached.

Peak = parameters + gradients + optimizer state + EMA + max(activations + recompute, encoders): a conservative sum
(gradients are freed between steps and fill up while backward frees activations).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ldm.errors import UserError
from training.models import TrainingModels

if TYPE_CHECKING:
    from training.train_text_to_image import TrainConfig

logger = logging.getLogger("training")

RUN_STATS_FILE = "run_stats.json"
"""The file of the estimate and the measured peak, in the run's output folder beside ``metrics.json``."""

HEADROOM = 0.95
"""The share of the device's free memory a run may plan to use: the rest is for the CUDA caching allocator's
fragmentation and the libraries' workspaces, which the estimate does not count."""

BNB_BLOCK = 256
"""bitsandbytes' block size of 8-bit optimizer states (one float32 scale per block and moment)."""
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps the states of tensors smaller than this in float32."""


# --------------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak memory of a run's training step, by term, in bytes (see the module docstring for each term)."""

    device: str
    parameters_trained: int
    parameters_frozen: int
    gradients: int
    optimizer_state: int
    ema: int
    activations: int
    recompute: int
    encoders: int

    @property
    def persistent(self) -> int:
        """What stays allocated through a step: parameters, gradients, optimizer state and EMA."""
        return self.parameters_trained + self.parameters_frozen + self.gradients + self.optimizer_state + self.ema

    @property
    def total(self) -> int:
        """The estimated peak: the persistent terms plus the larger of the training forward's activations (with
        the recomputed block) and the no-gradient encoder forwards."""
        return self.persistent + max(self.activations + self.recompute, self.encoders)

    def as_dict(self) -> dict[str, Any]:
        """The terms and the total, for ``run_stats.json``."""
        return dataclasses.asdict(self) | {"total": self.total}

    def table(self) -> str:
        """A small breakdown table (MiB) for the run log."""
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "device"]
        rows.append(("total (peak)", self.total))
        width = max(len(name) for name, _ in rows)
        lines = [f"memory estimate on {self.device}:"]
        lines += [f"  {name:<{width}}  {value / 2**20:>10.1f} MiB" for name, value in rows]
        return "\n".join(lines)


def estimate_memory(
    config: TrainConfig, models: TrainingModels, device: torch.device | str, *, shards: int = 1
) -> MemoryEstimate:
    """The peak memory of one training step of ``config`` on ``device`` (per process), without computing it.

    ``models`` gives the architectures (configs, tokenizers, sources) and is not changed: the run's models are
    rebuilt as fake tensors, :func:`training.methods.build_method` settles on them what ``config`` trains, and one
    forward of a fake batch of ``config.train_batch_size`` images at ``config.resolution`` runs under the run's
    autocast. A pure function of its arguments (re-run for other settings by :func:`fitting_settings`).
    ``shards``: the processes a fully sharded run (FSDP) splits the trained parameters, their gradients and
    optimizer state across (each process holds its share; activations are per process anyway).
    """
    from training.methods import build_method

    device = torch.device(device)
    with _quiet_logs():
        # What is trained is settled on meta tensors (fake tensors cannot be moved or cast by nn.Module.to), then
        # every parameter becomes a fake tensor on the run's device type, where autocast and the attention kernel
        # choice are the run's.
        meta = _meta_models(models, copy_tokenizers=config.placeholder_token is not None)
        method = build_method(config, meta, "meta")
        modules = [meta.unet, meta.vae] + [model for _, model, _ in meta.text_encoders()]
        trained = method.params
        trained_ids = {id(p) for p in trained}
        frozen = [t for m in modules for t in [*m.parameters(), *m.buffers()] if id(t) not in trained_ids]
        ema = method.ema.shadow_params if method.ema is not None else []
        # the modules a training step runs (not the VAE's decoder)
        running = [meta.unet, meta.vae.encoder, meta.vae.quant_conv, *modules[2:]]
        running = [module for module in running if module is not None]
        with FakeTensorMode(allow_non_fake_inputs=True):
            _to_fake(running, device)
            method.conditioning.device = device
            activations, recompute, encoders = _traced_forward_bytes(config, method, meta, device, running)
    optimizer_state = optimizer_state_bytes(_optimizer(config), trained, _optimizer_args(config))
    return MemoryEstimate(
        device=str(device),
        parameters_trained=-(-_bytes(trained) // shards),
        parameters_frozen=_bytes(frozen),
        gradients=-(-_bytes(trained) // shards),
        optimizer_state=-(-optimizer_state // shards),
        ema=_bytes(ema),
        activations=activations,
        recompute=recompute,
        encoders=encoders,
    )


def optimizer_state_bytes(name: str, params: Iterable[Tensor], optimizer_args: Mapping[str, Any] | None = None) -> int:
    """The bytes of optimizer ``name``'s state for ``params`` (each state in the parameter's dtype unless said):

    - ``adamw``: ``exp_avg`` and ``exp_avg_sq``, 2 per element;
    - ``adamw8bit`` (bitsandbytes): two uint8 moments and a float32 scale per :data:`BNB_BLOCK` elements each, for
      tensors of at least :data:`BNB_MIN_8BIT_SIZE` elements; smaller ones as ``adamw``;
    - ``adafactor`` (transformers): a factored second moment (``shape[:-1]`` and ``shape[:-2] + shape[-1:]``) of
      tensors of 2 or more dimensions, a full one of vectors; a full first moment with ``beta1``;
    - ``prodigy``: ``exp_avg`` (with ``betas[0] > 0``), ``exp_avg_sq``, ``s`` and ``p0``, 4 per element;
    - ``lion``: ``exp_avg``, 1 per element.

    Per-tensor scalars (step counts) are left out.
    """
    args = dict(optimizer_args or {})
    total = 0
    for p in params:
        n, size = p.numel(), p.element_size()
        if name == "adamw":
            total += 2 * n * size
        elif name == "adamw8bit":
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 2 * n * 4
        elif name == "adafactor":
            if p.dim() >= 2:
                shape = tuple(p.shape)
                total += (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])) * size
            else:
                total += n * size
            if args.get("beta1") is not None:
                total += n * size
        elif name == "prodigy":
            moments = 2 if tuple(args.get("betas", (0.9, 0.999)))[0] > 0 else 1
            total += (moments + 2) * n * size
        elif name == "lion":
            total += n * size
        else:
            raise ValueError(f"no memory model of optimizer {name!r}: adamw, adamw8bit, adafactor, prodigy or lion")
    return total


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer(config: TrainConfig) -> str:
    from training.command import optimizer_name

    return optimizer_name(config)


def _optimizer_args(config: TrainConfig) -> dict[str, Any]:
    from training.command import parse_optimizer_args

    return parse_optimizer_args(config.optimizer_args)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The fake build's messages (``build_method``'s, diffusers') are the real run's to say, not the estimate's."""
    loggers = [logging.getLogger(name) for name in ("training", "diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _meta_models(models: TrainingModels, *, copy_tokenizers: bool) -> TrainingModels:
    """``models``' architectures on the meta device (shapes and dtypes, no data), with their tokenizers, or copies
    of them with ``copy_tokenizers`` (textual inversion adds tokens to them)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(models.unet.config)
        vae = AutoencoderKL.from_config(models.vae.config)
        encoders = {name: type(model)(copy.deepcopy(model.config)) for name, model, _ in models.text_encoders()}
    tokenizers = {"tokenizer": models.tokenizer, "tokenizer_2": models.tokenizer_2}
    if copy_tokenizers:  # a copy of a CLIP tokenizer is some 30 MB the process keeps: only when needed
        tokenizers = {name: copy.deepcopy(tokenizer) for name, tokenizer in tokenizers.items()}
    return dataclasses.replace(
        models,
        unet=unet,
        vae=vae,
        text_encoder=encoders["text_encoder"],
        text_encoder_2=encoders.get("text_encoder_2"),
        **tokenizers,
    )


def _to_fake(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Replace the parameters and buffers of ``modules`` (meta tensors) by fake tensors of the same shapes, dtypes
    and ``requires_grad`` on ``device``, inside the caller's ``FakeTensorMode``."""
    fakes: dict[int, Tensor] = {}
    for module in modules:
        for sub in module.modules():
            for tensors in (sub._parameters, sub._buffers):
                for name, tensor in tensors.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in fakes:
                        fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
                        if isinstance(tensor, torch.nn.Parameter):
                            fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        fakes[id(tensor)] = fake
                    tensors[name] = fakes[id(tensor)]


def _latents(config: TrainConfig, vae: AutoencoderKL, device: torch.device, generator: torch.Generator) -> Tensor:
    """A batch's float32 latents: from the cached posterior, or by encoding fake images with the frozen VAE as the
    loop does (:func:`training.train_text_to_image.batch_latents`)."""
    from training.train_text_to_image import batch_latents

    b, side = config.train_batch_size, config.resolution
    if config.cache:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return torch.empty(b, vae.config.latent_channels, side // factor, side // factor, device=device)
    return batch_latents({"pixel_values": torch.empty(b, 3, side, side, device=device)}, vae, generator, vae.dtype)


def _text_forward(method: Any, batch_size: int, device: torch.device, *, trained: bool) -> list[Any]:
    """The outputs of the run's text encoders that are trained (``trained``) or frozen, on 77-token captions; the
    trained ones record their graph. (The project's caption encoding branches on the token values, which fake
    tensors do not have; its tensors are the encoders' outputs, whose saved activations these are.)"""
    outputs = []
    for encoder in method.conditioning.encoders:
        if (encoder.trained is not None) != trained:
            continue
        ids = torch.zeros(batch_size, encoder.tokenizer.model_max_length, dtype=torch.long, device=device)
        with torch.set_grad_enabled(trained):
            outputs.append(encoder.runner(ids, output_hidden_states=True))
    return outputs


class _SavedTensors:
    """The distinct storages autograd saves for backward (``saved_tensors_hooks``), parameters left out; with
    gradient checkpointing, each checkpointed block's inputs are kept and its own saved tensors counted apart."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.saved: dict[int, int] = {}
        self.keep: list[Tensor] = []  # held so that no storage address is reused while counting
        self.recompute = 0

    def record(self, tensor: Tensor, into: dict[int, int]) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude:
            into[storage._cdata] = storage.nbytes()
            self.keep.append(tensor)

    @contextlib.contextmanager
    def hooks(self, into: dict[int, int]) -> Iterator[None]:
        def pack(tensor: Tensor) -> Tensor:
            self.record(tensor, into)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield

    def checkpoint(self, module: torch.nn.Module, *args: Any) -> Any:
        """What ``torch.utils.checkpoint`` (non-reentrant) keeps: the block's tensor inputs; its own saved tensors
        live again only while backward recomputes it, one block at a time."""
        for arg in tree_leaves(args):
            if isinstance(arg, Tensor):
                self.record(arg, self.saved)
        inner: dict[int, int] = {}
        with self.hooks(inner):
            out = module(*args)
        self.recompute = max(self.recompute, sum(size for key, size in inner.items() if key not in self.saved))
        return out


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages created under it that are alive, and their peak (storage finalizers)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            self.live.add(key)
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes


def _unet_conditioning(
    unet_config: Any, outputs: list[Any], batch_size: int, device: torch.device
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """The U-Net's conditioning of the shapes the family's encoding gives: the encoders' hidden states side by side
    (fake ones of ``cross_attention_dim`` when the encoders' outputs come from the cache), and for a U-Net with
    ``text_time`` embeddings (SDXL) the pooled projection (the trained encoder's where there is one) and size ids."""
    states = [out.last_hidden_state for out in outputs]
    width = unet_config.cross_attention_dim
    if sum(state.shape[-1] for state in states) == width:
        hidden = torch.cat(states, dim=-1)
    else:
        hidden = torch.empty(batch_size, 77, width, device=device)
    if unet_config.addition_embed_type != "text_time":
        return hidden, None
    pooled_width = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    pooled = [out.text_embeds for out in outputs if getattr(out, "text_embeds", None) is not None]
    text_embeds = pooled[0] if pooled else torch.empty(batch_size, pooled_width, device=device)
    return hidden, {"text_embeds": text_embeds, "time_ids": torch.empty(batch_size, 6, device=device)}


def _traced_forward_bytes(
    config: TrainConfig, method: Any, models: TrainingModels, device: torch.device, modules: list[torch.nn.Module]
) -> tuple[int, int, int]:
    """:func:`_forward_bytes`, which fake tensors cannot trace through a branch on a tensor's value (peft's LoHa and
    LoKr draw their module dropout in training mode): then again with the modules in evaluation mode (dropout's
    masks left out), and failing that, with a warning, no activations (the estimate is then a lower bound)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    try:
        return _forward_bytes(config, method, models, device, modules)
    except DataDependentOutputException:
        pass
    for module in modules:
        module.eval()
    try:
        return _forward_bytes(config, method, models, device, modules)
    except DataDependentOutputException as err:
        logger.warning("the memory estimate could not trace the training forward (%s): activations left out", err)
        return 0, 0, 0


def _forward_bytes(
    config: TrainConfig,
    method: Any,
    models: TrainingModels,
    device: torch.device,
    modules: list[torch.nn.Module],
) -> tuple[int, int, int]:
    """``(activations, recompute, encoders)`` of one training forward of the fake ``method`` (see the module
    docstring), under the run's autocast: the no-gradient encoders first, then the trained text encoders and the
    U-Net's loss (:func:`training.objective.diffusion_training_loss`)."""
    from training.methods import WEIGHT_DTYPES
    from training.objective import ObjectiveConfig, diffusion_training_loss

    parameters = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
    saved = _SavedTensors(parameters)
    if config.gradient_checkpointing:
        method.unet.enable_gradient_checkpointing(saved.checkpoint)
    generator = torch.Generator().manual_seed(0)
    dtype = WEIGHT_DTYPES.get(config.mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    b = config.train_batch_size

    frozen, encoders = [], 0
    if config.cache:  # the latents and the frozen encoders' outputs are read from the cache
        latents = _latents(config, method.vae, device, generator)
    else:
        with _LiveBytes() as live, torch.no_grad():
            latents = _latents(config, method.vae, device, generator)
            frozen = _text_forward(method, b, device, trained=False)
        encoders = live.peak
    with saved.hooks(saved.saved), autocast:
        outputs = _text_forward(method, b, device, trained=True)
        hidden, added = _unet_conditioning(method.unet.config, outputs + frozen, b, device)
        objective = ObjectiveConfig(prediction_type=models.noise_scheduler.config.prediction_type)
        diffusion_training_loss(
            method.unet_runner,
            latents,
            hidden.to(method.weight_dtype),
            models.noise_scheduler.alphas_cumprod,
            objective,
            generator,
            added_cond_kwargs=added,
        )
    return sum(saved.saved.values()), saved.recompute, encoders


# --------------------------------------------------------------------------------------------------------------------
# The check: refuse a run that will not fit, naming settings that would


def fitting_settings(
    config: TrainConfig, models: TrainingModels, device: torch.device | str, capacity: int, *, shards: int = 1
) -> list[tuple[str, MemoryEstimate]]:
    """Settings that bring the estimate of ``config`` within ``capacity`` bytes, each as ``(flags, estimate)``: each
    of gradient checkpointing, 8-bit AdamW and LoRA (rank 16, for a full fine-tune) that fits alone, and the largest
    smaller batch whose gradient accumulation keeps the effective batch; when none fits alone, these changes
    together (with a smaller batch if need be)."""
    from training.command import optimizer_name

    changes: list[tuple[str, dict[str, Any]]] = []
    if not config.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if optimizer_name(config) == "adamw":
        changes.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit", "use_8bit_adam": False}))
    if config.lora_rank is None and config.placeholder_token is None:
        changes.append(("--lora-rank 16", {"lora_rank": 16}))
    found = []
    for flags, settings in changes:
        estimate = estimate_memory(dataclasses.replace(config, **settings), models, device, shards=shards)
        if estimate.total <= capacity:
            found.append((flags, estimate))
    smaller = _smaller_batch(config, models, device, capacity, shards=shards)
    if smaller is not None:
        found.append(smaller)
    if found or len(changes) < 2:
        return found
    flags = " ".join(flag for flag, _ in changes)
    together = dataclasses.replace(config, **{key: value for _, change in changes for key, value in change.items()})
    estimate = estimate_memory(together, models, device, shards=shards)
    if estimate.total <= capacity:
        return [(flags, estimate)]
    smaller = _smaller_batch(together, models, device, capacity, shards=shards)
    return [] if smaller is None else [(f"{flags} {smaller[0]}", smaller[1])]


def _smaller_batch(
    config: TrainConfig, models: TrainingModels, device: torch.device | str, capacity: int, *, shards: int = 1
) -> tuple[str, MemoryEstimate] | None:
    """The largest divisor of the batch size below it whose estimate fits, as flags that keep the effective batch
    (``batch_size / divisor`` times as many accumulated micro-batches) and its estimate; or None."""
    size = config.train_batch_size
    for batch in sorted((d for d in range(1, size) if size % d == 0), reverse=True):
        estimate = estimate_memory(dataclasses.replace(config, train_batch_size=batch), models, device, shards=shards)
        if estimate.total <= capacity:
            steps = config.gradient_accumulation_steps * size // batch
            return f"--train-batch-size {batch} --gradient-accumulation-steps {steps}", estimate
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def check_fits(
    config: TrainConfig, models: TrainingModels, estimate: MemoryEstimate, capacity: int, *, shards: int = 1
) -> None:
    """Refuse a run whose estimated peak exceeds ``capacity`` bytes (the device's free memory times
    :data:`HEADROOM`, or a given capacity), naming settings that would fit (:func:`fitting_settings`).

    Raises:
        UserError: the run will not fit; one line with the estimate, the capacity, the settings that fit and
            ``--skip-memory-check``.
    """
    if estimate.total <= capacity:
        return
    options = fitting_settings(config, models, estimate.device, capacity, shards=shards)
    if options:
        advice = "settings that fit: " + "; ".join(f"{flags} ({_size(option.total)})" for flags, option in options)
    else:
        advice = "no change of batch, checkpointing, optimizer or LoRA fits: lower --resolution or use more devices"
    raise UserError(
        f"this run needs about {_size(estimate.total)} on {estimate.device} but {_size(capacity)} is available; "
        f"{advice}; or pass --skip-memory-check to try anyway"
    )


def device_capacity(device: torch.device | str) -> int | None:
    """The memory a run may plan to use on ``device``: :data:`HEADROOM` of CUDA's free memory; None elsewhere (no
    check: the CPU's memory is shared and swaps)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * HEADROOM)


def preflight(
    config: TrainConfig,
    models: TrainingModels,
    device: torch.device | str,
    *,
    capacity: int | None = None,
    check: bool = True,
    shards: int = 1,
) -> MemoryEstimate:
    """Estimate the run's peak memory (:func:`estimate_memory`), log its table, and with ``check`` refuse a run that
    will not fit ``capacity`` bytes (default: :func:`device_capacity`; no check on the CPU) with the settings that
    would (:func:`check_fits`). ``shards``: see :func:`estimate_memory`. Call it before the models are moved to the
    device.

    Raises:
        UserError: the run will not fit.
    """
    estimate = estimate_memory(config, models, device, shards=shards)
    logger.info("%s", estimate.table())
    capacity = device_capacity(device) if capacity is None else capacity
    if check and capacity is not None:
        check_fits(config, models, estimate, capacity, shards=shards)
    return estimate


# --------------------------------------------------------------------------------------------------------------------
# The measurement


def memory_in_use(device: torch.device | str) -> int:
    """The memory the process holds now: CUDA's allocated bytes on ``device``, or the resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm", encoding="ascii") as statm:  # resident pages, second field
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured_peak(device: torch.device | str) -> int:
    """The peak memory of the process so far: ``torch.cuda.max_memory_allocated`` on CUDA, the peak resident set on
    the CPU: Linux's ``VmHWM`` (``/proc/self/status``), else ``getrusage``'s ``ru_maxrss`` (KiB on Linux, bytes on
    macOS). On Linux ``ru_maxrss`` keeps the high-water mark of the parent process at ``fork``, so a run started by a
    large process (a test runner, a benchmark) would report the parent's size; ``VmHWM`` is the run's own."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_run_stats(
    output_dir: str | Path, estimate: MemoryEstimate, baseline: int, device: torch.device | str
) -> Path:
    """Write ``run_stats.json`` in ``output_dir``: the estimate, the measured peak (:func:`measured_peak`), the
    memory in use before the models were built (``baseline``) and the ratio of the estimate to the peak above it."""
    peak = measured_peak(device)
    stats = {
        "memory_estimate": estimate.as_dict(),
        "measured_peak": peak,
        "measured_baseline": baseline,
        "measured_kind": "cuda_max_memory_allocated" if torch.device(device).type == "cuda" else "cpu_peak_rss",
        "estimate_over_measured": estimate.total / max(peak - baseline, 1),
    }
    path = Path(output_dir) / RUN_STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
