"""LatentDiffusionInpaintPipeline against stock diffusers' StableDiffusionInpaintPipeline on the same tiny components
(a text-to-image U-Net and a 9-channel inpainting one), schedulers and seeds; our extras (pasting the original pixels
back, feathering, RePaint resampling, outpainting) against their own references; the ``inpaint`` command line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AsymmetricAutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    StableDiffusionInpaintPipeline,
)

from ldm.errors import UserError
from pipelines import LatentDiffusionInpaintPipeline, LatentDiffusionPipeline, outpaint_canvas
from pipelines.generation_defaults import GenerationDefaults
from pipelines.inpaint import main as inpaint_main
from pipelines.masks import feather_mask, latent_mask
from tests.pipelines.editing import PARITY_TOLERANCE, SIZE, box_mask, ours, random_image, run, stock, unet_variant


@pytest.fixture
def ddim_components(tiny_components) -> dict:
    # clip_sample off up front: our pipeline turns it off as stock text-to-image does, stock inpainting does not.
    scheduler = DDIMScheduler.from_config(tiny_components["scheduler"].config, clip_sample=False)
    return {**tiny_components, "scheduler": scheduler}


@pytest.fixture(params=["text-to-image", "inpainting"])
def components(request, ddim_components) -> dict:
    """The DDIM components with a 4-channel (text-to-image) or a 9-channel (inpainting) U-Net."""
    if request.param == "inpainting":
        return {**ddim_components, "unet": unet_variant(ddim_components["unet"], in_channels=9)}
    return ddim_components


def pipes(components: dict) -> tuple[StableDiffusionInpaintPipeline, LatentDiffusionInpaintPipeline]:
    return stock(StableDiffusionInpaintPipeline, components), ours(LatentDiffusionInpaintPipeline, components)


def assert_same_as_stock(components: dict, **kwargs) -> np.ndarray:
    stock_pipe, our_pipe = pipes(components)
    expected, actual = run(stock_pipe, **kwargs), run(our_pipe, **kwargs)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < PARITY_TOLERANCE
    return actual


# ------------------------------------------------------------------------------------------------ stock parity


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_same_images_as_stock(components, strength) -> None:
    actual = assert_same_as_stock(components, image=random_image(), mask_image=box_mask(), strength=strength)
    assert actual.shape == (1, SIZE, SIZE, 3)


def test_same_images_as_stock_with_an_ancestral_scheduler(components) -> None:
    # An ancestral scheduler draws from the generator at every step: equal images mean equal draws before the loop.
    scheduler = EulerAncestralDiscreteScheduler.from_config(components["scheduler"].config)
    components = {**components, "scheduler": scheduler}
    assert_same_as_stock(components, image=random_image(), mask_image=box_mask(), strength=0.8)


def test_batch_generators_and_latents_as_stock(components) -> None:
    kwargs = {
        "prompt": ["a red circle", "a blue square"],
        "image": [random_image(seed=s) for s in range(4)],
        "mask_image": box_mask(),
        "num_images_per_prompt": 2,
        "num_inference_steps": 3,
        "output_type": "np",
    }
    stock_pipe, our_pipe = pipes(components)
    for extra in ({}, {"latents": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))}):
        images = []
        for pipe in (stock_pipe, our_pipe):
            generators = [torch.Generator().manual_seed(s) for s in range(4)]
            images.append(pipe(**kwargs, **extra, generator=generators).images)
        assert images[1].shape == (4, SIZE, SIZE, 3)
        assert np.abs(images[1] - images[0]).max() < PARITY_TOLERANCE


def test_one_image_for_a_batch_with_generators_equals_the_single_runs(ddim_components) -> None:
    # Stock encodes the shared image once with the first generator, so its second image depends on the first seed;
    # ours encodes each output's copy with its own generator (the image and, for an inpainting U-Net, the masked one).
    components = {**ddim_components, "unet": unet_variant(ddim_components["unet"], in_channels=9)}
    our_pipe = ours(LatentDiffusionInpaintPipeline, components)
    kwargs = {"image": random_image(), "mask_image": box_mask(), "strength": 0.8, "output_type": "np"}
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = our_pipe(["a red circle", "a blue square"], **kwargs, generator=generators, num_inference_steps=3).images
    for prompt, seed, image in zip(["a red circle", "a blue square"], (3, 4), batch, strict=True):
        single = our_pipe(prompt, **kwargs, generator=torch.Generator().manual_seed(seed), num_inference_steps=3)
        assert np.abs(single.images[0] - image).max() < PARITY_TOLERANCE


@pytest.mark.parametrize("fill", [0, 255])
def test_all_black_and_all_white_masks_run_as_stock_with_a_warning(components, fill, caplog) -> None:
    mask = PIL.Image.new("L", (SIZE, SIZE), fill)
    with caplog.at_level(logging.WARNING, logger="pipelines.masks"):
        assert_same_as_stock(components, image=random_image(), mask_image=mask, strength=0.9)
    assert ("all black" if fill == 0 else "all white") in caplog.text


def test_height_and_width_resize_as_stock(components) -> None:
    actual = assert_same_as_stock(components, image=random_image(), mask_image=box_mask(), height=48, width=32)
    assert actual.shape == (1, 48, 32, 3)


def test_masked_image_latents_as_stock(components) -> None:
    # The masked image's latents given instead of encoded: take them from a generator the call does not share.
    stock_pipe = stock(StableDiffusionInpaintPipeline, components)
    image = stock_pipe.image_processor.preprocess(random_image())
    mask = stock_pipe.mask_processor.preprocess(box_mask())
    masked = stock_pipe._encode_vae_image(image * (mask < 0.5), torch.Generator().manual_seed(9))
    assert_same_as_stock(components, image=random_image(), mask_image=box_mask(), masked_image_latents=masked)


def test_padding_mask_crop_as_stock(components) -> None:
    image = random_image((96, 96), seed=3)
    mask = np.zeros((96, 96), np.uint8)
    mask[40:56, 48:64] = 255
    mask = PIL.Image.fromarray(mask, mode="L")
    stock_pipe, our_pipe = pipes(components)
    kwargs = {"image": image, "mask_image": mask, "padding_mask_crop": 8, "height": 64, "width": 64}
    expected = run(stock_pipe, **kwargs, output_type="pil")[0]
    actual = run(our_pipe, **kwargs, output_type="pil")[0]
    assert actual.size == (96, 96)
    assert np.abs(np.asarray(actual).astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_asymmetric_vae_decodes_with_the_image_and_mask_as_stock(ddim_components) -> None:
    # An AsymmetricAutoencoderKL's decoder is conditioned on the original image and the pixel mask.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = AsymmetricAutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            down_block_out_channels=(8, 16, 32, 32),
            up_block_types=("UpDecoderBlock2D",) * 4,
            up_block_out_channels=(8, 16, 32, 32),
            layers_per_down_block=1,
            layers_per_up_block=1,
            norm_num_groups=8,
            sample_size=SIZE,
        ).eval()
    assert_same_as_stock({**ddim_components, "vae": vae}, image=random_image(), mask_image=box_mask(), strength=0.8)


def test_lcm_unet_as_stock(components) -> None:
    unet = unet_variant(components["unet"], in_channels=components["unet"].config.in_channels, time_cond_proj_dim=32)
    lcm = {**components, "unet": unet, "scheduler": LCMScheduler.from_config(components["scheduler"].config)}
    assert_same_as_stock(lcm, image=random_image(), mask_image=box_mask(), guidance_scale=6.0)
    assert_same_as_stock(lcm, image=random_image(), mask_image=box_mask(), guidance_scale=6.0, strength=0.7)


def test_callback_changing_guidance_as_stock(components) -> None:
    # As stock's callback_cfg test: after step 1 keep the positive half of each doubled tensor and stop guiding.
    def stop_guiding_after_one_step(pipe, step, timestep, tensors):
        if step == 1:
            for name in ("prompt_embeds", "mask", "masked_image_latents"):
                tensors[name] = tensors[name].chunk(2)[-1]
            pipe._guidance_scale = 1.0
        return tensors

    assert_same_as_stock(
        components,
        image=random_image(),
        mask_image=box_mask(),
        callback_on_step_end=stop_guiding_after_one_step,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "mask", "masked_image_latents"],
    )


def test_from_pipe_and_stock_components_and_save_load(tiny_components, tmp_path) -> None:
    text = LatentDiffusionPipeline(**tiny_components)
    text.generation_defaults = GenerationDefaults(num_inference_steps=3, guidance_scale=4.0)
    inpaint = LatentDiffusionInpaintPipeline.from_pipe(text)
    assert inpaint.unet is text.unet and inpaint.vae is text.vae and inpaint.scheduler is text.scheduler
    assert inpaint.generation_defaults == text.generation_defaults
    inpaint.set_progress_bar_config(disable=True)

    stock_pipe = stock(StableDiffusionInpaintPipeline, tiny_components)
    from_stock = ours(LatentDiffusionInpaintPipeline, stock_pipe.components)
    kwargs = {"image": random_image(), "mask_image": box_mask(), "num_inference_steps": 3, "guidance_scale": 4.0}
    expected = run(stock_pipe, **kwargs)
    assert np.abs(run(from_stock, **kwargs) - expected).max() < PARITY_TOLERANCE

    inpaint.save_pretrained(tmp_path / "saved")
    loaded = LatentDiffusionInpaintPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_defaults == text.generation_defaults
    defaults = {**kwargs, "num_inference_steps": None, "guidance_scale": None}
    assert np.abs(run(loaded, **defaults) - expected).max() < PARITY_TOLERANCE


# -------------------------------------------------------------------------------------- our extras, opt-in


def test_keep_unmasked_pixels_keeps_them_exactly_and_changes_the_masked_ones(components) -> None:
    image, mask = random_image(), box_mask()
    our_pipe = ours(LatentDiffusionInpaintPipeline, components)
    result = np.asarray(run(our_pipe, image=image, mask_image=mask, output_type="pil", keep_unmasked_pixels=True)[0])
    original, masked = np.asarray(image), np.asarray(mask) > 127
    np.testing.assert_array_equal(result[~masked], original[~masked])
    assert np.abs(result[masked].astype(int) - original[masked]).mean() > 10
    # Inside the mask it is stock's image (the latent mask covers the same blocks for a mask on the latent grid).
    stock_result = np.asarray(
        run(stock(StableDiffusionInpaintPipeline, components), image=image, mask_image=mask, output_type="pil")[0]
    )
    assert np.abs(result[masked].astype(int) - stock_result[masked]).max() <= 1
    # Off (the default), the area outside the mask went through the VAE like stock's.
    plain = np.asarray(run(our_pipe, image=image, mask_image=mask, output_type="pil")[0])
    assert not np.array_equal(plain[~masked], original[~masked])


def test_latent_mask_covers_every_block_with_a_masked_pixel() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3, 9] = 1  # one pixel, not a block's top-left one
    assert latent_mask(mask, (2, 2)).sum() == 0  # nearest (stock): the block's top-left pixel only
    covered = latent_mask(mask, (2, 2), cover=True)
    assert covered[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_keep_unmasked_pixels_regenerates_a_mask_off_the_latent_grid(ddim_components) -> None:
    # A mask not on the 8-pixel grid: every masked pixel still changes, every other pixel is the original's.
    image, mask = random_image(), box_mask(13, 43, 5, 37)
    result = run(
        ours(LatentDiffusionInpaintPipeline, ddim_components),
        image=image,
        mask_image=mask,
        output_type="pil",
        keep_unmasked_pixels=True,
    )[0]
    result, original, masked = np.asarray(result).astype(int), np.asarray(image).astype(int), np.asarray(mask) > 127
    np.testing.assert_array_equal(result[~masked], original[~masked])
    assert (np.abs(result - original).sum(-1)[masked] > 0).mean() > 0.95


def resampled_inpainting_reference(components: dict, image, mask, *, steps: int, resamples: int, seed: int):
    """RePaint's loop written out with the components (no guidance): every DDIM step redone ``resamples`` more times
    from its result noised back by q(x_t | x_t') = N(sqrt(a_t / a_t') x_t', (1 - a_t / a_t') I), the known region put
    back after every pass. The random draws in the pipeline's (stock's) order: the image's VAE posterior, the initial
    noise, the masked image's posterior (unused by a text-to-image U-Net), then the re-noising."""
    pipe, generator = ours(LatentDiffusionInpaintPipeline, components), torch.Generator().manual_seed(seed)
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    scheduler.set_timesteps(steps)
    vae, factor = components["vae"], pipe.vae_scale_factor
    pixels = torch.from_numpy(np.asarray(image) / 127.5 - 1).permute(2, 0, 1)[None].float()
    known = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(known.shape, generator=generator)
    keep = torch.from_numpy(np.asarray(mask) < 128)[None, None]
    vae.encode(pixels * keep).latent_dist.sample(generator)
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
    expected = resampled_inpainting_reference(
        ddim_components, kwargs["image"], kwargs["mask_image"], steps=4, resamples=2, seed=0
    )
    actual = run(ours(LatentDiffusionInpaintPipeline, ddim_components), resamples=2, **kwargs)
    assert (actual - expected).abs().max() < PARITY_TOLERANCE
    plain = run(ours(LatentDiffusionInpaintPipeline, ddim_components), **kwargs)
    assert (actual - plain).abs().max() > 0.1  # resampling changed the result


