"""Helpers shared by the img2img and inpainting tests: stock and our pipelines on the same tiny components, a seeded
call, a random image, a box mask and the tiny U-Net / VAE variants (inpainting, LCM, AutoencoderTiny)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderTiny, DDIMScheduler, UNet2DConditionModel

from ldm.presets import build_components

PARITY_TOLERANCE = 1e-4
SIZE = 64


def stock(cls, components: dict):
    """A stock pipeline of ``cls`` without a safety checker, progress bar off."""
    pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(cls, components: dict):
    """One of our pipelines on ``components``, progress bar off."""
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed: int = 0, **kwargs):
    """``pipe`` on "a red circle", 4 steps, numpy output, seeded with ``seed``; returns the images."""
    kwargs = {"prompt": "a red circle", "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def random_image(size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> PIL.Image.Image:
    """Uniform random RGB pixels, ``size`` = (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def box_mask(top: int = 16, bottom: int = 48, left: int = 8, right: int = 40, size: int = SIZE) -> PIL.Image.Image:
    """A white box on black, on the 8-pixel latent grid (so stock's nearest-neighbour latent mask covers it)."""
    mask = np.zeros((size, size), np.uint8)
    mask[top:bottom, left:right] = 255
    return PIL.Image.fromarray(mask, mode="L")


def unet_variant(unet: UNet2DConditionModel, seed: int = 1, **config) -> UNet2DConditionModel:
    """A fresh U-Net of ``unet``'s architecture with ``config`` changed (``in_channels=9``: an inpainting U-Net;
    ``time_cond_proj_dim``: an LCM U-Net), random weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(unet.config, **config).eval()


def tiny_autoencoder_tiny(factor_levels: int = 3, seed: int = 2) -> AutoencoderTiny:
    """A random ``AutoencoderTiny`` (TAESD's architecture, 4 latent channels) that downsamples by
    ``2 ** (factor_levels - 1)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        channels, blocks = (8,) * factor_levels, (1,) * factor_levels
        return AutoencoderTiny(
            encoder_block_out_channels=channels,
            decoder_block_out_channels=channels,
            num_encoder_blocks=blocks,
            num_decoder_blocks=blocks,
            latent_channels=4,
        ).eval()


PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle"]


def img2img_inputs(batch_size: int) -> dict:
    """The generic checks' call inputs for img2img: one shared image, strength 1 so every step of the schedule runs
    (the checks count them)."""
    prompts = PROMPTS[:batch_size]
    return {
        "prompt": prompts[0] if batch_size == 1 else prompts,
        "image": random_image(),
        "strength": 1.0,
        "guidance_scale": 6.0,
    }


def inpaint_inputs(batch_size: int) -> dict:
    """The generic checks' call inputs for inpainting: one shared image and box mask, stock's strength 1."""
    return {**img2img_inputs(batch_size), "mask_image": box_mask()}


def inpainting_unet_components(components: dict) -> dict:
    """``components`` with a 9-channel inpainting U-Net of the same architecture in place of the U-Net."""
    return {**components, "unet": unet_variant(components["unet"], in_channels=9)}


def edit_components() -> dict:
    """The tiny SD components with stock's optional ones as None and a DDIM scheduler with ``clip_sample`` off (our
    pipelines turn it off as stock text-to-image and img2img do; stock inpainting keeps it)."""
    components = build_components("tiny", seed=0)
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, clip_sample=False)
    return components | {
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def inpainting_unet_edit_components() -> dict:
    """:func:`edit_components` with a 9-channel inpainting U-Net."""
    return inpainting_unet_components(edit_components())
