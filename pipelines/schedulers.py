"""The samplers the commands (and the web app) offer, by name, as diffusers scheduler classes and settings.

The names follow AUTOMATIC1111's samplers (``dpmpp_2m_karras`` is its "DPM++ 2M" with the "Karras" schedule type),
in the spelling of ComfyUI's sampler names; :data:`SAMPLERS` is the table. A sampler is swapped in with
``from_config(pipe.scheduler.config)``, so it keeps what the model was trained with (``num_train_timesteps``, the beta
schedule, ``prediction_type``) and its timestep spacing; only the sampling algorithm (and, for the ``_karras``
variants, the noise levels visited: Karras et al. 2022, eq. 5) changes. ``lms`` needs scipy (diffusers'
``LMSDiscreteScheduler`` integrates its coefficients with it).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.errors import UserError

KARRAS = "Karras"
UNIFORM = "Uniform"


@dataclass(frozen=True)
class Sampler:
    """A named sampler: the diffusers class, the config entries the name fixes, and AUTOMATIC1111's names for it
    (``Sampler:`` and ``Schedule type:`` in its ``parameters`` text)."""

    name: str
    scheduler_class: type[SchedulerMixin]
    options: Mapping[str, Any] = field(default_factory=dict)
    a1111_name: str = ""
    schedule_type: str = UNIFORM


def _karras_pair(name: str, cls: type[SchedulerMixin], a1111: str, **options: Any) -> tuple[Sampler, Sampler]:
    """The plain sampler and its ``_karras`` variant (Karras et al. 2022's noise levels)."""
    return (
        Sampler(name, cls, {**options, "use_karras_sigmas": False}, a1111),
        Sampler(f"{name}_karras", cls, {**options, "use_karras_sigmas": True}, a1111, KARRAS),
    )


DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler("ddpm", DDPMScheduler, a1111_name="DDPM"),
        Sampler("ddim", DDIMScheduler, a1111_name="DDIM"),
        Sampler("pndm", PNDMScheduler, a1111_name="PLMS"),
        *_karras_pair("lms", LMSDiscreteScheduler, "LMS"),
        *_karras_pair("euler", EulerDiscreteScheduler, "Euler"),
        Sampler("euler_a", EulerAncestralDiscreteScheduler, a1111_name="Euler a"),
        *_karras_pair("heun", HeunDiscreteScheduler, "Heun"),
        *_karras_pair("dpm2", KDPM2DiscreteScheduler, "DPM2"),
        *_karras_pair("dpm2_a", KDPM2AncestralDiscreteScheduler, "DPM2 a"),
        *_karras_pair("dpmpp_2m", DPMSolverMultistepScheduler, "DPM++ 2M", **DPMPP_2M),
        *_karras_pair("dpmpp_2m_sde", DPMSolverMultistepScheduler, "DPM++ 2M SDE", **DPMPP_2M_SDE),
        *_karras_pair("unipc", UniPCMultistepScheduler, "UniPC"),
        Sampler("lcm", LCMScheduler, a1111_name="LCM"),
    )
}
"""Sampler name -> :class:`Sampler`."""

ALIASES: dict[str, str] = {"euler-a": "euler_a", "dpm++": "dpmpp_2m"}
"""Names earlier versions used, still accepted."""

SCHEDULERS: dict[str, type[SchedulerMixin]] = {name: sampler.scheduler_class for name, sampler in SAMPLERS.items()}
"""Sampler name -> diffusers scheduler class."""


def canonical_name(name: str) -> str:
    """The sampler name ``name`` stands for (an old alias becomes its current name).

    Raises:
        UserError: an unknown name (the message lists the names).
    """
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """Build the sampler ``name`` (or an alias) from a scheduler config, usually ``pipe.scheduler.config``.

    The training schedule, prediction type and timestep spacing in ``config`` are kept; entries the new class does
    not know (such as PNDM's ``skip_prk_steps``) are ignored by diffusers.

    Raises:
        UserError: ``name`` is not one of :data:`SAMPLERS` or :data:`ALIASES`.
    """
    sampler = SAMPLERS[canonical_name(name)]
    cls = sampler.scheduler_class
    options = dict(sampler.options)
    if "clip_sample" not in config and "clip_sample" in inspect.signature(cls.__init__).parameters:
        # DDIM/DDPM default to clipping x0 to [-1, 1], right for pixels but wrong for latents (Stable Diffusion's
        # configs say clip_sample=false; PNDM-based ones such as the presets' omit the key).
        options["clip_sample"] = False
    return cls.from_config(config, **options)


def sampler_of(scheduler: SchedulerMixin) -> Sampler | None:
    """The named sampler a scheduler instance is, or ``None``: the class must match exactly (not a subclass) and so
    must every option the name fixes (a ``DPMSolverMultistepScheduler`` with Karras sigmas is not ``dpmpp_2m``)."""
    for sampler in SAMPLERS.values():
        options_match = all(scheduler.config.get(key) == value for key, value in sampler.options.items())
        if type(scheduler) is sampler.scheduler_class and options_match:
            return sampler
    return None


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The sampler name of a scheduler instance (for image metadata), or its class name when no name matches it."""
    sampler = sampler_of(scheduler)
    return sampler.name if sampler is not None else type(scheduler).__name__


def a1111_sampler(scheduler: SchedulerMixin) -> tuple[str, str]:
    """AUTOMATIC1111's ``(Sampler, Schedule type)`` for a scheduler instance; an unnamed one gives its class name
    and the schedule its ``use_karras_sigmas`` says."""
    sampler = sampler_of(scheduler)
    if sampler is not None:
        return sampler.a1111_name, sampler.schedule_type
    return type(scheduler).__name__, KARRAS if scheduler.config.get("use_karras_sigmas") else UNIFORM