def test_resampling_runs_the_unet_once_more_per_step_per_resample_and_keeps_the_unmasked_pixels(
    ddim_components,
) -> None:
    pipe, calls = ours(LatentDiffusionInpaintPipeline, ddim_components), []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    image, mask = random_image(), box_mask()
    result = run(
        pipe,
        image=image,
        mask_image=mask,
        resamples=3,
        num_inference_steps=5,
        output_type="pil",
        keep_unmasked_pixels=True,
    )[0]
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

    image, mask_image = random_image(), box_mask(16, 48, 16, 48)
    pipe = ours(LatentDiffusionInpaintPipeline, ddim_components)
    kwargs = {"image": image, "mask_image": mask_image, "output_type": "pil", "keep_unmasked_pixels": True}
    sharp = np.asarray(run(pipe, **kwargs)[0])
    soft, original = np.asarray(run(pipe, **kwargs, mask_blur=2.0)[0]), np.asarray(image)
    np.testing.assert_array_equal(soft[:9], original[:9])
    assert not np.array_equal(soft[14:16], original[14:16])  # feathered just outside the mask
    assert not np.array_equal(soft[16:18], sharp[16:18])  # and just inside it


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
    with pytest.raises(UserError, match="at least one"):
        outpaint_canvas(image)


def test_outpainting_preserves_the_original(ddim_components) -> None:
    image = random_image((48, 64))
    canvas, mask = outpaint_canvas(image, left=16)
    pipe = ours(LatentDiffusionInpaintPipeline, ddim_components)
    result = np.asarray(run(pipe, image=canvas, mask_image=mask, output_type="pil", keep_unmasked_pixels=True)[0])
    assert result.shape == (64, 64, 3)
    np.testing.assert_array_equal(result[:, 16:], np.asarray(image))


