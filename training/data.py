"""Image–caption training samples: a torch dataset over :mod:`training.records`, with deterministic transforms.

:class:`ImageCaptionDataset` turns records (read by :func:`load_image_caption_records`, checked by
:func:`scan_images`) into training samples; every random choice in it is a function of ``(seed, epoch, index)``, so a
resumed run sees the same samples. :func:`collate` stacks them into batches of one bucket (:mod:`training.buckets`).
Each sample records where its pixels come from (:class:`CropWindow`: original size and crop corner), SDXL's
micro-conditioning (:mod:`training.micro_conditioning`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from common.images import to_rgb
from ldm.errors import UserError
from training.buckets import LATENT_FACTOR, BucketBatchSampler, assign_buckets, make_buckets, make_generator
from training.captions import process_caption
from training.masks import alpha_mask, latent_mask, mask_file
from training.record_formats import DataSummary, ImageCaptionRecords, Region
from training.records import Subset

__all__ = [
    "CropMode",
    "CropWindow",
    "ImageCaptionDataset",
    "Interpolation",
    "MICRO_CONDITIONING",
    "apply_crop_window",
    "collate",
    "crop_window",
    "resize_and_crop",
    "stack_loss_terms",
    "stack_micro_conditioning",
]

logger = logging.getLogger(__name__)

CropMode = Literal["center", "random"]
Interpolation = Literal["bicubic", "lanczos"]
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class CropWindow:
    """Where a training sample's pixels come from: SDXL's size and crop micro-conditioning of the sample.

    Sizes and corners are ``(height, width)`` and ``(top, left)``, SDXL's order (``add_time_ids``), unlike PIL's
    ``(width, height)``. Cropping the source image, resized to ``resized_size``, at ``crop_top_left`` to
    ``target_size`` gives the sample's pixels exactly.

    Attributes:
        original_size: the source image's size before any resize (after EXIF orientation).
        resized_size: the size it was resized to, covering the target with its aspect ratio kept.
        crop_top_left: the corner of the crop in the resized image's pixels.
        target_size: the size of the crop: the sample's bucket.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def mirrored(self) -> CropWindow:
        """The window of the horizontally flipped sample, in the flipped resized image: ``left`` becomes
        ``resized_width - left - target_width`` (the crop of a flipped image is the flip of the crop)."""
        top, left = self.crop_top_left
        return replace(self, crop_top_left=(top, self.resized_size[1] - left - self.target_size[1]))


def crop_window(
    image_size: tuple[int, int],
    size: tuple[int, int],
    crop: CropMode = "center",
    offset: tuple[float, float] = (0.5, 0.5),
) -> CropWindow:
    """The :class:`CropWindow` of :func:`resize_and_crop` for an image of ``image_size`` and a target ``size``, both
    PIL ``(width, height)``: the image is scaled to just cover ``size``, then ``crop="center"`` takes the middle
    (the top-left of the two middles when the free range is odd) and ``"random"`` places the window at ``offset``
    (two uniforms in [0, 1), x then y) of the free range, every position equally likely."""
    width, height = image_size
    target_width, target_height = size
    scale = max(target_width / width, target_height / height)
    new_width, new_height = max(target_width, round(width * scale)), max(target_height, round(height * scale))
    free_x, free_y = new_width - target_width, new_height - target_height
    if crop == "center":
        left, top = free_x // 2, free_y // 2
    else:
        left, top = min(free_x, int(offset[0] * (free_x + 1))), min(free_y, int(offset[1] * (free_y + 1)))
    return CropWindow((height, width), (new_height, new_width), (top, left), (target_height, target_width))


def regions_in_window(regions: Sequence[Region], window: CropWindow, flipped: bool = False) -> tuple[Region, ...]:
    """``regions`` (boxes in fractions of the source image) as boxes in fractions of the sample that ``window`` cuts
    out (and ``flipped`` mirrors), clipped to it; a region the crop leaves out entirely is dropped."""
    (resized_h, resized_w), (top, left) = window.resized_size, window.crop_top_left
    height, width = window.target_size
    result = []
    for region in regions:
        x0, y0, x1, y1 = region.box
        x0, x1 = (min(max((x * resized_w - left) / width, 0.0), 1.0) for x in (x0, x1))
        y0, y1 = (min(max((y * resized_h - top) / height, 0.0), 1.0) for y in (y0, y1))
        if flipped:
            x0, x1 = 1.0 - x1, 1.0 - x0
        if x0 < x1 and y0 < y1:
            result.append(Region(region.phrase, (x0, y0, x1, y1)))
    return tuple(result)


