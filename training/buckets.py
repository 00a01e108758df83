"""Aspect-ratio buckets (NovelAI / kohya-ss style) and a batch sampler that keeps every batch inside one bucket.

Images can share a batch only if they have the same size. Bucketing picks a set of sizes of about the training area
(``resolution ** 2``) with sides that are multiples of ``step``; each image goes to the bucket whose aspect ratio is
nearest its own, and is resized to cover that bucket and cropped, so a wide photo is trained wide instead of being cut
to a square. Every random draw here is a function of ``(seed, epoch, ...)`` through :func:`derive_seed`, so a resumed
run gets exactly the batches of the interrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ldm.errors import UserError

logger = logging.getLogger(__name__)

LATENT_FACTOR = 8  # the VAE downsamples by 8, so every image side must be a multiple of 8


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a stable function of ``parts`` (e.g. ``(seed, epoch, index)``).

    BLAKE2b of the parts' text: the same on every machine, process and Python run, unlike ``hash()`` (salted per
    process for strings). Changing this function changes every sample of every run, so it is pinned by a test.
    """
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def make_generator(*parts: int | str) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def make_buckets(
    resolution: int = 512, *, min_size: int | None = None, max_size: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """The bucket sizes ``(width, height)`` for training at ``resolution``, sorted by aspect ratio (tall to wide).

    For each width from ``min_size`` to ``max_size`` (every ``step`` pixels) the tallest height that is a multiple of
    ``step``, at most ``max_size`` and keeps ``width * height <= resolution ** 2``; both orientations, plus the square
    ``resolution x resolution`` (kohya-ss ``make_bucket_resolutions``). ``min_size`` defaults to half of
    ``resolution`` and ``max_size`` to twice it; all three must be multiples of ``step``, itself a multiple of 8.
    """
    min_size = max(step, resolution // 2 // step * step) if min_size is None else min_size
    max_size = 2 * resolution if max_size is None else max_size
    if step <= 0 or step % LATENT_FACTOR:
        raise ValueError(f"step must be a positive multiple of {LATENT_FACTOR} (the VAE downsamples by 8); got {step}")
    for name, value in (("resolution", resolution), ("min_size", min_size), ("max_size", max_size)):
        if value <= 0 or value % step:
            raise ValueError(f"{name} must be a positive multiple of step ({step}); got {value}")
    if not min_size <= resolution <= max_size:
        raise ValueError(
            f"need min_size <= resolution <= max_size; got min_size={min_size}, resolution={resolution}, "
            f"max_size={max_size}"
        )
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, max_area // width // step * step)
        if height >= min_size:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda size: (size[0] / size[1], size[0]))


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """For each image size ``(width, height)``, the index in ``buckets`` of the nearest aspect ratio.

    Distance is ``|log(w / h) - log(bw / bh)|``, symmetric between portrait and landscape; ties go to the bucket with
    the larger area, then to the earlier one in ``buckets``.
    """
    if not buckets:
        raise ValueError("buckets is empty; pass at least one (width, height), e.g. make_buckets(resolution)")
    order = sorted(range(len(buckets)), key=lambda b: (-buckets[b][0] * buckets[b][1], b))
    bucket_ratios = np.log([buckets[b][0] / buckets[b][1] for b in order])
    size_array = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    ratios = np.log(size_array[:, 0] / size_array[:, 1])
    assigned: list[int] = []
    for start in range(0, len(ratios), 65536):  # chunks keep the distance matrix small for millions of images
        nearest = np.abs(ratios[start : start + 65536, None] - bucket_ratios[None, :]).argmin(axis=1)
        assigned.extend(order[i] for i in nearest.tolist())
    return assigned


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that all come from one bucket, reshuffled deterministically every epoch.

    Each epoch, with a generator seeded by ``(seed, epoch)``: shuffle the indices of every bucket, cut them into
    batches of ``batch_size`` (the last one of a bucket may be smaller; ``drop_last=True`` drops it), then shuffle
    the order of all batches so buckets are interleaved. The same ``(seed, epoch)`` always gives the same batches, and
    every index appears exactly once per epoch (unless dropped by ``drop_last``). ``shuffle=False`` gives the batches
    in bucket order and index order, the same every epoch.

    Call :meth:`set_epoch` before iterating each epoch (PyTorch's ``DistributedSampler`` convention).
    ``shared_epoch`` is a 0-d int64 tensor holding the epoch shared with another object:
    ``ImageCaptionDataset.batch_sampler`` passes its own, so ``set_epoch`` on either one moves both.
    """

    def __init__(
        self,
        bucket_of_index: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        *,
        shared_epoch: torch.Tensor | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if len(bucket_of_index) == 0:
            raise ValueError("bucket_of_index is empty: the dataset has no samples")
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of_index):
            self.members.setdefault(int(bucket), []).append(index)
        self._epoch = torch.zeros((), dtype=torch.int64) if shared_epoch is None else shared_epoch
        if drop_last:
            unused = sum(len(indices) % batch_size for indices in self.members.values())
            if len(self) == 0:
                raise UserError(
                    f"no bucket holds batch_size={batch_size} images, so drop_last=True leaves no batch; "
                    "lower the batch size or pass drop_last=False"
                )
            if unused:
                logger.info(
                    "drop_last=True: %d of %d samples are left out of each epoch", unused, len(bucket_of_index)
                )

    @property
    def epoch(self) -> int:
        """The epoch whose batches :meth:`__iter__` yields."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self._epoch.fill_(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in the order they are yielded."""
        epoch = self.epoch if epoch is None else epoch
        generator = make_generator(self.seed, epoch, "batches")
        batches: list[list[int]] = []
        for bucket in sorted(self.members):
            indices = self.members[bucket]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(len(indices) / self.batch_size) for indices in self.members.values())