# -------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"strength": 0.1, "num_inference_steps": 5}, "leaves no denoising step"),
        ({"mask_image": None}, "pass mask_image"),
        ({"resamples": -1}, "resamples must be a whole number >= 0"),
        ({"mask_blur": 2.0}, "pass keep_unmasked_pixels=True"),
        ({"padding_mask_crop": 8, "output_type": "np"}, "padding_mask_crop needs output_type 'pil'"),
        (
            {"resamples": 2, "scheduler": DPMSolverMultistepScheduler},
            "keeps no state \\(DDIM or DDPM\\); this pipeline has DPMSolverMultistepScheduler",
        ),
    ],
)
def test_errors_name_the_fix(ddim_components, kwargs, message) -> None:
    pipe = ours(LatentDiffusionInpaintPipeline, ddim_components)
    if "scheduler" in kwargs:
        pipe.scheduler = kwargs.pop("scheduler").from_config(pipe.scheduler.config)
    with pytest.raises(UserError, match=message):
        run(pipe, **{"image": random_image(), "mask_image": box_mask(), **kwargs})


def test_resamples_with_an_inpainting_unet_and_a_wrong_unet_are_refused(ddim_components) -> None:
    for in_channels, message in ((9, "resamples is for inpainting with a text-to-image U-Net"), (5, "takes 5 input")):
        unet = unet_variant(ddim_components["unet"], in_channels=in_channels)
        pipe = ours(LatentDiffusionInpaintPipeline, {**ddim_components, "unet": unet})
        with pytest.raises(UserError, match=message):
            run(pipe, image=random_image(), mask_image=box_mask(), resamples=1)


