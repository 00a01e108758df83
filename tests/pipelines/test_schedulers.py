"""The sampler names: each builds its diffusers class from a model's scheduler config, keeps the model's training
schedule, and generates; unknown names are refused with the list of names."""

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
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from pipelines import LatentDiffusionPipeline
from pipelines.schedulers import SCHEDULERS, make_scheduler, scheduler_name

EXPECTED_CLASSES = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir: str) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_names_are_the_cli_names() -> None:
    assert list(SCHEDULERS) == list(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_make_scheduler_builds_the_class_from_the_model_config(tiny_pipe: LatentDiffusionPipeline, name: str) -> None:
    config = tiny_pipe.scheduler.config
    scheduler = make_scheduler(name, config)
    assert type(scheduler) is EXPECTED_CLASSES[name]
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == config[key], key
    assert scheduler_name(scheduler) == name

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = scheduler
    try:
        images = tiny_pipe(
            "a red fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
    finally:
        tiny_pipe.scheduler = original
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_dpm_plus_plus_is_dpmsolver_plus_plus_whatever_the_config_says(tiny_pipe: LatentDiffusionPipeline) -> None:
    sde = DPMSolverMultistepScheduler.from_config(tiny_pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    assert make_scheduler("dpm++", sde.config).config.algorithm_type == "dpmsolver++"
    # An instance the names do not describe is reported by its class, not mislabelled.
    assert scheduler_name(sde) == "DPMSolverMultistepScheduler"


def test_unknown_name_lists_the_names(tiny_pipe: LatentDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'heun'; choose one of ddpm, ddim, .*unipc"):
        make_scheduler("heun", tiny_pipe.scheduler.config)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_latent_samplers_do_not_clip_x0(name, tiny_components):
    # the presets' PNDM config has no clip_sample key; DDIM/DDPM would default to clipping x0 to [-1, 1]
    assert "clip_sample" not in tiny_components["scheduler"].config
    assert make_scheduler(name, tiny_components["scheduler"].config).config.clip_sample is False
    explicit = {**tiny_components["scheduler"].config, "clip_sample": True}
    assert make_scheduler(name, explicit).config.clip_sample is True
