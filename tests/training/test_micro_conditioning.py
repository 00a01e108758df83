"""SDXL's time ids from a batch's recorded sizes and crops: the order and values of stock diffusers'
``StableDiffusionXLPipeline._get_add_time_ids``, one row per sample."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from training.micro_conditioning import add_time_ids

TIME_EMBED_DIM, POOLED_DIM = 8, 32


@pytest.fixture(scope="module")
def stock() -> SimpleNamespace:
    """What stock ``_get_add_time_ids`` reads of its pipeline: a tiny text_time U-Net (it checks the sizes)."""
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        norm_num_groups=32,
    )
    return SimpleNamespace(unet=unet)


def stock_time_ids(stock: SimpleNamespace, original, crop, target) -> torch.Tensor:
    return StableDiffusionXLPipeline._get_add_time_ids(
        stock, tuple(original), tuple(crop), tuple(target), dtype=torch.float32, text_encoder_projection_dim=POOLED_DIM
    )


def test_add_time_ids_are_stocks_for_every_sample(stock) -> None:
    original = torch.tensor([[1024, 768], [333, 1999], [64, 64]])
    crop = torch.tensor([[0, 128], [17, 0], [0, 0]])
    target = torch.tensor([[1024, 1024], [896, 1152], [64, 64]])
    ours = add_time_ids(original, crop, target)
    rows = zip(original.tolist(), crop.tolist(), target.tolist())
    expected = torch.cat([stock_time_ids(stock, *row) for row in rows])
    assert ours.dtype == torch.float32 and ours.shape == (3, 6)
    assert torch.equal(ours, expected)
    # one pair stands for the whole batch (stock's sampling defaults: the target size, no crop)
    shared = add_time_ids(original, (0, 0), (1024, 1024))
    assert torch.equal(shared[1], stock_time_ids(stock, original[1].tolist(), (0, 0), (1024, 1024))[0])
    assert add_time_ids((1024, 1024), (0, 0), (1024, 1024), dtype=torch.float16).dtype == torch.float16


def test_add_time_ids_refuses_what_is_not_pairs_of_pixels() -> None:
    with pytest.raises(ValueError, match="one pair or one per sample; got 3, 2, 1"):
        add_time_ids(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), (8, 8))
    with pytest.raises(ValueError, match=r"crop_top_left must be a pair or a \(batch, 2\) tensor"):
        add_time_ids((8, 8), (0, 0, 0), (8, 8))
    with pytest.raises(ValueError, match="original_size must hold integers"):
        add_time_ids(torch.tensor([[8.0, 8.0]]), (0, 0), (8, 8))
