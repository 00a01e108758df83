"""Creating the ``Accelerator`` of a training command so that every launcher gives a real multi-process run, and the
sharded (FSDP) runs that launchers can ask for.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) on a machine without CUDA, accelerate only sets up
its gloo CPU backend when asked for ``cpu=True``; otherwise each process silently runs alone, and N processes then
write the same checkpoint folder. :func:`make_accelerator` asks for it, and refuses a launch it cannot honour.

Full fine-tunes that do not fit one device (the SDXL U-Net with AdamW) shard the trained model across the processes
with FSDP2 (torch's ``fully_shard``), turned on by accelerate's launcher::

    accelerate launch --config_file recipes/accelerate/fsdp_sdxl.yaml --num_processes 8 \\
        -m training.train_text_to_image --pretrained-model DIR --dataset DATA --mixed-precision bf16 ...

The launcher exports ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` settings of the file; ``accelerator.prepare`` then
shards each trained module block by block. accelerate only shards on accelerators, so on CPU-only machines (tests,
debugging with gloo) :func:`make_accelerator` installs the same plugin itself. FSDP1 (``fsdp_version: 1``, flat
parameters) is refused: checkpoints gather FSDP2's ``DTensor`` s (``training.checkpoint``), and the end of a run
saves :func:`unsharded` copies of the sharded modules.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator, PartialState, init_empty_weights
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

from ldm.errors import UserError
from training.state_io import full_tensors

logger = logging.getLogger("training")

FSDP_RECIPE = "recipes/accelerate/fsdp_sdxl.yaml"
"""The accelerate config file of sharded full fine-tunes."""


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 for a plain ``python -m``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    """Whether the launcher asks for FSDP (``accelerate launch`` with a ``distributed_type: FSDP`` config file)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator`` that joins the launcher's process group, on CUDA or (gloo) on the CPU, sharding the trained
    modules with FSDP2 when the launcher asks for it (:func:`fsdp_requested`)."""
    cpu_run = launched_processes() > 1 and not torch.cuda.is_available()
    if cpu_run:
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
    if cpu_run and fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _shard_on_cpu(accelerator)
    if is_sharded_run(accelerator) and not accelerator.is_fsdp2:
        raise UserError(
            f"FSDP1 (fsdp_version: 1) is not supported; set fsdp_version: 2 in the accelerate config ({FSDP_RECIPE})"
        )
    return accelerator


def _shard_on_cpu(accelerator: Accelerator) -> None:
    """Turn a gloo CPU run into an FSDP one, as accelerate does on accelerators: the plugin reads the launcher's
    ``FSDP_*`` settings and takes the run's mixed precision."""
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded_run(accelerator: Accelerator) -> bool:
    """Whether ``accelerator.prepare`` shards the trained modules (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharded_run(accelerator: Accelerator, unsupported: Mapping[str, bool]) -> None:
    """On a sharded run, log that it is one, and stop it before training when it uses a feature
    (``{"--ema-decay": True, ...}``) that runs a sharded module on the main process alone (validation, the final save
    of LoRA layers or text encoders) or keeps unsharded copies of its weights (EMA); the message names them.

    Raises:
        UserError: the run is sharded and some feature is on.
    """
    if not is_sharded_run(accelerator):
        return
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise UserError(
            f"FSDP ({FSDP_RECIPE}) shards a full fine-tune of the U-Net; {', '.join(used)} cannot run sharded: drop "
            "them, or launch without FSDP (one process, or DDP: recipes/accelerate/ddp.yaml)"
        )
    logger.info("FSDP2: the trained modules are sharded across %d processes", accelerator.num_processes)


def unsharded(module: torch.nn.Module, *, is_main_process: bool) -> torch.nn.Module:
    """``module`` itself, or when FSDP sharded it, a plain copy with its full weights on the CPU (on the main process;
    the others get ``module`` back): what ``save_pretrained`` needs at the end of a sharded run.

    Every process must call this for the same modules in the same order: gathering the shards is a collective. The
    copy is built empty from the module's config (a diffusers model, or a transformers one) and takes the gathered
    tensors, so the main process holds the weights once.

    Raises:
        TypeError: a sharded module that is neither a diffusers nor a transformers model (no config to rebuild it).
    """
    if not isinstance(module, FSDPModule):
        return module
    state = full_tensors(module.state_dict(), keep=is_main_process)
    if not is_main_process:
        return module
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights():
        if hasattr(cls, "from_config"):  # diffusers' ModelMixin
            copy = cls.from_config(module.config)
        elif hasattr(cls, "_from_config"):  # transformers' PreTrainedModel
            copy = cls._from_config(module.config)
        else:
            raise TypeError(f"cannot rebuild a {cls.__name__} from a config to save it unsharded")
    copy.load_state_dict(state, assign=True)
    return copy.train(module.training)
