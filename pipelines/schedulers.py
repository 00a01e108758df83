"""The samplers the command line (and the web app) offer, by name, mapped to diffusers scheduler classes.

A sampler is swapped in with ``from_config(pipe.scheduler.config)``, so it keeps what the model was trained with
(``num_train_timesteps``, the beta schedule, ``prediction_type``) and its timestep spacing; only the sampling
algorithm changes. ``lms`` needs scipy (diffusers' ``LMSDiscreteScheduler`` integrates its coefficients with it).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
"""Sampler name -> diffusers scheduler class."""

SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    # DPMSolverMultistepScheduler also implements first-generation DPM-Solver and the SDE variants; "dpm++" is the
    # deterministic DPM-Solver++ (Lu et al. 2022), whatever the config it is built from says.
    "dpm++": {"algorithm_type": "dpmsolver++"},
}
"""Config entries a sampler name fixes on top of the model's scheduler config."""


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """Build the sampler ``name`` from a scheduler config, usually ``pipe.scheduler.config``.

    The training schedule, prediction type and timestep spacing in ``config`` are kept; entries the new class does
    not know (such as PNDM's ``skip_prk_steps``) are ignored by diffusers.

    Raises:
        ValueError: ``name`` is not one of :data:`SCHEDULERS`.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    options = dict(SCHEDULER_OPTIONS.get(name, {}))
    if "clip_sample" not in config and "clip_sample" in inspect.signature(cls.__init__).parameters:
        # DDIM/DDPM default to clipping x0 to [-1, 1], right for pixels but wrong for latents (Stable Diffusion's
        # configs say clip_sample=false; PNDM-based ones such as the presets' omit the key).
        options["clip_sample"] = False
    return cls.from_config(config, **options)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The sampler name of a scheduler instance (for image metadata), or its class name when no name matches it.

    The class must match exactly (not a subclass) and so must the options the name fixes: a
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"`` is not ``"dpm++"``.
    """
    for name, cls in SCHEDULERS.items():
        options = SCHEDULER_OPTIONS.get(name, {})
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in options.items()):
            return name
    return type(scheduler).__name__
