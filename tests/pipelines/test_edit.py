"""LatentDiffusionEditPipeline (img2img, inpainting, outpainting) against stock diffusers' img2img and inpainting
pipelines on the same tiny components, and the ``img2img`` / ``inpaint`` command lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)

from pipelines import LatentDiffusionEditPipeline, outpaint_canvas
from pipelines.img2img import main as img2img_main
from pipelines.inpaint import main as inpaint_main
from pipelines.pipeline_latent_diffusion_edit import feather_mask

PARITY_TOLERANCE = 1e-4
SIZE = 64


def stock(cls, components: dict):
    pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(components: dict) -> LatentDiffusionEditPipeline:
    pipe = LatentDiffusionEditPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed: int = 0, **kwargs):
    kwargs = {"prompt": "a red circle", "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def random_image(size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def box_mask(top: int = 16, bottom: int = 48, left: int = 8, right: int = 40) -> PIL.Image.Image:
    """A white box on black, on the 8-pixel latent grid (so stock's nearest-neighbour latent mask is the same)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[top:bottom, left:right] = 255
    return PIL.Image.fromarray(mask, mode="L")


@pytest.fixture
def ddim_components(tiny_components) -> dict:
    # clip_sample off up front: our pipeline turns it off as stock text-to-image does, stock inpainting does not.
    scheduler = DDIMScheduler.from_config(tiny_components["scheduler"].config, clip_sample=False)
    return {**tiny_components, "scheduler": scheduler}


# ------------------------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, PNDMScheduler])
def test_img2img_same_images_as_stock(tiny_components, scheduler_cls) -> None:
    components = {**tiny_components, "scheduler": scheduler_cls.from_config(tiny_components["scheduler"].config)}
    kwargs = {"image": random_image(), "strength": 0.6, "num_inference_steps": 5}
    expected = run(stock(StableDiffusionImg2ImgPipeline, components), **kwargs)
    actual = run(ours(components), **kwargs)
    assert actual.shape == (1, SIZE, SIZE, 3)
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE


def test_strength_sets_the_number_of_steps_as_stock(ddim_components) -> None:
    def count_steps(pipe, strength: float) -> list[int]:
        seen: list[int] = []

        def callback(pipe, step, timestep, tensors):
            seen.append(int(timestep))
            return tensors

        run(pipe, image=random_image(), strength=strength, num_inference_steps=6, guidance_scale=1.0,
            output_type="latent", callback_on_step_end=callback)  # fmt: skip
        return seen

    for strength, expected_steps in ((0.3, 1), (0.5, 3), (1.0, 6)):  # int(6 * strength), as stock
        actual = count_steps(ours(ddim_components), strength)
        assert len(actual) == expected_steps
        assert actual == count_steps(stock(StableDiffusionImg2ImgPipeline, ddim_components), strength)


# ---------------------------------------------------------------------------------------------------- inpainting


def test_inpainting_keeps_unmasked_pixels_exactly_and_changes_the_masked_ones(ddim_components) -> None:
    image, mask = random_image(), box_mask()
    result = run(ours(ddim_components), image=image, mask_image=mask, output_type="pil")[0]
    result, original = np.asarray(result), np.asarray(image)
    masked = np.asarray(mask) > 127
    np.testing.assert_array_equal(result[~masked], original[~masked])
    assert np.abs(result[masked].astype(int) - original[masked]).mean() > 10


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_plain_unet_inpainting_latents_match_stock(ddim_components, strength) -> None:
    # Stock's inpainting pipeline with a 4-channel U-Net does the same known-region replacement in latent space.
    kwargs = {"image": random_image(), "mask_image": box_mask(), "strength": strength, "output_type": "latent"}
    expected = run(stock(StableDiffusionInpaintPipeline, ddim_components), **kwargs)
    actual = run(ours(ddim_components), **kwargs)
    assert (actual - expected).abs().max() < PARITY_TOLERANCE


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_unet_matches_stock(ddim_components, strength) -> None:
    unet = ddim_components["unet"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet9 = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).eval()
    components = {**ddim_components, "unet": unet9}
    kwargs = {"image": random_image(), "mask_image": box_mask(), "strength": strength}
    stock_pipe, our_pipe = stock(StableDiffusionInpaintPipeline, components), ours(components)

    expected = run(stock_pipe, **kwargs, output_type="latent")
    assert (run(our_pipe, **kwargs, output_type="latent") - expected).abs().max() < PARITY_TOLERANCE
    # In pixels: the same inside the mask; outside it ours pastes the original back and stock does not.
    expected, actual = run(stock_pipe, **kwargs), run(our_pipe, **kwargs)
    masked = np.asarray(box_mask()) > 127
    assert np.abs(actual[0][masked] - expected[0][masked]).max() < PARITY_TOLERANCE
    original = np.asarray(kwargs["image"]) / 255
    assert np.abs(actual[0][~masked] - original[~masked]).max() < 1e-6


def resampled_inpainting_reference(components: dict, image, mask, *, steps: int, resamples: int, seed: int):
    """RePaint's loop written out with the components (no guidance): every DDIM step redone ``resamples`` more times
    from its result noised back by q(x_t | x_t') = N(sqrt(a_t / a_t') x_t', (1 - a_t / a_t') I), the known region put
    back after every pass. The random draws in the pipeline's order: VAE posterior, initial noise, re-noising."""
    pipe, generator = ours(components), torch.Generator().manual_seed(seed)
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    scheduler.set_timesteps(steps)
    vae, factor = components["vae"], pipe.vae_scale_factor
    pixels = torch.from_numpy(np.asarray(image) / 127.5 - 1).permute(2, 0, 1)[None].float()
    known = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(known.shape, generator=generator)
    regenerate = F.max_pool2d(torch.from_numpy(np.asarray(mask) / 255.0)[None, None].float(), factor)
    embeds = pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
    alphas_cumprod, timesteps = scheduler.alphas_cumprod, scheduler.timesteps
    latents = noise * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        after = timesteps[i + 1] if i + 1 < len(timesteps) else None
        for attempt in range(resamples + 1):
            if attempt:
                ratio = alphas_cumprod[t] / (alphas_cumprod[after] if after is not None else 1.0)
                latents = ratio.sqrt() * latents + (1 - ratio).sqrt() * torch.randn(known.shape, generator=generator)
            eps = components["unet"](latents, t, encoder_hidden_states=embeds).sample
            latents = scheduler.step(eps, t, latents).prev_sample
            at_next = known if after is None else scheduler.add_noise(known, noise, after[None])
            latents = regenerate * latents + (1 - regenerate) * at_next
    return latents


def test_resampling_matches_repaint_written_out(ddim_components) -> None:
    kwargs = {"image": random_image(), "mask_image": box_mask(), "guidance_scale": 1.0, "output_type": "latent"}
    expected = resampled_inpainting_reference(ddim_components, kwargs["image"], kwargs["mask_image"], steps=4,
                                              resamples=2, seed=0)  # fmt: skip
    actual = run(ours(ddim_components), resamples=2, **kwargs)
    assert (actual - expected).abs().max() < PARITY_TOLERANCE
    assert (actual - run(ours(ddim_components), **kwargs)).abs().max() > 0.1  # resampling changed the result


def test_resampling_runs_the_unet_once_more_per_step_per_resample_and_keeps_the_unmasked_pixels(
    ddim_components,
) -> None:
    pipe, calls = ours(ddim_components), []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    image, mask = random_image(), box_mask()
    result = run(pipe, image=image, mask_image=mask, resamples=3, num_inference_steps=5, output_type="pil")[0]
    assert len(calls) == 5 * (1 + 3)
    masked = np.asarray(mask) > 127
    np.testing.assert_array_equal(np.asarray(result)[~masked], np.asarray(image)[~masked])


def test_mask_blur_feathers_only_near_the_mask(ddim_components) -> None:
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 16:48] = 1
    blurred = feather_mask(mask, sigma=2.0)
    assert blurred[..., 31, 31] == pytest.approx(1.0) and 0 < blurred[..., 16, 31] < 1 and 0 < blurred[..., 15, 31]
    assert (blurred[..., :9, :] == 0).all()  # beyond 3 sigma of the mask: exactly 0
    assert torch.equal(feather_mask(mask, 0), mask)

    image = random_image()
    mask_image = box_mask(16, 48, 16, 48)
    sharp = np.asarray(run(ours(ddim_components), image=image, mask_image=mask_image, output_type="pil")[0])
    soft = run(ours(ddim_components), image=image, mask_image=mask_image, mask_blur=2.0, output_type="pil")[0]
    soft, original = np.asarray(soft), np.asarray(image)
    np.testing.assert_array_equal(soft[:9], original[:9])
    assert not np.array_equal(soft[14:16], original[14:16])  # feathered just outside the mask
    assert not np.array_equal(soft[16:18], sharp[16:18])  # and just inside it