# ------------------------------------------------------------------------------------------------ command line


def cli(capsys, main, *argv: str) -> tuple[int, list[Path], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [Path(line) for line in captured.out.splitlines()], captured.err


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

    code, paths, err = cli(
        capsys, inpaint_main, *args, "--outpaint", "left=16,bottom=8", "--resamples", "1", "--scheduler", "ddim"
    )
    assert code == 0, err
    with PIL.Image.open(paths[0]) as image:
        assert image.size == (SIZE + 16, SIZE + 8) and image.text["outpaint"] == "left=16,bottom=8"
        assert image.text["resamples"] == "1" and image.text["scheduler"] == "ddim"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --mask FILE or --outpaint"),
        (["--outpaint", "middle=3"], "SIDE in left, right, top, bottom"),
        (["--outpaint", "left=8", "--resamples", "-1"], "--resamples: must be"),
        (["--outpaint", "left=8", "--resamples", "2"], "needs a scheduler whose step keeps no state"),
    ],
)
def test_inpaint_cli_bad_arguments_exit_2_with_one_line(capsys, tiny_sd_dir, tmp_path, extra, message) -> None:
    PIL.Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "in.png")
    args = ["--model", tiny_sd_dir, "--image", str(tmp_path / "in.png"), "--prompt", "a fox", "--steps", "2"]
    code, paths, err = cli(capsys, inpaint_main, *args, *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and paths == []
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
