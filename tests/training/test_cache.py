"""The latent / text-embedding cache: the values are the encoders' own, each sample's micro-conditioning is kept,
named caption outputs (SDXL's two) fit the same format, stale or old caches are rebuilt, training uses it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from ldm.errors import UserError
from ldm.presets import build_components
from ldm.text import encode_prompts
from tests.training.test_records import captioned_folder, noise
from training.cache import (
    CACHE_FORMAT,
    CachedLatentDataset,
    build_cache,
    cache_fingerprint,
    cache_is_current,
    collate_cached,
    weights_hash,
    write_cache,
)
from training.config import ConfigError
from training.data import ImageCaptionDataset, collate
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
        # not in the data: encoded into the table by hand for the check
        cached.add_caption(captions[2], {"prompt_embeds": encode_prompts(text_encoder, tokenizer, [captions[2]])[0]})
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
    parts = build_components("tiny", seed=0)
    dataset = ImageCaptionDataset(load_image_caption_records(shapes_dir), resolution=64)
    write_format_1_cache(tmp_path / "cache", dataset, parts["vae"], parts["text_encoder"])  # left by an old version
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=3, cache=True))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    built = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    assert manifest["size"] == 8 and manifest["format"] == CACHE_FORMAT and (final / "unet").is_dir()  # rebuilt
    train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=5, cache=True, resume="latest"))
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt


def test_cache_refuses_random_crops(tiny_sd_dir, shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="cache needs the same pixels"):
        config(tiny_sd_dir, shapes_dir, tmp_path, cache=True, crop="random")


# ------------------------------------------------------------------------------------------ micro-conditioning


def mixed_sizes(folder: Path, **kwargs) -> ImageCaptionDataset:
    """Wide, tall and square images at resolution 32 in aspect-ratio buckets (center crop: what a cache takes)."""
    sizes = [(80, 40), (40, 72), (50, 26), (96, 32), (26, 52), (70, 33)]  # 96 x 32 fills the 48 x 16 bucket
    images = {f"{i}.png": noise(size, seed=i) for i, size in enumerate(sizes)}
    captioned_folder(folder, images, {name: f"image {name}" for name in images})
    settings = dict(resolution=32, bucketing=True) | kwargs
    return ImageCaptionDataset(load_image_caption_records(str(folder), num_workers=1), **settings)


def test_cache_keeps_each_samples_size_and_crop(tmp_path):
    """A cached run gets the micro-conditioning the image pipeline records, sample by sample and batched."""
    dataset = mixed_sizes(tmp_path / "data")
    parts = build_components("tiny", seed=0)
    folder = build_cache(dataset, parts["vae"], parts["text_encoder"], parts["tokenizer"], tmp_path / "cache")
    cached = CachedLatentDataset(dataset, folder)
    keys = ("original_size", "crop_top_left", "target_size")
    samples = [dataset[i] for i in range(len(dataset))]
    assert {s["crop_top_left"] != (0, 0) for s in samples} == {True, False}  # some are cropped, some not
    for i, sample in enumerate(samples):
        assert {key: cached[i][key] for key in keys} == {key: sample[key] for key in keys}
        assert tuple(cached[i]["latent_mean"].shape[1:]) == tuple(size // 8 for size in sample["target_size"])
    batch = dataset.batch_sampler(4, shuffle=False).batches()[0]
    from_cache, from_images = collate_cached([cached[i] for i in batch]), collate([dataset[i] for i in batch])
    for key in keys:
        assert from_cache[key].dtype == torch.long and torch.equal(from_cache[key], from_images[key])


def test_fingerprint_follows_the_crop_and_resize_settings(tmp_path):
    dataset = mixed_sizes(tmp_path / "data")
    vae, text_encoder = (build_components("tiny", seed=0)[name] for name in ("vae", "text_encoder"))
    reference = cache_fingerprint(dataset, vae, text_encoder)
    assert reference["format"] == CACHE_FORMAT
    same = [mixed_sizes(tmp_path / "data", seed=7)]  # the seed only picks captions, which are not cached as samples
    changed = [
        mixed_sizes(tmp_path / "data", interpolation="bicubic"),
        mixed_sizes(tmp_path / "data", resolution=40),
        mixed_sizes(tmp_path / "data", bucketing=False),
        mixed_sizes(tmp_path / "data", buckets=[(32, 32), (48, 24), (24, 48)]),
    ]
    records = dataset.records
    resized = replace(records, records=[replace(records.records[0], size=(81, 40)), *records.records[1:]])
    changed.append(ImageCaptionDataset(resized, resolution=32, bucketing=True))  # an image replaced by another size
    assert all(cache_fingerprint(other, vae, text_encoder) == reference for other in same)
    for other in changed:
        assert cache_fingerprint(other, vae, text_encoder) != reference


def write_format_1_cache(folder: Path, dataset: ImageCaptionDataset, vae, text_encoder) -> None:
    """A cache as the previous version wrote it: one ``caption.{j}`` tensor per caption, no sizes or crops."""
    folder.mkdir(parents=True)
    fingerprint = {k: v for k, v in cache_fingerprint(dataset, vae, text_encoder).items() if k in ("buckets", "crop")}
    fingerprint |= {"vae": weights_hash(vae), "text_encoder": weights_hash(text_encoder)}
    captions = sorted({c for record in dataset.records.records for c in record.captions} | {""})
    latents = {f"{kind}.{i}": torch.zeros(4, 4, 4) for i in range(len(dataset)) for kind in ("mean", "std")}
    save_file(latents | {"source_index": torch.arange(len(dataset))}, folder / "latents.safetensors")
    save_file({f"caption.{j}": torch.zeros(77, 32) for j in range(len(captions))}, folder / "text.safetensors")
    manifest = {"fingerprint": fingerprint, "captions": captions, "size": len(dataset)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_cache_of_the_previous_format_is_rebuilt_never_read(tmp_path):
    dataset = mixed_sizes(tmp_path / "data")
    parts = build_components("tiny", seed=0)
    vae, text_encoder, tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
    write_format_1_cache(tmp_path / "cache", dataset, vae, text_encoder)
    assert not cache_is_current(tmp_path / "cache", cache_fingerprint(dataset, vae, text_encoder))
    with pytest.raises(UserError, match="has format 1, this version reads 2; delete it"):
        CachedLatentDataset(dataset, tmp_path / "cache")
    build_cache(dataset, vae, text_encoder, tokenizer, tmp_path / "cache")
    assert cache_is_current(tmp_path / "cache", cache_fingerprint(dataset, vae, text_encoder))
    assert CachedLatentDataset(dataset, tmp_path / "cache")[0]["original_size"] == (40, 80)
    with pytest.raises(UserError, match="holds 6 samples, the dataset 5"):
        records = dataset.records
        CachedLatentDataset(ImageCaptionDataset(replace(records, records=records.records[:5])), tmp_path / "cache")


# ------------------------------------------------------------------------------ named caption outputs (SDXL's)


@dataclass
class TwoEncoders:
    """SDXL's shape of caption outputs from two tiny CLIP encoders: both encoders' hidden states concatenated, and
    the second one's pooled output."""

    first: torch.nn.Module
    second: torch.nn.Module
    tokenizer: object
    outputs: tuple[str, ...] = ("prompt_embeds", "pooled_prompt_embeds")

    def fingerprint(self) -> dict[str, str]:
        return {"text_encoder": weights_hash(self.first), "text_encoder_2": weights_hash(self.second)}

    def encode(self, caption: str) -> dict[str, Tensor]:
        hidden = [encode_prompts(encoder, self.tokenizer, [caption])[0] for encoder in (self.first, self.second)]
        ids = self.tokenizer([caption], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        pooled = self.second(ids.input_ids).pooler_output[0]
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def test_two_encoders_outputs_are_cached_in_the_same_format(tmp_path):
    dataset = mixed_sizes(tmp_path / "data")
    parts, other = build_components("tiny", seed=0), build_components("tiny", seed=1)
    encoder = TwoEncoders(parts["text_encoder"], other["text_encoder"], parts["tokenizer"])
    with torch.no_grad():
        folder = write_cache(dataset, parts["vae"], encoder, tmp_path / "cache")
        assert cache_is_current(folder, cache_fingerprint(dataset, parts["vae"], encoder))
        changed = replace(encoder, second=build_components("tiny", seed=2)["text_encoder"])
        assert not cache_is_current(folder, cache_fingerprint(dataset, parts["vae"], changed))
        cached = CachedLatentDataset(dataset, folder)
        long = "a long caption, " * 30
        cached.add_caption(long, encoder.encode(long))
        captions = [cached.captions[1], long, ""]
        outputs = cached.text_outputs(captions)
        hidden = [encode_prompts(e, encoder.tokenizer, captions) for e in (encoder.first, encoder.second)]
        pooled = torch.stack([encoder.encode(c)["pooled_prompt_embeds"] for c in captions])
    assert sorted(outputs) == ["pooled_prompt_embeds", "prompt_embeds"] and outputs["prompt_embeds"].shape[1] == 154
    torch.testing.assert_close(outputs["prompt_embeds"], torch.cat(hidden, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["pooled_prompt_embeds"], pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="returned"):
        write_cache(dataset, parts["vae"], replace(encoder, outputs=("prompt_embeds",)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))
