"""FLOP counts and the machine's matrix-multiply rate, so a benchmark can print how close to the limit it runs.

* :func:`count_flops` counts the floating-point operations of a call with ``torch.utils.flop_counter`` (a
  multiply-add is 2 FLOPs; convolutions, matrix products and attention are counted, element-wise work is not). The
  CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is added to torch's table, which has only
  the CUDA kernels.
* :func:`generation_flops` splits a pipeline call into FLOPs per denoising step and the fixed rest (text encoding,
  VAE decoding) from two short calls, so a 50-step call's count costs a 1-step and a 2-step call.
* :func:`matmul_flops_per_s` measures the dense matrix-multiply rate of a device and dtype: the practical ceiling
  that "achieved FLOP/s" is compared with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _custom_flop_formulas() -> dict:
    """Formulas torch's table lacks, keyed by the aten op (those this torch build has)."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """The FLOPs of one call of ``fn()`` (which runs for real)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class GenerationFlops:
    """FLOPs of a pipeline call: ``per_step`` for each denoising step, ``fixed`` for the rest."""

    per_step: int
    fixed: int

    def total(self, steps: int) -> int:
        """The FLOPs of a call with ``steps`` denoising steps."""
        return self.fixed + self.per_step * steps


def generation_flops(pipe: Callable[..., Any], kwargs: dict[str, Any]) -> GenerationFlops:
    """Count a 1-step and a 2-step call of ``pipe(**kwargs)`` (other arguments as given): the difference is one
    step's FLOPs (the U-Net with its guidance batch, the scheduler), the rest is the fixed part.

    Assumes a scheduler of one model call per step (DDIM, Euler, DPM-Solver++ ...); not Heun's two.
    """

    def call(steps: int) -> int:
        generator = torch.Generator("cpu").manual_seed(0)
        return count_flops(lambda: pipe(**{**kwargs, "num_inference_steps": steps}, generator=generator))

    one, two = call(1), call(2)
    return GenerationFlops(per_step=two - one, fixed=2 * one - two)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 10
) -> float:
    """The measured rate of ``size``-square matrix products (FLOP/s) on ``device`` in ``dtype``, after warm-up.

    ``size`` defaults to 8192 on CUDA (large enough to reach the tensor cores' rate) and 1024 elsewhere.
    """
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)
