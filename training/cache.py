"""Cache the frozen encoders' outputs: VAE latents and text embeddings, computed once and stored as safetensors.

With a frozen VAE and text encoder, every epoch would re-encode the same images and captions; caching does that once
(the U-Net step is then all that remains). The VAE posterior is stored as its mean and standard deviation, so each
step still draws a fresh latent sample, as without the cache. Each sample's size and crop micro-conditioning
(``original_size``, ``crop_top_left``, ``target_size``, :class:`training.data.CropWindow`) is stored with its
latents, so a cached run conditions SDXL exactly as an uncached one. Caching needs a deterministic image pipeline
(center crop, no flip).

Caption outputs are stored per distinct caption, plus the empty prompt that caption dropout uses, as named tensors: a
:class:`CaptionEncoder` says which (Stable Diffusion 1.x/2.x: ``prompt_embeds``; SDXL: ``prompt_embeds``, both
encoders' hidden states concatenated, and ``pooled_prompt_embeds``), so a family with more outputs needs no new
format.

A cache folder is written atomically (a temporary folder renamed into place) and carries a fingerprint of what it
was computed from (the format version, the records and their image sizes, the buckets and crop settings, and hashes
of the VAE and text encoder weights); a cache whose fingerprint differs is rebuilt, never silently reused, and a
folder of another format is refused, never misread.

With ``--masked-loss`` each sample's latent-size mask (``loss_mask``, :mod:`training.masks`) is stored with its
latents, and the fingerprint holds the mask setting and a hash of the mask files. A sample's ``loss_weight`` (its
subset's) is not a cached value: it is read from the dataset's subsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.errors import UserError
from ldm.text import CHUNK_TOKENS, encode_prompts
from ldm.tokenizer import CLIP_MAX_LENGTH
from training.data import (
    MICRO_CONDITIONING,
    ImageCaptionDataset,
    collate,
    crop_window,
    regions_in_window,
    stack_loss_terms,
    stack_micro_conditioning,
)
from training.masks import masks_hash

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATENTS = "latents.safetensors"
TEXT = "text.safetensors"
CACHE_FORMAT = 2
"""The layout version. 1: one ``caption.{j}`` embedding per caption, no micro-conditioning. 2: named caption outputs
``{name}.{j}`` and each sample's ``original_size`` / ``crop_top_left`` / ``target_size``."""
assert CHUNK_TOKENS + 2 == CLIP_MAX_LENGTH


