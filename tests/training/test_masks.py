"""Masked loss: masks from alpha or a mask folder, cropped like their image, averaged onto the latent grid, cached
with the latents (and in the cache's fingerprint); ``masked_mean`` against hand-computed means."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion import diffusion_loss
from ldm.presets import build_components
from training.cache import CachedLatentDataset, ClipCaptionEncoder, cache_fingerprint, collate_cached, write_cache
from training.data import ImageCaptionDataset, collate
from training.masks import latent_mask, masked_mean
from training.records import Subset, load_subsets


def test_a_mask_from_alpha_is_the_mean_of_each_8x8_cell(tmp_path):
    alpha = np.zeros((16, 16), dtype=np.uint8)
    alpha[:8, :4] = 255  # top-left cell: half its pixels -> 0.5
    alpha[8:, 8:] = 255  # bottom-right cell: all -> 1
    alpha[0, 8] = 51  # top-right cell: one pixel at 0.2 -> 0.2 / 64
    rgba = np.dstack([np.full((16, 16, 3), 120, dtype=np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a grey square")
    subset = Subset(path=str(tmp_path))
    dataset = ImageCaptionDataset(load_subsets([subset]), resolution=16, subsets=[subset], masked_loss=True)
    mask = dataset[0]["loss_mask"]
    expected = torch.tensor([[[0.5, 0.2 / 64], [0.0, 1.0]]])
    assert mask.shape == (1, 2, 2) and torch.allclose(mask, expected, atol=1e-6)
    batch = collate([dataset[0], dataset[0]])
    assert batch["loss_mask"].shape == (2, 1, 2, 2)


def mask_folder(root):
    """A 32x16 image (cropped to the centre 16x16 at resolution 16) and its mask file: column x has value 8 * x."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    Image.new("RGB", (32, 16), (10, 200, 30)).save(images / "wide.jpg")
    (images / "wide.txt").write_text("a green field")
    columns = np.tile((np.arange(32) * 8).astype(np.uint8), (16, 1))
    Image.fromarray(columns, "L").save(masks / "wide.png")
    return images, masks


def test_a_mask_file_is_cropped_like_its_image(tmp_path):
    images, masks = mask_folder(tmp_path)
    subset = Subset(path=str(images), mask_dir=str(masks))
    dataset = ImageCaptionDataset(load_subsets([subset]), resolution=16, subsets=[subset], masked_loss=True)
    sample = dataset[0]
    assert sample["crop_top_left"] == (0, 8)  # the centre crop of a 32-wide image starts at x = 8
    # latent cell (row, col) averages columns 8 + 8 col ... 15 + 8 col, whose values are 8 * x / 255
    expected = [8 * np.mean(np.arange(8 + 8 * c, 16 + 8 * c)) / 255 for c in (0, 1)]
    assert torch.allclose(sample["loss_mask"], torch.tensor([[expected, expected]], dtype=torch.float32))
    # a flipped sample's mask is flipped with it
    flipped = ImageCaptionDataset(
        load_subsets([subset]), resolution=16, subsets=[subset], masked_loss=True, flip=True, seed=0
    )
    for epoch in range(8):
        flipped.set_epoch(epoch)
        if flipped[0]["crop_top_left"] == (0, 8) and flipped._draws(0)[2] < 0.5:  # mirrored corner equals here
            assert torch.allclose(flipped[0]["loss_mask"], sample["loss_mask"].flip(-1))
            break
    else:
        pytest.fail("no flipped sample in 8 epochs")


def test_masked_mean_is_the_mean_over_masked_elements():
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(2, 4, 3, 3, generator=generator)
    ones = torch.ones(2, 1, 3, 3)
    pred, target = torch.rand(2, 4, 3, 3, generator=generator), torch.rand(2, 4, 3, 3, generator=generator)
    assert torch.allclose(masked_mean((pred - target) ** 2, ones), diffusion_loss(pred, target))
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, 0, 0], mask[0, 0, 2, 1] = 1.0, 0.5
    expected = (loss[0, :, 0, 0].sum() + 0.5 * loss[0, :, 2, 1].sum()) / (4 * 1.5)
    result = masked_mean(loss, mask)
    assert torch.allclose(result[0], expected) and result[1] == 0  # an empty mask gives 0, not NaN
    with pytest.raises(ValueError, match="latent size"):
        masked_mean(loss, torch.ones(2, 1, 6, 6))


def test_latent_mask_is_area_interpolation():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24), dtype=np.uint8)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(pixels / 255.0).float()[None, None], size=(2, 3), mode="area"
    )[0]
    assert torch.allclose(latent_mask(Image.fromarray(pixels)), reference, atol=1e-6)


def test_masks_are_cached_and_in_the_fingerprint(tmp_path):
    images, masks = mask_folder(tmp_path)
    parts = build_components("tiny", seed=0)
    encoder = ClipCaptionEncoder(parts["text_encoder"], parts["tokenizer"])
    subset = Subset(path=str(images), mask_dir=str(masks))
    records = load_subsets([subset])
    dataset = ImageCaptionDataset(records, resolution=16, subsets=[subset], masked_loss=True)
    unmasked = ImageCaptionDataset(records, resolution=16, subsets=[subset])
    fingerprint = cache_fingerprint(dataset, parts["vae"], encoder)
    assert fingerprint != cache_fingerprint(unmasked, parts["vae"], encoder)
    assert "masks" not in cache_fingerprint(unmasked, parts["vae"], encoder)  # unmasked caches keep theirs

    folder = write_cache(dataset, parts["vae"], encoder, tmp_path / "cache")
    cached = CachedLatentDataset(dataset, folder)
    batch = collate_cached([cached[0]])
    assert torch.equal(batch["loss_mask"], dataset[0]["loss_mask"][None]) and batch["loss_weight"].tolist() == [1.0]

    Image.new("L", (32, 16), 255).save(masks / "wide.png")  # the mask changes, its name does not
    assert cache_fingerprint(dataset, parts["vae"], encoder) != fingerprint
