"""Creating the ``Accelerator`` of a training command so that every launcher gives a real multi-process run.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) on a machine without CUDA, accelerate only sets up
its gloo CPU backend when asked for ``cpu=True``; otherwise each process silently runs alone, and N processes then
write the same checkpoint folder. :func:`make_accelerator` asks for it, and refuses a launch it cannot honour.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 for a plain ``python -m``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator`` that joins the launcher's process group, on CUDA or (gloo) on the CPU."""
    if launched_processes() > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    if launched_processes() == 1:
        # accelerate keeps one global state per process; a second run in the same process (a notebook, tests) may
        # ask for another precision, so start from a clean state. Multi-process runs keep their process group.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched_processes():
        raise RuntimeError(
            f"the launcher started {launched_processes()} processes but accelerate joined {accelerator.num_processes};"
            " launch with torchrun --nproc_per_node N or accelerate launch, on one machine type"
        )
    return accelerator
