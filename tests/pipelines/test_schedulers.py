"""The sampler names: each builds its diffusers class with the settings its AUTOMATIC1111 name means, keeps the
model's training schedule, and generates; Karras variants visit Karras et al.'s noise levels; unknown names are
refused with the list of names; the old names still work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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

from ldm.errors import UserError
from pipelines import LatentDiffusionPipeline
from pipelines.schedulers import SAMPLERS, a1111_sampler, make_scheduler, scheduler_name

# name -> (class, config entries it must have, A1111 "Sampler", A1111 "Schedule type"), written from diffusers'
# scheduler documentation table of A1111 equivalents.
EXPECTED = {
    "ddpm": (DDPMScheduler, {}, "DDPM", "Uniform"),
    "ddim": (DDIMScheduler, {}, "DDIM", "Uniform"),
    "pndm": (PNDMScheduler, {}, "PLMS", "Uniform"),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}, "LMS", "Uniform"),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}, "LMS", "Karras"),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}, "Euler", "Uniform"),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}, "Euler", "Karras"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a", "Uniform"),
    "heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}, "Heun", "Uniform"),
    "heun_karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}, "Heun", "Karras"),
    "dpm2": (KDPM2DiscreteScheduler, {"use_karras_sigmas": False}, "DPM2", "Uniform"),
    "dpm2_karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}, "DPM2", "Karras"),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {"use_karras_sigmas": False}, "DPM2 a", "Uniform"),
    "dpm2_a_karras": (KDPM2AncestralDiscreteScheduler, {"use_karras_sigmas": True}, "DPM2 a", "Karras"),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
        "Uniform",
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M",
        "Karras",
    ),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M SDE",
        "Uniform",
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M SDE",
        "Karras",
    ),
    "unipc": (UniPCMultistepScheduler, {"use_karras_sigmas": False}, "UniPC", "Uniform"),
    "unipc_karras": (UniPCMultistepScheduler, {"use_karras_sigmas": True}, "UniPC", "Karras"),
    "lcm": (LCMScheduler, {}, "LCM", "Uniform"),
}


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir: str) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_names_are_the_table() -> None:
    assert list(SAMPLERS) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_make_scheduler_builds_the_class_from_the_model_config(tiny_pipe: LatentDiffusionPipeline, name: str) -> None:
    cls, options, a1111_name, schedule_type = EXPECTED[name]
    config = tiny_pipe.scheduler.config
    scheduler = make_scheduler(name, config)
    assert type(scheduler) is cls
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == config[key], key
    assert {key: scheduler.config[key] for key in options} == options
    assert scheduler_name(scheduler) == name
    assert a1111_sampler(scheduler) == (a1111_name, schedule_type)

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = scheduler
    try:
        images = tiny_pipe("a red fox", 32, 32, 2, generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        tiny_pipe.scheduler = original
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


def test_karras_variants_visit_karras_noise_levels(tiny_pipe: LatentDiffusionPipeline) -> None:
    # Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7,
    # between the training schedule's smallest and largest sigma.
    scheduler = make_scheduler("dpmpp_2m_karras", tiny_pipe.scheduler.config)
    steps = 10
    scheduler.set_timesteps(steps)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    rho, ramp = 7.0, torch.linspace(0, 1, steps, dtype=torch.float64)
    low, high = sigmas.min() ** (1 / rho), sigmas.max() ** (1 / rho)
    expected = (high + ramp * (low - high)) ** rho
    torch.testing.assert_close(scheduler.sigmas[:steps].double(), expected, rtol=1e-4, atol=1e-5)
    plain = make_scheduler("dpmpp_2m", tiny_pipe.scheduler.config)
    plain.set_timesteps(steps)
    assert not torch.allclose(plain.sigmas[:steps].double(), expected, rtol=1e-2)


def test_dpmpp_2m_is_dpmsolver_plus_plus_whatever_the_config_says(tiny_pipe: LatentDiffusionPipeline) -> None:
    sde = DPMSolverMultistepScheduler.from_config(tiny_pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    assert make_scheduler("dpmpp_2m", sde.config).config.algorithm_type == "dpmsolver++"
    assert scheduler_name(sde) == "dpmpp_2m_sde"
    # An instance the names do not describe is reported by its class, not mislabelled.
    third_order = DPMSolverMultistepScheduler.from_config(tiny_pipe.scheduler.config, solver_order=3)
    assert scheduler_name(third_order) == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize(("old", "new"), [("euler-a", "euler_a"), ("dpm++", "dpmpp_2m")])
def test_old_names_still_work(tiny_pipe: LatentDiffusionPipeline, old: str, new: str) -> None:
    assert scheduler_name(make_scheduler(old, tiny_pipe.scheduler.config)) == new


def test_unknown_name_lists_the_names(tiny_pipe: LatentDiffusionPipeline) -> None:
    with pytest.raises(UserError, match="unknown scheduler 'fast'; choose one of ddpm, ddim, .*lcm"):
        make_scheduler("fast", tiny_pipe.scheduler.config)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_latent_samplers_do_not_clip_x0(name, tiny_components):
    # the presets' PNDM config has no clip_sample key; DDIM/DDPM would default to clipping x0 to [-1, 1]
    assert "clip_sample" not in tiny_components["scheduler"].config
    assert make_scheduler(name, tiny_components["scheduler"].config).config.clip_sample is False
    explicit = {**tiny_components["scheduler"].config, "clip_sample": True}
    assert make_scheduler(name, explicit).config.clip_sample is True
