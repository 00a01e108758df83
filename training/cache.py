"""Cache the frozen encoders' outputs: VAE latents and CLIP text embeddings, computed once and stored as safetensors.

With a frozen VAE and text encoder, every epoch would re-encode the same images and captions; caching does that once
(the U-Net step is then all that remains). The VAE posterior is stored as its mean and standard deviation, so each
step still draws a fresh latent sample, as without the cache. Text embeddings are stored per distinct caption, plus
the empty prompt that caption dropout uses. Caching needs a deterministic image pipeline (center crop, no flip).

A cache folder is written atomically (a temporary folder renamed into place) and carries a fingerprint of what it
was computed from (the records, resolution, buckets, and hashes of the VAE and text encoder weights); a cache whose
fingerprint differs is rebuilt, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.text import CHUNK_TOKENS, encode_prompts
from ldm.tokenizer import CLIP_MAX_LENGTH
from training.data import ImageCaptionDataset, collate

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATENTS = "latents.safetensors"
TEXT = "text.safetensors"
assert CHUNK_TOKENS + 2 == CLIP_MAX_LENGTH


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_fingerprint(dataset: ImageCaptionDataset, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict:
    """What a cache depends on; two caches with equal fingerprints hold the same values."""
    records = hashlib.sha256()
    for i, record in enumerate(dataset.records.records):
        records.update(json.dumps([dataset.records.image_name(i), list(record.captions)]).encode())
    return {
        "records": records.hexdigest(),
        "buckets": [list(dataset.target_size(i)) for i in range(len(dataset))],
        "crop": dataset.crop,
        "interpolation": dataset.interpolation,
        "vae": weights_hash(vae),
        "text_encoder": weights_hash(text_encoder),
    }


def _check_deterministic(dataset: ImageCaptionDataset) -> None:
    if dataset.crop != "center" or dataset.flip:
        raise ValueError(
            "caching latents needs the same pixels every epoch: use --crop center and no --flip, or drop --cache"
        )


@torch.no_grad()
def build_cache(
    dataset: ImageCaptionDataset,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    folder: str | Path,
    *,
    batch_size: int = 16,
) -> Path:
    """Encode every image and distinct caption of ``dataset`` and write the cache to ``folder`` (replacing it)."""
    _check_deterministic(dataset)
    folder = Path(folder)
    fingerprint = cache_fingerprint(dataset, vae, text_encoder)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        latents: dict[str, torch.Tensor] = {}
        source = torch.empty(len(dataset), dtype=torch.int64)
        indices = list(range(len(dataset)))
        # Encode bucket by bucket so each VAE batch has one image size.
        by_bucket: dict[int, list[int]] = {}
        for i in indices:
            by_bucket.setdefault(dataset.bucket_of_index[i], []).append(i)
        batches = [group[k : k + batch_size] for group in by_bucket.values() for k in range(0, len(group), batch_size)]
        for batch_indices in tqdm(batches, desc="caching latents"):
            batch = collate([dataset[i] for i in batch_indices])
            posterior = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
            for k, i in enumerate(batch_indices):
                latents[f"mean.{i}"] = posterior.mean[k].float().cpu().contiguous()
                latents[f"std.{i}"] = posterior.std[k].float().cpu().contiguous()
                source[i] = int(batch["indices"][k])
        latents["source_index"] = source
        save_file(latents, tmp / LATENTS)

        captions = sorted({c for record in dataset.records.records for c in record.captions} | {""})
        embeds = {}
        # One caption at a time: each keeps its own number of 77-token chunks (padding happens per batch).
        for j, caption in enumerate(tqdm(captions, desc="caching text embeddings")):
            embeds[f"caption.{j}"] = encode_prompts(text_encoder, tokenizer, [caption], device=device)[0].float().cpu()
        save_file(embeds, tmp / TEXT)
        manifest = {"fingerprint": fingerprint, "captions": captions, "size": len(dataset)}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached %d latents and %d captions in %s", len(dataset), len(captions), folder)
    return folder


def cache_is_current(folder: str | Path, fingerprint: dict) -> bool:
    """Whether ``folder`` holds a complete cache computed from exactly ``fingerprint``."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    complete = (folder / LATENTS).is_file() and (folder / TEXT).is_file()
    return complete and manifest.get("fingerprint") == fingerprint


class CachedLatentDataset(Dataset[dict[str, Any]]):
    """The samples of an :class:`ImageCaptionDataset` as cached latents: ``{"latent_mean", "latent_std",
    "caption", "index"}``, with the same caption choice per (seed, epoch, index) as the image dataset."""

    def __init__(self, dataset: ImageCaptionDataset, folder: str | Path) -> None:
        self.dataset = dataset
        self.folder = Path(folder)
        manifest = json.loads((self.folder / MANIFEST).read_text())
        self.captions: list[str] = manifest["captions"]
        self._caption_index = {c: i for i, c in enumerate(self.captions)}
        self.bucket_of_index = dataset.bucket_of_index
        self._latents = None  # opened lazily, once per process (DataLoader workers included)
        with safe_open(self.folder / TEXT, framework="pt") as text:
            self._embeds = [text.get_tensor(f"caption.{i}") for i in range(len(self.captions))]

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds the caption choice (as :meth:`ImageCaptionDataset.set_epoch`)."""
        self.dataset.set_epoch(epoch)

    def summary(self):
        return self.dataset.summary()

    def summary_dict(self) -> dict:
        return self.dataset.summary_dict()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._latents is None:
            self._latents = safe_open(self.folder / LATENTS, framework="pt")
        source = int(self._latents.get_slice("source_index")[index : index + 1][0])
        return {
            "latent_mean": self._latents.get_tensor(f"mean.{index}"),
            "latent_std": self._latents.get_tensor(f"std.{index}"),
            "caption": self.dataset.pick_caption(source, index),
            "index": source,
        }

    def embeddings(self, captions: list[str]) -> torch.Tensor:
        """The cached text embeddings of ``captions`` ``(B, 77 * n, D)``, shorter ones padded with empty-prompt
        chunks to the longest, exactly as :func:`ldm.text.encode_prompts` pads a batch."""
        missing = [c for c in captions if c not in self._caption_index]
        if missing:
            raise KeyError(f"captions not in the cache {self.folder}: {missing[:3]}")
        rows = [self._embeds[self._caption_index[c]] for c in captions]
        longest = max(row.shape[0] for row in rows)
        pad = self._embeds[self._caption_index[""]]
        return torch.stack([torch.cat([row] + [pad] * ((longest - row.shape[0]) // pad.shape[0])) for row in rows])


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples (all from one bucket, so one latent size)."""
    return {
        "latent_mean": torch.stack([b["latent_mean"] for b in batch]),
        "latent_std": torch.stack([b["latent_std"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "indices": torch.tensor([b["index"] for b in batch]),
    }
