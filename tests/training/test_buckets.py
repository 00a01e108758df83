"""Aspect-ratio buckets and the bucket batch sampler: geometry, nearest-ratio assignment, deterministic batches."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from training.buckets import BucketBatchSampler, assign_buckets, derive_seed, make_buckets, make_generator


def test_derive_seed_is_pinned_and_separates_its_parts() -> None:
    # Pinned: changing the derivation would silently change every sample of a resumed run.
    assert derive_seed(0, 0, 0) == 8582715282548162673
    assert derive_seed(1234, 7, 42) == 6430415085073793579
    assert derive_seed(1, 23) != derive_seed(12, 3)  # parts are separated, not concatenated
    assert 0 <= derive_seed("x", 2**70) < 2**63
    a = torch.rand(3, generator=make_generator(5, 1, 2))
    assert torch.equal(a, torch.rand(3, generator=make_generator(5, 1, 2)))
    assert not torch.equal(a, torch.rand(3, generator=make_generator(5, 2, 2)))


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (64, 8)])
def test_make_buckets_respect_area_step_and_limits(resolution: int, step: int) -> None:
    buckets = make_buckets(resolution, step=step)
    min_size, max_size = max(step, resolution // 2 // step * step), 2 * resolution
    assert (resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets)) > 3
    for width, height in buckets:
        assert width * height <= resolution**2
        assert width % step == 0 and height % step == 0
        assert min_size <= width <= max_size and min_size <= height <= max_size
        assert (height, width) in buckets  # both orientations
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert ratios[-1] >= 3.5  # down to min_size x (area / min_size): 4:1 at the defaults


def test_make_buckets_matches_kohya_for_512() -> None:
    # kohya-ss sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64), sorted by aspect ratio.
    widths = [256, 256, 256, 256, 320, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024]
    heights = [1024, 960, 896, 832, 768, 704, 640, 576, 512, 448, 384, 320, 320, 256, 256, 256, 256]
    assert make_buckets(512) == list(zip(widths, heights))
    assert make_buckets(512, min_size=256, max_size=1024, step=64) == make_buckets(512)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 500}, "resolution must be a positive multiple of step"),
        ({"resolution": 512, "step": 60}, "step must be a positive multiple of 8"),
        ({"resolution": 512, "min_size": 640}, "min_size <= resolution <= max_size"),
        ({"resolution": 512, "max_size": 1000}, "max_size must be a positive multiple of step"),
    ],
)
def test_make_buckets_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_buckets(**kwargs)


def test_assign_buckets_picks_the_nearest_aspect_ratio() -> None:
    buckets = make_buckets(512)
    sizes = [(1000, 500), (500, 1000), (640, 640), (1920, 1080), (300, 2000), (5000, 500)]
    assigned = assign_buckets(sizes, buckets)
    for (width, height), bucket in zip(sizes, assigned):
        errors = [abs(math.log(width / height) - math.log(w / h)) for w, h in buckets]
        assert errors[bucket] == min(errors)
    wide = buckets[assigned[0]]
    assert wide[0] / wide[1] > 1.7  # a 2:1 image goes to a wide bucket, not a square one
    assert buckets[assigned[1]] == (wide[1], wide[0])
    assert buckets[assigned[2]] == (512, 512)
    assert buckets[assigned[5]] == (1024, 256)  # beyond the widest bucket: the widest


def test_assign_buckets_breaks_ties_towards_the_larger_area() -> None:
    assert assign_buckets([(100, 100)], [(256, 256), (512, 512)]) == [1]
    with pytest.raises(ValueError, match="buckets is empty"):
        assign_buckets([(1, 1)], [])


BUCKET_OF_INDEX = [0] * 7 + [1] * 5 + [2] * 1 + [3] * 10


def test_sampler_batches_come_from_one_bucket_and_cover_each_index_once() -> None:
    sampler = BucketBatchSampler(BUCKET_OF_INDEX, batch_size=3, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 2 + 1 + 4
        assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKET_OF_INDEX)))
        for batch in batches:
            assert 1 <= len(batch) <= 3
            assert len({BUCKET_OF_INDEX[i] for i in batch}) == 1


def test_sampler_is_a_deterministic_function_of_seed_and_epoch() -> None:
    first = BucketBatchSampler(BUCKET_OF_INDEX, batch_size=3, seed=7)
    second = BucketBatchSampler(BUCKET_OF_INDEX, batch_size=3, seed=7)
    second.set_epoch(4)
    first.set_epoch(4)
    assert list(first) == list(second) == first.batches(4)
    assert first.batches(4) != first.batches(5)
    assert first.batches(4) != BucketBatchSampler(BUCKET_OF_INDEX, batch_size=3, seed=8).batches(4)
    # Buckets are interleaved, not consumed one after the other.
    order = [BUCKET_OF_INDEX[batch[0]] for batch in first.batches(4)]
    assert order != sorted(order)


def test_sampler_drop_last_and_no_shuffle() -> None:
    sampler = BucketBatchSampler(BUCKET_OF_INDEX, batch_size=3, seed=0, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 1 + 0 + 3
    assert all(len(batch) == 3 for batch in batches)
    assert Counter(BUCKET_OF_INDEX[b[0]] for b in batches) == {0: 2, 1: 1, 3: 3}
    ordered = BucketBatchSampler(BUCKET_OF_INDEX, batch_size=4, shuffle=False)
    assert ordered.batches(0) == ordered.batches(9)
    assert ordered.batches(0)[:3] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        BucketBatchSampler([0, 0], batch_size=0)
    with pytest.raises(ValueError, match="drop_last=True leaves no batch"):
        BucketBatchSampler([0, 1, 2], batch_size=2, drop_last=True)
    with pytest.raises(ValueError, match="no samples"):
        BucketBatchSampler([], batch_size=2)
