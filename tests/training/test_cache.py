"""The latent / text-embedding cache: the values are the encoders' own, stale caches are rebuilt, training uses it."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.presets import build_components
from ldm.text import encode_prompts
from training.cache import CachedLatentDataset, build_cache, cache_fingerprint, cache_is_current, collate_cached
from training.config import ConfigError
from training.data import ImageCaptionDataset
from training.records import load_image_caption_records
from training.train_text_to_image import train

from .test_train_text_to_image import config


@pytest.fixture
def dataset(shapes_dir) -> ImageCaptionDataset:
    return ImageCaptionDataset(load_image_caption_records(shapes_dir), resolution=64)


def test_cache_holds_the_encoders_outputs(dataset, tmp_path):
    parts = build_components("tiny", seed=0)
    vae, text_encoder, tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
    folder = build_cache(dataset, vae, text_encoder, tokenizer, tmp_path / "cache", batch_size=3)
    cached = CachedLatentDataset(dataset, folder)
    with torch.no_grad():
        for i in (0, 5, 7):
            sample = dataset[i]
            posterior = vae.encode(sample["pixel_values"][None]).latent_dist
            item = cached[i]
            torch.testing.assert_close(item["latent_mean"], posterior.mean[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(item["latent_std"], posterior.std[0], atol=1e-5, rtol=1e-5)
            assert item["caption"] == sample["caption"] and item["index"] == i
        captions = [dataset[0]["caption"], "", "a long caption, " * 30]
        cached.captions.append(captions[2])  # not in the data: encode it into the table by hand for the check
        cached._caption_index[captions[2]] = len(cached.captions) - 1
        cached._embeds.append(encode_prompts(text_encoder, tokenizer, [captions[2]])[0])
        expected = encode_prompts(text_encoder, tokenizer, captions)  # pads to the longest, as a batch does
    torch.testing.assert_close(cached.embeddings(captions), expected, atol=1e-5, rtol=1e-5)
    batch = collate_cached([cached[0], cached[1]])
    assert batch["latent_mean"].shape == (2, 4, 8, 8) and len(batch["captions"]) == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_stale_caches_are_detected(dataset, tmp_path):
    parts = build_components("tiny", seed=0)
    folder = build_cache(dataset, parts["vae"], parts["text_encoder"], parts["tokenizer"], tmp_path / "cache")
    assert cache_is_current(folder, cache_fingerprint(dataset, parts["vae"], parts["text_encoder"]))
    other_vae = build_components("tiny", seed=1)["vae"]
    assert not cache_is_current(folder, cache_fingerprint(dataset, other_vae, parts["text_encoder"]))
    (folder / "manifest.json").write_text("{broken")
    assert not cache_is_current(folder, cache_fingerprint(dataset, parts["vae"], parts["text_encoder"]))


def test_training_with_the_cache_builds_it_once(tiny_sd_dir, shapes_dir, tmp_path):
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=3, cache=True))
    manifest = tmp_path / "cache" / "manifest.json"
    built = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["size"] == 8 and (final / "unet").is_dir()
    train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=5, cache=True, resume="latest"))
    assert manifest.stat().st_mtime_ns == built  # reused, not rebuilt


def test_cache_refuses_random_crops(tiny_sd_dir, shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="cache needs the same pixels"):
        config(tiny_sd_dir, shapes_dir, tmp_path, cache=True, crop="random")
