"""Mask helpers for inpainting and outpainting: the padded canvas of an outpainting, the latent-size mask, the
feathered pixel-space blend, and the check that a mask keeps and regenerates something.

Masks follow diffusers: ``(B, 1, H, W)`` tensors in [0, 1], white (1) = regenerate, black (0) = keep.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ldm.errors import UserError

logger = logging.getLogger(__name__)


def outpaint_canvas(
    image: PIL.Image.Image,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: Literal["edge"] | tuple[int, int, int] = "edge",
    multiple: int = 8,
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Pad ``image`` by the given pixels per side for outpainting; returns ``(canvas, mask)``.

    The canvas is rounded up to multiples of ``multiple`` (the VAE factor); the extra pixels go to the right / bottom
    unless only the left / top is extended. The mask is white (regenerate) on the new area and black on the original.
    ``fill`` is what the new area starts as: ``"edge"`` repeats the border pixels outwards (a start that matters only
    for ``strength`` < 1), or an RGB colour.

    Raises:
        UserError: a negative extension, nothing to extend, or a ``fill`` that is neither ``"edge"`` nor RGB.
    """
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if not isinstance(value, int) or value < 0:
            raise UserError(f"outpaint {name} must be a whole number of pixels >= 0; got {value!r}")
    if not any(sides.values()):
        raise UserError("outpaint needs at least one of left, right, top, bottom > 0 (pixels to add on that side)")
    if fill != "edge" and not (isinstance(fill, tuple) and len(fill) == 3):
        raise UserError(f"fill must be 'edge' or an (r, g, b) tuple; got {fill!r}")

    def round_up(size: int, before: int, after: int) -> tuple[int, int]:
        extra = -(size + before + after) % multiple
        return (before + extra, after) if before > 0 and after == 0 else (before, after + extra)

    width, height = image.size
    left, right = round_up(width, left, right)
    top, bottom = round_up(height, top, bottom)
    pixels = np.asarray(image.convert("RGB"))
    padding = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(pixels, padding, mode="edge")
    else:
        canvas = np.stack([np.pad(pixels[..., c], padding[:2], constant_values=fill[c]) for c in range(3)], axis=-1)
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top : top + height, left : left + width] = 0
    return PIL.Image.fromarray(canvas), PIL.Image.fromarray(mask, mode="L")


def feather_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``(B, 1, H, W)`` mask with standard deviation ``sigma`` pixels (kernel radius ceil(3 sigma),
    edges replicated); pixels farther than the radius from the mask stay exactly 0. ``sigma`` = 0 returns ``mask``."""
    if sigma <= 0:
        return mask
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(mask.dtype)
    blurred = F.pad(mask, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def latent_mask(mask: torch.Tensor, size: tuple[int, int], cover: bool = False) -> torch.Tensor:
    """A ``(B, 1, H, W)`` pixel mask at the latents' ``size`` ``(h, w)``.

    ``cover`` False: nearest-neighbour resizing, as stock ``StableDiffusionInpaintPipeline`` does (each latent takes
    the top-left pixel of its block). ``cover`` True: 1 where any pixel of the latent's block is masked (a max pool),
    so every masked pixel is regenerated, which pasting the original back outside the mask needs.
    """
    if cover:
        return F.adaptive_max_pool2d(mask, size)
    return F.interpolate(mask, size=size)


def paste_unmasked(
    generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, blur: float = 0.0
) -> torch.Tensor:
    """``generated`` inside the mask, ``original`` outside it, blended through the mask feathered by ``blur`` pixels
    (:func:`feather_mask`): ``(1 - m) * original + m * generated``. Images ``(B, 3, H, W)`` in the same range, mask
    ``(B, 1, H, W)`` (a batch of 1 broadcasts)."""
    blend = feather_mask(mask.to(generated.dtype), blur)
    return (1 - blend) * original.to(generated.dtype) + blend * generated


def warn_if_mask_is_uniform(mask: torch.Tensor) -> None:
    """Log a warning for a binarized mask that keeps nothing (all white) or regenerates nothing (all black); stock
    runs such masks, and so do we."""
    regenerate = mask >= 0.5
    if not regenerate.any():
        logger.warning(
            "mask_image is all black: nothing is regenerated (outside strength's noise); paint the area to redo white"
        )
    elif regenerate.all():
        logger.warning("mask_image is all white: nothing of the image is kept; this is img2img with the whole image")