def apply_crop_window(image: Image.Image, window: CropWindow, interpolation: Interpolation = "lanczos") -> Image.Image:
    """Resize ``image`` to ``window.resized_size`` (PIL's bicubic and Lanczos filters antialias when shrinking; an
    image already that size is not resampled) and crop ``window.target_size`` at ``window.crop_top_left``."""
    if (image.height, image.width) != window.original_size:
        raise ValueError(f"the window is for a {window.original_size} (h, w) image; got {image.size[::-1]}")
    new_height, new_width = window.resized_size
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), _RESAMPLE[interpolation])
    (top, left), (height, width) = window.crop_top_left, window.target_size
    return image.crop((left, top, left + width, top + height))


def resize_and_crop(
    image: Image.Image,
    size: tuple[int, int],
    crop: CropMode = "center",
    offset: tuple[float, float] = (0.5, 0.5),
    interpolation: Interpolation = "lanczos",
) -> Image.Image:
    """Resize ``image`` to just cover ``size`` = (width, height) keeping its aspect ratio, then crop to ``size``.

    For a square ``size`` this resizes the shorter side to the resolution. PIL's bicubic and Lanczos filters
    antialias when shrinking; an image already covering ``size`` exactly is not resampled. ``crop="center"`` takes
    the middle; ``"random"`` places the window at ``offset`` (two uniforms in [0, 1)) of the free range. Where the
    crop lies is :func:`crop_window`.
    """
    return apply_crop_window(image, crop_window(image.size, size, crop, offset), interpolation)


def _check_choice(name: str, value: str, choices: object) -> None:
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {', '.join(get_args(choices))}; got {value!r}")