class CaptionEncoder(Protocol):
    """What the cache needs of a frozen text conditioning: the names of its outputs, what they depend on, and the
    outputs of one caption. Stable Diffusion 1.x/2.x: :class:`ClipCaptionEncoder`; SDXL's two encoders fill the same
    three members (``outputs = ("prompt_embeds", "pooled_prompt_embeds")``)."""

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names of the tensors :meth:`encode` returns."""
        ...

    def fingerprint(self) -> dict[str, str]:
        """What the outputs depend on (e.g. ``{"text_encoder": weights_hash(...)}``); part of the cache's
        fingerprint."""
        ...

    def encode(self, caption: str) -> dict[str, Tensor]:
        """The outputs of one caption, each without a batch dimension, float32 on the CPU. A sequence output may be
        longer for a long caption (more 77-token chunks): it must then be a whole number of the empty caption's
        output, which pads it in a batch (see :meth:`CachedLatentDataset.text_outputs`)."""
        ...


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ClipCaptionEncoder:
    """One CLIP text encoder's last hidden states (Stable Diffusion 1.x/2.x), as :func:`ldm.text.encode_prompts`
    computes them in 77-token chunks: the output ``prompt_embeds`` ``(77 * n, D)``. ``device``: where the ids go
    (default: the encoder's own)."""

    text_encoder: torch.nn.Module
    tokenizer: Any
    device: torch.device | str | None = None

    outputs: ClassVar[tuple[str, ...]] = ("prompt_embeds",)

    def fingerprint(self) -> dict[str, str]:
        """The hash of the encoder's weights."""
        return {"text_encoder": weights_hash(self.text_encoder)}

    def encode(self, caption: str) -> dict[str, Tensor]:
        """``{"prompt_embeds": (77 * n, D)}`` of ``caption``, float32 on the CPU."""
        embeds = encode_prompts(self.text_encoder, self.tokenizer, [caption], device=self.device)[0]
        return {"prompt_embeds": embeds.float().cpu()}


def records_hash(dataset: ImageCaptionDataset) -> str:
    """sha256 of the dataset's records: each image's name, captions and scanned size (and, where set, its repeats
    and subset); two datasets with equal hashes read the same images with the same captions."""
    records = hashlib.sha256()
    for i, record in enumerate(dataset.records.records):
        size = None if record.size is None else list(record.size)
        entry: list[Any] = [dataset.records.image_name(i), list(record.captions), size]
        if record.repeats != 1 or record.subset != 0:  # only then, so caches without subsets keep their fingerprint
            entry += [record.repeats, record.subset]
        records.update(json.dumps(entry).encode())
    return records.hexdigest()


def _masks_fingerprint(dataset: ImageCaptionDataset) -> str:
    """The hash of every record's mask file (or its absence: the image's alpha, or a full mask)."""
    return masks_hash([dataset.mask_path(i) for i in range(len(dataset.records))])


def cache_fingerprint(
    dataset: ImageCaptionDataset, vae: torch.nn.Module, text_encoder: CaptionEncoder | torch.nn.Module
) -> dict[str, Any]:
    """What a cache depends on; two caches with equal fingerprints hold the same values.

    The format version; the records (image names, captions and scanned sizes); each sample's bucket, the crop,
    flip and interpolation settings (which, with the image sizes, fix every sample's pixels and crop corner); the
    VAE's weights; the caption outputs' names and what they depend on; with masked loss, the masks' files (names and
    bytes; a key present only then, so unmasked caches keep their fingerprint). ``text_encoder`` is a
    :class:`CaptionEncoder`, or a bare module, read as Stable Diffusion's one CLIP encoder
    (:class:`ClipCaptionEncoder`).
    """
    if isinstance(text_encoder, torch.nn.Module):
        text_encoder = ClipCaptionEncoder(text_encoder, tokenizer=None)
    masks = {"masked_loss": True, "masks": _masks_fingerprint(dataset)} if dataset.masked_loss else {}
    return masks | {
        "format": CACHE_FORMAT,
        "records": records_hash(dataset),
        "buckets": [list(dataset.target_size(i)) for i in range(len(dataset))],
        "crop": dataset.crop,
        "flip": dataset.flip,
        "interpolation": dataset.interpolation,
        "vae": weights_hash(vae),
        "text": text_encoder.fingerprint(),
        "text_outputs": list(text_encoder.outputs),
    }


def _check_deterministic(dataset: ImageCaptionDataset) -> None:
    if dataset.crop != "center" or dataset.flip:
        raise ValueError(
            "caching latents needs the same pixels every epoch: use --crop center and no --flip, or drop --cache"
        )


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


@torch.no_grad()
def write_cache(
    dataset: ImageCaptionDataset,
    vae: torch.nn.Module,
    encoder: CaptionEncoder,
    folder: str | Path,
    *,
    batch_size: int = 16,
) -> Path:
    """Encode every image of ``dataset`` with ``vae`` and every distinct caption (and the empty one) with
    ``encoder``, and write the cache to ``folder`` (replacing it); returns ``folder``."""
    _check_deterministic(dataset)
    folder = Path(folder)
    fingerprint = cache_fingerprint(dataset, vae, encoder)
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        latents: dict[str, Tensor] = {}
        source = torch.empty(len(dataset), dtype=torch.int64)
        conditioning = {key: torch.empty(len(dataset), 2, dtype=torch.int64) for key in MICRO_CONDITIONING}
        masks: dict[str, Tensor] = {}
        # Encode bucket by bucket so each VAE batch has one image size.
        by_bucket: dict[int, list[int]] = {}
        for i in range(len(dataset)):
            by_bucket.setdefault(dataset.bucket_of_index[i], []).append(i)
        batches = [group[k : k + batch_size] for group in by_bucket.values() for k in range(0, len(group), batch_size)]
        for batch_indices in tqdm(batches, desc="caching latents"):
            batch = collate([dataset[i] for i in batch_indices])
            posterior = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
            for k, i in enumerate(batch_indices):
                latents[f"mean.{i}"] = posterior.mean[k].float().cpu().contiguous()
                latents[f"std.{i}"] = posterior.std[k].float().cpu().contiguous()
                source[i] = int(batch["indices"][k])
                for key in MICRO_CONDITIONING:
                    conditioning[key][i] = batch[key][k]
                if "loss_mask" in batch:
                    masks[f"mask.{i}"] = batch["loss_mask"][k].float().contiguous()
        latents["source_index"] = source
        save_file(latents | conditioning | masks, tmp / LATENTS)

        captions = sorted({c for record in dataset.records.records for c in record.captions} | {""})
        outputs: dict[str, Tensor] = {}
        # One caption at a time: each keeps its own number of 77-token chunks (padding happens per batch).
        for j, caption in enumerate(tqdm(captions, desc="caching text embeddings")):
            encoded = encoder.encode(caption)
            if sorted(encoded) != sorted(encoder.outputs):
                raise ValueError(
                    f"the caption encoder returned {sorted(encoded)}; it declares {list(encoder.outputs)}"
                )
            outputs.update({f"{name}.{j}": value.float().cpu().contiguous() for name, value in encoded.items()})
        save_file(outputs, tmp / TEXT)
        manifest = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "captions": captions,
            "text_outputs": list(encoder.outputs),
            "size": len(dataset),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        _fsync_files(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached %d latents and %d captions in %s", len(dataset), len(captions), folder)
    return folder


def build_cache(
    dataset: ImageCaptionDataset,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    folder: str | Path,
    *,
    batch_size: int = 16,
) -> Path:
    """:func:`write_cache` with Stable Diffusion's one CLIP text encoder (:class:`ClipCaptionEncoder`, run on the
    VAE's device)."""
    device = next(vae.parameters()).device
    encoder = ClipCaptionEncoder(text_encoder, tokenizer, device)
    return write_cache(dataset, vae, encoder, folder, batch_size=batch_size)


def cache_is_current(folder: str | Path, fingerprint: dict) -> bool:
    """Whether ``folder`` holds a complete cache of this format computed from exactly ``fingerprint``."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    complete = (folder / LATENTS).is_file() and (folder / TEXT).is_file()
    return complete and manifest.get("format") == CACHE_FORMAT and manifest.get("fingerprint") == fingerprint


class CachedLatentDataset(Dataset[dict[str, Any]]):
    """The samples of an :class:`ImageCaptionDataset` as cached latents: ``{"latent_mean", "latent_std",
    "caption", "index", "original_size", "crop_top_left", "target_size"}``, with the same caption choice per
    (seed, epoch, index) as the image dataset and the micro-conditioning it recorded when the cache was built.

    ``folder`` must hold a complete cache of this format (check it with :func:`cache_is_current` first); a cache of
    another format or size is refused with a message, never read."""

    def __init__(self, dataset: ImageCaptionDataset, folder: str | Path) -> None:
        self.dataset = dataset
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{self.folder} is not a complete latent cache ({err}); delete it to rebuild it") from None
        if manifest.get("format") != CACHE_FORMAT:
            raise UserError(
                f"the latent cache {self.folder} has format {manifest.get('format', 1)}, this version reads "
                f"{CACHE_FORMAT}; delete it (training with --cache rebuilds it)"
            )
        if manifest["size"] != len(dataset):
            raise UserError(
                f"the latent cache {self.folder} holds {manifest['size']} samples, the dataset {len(dataset)}; "
                "delete it (training with --cache rebuilds it)"
            )
        self.captions: list[str] = manifest["captions"]
        self.text_output_names: tuple[str, ...] = tuple(manifest["text_outputs"])
        self._caption_index = {c: i for i, c in enumerate(self.captions)}
        self.bucket_of_index = dataset.bucket_of_index
        self._latents = None  # opened lazily, once per process (DataLoader workers included)
        with safe_open(self.folder / TEXT, framework="pt") as text:
            self._outputs = [
                {name: text.get_tensor(f"{name}.{j}") for name in self.text_output_names}
                for j in range(len(self.captions))
            ]

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
        item: dict[str, Any] = {
            "latent_mean": self._latents.get_tensor(f"mean.{index}"),
            "latent_std": self._latents.get_tensor(f"std.{index}"),
            "caption": self.dataset.pick_caption(source, index),
            "index": source,
        }
        for key in MICRO_CONDITIONING:
            pair = self._latents.get_slice(key)[index : index + 1][0]
            item[key] = (int(pair[0]), int(pair[1]))
        item["loss_weight"] = self.dataset.loss_weight(source)
        if self.dataset.masked_loss:
            item["loss_mask"] = self._latents.get_tensor(f"mask.{index}")
        regions = self.dataset.records.records[source].regions
        if regions:  # the cache holds center crops, unflipped (_check_deterministic): the same window again
            (height, width), (target_h, target_w) = item["original_size"], item["target_size"]
            item["regions"] = regions_in_window(regions, crop_window((width, height), (target_w, target_h)))
        return item

    def add_caption(self, caption: str, outputs: dict[str, Tensor]) -> None:
        """Hold ``outputs`` (named as the cache's) for ``caption`` in memory, as if it had been cached (for a caption
        that is not in the data, such as a test's)."""
        if sorted(outputs) != sorted(self.text_output_names):
            raise ValueError(f"outputs must be {list(self.text_output_names)}; got {sorted(outputs)}")
        self._caption_index[caption] = len(self.captions)
        self.captions.append(caption)
        self._outputs.append(dict(outputs))

    def text_outputs(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """The cached outputs of ``captions``, each stacked ``(B, ...)``: a sequence output of a shorter caption is
        padded with the empty caption's (its 77-token chunks) to the longest, exactly as
        :func:`ldm.text.encode_prompts` pads a batch; outputs of one shape (a pooled embedding) are stacked."""
        missing = [c for c in captions if c not in self._caption_index]
        if missing:
            hint = ""
            if self.dataset.makes_new_captions:
                hint = (
                    "; shuffle_caption and caption_tag_dropout make captions the cache cannot hold: drop them, or "
                    "train the text encoder, or drop --cache"
                )
            raise KeyError(f"captions not in the cache {self.folder}: {missing[:3]}{hint}")
        empty = self._outputs[self._caption_index[""]]
        stacked = {}
        for name in self.text_output_names:
            rows = [self._outputs[self._caption_index[c]][name] for c in captions]
            longest = max(row.shape[0] for row in rows)
            pad = empty[name]
            stacked[name] = torch.stack(
                [torch.cat([row] + [pad] * ((longest - row.shape[0]) // pad.shape[0])) for row in rows]
            )
        return stacked

    def embeddings(self, captions: list[str]) -> Tensor:
        """The cached text embeddings of ``captions`` ``(B, 77 * n, D)`` (``prompt_embeds`` of
        :meth:`text_outputs`), shorter ones padded with empty-prompt chunks to the longest, exactly as
        :func:`ldm.text.encode_prompts` pads a batch."""
        return self.text_outputs(captions)["prompt_embeds"]


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples (all from one bucket, so one latent size), with their micro-conditioning and loss terms
    (``loss_weight``, ``loss_mask``) as :func:`training.data.collate` stacks them."""
    return {
        "latent_mean": torch.stack([b["latent_mean"] for b in batch]),
        "latent_std": torch.stack([b["latent_std"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "indices": torch.tensor([b["index"] for b in batch]),
        **stack_micro_conditioning(batch),
        **stack_loss_terms(batch),
    }
