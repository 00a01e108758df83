"""Masked loss (kohya-ss ``--masked_loss``): train only where a mask says, from the image's alpha or a mask file.

A mask is a grayscale image the size of its training image, 255 where the loss counts, 0 where it does not (values in
between weigh in between): the image's alpha channel, or a PNG of the same name in a mask folder (``a.jpg`` ->
``MASK_DIR/a.png``). :class:`training.data.ImageCaptionDataset` resizes and crops it exactly as its image (same
window, same flip), then :func:`latent_mask` averages it down to the latent grid; :func:`masked_mean` is the loss
over the masked latent elements.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from training.buckets import LATENT_FACTOR

__all__ = ["alpha_mask", "latent_mask", "mask_file", "masked_mean", "masks_hash"]


def mask_file(image: str | Path, mask_dir: str | Path) -> Path:
    """The mask file of ``image`` in ``mask_dir``: the image's file name with the ``.png`` suffix."""
    return Path(mask_dir) / (Path(image).stem + ".png")


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The alpha channel of ``image`` as an ``L`` image, or None when it has no transparency."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def latent_mask(mask: Image.Image, factor: int = LATENT_FACTOR) -> Tensor:
    """A pixel-size ``L`` mask (H, W) as a float mask ``(1, H / factor, W / factor)`` in [0, 1] on the latent grid:
    each latent cell is the mean of its ``factor x factor`` pixels (area averaging, ``F.interpolate(mode="area")``
    for a whole factor)."""
    if mask.width % factor or mask.height % factor:
        raise ValueError(f"mask sides must be multiples of {factor}; got {mask.size}")
    pixels = torch.from_numpy(np.array(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    return F.avg_pool2d(pixels, factor)[0]


def masked_mean(loss_elementwise: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``loss_elementwise`` ``(B, C, h, w)`` over each sample's masked elements, weighted by ``mask``
    ``(B, 1, h, w)`` (broadcast over channels): ``sum_{c,h,w} m * l / sum_{c,h,w} m``, shape ``(B,)``, float32.

    A mask of ones gives the plain per-sample mean (``diffusion_loss`` without weights); an all-zero mask gives 0.
    """
    if mask.ndim != loss_elementwise.ndim or mask.shape[0] != loss_elementwise.shape[0] or mask.shape[1] != 1:
        raise ValueError(
            f"mask must be (B, 1, h, w) for a loss of shape {tuple(loss_elementwise.shape)}; got {tuple(mask.shape)}"
        )
    if mask.shape[2:] != loss_elementwise.shape[2:]:
        raise ValueError(
            f"the mask is {tuple(mask.shape[2:])} and the loss {tuple(loss_elementwise.shape[2:])}: masks must be at "
            "the latent size (latent_mask)"
        )
    loss, mask = loss_elementwise.float(), mask.float().expand_as(loss_elementwise)
    dims = list(range(1, loss.ndim))
    return (loss * mask).sum(dims) / mask.sum(dims).clamp_min(torch.finfo(torch.float32).tiny)


def masks_hash(paths: list[Path | None]) -> str:
    """sha256 of the masks' file names and bytes (``None``: no file, the image's alpha or a full mask), for the
    latent cache's fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\0")
        if path is not None and path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()