# --------------------------------------------------------------------------------------------------- outpainting


def test_outpaint_canvas_sizes_mask_and_original_region() -> None:
    image = random_image((60, 40))
    canvas, mask = outpaint_canvas(image, left=10, bottom=16, multiple=8)
    # width 60 + 10 = 70 -> 72 (the 2 extra go left, the only extended side); height 40 + 16 = 56 already fits.
    assert canvas.size == mask.size == (72, 56)
    pixels, mask_pixels = np.asarray(canvas), np.asarray(mask)
    np.testing.assert_array_equal(pixels[:40, 12:], np.asarray(image))
    assert (
        (mask_pixels[:40, 12:] == 0).all() and (mask_pixels[40:] == 255).all() and (mask_pixels[:, :12] == 255).all()
    )
    np.testing.assert_array_equal(pixels[:40, 0], pixels[:40, 12])  # "edge" fill repeats the border

    canvas, mask = outpaint_canvas(image, right=3, fill=(0, 0, 255))
    assert canvas.size == (64, 40) and (np.asarray(canvas)[:, 60:] == (0, 0, 255)).all()
    with pytest.raises(ValueError, match="at least one"):
        outpaint_canvas(image)


def test_outpainting_preserves_the_original(ddim_components) -> None:
    image = random_image((48, 64))
    canvas, mask = outpaint_canvas(image, left=16)
    result = np.asarray(run(ours(ddim_components), image=canvas, mask_image=mask, output_type="pil")[0])
    assert result.shape == (64, 64, 3)
    np.testing.assert_array_equal(result[:, 16:], np.asarray(image))


