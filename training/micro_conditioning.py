"""SDXL's size and crop micro-conditioning of a training batch (Podell et al. 2023, "SDXL", sec. 2.2).

SDXL's U-Net embeds six integers per image next to the pooled text embedding (``added_cond_kwargs["time_ids"]``):
the source image's original size, the top-left corner of the crop taken from it, and the target size. Training feeds
each sample's own values, recorded by :class:`training.data.ImageCaptionDataset` (and kept by the latent cache), so
that at sampling time ``original_size = target_size = (1024, 1024)`` and ``crops_coords_top_left = (0, 0)`` ask for a
large, uncropped image. The row of one image is :func:`ldm.micro_conditioning.size_crop_time_ids`, which the
pipelines use at sampling time; :func:`add_time_ids` builds a batch of them for the trainer's conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldm.micro_conditioning import size_crop_time_ids

__all__ = ["add_time_ids"]

SizeLike = Tensor | Sequence[int] | Sequence[Sequence[int]]
"""A ``(B, 2)`` integer tensor (or nested sequence) of per-sample pairs, or one pair ``(a, b)`` for the whole batch."""


def _pairs(name: str, value: SizeLike) -> Tensor:
    pairs = torch.as_tensor(value)
    if pairs.is_floating_point() or pairs.is_complex() or pairs.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers (pixels); got {pairs.dtype}")
    if pairs.dim() == 1:
        pairs = pairs[None]
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{name} must be a pair or a (batch, 2) tensor of pairs; got shape {tuple(pairs.shape)}")
    return pairs.long()


def add_time_ids(
    original_size: SizeLike,
    crop_top_left: SizeLike,
    target_size: SizeLike,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SDXL's ``time_ids`` ``(B, 6)``: each row ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``
    (:func:`ldm.micro_conditioning.size_crop_time_ids` of each sample).

    The order of ``StableDiffusionXLPipeline._get_add_time_ids`` (``original_size + crops_coords_top_left +
    target_size``), which the U-Net's ``add_time_proj`` embeds six values at a time. Each argument is a ``(B, 2)``
    integer tensor (a batch's ``original_size`` / ``crop_top_left`` / ``target_size`` from
    :func:`training.data.collate`) or one ``(a, b)`` pair shared by every row; ``B`` is the largest batch given.
    Sizes are ``(height, width)``, the corner ``(top, left)``. The result is in ``dtype`` on the first tensor
    argument's device (as stock casts to the text embeddings' dtype; note that bfloat16 holds integers exactly
    only up to 256, and float16 up to 2048).
    """
    given = {"original_size": original_size, "crop_top_left": crop_top_left, "target_size": target_size}
    parts = [_pairs(name, value) for name, value in given.items()]
    batch = max(part.shape[0] for part in parts)
    if any(part.shape[0] not in (1, batch) for part in parts):
        raise ValueError(
            "original_size, crop_top_left and target_size must have one pair or one per sample; got "
            + ", ".join(str(part.shape[0]) for part in parts)
        )
    device = next((value.device for value in given.values() if isinstance(value, Tensor)), None)
    rows = zip(*(part.expand(batch, 2).tolist() for part in parts))
    # one row at a time through the pipelines' function, so the order lives in one place
    return torch.cat([size_crop_time_ids(*(tuple(pair) for pair in row), dtype=dtype) for row in rows]).to(device)
