"""SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): the image's original size, crop offset and target size
given to the U-Net as six numbers (``add_time_ids``), each embedded with sinusoidal features like the timestep and
concatenated with the pooled text embedding (the U-Net's ``addition_embed_type="text_time"``). The refiner swaps the
target size for an aesthetic score (sec. 2.5). The pipelines compute these at sampling time and the trainer from
each sample's recorded size and crop, so both sides build them here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def size_crop_time_ids(
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int],
    target_size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(1, 6)``: ``(h_orig, w_orig, crop_top, crop_left, h_target, w_target)``, the base model's ``time_ids``."""
    return torch.tensor([[*original_size, *crops_coords_top_left, *target_size]], dtype=dtype)


def aesthetic_time_ids(
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int],
    aesthetic_score: float,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(1, 5)``: ``(h_orig, w_orig, crop_top, crop_left, aesthetic_score)``, the refiner's ``time_ids``."""
    return torch.tensor([[*original_size, *crops_coords_top_left, aesthetic_score]], dtype=dtype)