class ImageCaptionDataset(Dataset[dict[str, Any]]):
    """Training samples ``{"pixel_values", "caption", "index", "replaced", "original_size", "crop_top_left",
    "target_size"}`` from :class:`ImageCaptionRecords`.

    ``pixel_values`` is a float tensor (3, H, W) in [-1, 1], where (W, H) is the bucket of the index
    (:meth:`target_size`). With ``bucketing=True`` the buckets are ``make_buckets(resolution)`` (step 64, or 8 when
    ``resolution`` is not a multiple of 64); ``buckets`` passes your own list (see :mod:`training.buckets`); each
    image goes to the bucket of nearest aspect ratio, using the sizes recorded by :func:`scan_images`. Without
    either, every image goes to the single square bucket ``resolution x resolution``. Each image is converted to RGB
    (:func:`to_rgb`), rotated by its EXIF orientation, resized to cover its bucket and cropped (``crop``: "center"
    or "random", :func:`resize_and_crop`).
    ``flip=True`` mirrors half the samples horizontally; it is off by default because it breaks captions that say
    "on the left" or show text.

    ``original_size``, ``crop_top_left`` and ``target_size`` are the sample's :class:`CropWindow` as ``(height,
    width)`` and ``(top, left)`` tuples of ints: SDXL's micro-conditioning (see :mod:`training.micro_conditioning`).
    They are the decoded image's size after EXIF rotation, before any resize; the corner of what was cropped (center,
    random or bucket crop) in the resized image's pixels; the bucket. For a flipped sample the corner is measured in
    the flipped resized image (``left = resized_width - left - target_width``), so cropping the flipped resized image
    there gives the sample's pixels: the corner of the image the model is shown. diffusers'
    ``train_text_to_image_sdxl.py`` example records the same (it flips the resized image, then crops it at the
    corner it records), and kohya's sd-scripts mirror a flipped sample's corner the same way. We follow diffusers
    and the SDXL paper (the pixels cropped from the top-left, sec. 2.2) in recording the crop actually taken; kohya's
    ``crop_ltrb`` is instead where the image would sit letterboxed in its bucket (0 on the cropped axis, and the
    same for every random crop).

    Randomness (crop position, flip, which caption of a list) comes from a generator seeded by
    ``(seed, epoch, index)`` (:func:`training.buckets.derive_seed`), so the same triple always gives the same sample.
    :meth:`set_epoch` stores the epoch in shared memory, so DataLoader workers, persistent ones included, see it.

    An image that fails to decode here (a truncated file that ``verify()`` missed) is replaced, deterministically,
    by the next index of the same bucket that decodes (cyclically); the sample then has that index, its caption and
    ``replaced=True``, and a warning names the bad file. ``failed_indices`` holds the failures seen by this process;
    ``failure_log`` (a text file, one image name a line, appended by every process and DataLoader worker) makes them
    count in :meth:`summary` wherever they were seen. A bucket none of whose images decodes is a :class:`UserError`.

    Subsets (:class:`training.records.Subset`, kohya-ss's): each record's ``repeats`` (``repeat=True``) make that many
    samples of it an epoch, each its own index (and own random draws); ``index`` in a sample is the record's. Each
    sample's ``loss_weight`` is its subset's, and its caption goes through the subset's random caption changes
    (:func:`training.captions.process_caption`, from a generator seeded by ``(seed, epoch, index, "caption")``, so
    the draws above do not move). ``masked_loss=True`` adds ``loss_mask`` ``(1, H / 8, W / 8)``: the subset's
    ``mask_dir`` file of the image (:func:`training.masks.mask_file`; all ones when missing) or else the image's
    alpha (all ones without), resized, cropped and flipped exactly as the image, averaged over each latent cell
    (:func:`training.masks.latent_mask`).
    """

    def __init__(
        self,
        records: ImageCaptionRecords,
        *,
        resolution: int = 512,
        bucketing: bool = False,
        buckets: Sequence[tuple[int, int]] | None = None,
        crop: CropMode = "center",
        flip: bool = False,
        seed: int = 0,
        interpolation: Interpolation = "lanczos",
        subsets: Sequence[Subset] | None = None,
        repeat: bool = True,
        masked_loss: bool = False,
        failure_log: str | Path | None = None,
    ) -> None:
        _check_choice("crop", crop, CropMode)
        _check_choice("interpolation", interpolation, Interpolation)
        if not records.records:
            raise ValueError(f"{records.source} has no records to train on")
        if resolution <= 0 or resolution % LATENT_FACTOR:
            raise ValueError(f"resolution must be a positive multiple of 8 (the VAE's factor); got {resolution}")
        if bucketing and buckets is None:
            buckets = make_buckets(resolution, step=64 if resolution % 64 == 0 else LATENT_FACTOR)
        self.subsets = list(subsets) if subsets is not None else [Subset()]
        if any(not 0 <= record.subset < len(self.subsets) for record in records.records):
            raise ValueError(f"the records name subsets beyond the {len(self.subsets)} given")
        self.record_of_index = [
            r for r, record in enumerate(records.records) for _ in range(record.repeats if repeat else 1)
        ]
        if buckets is None:
            self.buckets = [(resolution, resolution)]
            self.bucket_of_index = [0] * len(self.record_of_index)
        else:
            self.buckets = [(int(w), int(h)) for w, h in buckets]
            bad = [size for size in self.buckets if min(size) <= 0 or size[0] % 8 or size[1] % 8]
            if bad or not self.buckets:
                raise ValueError(f"bucket sides must be positive multiples of 8; got {bad or 'no buckets'}")
            if any(record.size is None for record in records.records):
                raise ValueError("aspect-ratio bucketing needs every image's size: load with scan=True or scan_images")
            bucket_of_record = assign_buckets([record.size for record in records.records], self.buckets)
            self.bucket_of_index = [bucket_of_record[r] for r in self.record_of_index]
        self.records = records
        self.crop, self.flip, self.seed, self.interpolation = crop, flip, seed, interpolation
        self.masked_loss = masked_loss
        self.failed_indices: set[int] = set()
        self.failure_log = None if failure_log is None else Path(failure_log)
        self._members: dict[int, list[int]] = {}
        self._position: list[int] = []
        for index, bucket in enumerate(self.bucket_of_index):
            self._position.append(len(self._members.setdefault(bucket, [])))
            self._members[bucket].append(index)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        counts = ", ".join(
            f"{w}x{h}: {len(self._members[b])}" for b, (w, h) in enumerate(self.buckets) if b in self._members
        )
        logger.info("%d samples in buckets %s", len(self), counts)

    def __len__(self) -> int:
        return len(self.record_of_index)

    @property
    def makes_new_captions(self) -> bool:
        """Whether some subset shuffles or drops tags: captions come out that no record holds."""
        return any(subset.caption_options.makes_new_captions for subset in self.subsets)

    def loss_weight(self, image: int) -> float:
        """The loss weight of record ``image``'s samples: its subset's."""
        return self.subsets[self.records.records[image].subset].loss_weight

    def mask_path(self, image: int) -> Path | None:
        """The mask file of record ``image`` in its subset's ``mask_dir`` (None without one: the alpha is used)."""
        mask_dir = self.subsets[self.records.records[image].subset].mask_dir
        name = self.records.records[image].image
        if mask_dir is None:
            return None
        if not isinstance(name, str):
            raise ValueError(f"mask_dir needs image files; {self.records.source} holds table rows")
        return mask_file(name, mask_dir)

    def undecodable(self) -> set[str]:
        """The names of the images that failed to decode: in this process, and in ``failure_log``."""
        names = {str(self.records.image_name(index)) for index in self.failed_indices}
        if self.failure_log is not None and self.failure_log.is_file():
            names.update(line for line in self.failure_log.read_text(encoding="utf-8").splitlines() if line)
        return names

    def summary(self) -> DataSummary:
        """The counts of the records: total, used, skipped without a caption, skipped unreadable (the files the
        scan found unreadable and those that failed to decode later)."""
        summary = self.records.summary()
        failed = len(self.undecodable())
        return replace(summary, used=summary.used - failed, skipped_corrupt=summary.skipped_corrupt + failed)

    def summary_dict(self) -> dict[str, str | int]:
        """:meth:`summary` as a JSON-ready dict, for the model card."""
        return self.summary().as_dict()

    @property
    def epoch(self) -> int:
        """The epoch that seeds the samples' randomness."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (in shared memory: DataLoader workers see it); call before iterating the epoch."""
        self._epoch.fill_(epoch)

    def target_size(self, index: int) -> tuple[int, int]:
        """The (width, height) of the sample at ``index``: its bucket."""
        return self.buckets[self.bucket_of_index[index]]

    def batch_sampler(self, batch_size: int, *, drop_last: bool = False, shuffle: bool = True) -> BucketBatchSampler:
        """A :class:`BucketBatchSampler` over this dataset's buckets, with its seed, sharing its epoch."""
        return BucketBatchSampler(
            self.bucket_of_index, batch_size, self.seed, drop_last, shuffle, shared_epoch=self._epoch
        )

    def _draws(self, index: int) -> list[float]:
        # Four draws, always, in this order, so changing crop or flip does not change which caption is picked.
        return torch.rand(4, generator=make_generator(self.seed, self.epoch, index)).tolist()

    def pick_caption(self, image: int, index: int) -> str:
        """The caption of record ``image`` that sample ``index`` uses this epoch (one of a list, at random), after its
        subset's random caption changes."""
        record = self.records.records[image]
        captions = record.captions
        caption = captions[min(int(self._draws(index)[3] * len(captions)), len(captions) - 1)]
        options = self.subsets[record.subset].caption_options
        if not options.active:
            return caption
        return process_caption(caption, options, make_generator(self.seed, self.epoch, index, "caption"))

    def _mask(self, image: int, opened: Image.Image) -> Image.Image:
        """The pixel-size mask of record ``image`` (decoded ``opened``, EXIF-rotated): its file, else its alpha,
        else all ones."""
        path = self.mask_path(image)
        if path is not None and path.is_file():
            with Image.open(path) as mask:
                mask = ImageOps.exif_transpose(mask).convert("L")
            if mask.size != opened.size:
                raise ValueError(f"the mask {path} is {mask.size}, its image {opened.size}: they must match")
            return mask
        if path is not None:
            logger.debug("no mask %s; the whole image counts", path)
        return alpha_mask(opened) or Image.new("L", opened.size, 255)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        crop_x, crop_y, flip, _ = self._draws(index)
        members = self._members[self.bucket_of_index[index]]
        start = self._position[index]
        for step in range(len(members)):
            candidate = self.record_of_index[members[(start + step) % len(members)]]
            if candidate in self.failed_indices:
                continue
            mask = None
            try:
                with self.records.open_image(candidate) as opened:
                    rotated = ImageOps.exif_transpose(opened)
                    image = to_rgb(rotated)
                    if self.masked_loss:
                        mask = self._mask(candidate, rotated)
            except Exception as err:  # PIL's decoders raise many types; a bad file must not stop training
                self.failed_indices.add(candidate)
                if self.failure_log is not None:  # one short append: whole lines even from several processes
                    self.failure_log.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.failure_log, "a", encoding="utf-8") as log:
                        log.write(f"{self.records.image_name(candidate)}\n")
                logger.warning(
                    "could not decode %s (%s: %s); using the next image of its bucket instead",
                    self.records.image_name(candidate),
                    type(err).__name__,
                    err,
                )
                continue
            window = crop_window(image.size, self.target_size(index), self.crop, (crop_x, crop_y))
            image = apply_crop_window(image, window, self.interpolation)
            if mask is not None:
                mask = apply_crop_window(mask, window, self.interpolation)
            if self.flip and flip < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                if mask is not None:
                    mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                window = window.mirrored()
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
            sample = {
                "pixel_values": pixels.float() / 127.5 - 1.0,
                "caption": self.pick_caption(candidate, index),
                "index": candidate,
                "replaced": candidate != self.record_of_index[index],
                "original_size": window.original_size,
                "crop_top_left": window.crop_top_left,
                "target_size": window.target_size,
                "loss_weight": self.loss_weight(candidate),
            }
            if mask is not None:
                sample["loss_mask"] = latent_mask(mask)
            regions = self.records.records[candidate].regions
            if regions:
                sample["regions"] = regions_in_window(regions, window, flipped=self.flip and flip < 0.5)
            return sample
        width, height = self.target_size(index)
        raise UserError(
            f"none of the {len(members)} images of bucket {width}x{height} of {self.records.source} could be "
            f"decoded (e.g. {self.records.image_name(self.record_of_index[members[0]])}); replace or remove the "
            "broken files (the warnings above name each)"
        )


MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")
"""The keys of a sample's (and a batch's) SDXL size and crop micro-conditioning, in ``add_time_ids`` order."""


def stack_micro_conditioning(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The samples' :data:`MICRO_CONDITIONING` stacked as LongTensors (B, 2) (image or cached samples alike)."""
    return {key: torch.tensor([list(sample[key]) for sample in batch], dtype=torch.long) for key in MICRO_CONDITIONING}


def stack_loss_terms(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The samples' ``loss_weight`` as a float tensor (B,) (1 where a sample has none), when they have one, their
    ``loss_mask`` stacked (B, 1, h, w), and when any has ``regions``, each sample's (a list; ``()`` for none), for
    the grounding loss (image or cached samples alike)."""
    terms: dict[str, Any] = {"loss_weight": torch.tensor([float(sample.get("loss_weight", 1.0)) for sample in batch])}
    if "loss_mask" in batch[0]:
        terms["loss_mask"] = torch.stack([sample["loss_mask"] for sample in batch])
    if any("regions" in sample for sample in batch):
        terms["regions"] = [tuple(sample.get("regions", ())) for sample in batch]
    return terms


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: ``pixel_values`` (B, 3, H, W), ``captions`` (list), ``indices`` (LongTensor), ``num_replaced``,
    and the micro-conditioning ``original_size``, ``crop_top_left``, ``target_size`` as LongTensors (B, 2), the loss
    terms ``loss_weight`` (B,) and, with masks, ``loss_mask`` (B, 1, h, w) (:func:`stack_loss_terms`).

    ``num_replaced`` counts the samples whose image failed to decode and was replaced (see
    :class:`ImageCaptionDataset`). All samples must share a size: batch with :class:`BucketBatchSampler`.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(sample["pixel_values"].shape) for sample in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"samples of different sizes in one batch: {sorted(shapes)}; batch with dataset.batch_sampler(batch_size) "
            "(a BucketBatchSampler) so that every batch comes from one bucket"
        )
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]).contiguous(),
        "captions": [sample["caption"] for sample in batch],
        "indices": torch.tensor([sample["index"] for sample in batch], dtype=torch.long),
        "num_replaced": sum(bool(sample.get("replaced", False)) for sample in batch),
        **stack_micro_conditioning(batch),
        **stack_loss_terms(batch),
    }