# -------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_image": PIL.Image.new("L", (32, 64))}, "mask_image is 32x64 but image is 64x64"),
        ({"mask_image": PIL.Image.new("L", (SIZE, SIZE))}, "all black: nothing to regenerate.*img2img"),
        ({"mask_image": PIL.Image.new("L", (SIZE, SIZE), 255)}, "all white: nothing is kept.*strength 1"),
        ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"image": random_image((60, 64))}, "not a multiple of 8.*resize or crop it to 56x64"),
        ({"strength": 0.1, "num_inference_steps": 5}, "leaves no denoising step"),
        ({"mask_image": box_mask(), "resamples": -1}, "resamples must be a whole number >= 0"),
        ({"resamples": 2}, "resamples is for inpainting.*pass a mask_image"),
        (
            {"mask_image": box_mask(), "resamples": 2, "scheduler": DPMSolverMultistepScheduler},
            "keeps no state \\(DDIM or DDPM\\); this pipeline has DPMSolverMultistepScheduler",
        ),
    ],
)
def test_errors_name_the_fix(ddim_components, kwargs, message) -> None:
    pipe = ours(ddim_components)
    if "scheduler" in kwargs:
        pipe.scheduler = kwargs.pop("scheduler").from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=message):
        run(pipe, **{"image": random_image(), **kwargs})


# ------------------------------------------------------------------------------------------------ command lines


def cli(capsys, main, *argv: str) -> tuple[int, list[Path], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [Path(line) for line in captured.out.splitlines()], captured.err


def test_img2img_cli_writes_pngs_with_metadata(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    random_image().save(tmp_path / "in.png")
    args = ["--model", tiny_sd_dir, "--image", str(tmp_path / "in.png"), "--prompt", "a fox", "--steps", "4"]
    code, paths, err = cli(capsys, img2img_main, *args, "--strength", "0.5", "--seed", "3", "--num-images", "2",
                           "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    assert [p.name for p in paths] == ["00000-3-a-fox.png", "00001-4-a-fox.png"]
    with PIL.Image.open(paths[1]) as image:
        assert image.size == (SIZE, SIZE)
        assert image.text["seed"] == "4" and image.text["strength"] == "0.5" and image.text["prompt"] == "a fox"
        assert image.text["image"] == str(tmp_path / "in.png") and image.text["model"] == tiny_sd_dir


def test_inpaint_cli_mask_and_outpaint(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    random_image().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    args = ["--model", tiny_sd_dir, "--image", str(tmp_path / "in.png"), "--prompt", "a fox", "--steps", "3"]
    args += ["--seed", "5", "--out", str(tmp_path / "out")]

    code, paths, err = cli(capsys, inpaint_main, *args, "--mask", str(tmp_path / "mask.png"))
    assert code == 0, err
    with PIL.Image.open(paths[0]) as image:
        assert image.text["mask"] == str(tmp_path / "mask.png") and image.text["strength"] == "1.0"
        kept = np.asarray(box_mask()) < 128
        np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[kept], np.asarray(random_image())[kept])

    code, paths, err = cli(capsys, inpaint_main, *args, "--outpaint", "left=16,bottom=8", "--resamples", "1",
                           "--scheduler", "ddim")  # fmt: skip
    assert code == 0, err
    with PIL.Image.open(paths[0]) as image:
        assert image.size == (SIZE + 16, SIZE + 8) and image.text["outpaint"] == "left=16,bottom=8"
        assert image.text["resamples"] == "1" and image.text["scheduler"] == "ddim"


@pytest.mark.parametrize(
    "main, extra, message",
    [
        (img2img_main, ["--strength", "0"], "--strength: must be in (0, 1]"),
        (img2img_main, ["--image", "missing.png"], "missing.png does not exist"),
        (inpaint_main, [], "exactly one of --mask FILE or --outpaint"),
        (inpaint_main, ["--outpaint", "middle=3"], "SIDE in left, right, top, bottom"),
        (inpaint_main, ["--mask", "IN"], "mask_image is all black"),  # the input image as its own mask: too dark
        (inpaint_main, ["--outpaint", "left=8", "--resamples", "-1"], "--resamples: must be"),
        (inpaint_main, ["--outpaint", "left=8", "--resamples", "2"], "needs a scheduler whose step keeps no state"),
    ],
)
def test_clis_bad_arguments_exit_2_with_one_line(capsys, tiny_sd_dir, tmp_path, main, extra, message) -> None:
    PIL.Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if arg == "IN" else arg for arg in extra]
    args = ["--model", tiny_sd_dir, "--image", str(tmp_path / "in.png"), "--prompt", "a fox", "--steps", "2"]
    code, paths, err = cli(capsys, main, *args, *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and paths == []
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
