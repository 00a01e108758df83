"""LatentDiffusionImg2ImgPipeline against stock diffusers' StableDiffusionImg2ImgPipeline on the same tiny components,
schedulers and seeds, and the ``img2img`` command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from ldm.errors import UserError
from pipelines import LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline
from pipelines.generation_defaults import GenerationDefaults
from pipelines.img2img import main as img2img_main
from tests.pipelines.editing import (
    PARITY_TOLERANCE,
    SIZE,
    ours,
    random_image,
    run,
    stock,
    tiny_autoencoder_tiny,
    unet_variant,
)


def pipes(components: dict) -> tuple[StableDiffusionImg2ImgPipeline, LatentDiffusionImg2ImgPipeline]:
    return stock(StableDiffusionImg2ImgPipeline, components), ours(LatentDiffusionImg2ImgPipeline, components)


def with_scheduler(components: dict, scheduler_cls) -> dict:
    return {**components, "scheduler": scheduler_cls.from_config(components["scheduler"].config)}


@pytest.mark.parametrize(
    "scheduler_cls",
    [
        DDIMScheduler,
        PNDMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
    ],
)
def test_same_images_as_stock(tiny_components, scheduler_cls) -> None:
    stock_pipe, our_pipe = pipes(with_scheduler(tiny_components, scheduler_cls))
    kwargs = {"image": random_image(), "strength": 0.6, "num_inference_steps": 5}
    expected, actual = run(stock_pipe, **kwargs), run(our_pipe, **kwargs)
    assert actual.shape == (1, SIZE, SIZE, 3)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_batch_negative_prompt_and_generator_list_as_stock(tiny_components) -> None:
    stock_pipe, our_pipe = pipes(tiny_components)
    kwargs = {
        "prompt": ["a red circle", "a blue square"],
        "negative_prompt": ["green", "yellow"],
        "image": [random_image(seed=1), random_image(seed=2)],
        "strength": 0.75,
    }
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = stock_pipe(**kwargs, generator=generators, num_inference_steps=4, output_type="np").images
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    actual = our_pipe(**kwargs, generator=generators, num_inference_steps=4, output_type="np").images
    assert actual.shape == (2, SIZE, SIZE, 3)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_custom_sigmas_and_timesteps_as_stock(tiny_components) -> None:
    stock_pipe, our_pipe = pipes(with_scheduler(tiny_components, EulerDiscreteScheduler))
    kwargs = {"image": random_image(), "strength": 0.5, "num_inference_steps": None}
    sigmas = [14.6, 8.0, 4.0, 2.0, 1.0, 0.5]
    assert np.abs(run(our_pipe, **kwargs, sigmas=sigmas) - run(stock_pipe, **kwargs, sigmas=sigmas)).max() < 1e-4
    stock_pipe, our_pipe = pipes(with_scheduler(tiny_components, EulerDiscreteScheduler))
    timesteps = [999, 800, 600, 400, 200, 100]
    actual, expected = run(our_pipe, **kwargs, timesteps=timesteps), run(stock_pipe, **kwargs, timesteps=timesteps)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_strength_sets_the_number_of_steps_as_stock(tiny_components) -> None:
    def count_steps(pipe, strength: float) -> list[int]:
        seen: list[int] = []

        def callback(pipe, step, timestep, tensors):
            seen.append(int(timestep))
            return tensors

        run(
            pipe,
            image=random_image(),
            strength=strength,
            num_inference_steps=6,
            guidance_scale=1.0,
            output_type="latent",
            callback_on_step_end=callback,
        )
        return seen

    stock_pipe, our_pipe = pipes(with_scheduler(tiny_components, DDIMScheduler))
    for strength, expected_steps in ((0.3, 1), (0.5, 3), (1.0, 6)):  # int(6 * strength), as stock
        actual = count_steps(our_pipe, strength)
        assert len(actual) == expected_steps and our_pipe.num_timesteps == expected_steps
        assert actual == count_steps(stock_pipe, strength)


def test_autoencoder_tiny_latents_take_the_encoded_size(tiny_components) -> None:
    # A VAE that downsamples by 4 where the pipeline was built with a factor-8 one (users swap TAESD in this way):
    # the latents are the encoded image's size, 16 x 16, not 64 / 8.
    stock_pipe, our_pipe = pipes(tiny_components)
    stock_pipe.vae = our_pipe.vae = tiny_autoencoder_tiny(factor_levels=3)
    kwargs = {"image": random_image(), "strength": 0.7}
    latents = run(our_pipe, **kwargs, output_type="latent")
    assert latents.shape == (1, 4, SIZE // 4, SIZE // 4)
    expected, actual = run(stock_pipe, **kwargs), run(our_pipe, **kwargs)
    assert actual.shape == (1, SIZE, SIZE, 3)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_lcm_unet_as_stock(tiny_components, guidance_scale) -> None:
    # An LCM U-Net takes the guidance scale as an embedding (timestep_cond) and runs no unconditional pass.
    components = {**tiny_components, "unet": unet_variant(tiny_components["unet"], time_cond_proj_dim=32)}
    stock_pipe, our_pipe = pipes(with_scheduler(components, LCMScheduler))
    calls = []
    our_pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True
    )
    kwargs = {"image": random_image(), "strength": 0.8, "guidance_scale": guidance_scale}
    expected, actual = run(stock_pipe, **kwargs), run(our_pipe, **kwargs)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE
    assert calls and set(calls) == {1}  # one image per U-Net pass: no classifier-free guidance batch
    assert not our_pipe.do_classifier_free_guidance


def test_callback_changing_guidance_and_reading_properties_as_stock(tiny_components) -> None:
    # As stock's callback_cfg test: after step 1 the callback keeps the positive half of the embeddings and turns
    # guidance off.
    def stop_guiding_after_one_step(pipe, step, timestep, tensors):
        seen.append((pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps))
        if step == 1:
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 1.0
        return tensors

    stock_pipe, our_pipe = pipes(tiny_components)
    kwargs = {
        "image": random_image(),
        "strength": 0.75,
        "callback_on_step_end": stop_guiding_after_one_step,
        "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"],
    }
    seen: list = []
    expected = run(stock_pipe, **kwargs)
    stock_seen, seen = seen, []
    actual = run(our_pipe, **kwargs)
    assert seen == stock_seen and seen[0][:2] == (7.5, True) and seen[-1][:2] == (1.0, False)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_interrupt_skips_the_remaining_steps(tiny_components) -> None:
    steps: list[int] = []

    def interrupt(pipe, step, timestep, tensors):
        steps.append(step)
        pipe._interrupt = step == 1
        return tensors

    our_pipe = ours(LatentDiffusionImg2ImgPipeline, tiny_components)
    run(our_pipe, image=random_image(), strength=1.0, num_inference_steps=5, callback_on_step_end=interrupt)
    assert steps == [0, 1]


def test_image_as_latents_and_an_odd_size_as_stock(tiny_components) -> None:
    stock_pipe, our_pipe = pipes(tiny_components)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for image in (latents, random_image((60, 64))):  # 60 wide: resized to 56 as stock does
        expected, actual = run(stock_pipe, image=image, strength=0.5), run(our_pipe, image=image, strength=0.5)
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_from_pipe_shares_components_and_defaults_and_stock_components_work(tiny_components, tmp_path) -> None:
    text = LatentDiffusionPipeline(**tiny_components)
    text.generation_defaults = GenerationDefaults(num_inference_steps=3, guidance_scale=4.0)
    edit = LatentDiffusionImg2ImgPipeline.from_pipe(text)
    assert edit.unet is text.unet and edit.vae is text.vae and edit.text_encoder is text.text_encoder
    assert edit.generation_defaults == text.generation_defaults

    stock_text = StableDiffusionPipeline(
        **tiny_components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    from_stock = LatentDiffusionImg2ImgPipeline(**stock_text.components)
    from_stock.set_progress_bar_config(disable=True)
    expected = run(stock(StableDiffusionImg2ImgPipeline, tiny_components), image=random_image(), strength=0.5)
    assert np.abs(run(from_stock, image=random_image(), strength=0.5) - expected).max() < PARITY_TOLERANCE

    edit.save_pretrained(tmp_path / "saved")
    loaded = LatentDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_defaults == text.generation_defaults
    edit.set_progress_bar_config(disable=True)
    kwargs = {"image": random_image(), "strength": 0.5, "num_inference_steps": None}  # the model's 3 steps
    assert np.abs(run(loaded, **kwargs) - run(edit, **kwargs)).max() < 1e-6
    stock_loaded = StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    stock_loaded.set_progress_bar_config(disable=True)
    stock_kwargs = {**kwargs, "num_inference_steps": 3, "guidance_scale": 4.0}
    assert np.abs(run(stock_loaded, **stock_kwargs) - run(edit, **kwargs)).max() < PARITY_TOLERANCE


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"strength": -0.1}, r"strength must be in \(0, 1\]"),
        ({"strength": 0.1, "num_inference_steps": 5}, "leaves no denoising step"),
        ({"image": None}, "pass the image to start from"),
    ],
)
def test_errors_name_the_fix(tiny_components, kwargs, message) -> None:
    with pytest.raises(UserError, match=message):
        run(ours(LatentDiffusionImg2ImgPipeline, tiny_components), **{"image": random_image(), **kwargs})


# ------------------------------------------------------------------------------------------------- command line


def cli(capsys, main, *argv: str) -> tuple[int, list[Path], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [Path(line) for line in captured.out.splitlines()], captured.err


def test_img2img_cli_writes_pngs_with_metadata(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    random_image().save(tmp_path / "in.png")
    args = ["--model", tiny_sd_dir, "--image", str(tmp_path / "in.png"), "--prompt", "a fox", "--steps", "4"]
    args += ["--strength", "0.5", "--seed", "3", "--num-images", "2", "--out", str(tmp_path / "out")]
    code, paths, err = cli(capsys, img2img_main, *args)
    assert code == 0, err
    assert [p.name for p in paths] == ["00000-3-a-fox.png", "00001-4-a-fox.png"]
    with PIL.Image.open(paths[1]) as image:
        assert image.size == (SIZE, SIZE)
        assert image.text["seed"] == "4" and image.text["strength"] == "0.5" and image.text["prompt"] == "a fox"
        assert image.text["image"] == str(tmp_path / "in.png") and image.text["model"] == tiny_sd_dir


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "0"], "--strength: must be in (0, 1]"),
        (["--image", "missing.png"], "missing.png does not exist"),
    ],
)
def test_img2img_cli_bad_arguments_exit_2_with_one_line(capsys, tiny_sd_dir, tmp_path, extra, message) -> None:
    PIL.Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "in.png")
    args = ["--model", tiny_sd_dir, "--image", str(tmp_path / "in.png"), "--prompt", "a fox", "--steps", "2"]
    code, paths, err = cli(capsys, img2img_main, *args, *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and paths == []
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
