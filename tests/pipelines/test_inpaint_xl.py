"""LatentDiffusionXLInpaintPipeline against stock StableDiffusionXLInpaintPipeline on the tiny SDXL components (a base
U-Net, a 9-channel inpainting U-Net and a refiner-style U-Net), schedulers and seeds; the pasted pixels against the
original image; the family table's entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from ldm.errors import UserError
from ldm.presets import build_components
from pipelines import LatentDiffusionXLInpaintPipeline
from pipelines.families import STABLE_DIFFUSION_XL, pipelines_of
from tests.pipelines.editing import PARITY_TOLERANCE, SIZE, box_mask, random_image, unet_variant

STEPS = 3


@pytest.fixture(scope="module")
def base_components() -> dict:
    """The tiny SDXL components (4-channel U-Net, Euler)."""
    return build_components("tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def inpainting_unet(base_components):
    """A 9-channel SDXL inpainting U-Net of the tiny architecture."""
    return unet_variant(base_components["unet"], in_channels=9)


def with_(components: dict, unet=None, scheduler: type | None = None) -> dict:
    """``components`` with another U-Net and / or scheduler class (from the shipped config)."""
    changed = dict(components)
    if unet is not None:
        changed["unet"] = unet
    if scheduler is not None:
        changed["scheduler"] = scheduler.from_config(components["scheduler"].config)
    return changed


def pair(components: dict, **settings) -> tuple[StableDiffusionXLInpaintPipeline, LatentDiffusionXLInpaintPipeline]:
    """Stock's and our pipeline on the same components (no watermark)."""
    pipes = (
        StableDiffusionXLInpaintPipeline(**components, add_watermarker=False, **settings),
        LatentDiffusionXLInpaintPipeline(**components, add_watermarker=False, **settings),
    )
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def run(pipe, seed: int | list[int] = 0, **kwargs):
    """``pipe`` on a random image and a box mask, 3 steps, guidance 5, numpy output; returns the images."""
    generator = (
        [torch.Generator().manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator().manual_seed(seed)
    )
    kwargs = {
        "prompt": "a red circle",
        "image": random_image(),
        "mask_image": box_mask(),
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "output_type": "np",
        **kwargs,
    }
    return pipe(generator=generator, **kwargs).images


def assert_parity(components: dict, settings: dict | None = None, **kwargs) -> np.ndarray:
    stock, ours = pair(components, **(settings or {}))
    expected, actual = run(stock, **kwargs), run(ours, **kwargs)
    assert actual.shape == expected.shape
    assert np.abs(np.asarray(actual, np.float32) - np.asarray(expected, np.float32)).max() < PARITY_TOLERANCE
    return actual


@pytest.mark.parametrize("kind", ["base", "inpainting"])
@pytest.mark.parametrize(
    ("scheduler", "strength"),
    [(EulerDiscreteScheduler, 1.0), (DDIMScheduler, 0.6), (EulerDiscreteScheduler, None)],
    ids=["euler-strength1", "ddim-strength0.6", "euler-stock-default"],
)
def test_same_images_as_stock(base_components, inpainting_unet, kind, scheduler, strength):
    unet = inpainting_unet if kind == "inpainting" else None
    extra = {} if strength is None else {"strength": strength}
    assert_parity(with_(base_components, unet, scheduler), **extra)


def test_masked_image_latents_as_stock(base_components, inpainting_unet):
    masked = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    actual = assert_parity(with_(base_components, inpainting_unet), masked_image_latents=masked, strength=1.0)
    # The given latents are used: other ones change the image.
    other = run(pair(with_(base_components, inpainting_unet))[1], masked_image_latents=-masked, strength=1.0)
    assert np.abs(actual - other).max() > 1e-3


def test_padding_mask_crop_as_stock(base_components):
    stock, ours = pair(base_components)
    kwargs = {"padding_mask_crop": 8, "output_type": "pil", "mask_image": box_mask(24, 40, 24, 40)}
    expected, actual = run(stock, **kwargs), run(ours, **kwargs)
    diff = np.abs(np.asarray(actual[0], np.int16) - np.asarray(expected[0], np.int16))
    assert diff.max() <= 1  # uint8 images: at most a rounding step apart


def test_refiner_style_unet_with_aesthetic_score_as_stock(base_components):
    unet = base_components["unet"]
    refiner = unet_variant(unet, projection_class_embeddings_input_dim=5 * 8 + 32)
    settings = {"requires_aesthetics_score": True}
    assert_parity(with_(base_components, refiner), settings, aesthetic_score=7.0, negative_aesthetic_score=2.0)


def test_refiner_split_continues_base_latents_as_stock(base_components):
    base = StableDiffusionXLPipeline(**base_components, add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    base_latents = base(
        "a red circle",
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        denoising_end=0.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert_parity(base_components, image=base_latents, num_inference_steps=4, denoising_start=0.5)


def test_refiner_split_takes_unbatched_base_latents_as_stock(base_components):
    # A base model's images[0] is one (C, h, w) latent; with no height / width given, the size comes from it.
    base = StableDiffusionXLInpaintPipeline(**base_components, add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4, "height": None, "width": None}
    latents = run(base, **kwargs, denoising_end=0.5, output_type="latent")[0]
    assert latents.shape == (4, SIZE // 8, SIZE // 8)
    actual = assert_parity(base_components, image=latents, denoising_start=0.5, **kwargs)
    assert actual.shape == (1, SIZE, SIZE, 3)


def test_denoising_end_hands_over_latents_as_stock(base_components, inpainting_unet):
    kwargs = {"num_inference_steps": 4, "denoising_end": 0.5, "output_type": "latent", "strength": 1.0}
    latents = assert_parity(with_(base_components, inpainting_unet), **kwargs)
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)


def test_resamples_with_a_base_unet(base_components, inpainting_unet):
    components = with_(base_components, scheduler=DDIMScheduler)
    _, ours = pair(components)
    plain, resampled = run(ours), run(ours, resamples=1)
    assert np.abs(plain - resampled).max() > 1e-3  # the extra passes change the result
    _, inpainting = pair(with_(components, inpainting_unet))
    with pytest.raises(UserError, match="resamples is for inpainting with a text-to-image U-Net"):
        run(inpainting, resamples=1)


def test_long_prompts_switch(base_components):
    long_prompt = " ".join(["red circle blue square"] * 25)  # 100 tokens: two chunks
    truncated = assert_parity(base_components, prompt=long_prompt, long_prompts=False)
    chunked = run(pair(base_components)[1], prompt=long_prompt)
    assert np.abs(chunked - truncated).max() > 1e-4  # on by default: the tokens past 77 count


def test_batch_equals_single_runs(base_components):
    _, ours = pair(base_components)
    prompts = ["a red circle", "a blue square"]
    batch = run(ours, seed=[0, 1], prompt=prompts, strength=0.7)
    singles = [run(ours, seed=[seed], prompt=p, strength=0.7)[0] for seed, p in zip([0, 1], prompts, strict=True)]
    assert np.abs(batch - np.stack(singles)).max() < PARITY_TOLERANCE


def test_callback_sees_stock_tensors(base_components, inpainting_unet):
    names = ["latents", "add_time_ids", "mask", "masked_image_latents"]
    seen: dict[str, list] = {"stock": [], "ours": []}

    def record(key):
        def callback(pipe, i, t, tensors):
            seen[key].append({name: tensors[name].clone() for name in names})
            return {}

        return callback

    stock, ours = pair(with_(base_components, inpainting_unet))
    for key, pipe in (("stock", stock), ("ours", ours)):
        run(pipe, strength=1.0, callback_on_step_end=record(key), callback_on_step_end_tensor_inputs=names)
    assert len(seen["ours"]) == len(seen["stock"]) == STEPS
    for ours_step, stock_step in zip(seen["ours"], seen["stock"], strict=True):
        for name in names:
            assert ours_step[name].shape == stock_step[name].shape, name
            assert (ours_step[name] - stock_step[name]).abs().max() < PARITY_TOLERANCE, name


def test_keep_unmasked_pixels_keeps_them_exactly(base_components):
    _, ours = pair(base_components)
    image, mask = random_image(), box_mask()
    images = run(ours, image=image, mask_image=mask, keep_unmasked_pixels=True)
    kept = np.asarray(mask) == 0
    original = np.asarray(image, np.float32) / 255
    assert np.abs(images[0][kept] - original[kept]).max() < 1e-6
    # Off (stock's default), the kept area goes through the VAE and changes.
    plain = run(ours, image=image, mask_image=mask)
    assert np.abs(plain[0][kept] - original[kept]).max() > 1e-2


def test_family_table_has_sdxl_inpainting():
    classes = pipelines_of(STABLE_DIFFUSION_XL)
    assert classes.inpaint is LatentDiffusionXLInpaintPipeline
    assert issubclass(classes.inpaint, classes.text_to_image)
