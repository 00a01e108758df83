"""Image–caption samples: exact transforms, deterministic samples, decode failures replaced, and batches through a
real DataLoader. The records they come from are tested in ``test_records.py``, whose drawing helpers these use."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from common.images import to_rgb
from ldm.errors import UserError, one_line
from tests.training.test_records import BLUE, GREEN, RED, WHITE, captioned_folder, noise, png_bytes, solid
from training.data import ImageCaptionDataset, collate, crop_window, resize_and_crop
from training.record_formats import ImageCaptionRecords
from training.records import load_image_caption_records, scan_images


def undecodable_png(image: Image.Image) -> bytes:
    """A PNG whose pixel data is garbage with a correct checksum: ``verify()`` passes, decoding fails."""
    data = bytearray(png_bytes(image))
    start = data.find(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    payload = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    data[start + 4 : start + 4 + length] = payload
    data[start + 4 + length : start + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + payload))
    return bytes(data)


def pixels_of(sample: dict) -> np.ndarray:
    """Back to uint8 RGB (H, W, 3) from [-1, 1]."""
    return np.rint((sample["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- robustness


def test_decode_failure_at_getitem_is_replaced_by_the_next_image_of_its_bucket(tmp_path: Path, caplog) -> None:
    images = {"0.png": solid(RED), "1.png": undecodable_png(solid(GREEN)), "2.png": solid(BLUE)}
    folder = captioned_folder(tmp_path, images, {"0.png": "red", "1.png": "green", "2.png": "blue"})
    records = load_image_caption_records(str(folder))
    assert len(records) == 3  # verify() cannot see this one
    dataset = ImageCaptionDataset(records, resolution=16)
    with caplog.at_level(logging.WARNING):
        sample = dataset[1]
    assert (sample["index"], sample["caption"], sample["replaced"]) == (2, "blue", True)
    assert str(folder / "1.png") in caplog.text and dataset.failed_indices == {1}
    again = ImageCaptionDataset(records, resolution=16)[1]  # a fresh process gives the same replacement
    assert torch.equal(again["pixel_values"], sample["pixel_values"]) and again["index"] == 2
    batch = collate([dataset[0], dataset[1], dataset[2]])
    assert batch["num_replaced"] == 1 and batch["indices"].tolist() == [0, 2, 2]


def test_undecodable_images_count_as_unreadable_wherever_they_were_met(tmp_path: Path) -> None:
    images = {"0.png": solid(RED), "1.png": undecodable_png(solid(GREEN)), "2.png": solid(BLUE)}
    folder = captioned_folder(tmp_path / "data", images, {"0.png": "red", "1.png": "green", "2.png": "blue"})
    records = load_image_caption_records(str(folder))
    log = tmp_path / "run" / "undecodable_images.txt"
    dataset = ImageCaptionDataset(records, resolution=16, failure_log=log)
    assert dataset.summary().skipped_corrupt == 0
    batches = list(DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate))  # met in a worker process
    assert batches[0]["num_replaced"] == 1 and dataset.failed_indices == set()  # the worker's copy saw it
    summary = dataset.summary()
    assert (summary.total, summary.used, summary.skipped_corrupt) == (3, 2, 1) and "1 unreadable" in str(summary)
    assert log.read_text() == f"{folder / '1.png'}\n"
    # a bucket of nothing but undecodable files: one line naming the fix, also through a worker
    only_bad = ImageCaptionDataset(ImageCaptionRecords("x", "captions", [records.records[1]], 1), resolution=16)
    message = r"none of the 1 images of bucket 16x16 of x could be decoded \(e.g. .*1.png\); replace or remove"
    with pytest.raises(UserError, match=message):
        only_bad[0]
    with pytest.raises(UserError) as raised:
        next(iter(DataLoader(only_bad, batch_size=1, num_workers=1, collate_fn=collate)))
    assert re.fullmatch(message + ".*", one_line(raised.value)) and "Traceback" not in one_line(raised.value)


# ---------------------------------------------------------------------------------------------------- transforms


def dataset_of(tmp_path: Path, images: dict[str, Image.Image], **kwargs) -> ImageCaptionDataset:
    folder = captioned_folder(tmp_path, images, {name: name for name in images})
    return ImageCaptionDataset(load_image_caption_records(str(folder), num_workers=1), **kwargs)


def test_center_crop_of_a_wide_image_keeps_the_middle(tmp_path: Path) -> None:
    image = solid(GREEN, (64, 32))
    image.paste(RED, (0, 0, 16, 32))
    image.paste(BLUE, (48, 0, 64, 32))
    sample = dataset_of(tmp_path, {"wide.png": image}, resolution=32)[0]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].dtype == torch.float32
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.equal(sample["pixel_values"], expected)  # no resampling: shorter side already 32


def test_resize_keeps_a_left_stripe_on_the_left_and_flip_is_off_by_default(tmp_path: Path) -> None:
    image = solid(BLUE, (32, 32))
    image.paste(RED, (0, 0, 16, 32))
    dataset = dataset_of(tmp_path, {"left.png": image}, resolution=16)
    assert dataset.flip is False
    for epoch in range(4):  # no epoch mirrors it
        dataset.set_epoch(epoch)
        values = dataset[0]["pixel_values"]
        assert values.shape == (3, 16, 16) and values.min() >= -1 and values.max() <= 1
        assert torch.allclose(values[:, :, :6], torch.tensor([1.0, -1, -1]).view(3, 1, 1), atol=0.02)
        assert torch.allclose(values[:, :, 10:], torch.tensor([-1.0, -1, 1]).view(3, 1, 1), atol=0.02)


def test_flip_when_asked_mirrors_some_samples_exactly(tmp_path: Path) -> None:
    image = noise((16, 16))
    plain = dataset_of(tmp_path / "a", {"n.png": image}, resolution=16)
    flipping = dataset_of(tmp_path / "b", {"n.png": image}, resolution=16, flip=True)
    flipped = []
    for epoch in range(8):
        plain.set_epoch(epoch)
        flipping.set_epoch(epoch)
        a, b = plain[0]["pixel_values"], flipping[0]["pixel_values"]
        assert torch.equal(b, a) or torch.equal(b, a.flip(-1))
        flipped.append(not torch.equal(b, a))
    assert any(flipped) and not all(flipped)


def test_to_rgb_composites_alpha_on_white_and_expands_modes() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    assert list(to_rgb(rgba).getdata()) == [RED, WHITE]
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert list(to_rgb(Image.new("LA", (1, 1), (0, 0))).getdata()) == [WHITE]
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("RGB", (2, 1), GREEN)
    palette.putpixel((1, 0), BLUE)
    palette = palette.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert palette.mode == "P" and list(to_rgb(palette).getdata()) == [GREEN, BLUE]
    palette.info["transparency"] = palette.getpixel((1, 0))
    assert list(to_rgb(palette).getdata()) == [GREEN, WHITE]
    sixteen = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16))
    assert [p[0] for p in to_rgb(sixteen).getdata()] == [0, 255, 128]
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == WHITE


def test_modes_come_out_as_rgb_samples(tmp_path: Path) -> None:
    images = {"rgba.png": Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "gray.png": Image.new("L", (16, 16), 255)}
    images["palette.png"] = solid(RED).convert("P")
    dataset = dataset_of(tmp_path, images, resolution=16)
    for index in range(3):
        sample = dataset[index]
        colour = RED if sample["caption"] == "palette.png" else WHITE
        assert np.all(pixels_of(sample) == colour)


def test_exif_rotation_is_applied_and_recorded(tmp_path: Path) -> None:
    image = solid(BLUE, (32, 16))
    image.paste(RED, (0, 0, 8, 16))  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red ends up at the top
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    (tmp_path / "photo.txt").write_text("a photo")
    records = load_image_caption_records(str(tmp_path))
    assert records.records[0].size == (16, 32)
    pixels = pixels_of(ImageCaptionDataset(records, resolution=16, bucketing=True, buckets=[(16, 32)])[0])
    assert pixels.shape == (32, 16, 3)
    assert np.abs(pixels[:4] - RED).max() < 40 and np.abs(pixels[-4:] - BLUE).max() < 40


def test_resize_and_crop_random_offsets_cover_the_free_range() -> None:
    image = noise((40, 16))
    reference = np.asarray(image)
    assert np.array_equal(np.asarray(resize_and_crop(image, (16, 16), "random", (0.0, 0.0))), reference[:, :16])
    assert np.array_equal(np.asarray(resize_and_crop(image, (16, 16), "random", (0.9999, 0.5))), reference[:, 24:])
    assert resize_and_crop(noise((30, 45)), (16, 8)).size == (16, 8)


# ------------------------------------------------------------------------------------------ micro-conditioning


def cover_size(original: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Closed form: the (h, w) an (h, w) image is resized to so that it just covers the (h, w) target."""
    scale = max(target[0] / original[0], target[1] / original[1])
    return max(target[0], round(original[0] * scale)), max(target[1], round(original[1] * scale))


def crop_at(source: Image.Image, sample: dict, flipped: bool) -> np.ndarray:
    """The sample's pixels rebuilt from its source image and its recorded micro-conditioning alone: resize to cover
    the target (PIL Lanczos), mirror if ``flipped``, crop ``target_size`` at ``crop_top_left``."""
    height, width = cover_size(sample["original_size"], sample["target_size"])
    resized = source.resize((width, height), Image.Resampling.LANCZOS)  # PIL returns a copy when the size is equal
    if flipped:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (top, left), (crop_h, crop_w) = sample["crop_top_left"], sample["target_size"]
    return np.asarray(resized, dtype=np.int64)[top : top + crop_h, left : left + crop_w]


def test_the_recorded_crop_rebuilds_every_sample_exactly(tmp_path: Path) -> None:
    """Random crops, flips and buckets: cropping the resized (and, for a flipped sample, mirrored) source image at
    the recorded corner gives the sample's pixels exactly, and only the flipped-image convention does so."""
    # no resampling for the first two (one side equals the target already), resampled for the others
    sizes = [(80, 32), (32, 72), (50, 26), (26, 52), (70, 33), (45, 45)]
    sources = {f"{i}.png": noise(size, seed=10 + i) for i, size in enumerate(sizes)}
    folder = captioned_folder(tmp_path, sources, {name: name for name in sources})
    records = load_image_caption_records(str(folder), num_workers=1)
    square = ImageCaptionDataset(records, resolution=32, crop="random", flip=True, seed=5)
    buckets = ImageCaptionDataset(records, resolution=32, bucketing=True, crop="random", flip=True, seed=5)
    kinds: set[tuple[bool, bool]] = set()
    for dataset in (square, buckets):
        for epoch in range(4):
            dataset.set_epoch(epoch)
            for index in range(len(dataset)):
                sample = dataset[index]
                source = sources[sample["caption"]]
                assert sample["original_size"] == (source.height, source.width)
                assert sample["target_size"] == dataset.target_size(index)[::-1]
                assert sample["target_size"] == tuple(sample["pixel_values"].shape[1:])
                pixels = pixels_of(sample)
                plain, mirrored = crop_at(source, sample, False), crop_at(source, sample, True)
                assert np.array_equal(plain, pixels) != np.array_equal(mirrored, pixels)
                flipped = np.array_equal(mirrored, pixels)
                top, left = sample["crop_top_left"]
                free_w = cover_size(sample["original_size"], sample["target_size"])[1] - sample["target_size"][1]
                kinds.add((flipped, 2 * left != free_w))
                assert 0 <= left <= free_w and top >= 0
    # flipped and plain samples, both with the crop off the middle (where the two conventions differ)
    assert kinds == {(False, True), (True, True), (False, False), (True, False)}
    batch = collate([buckets[i] for i in buckets.batch_sampler(8, shuffle=False).batches()[0]])
    for key in ("original_size", "crop_top_left", "target_size"):
        rows = [list(buckets[i][key]) for i in batch["indices"].tolist()]
        assert batch[key].dtype == torch.long and batch[key].tolist() == rows


def test_original_size_is_the_displayed_size_of_an_exif_rotated_file(tmp_path: Path) -> None:
    """A 48x16 JPEG (w x h) shown rotated by EXIF is a 48-high, 16-wide image: its original size is (48, 16) (not
    the resized 24 x 8); the square 8 crop is taken from the middle (top 8) of the resized image, and the crop
    rebuilt from the rotated file is the sample."""
    image = noise((48, 16), seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    (tmp_path / "photo.txt").write_text("a photo")
    sample = ImageCaptionDataset(load_image_caption_records(str(tmp_path)), resolution=8)[0]
    assert (sample["original_size"], sample["crop_top_left"], sample["target_size"]) == ((48, 16), (8, 0), (8, 8))
    with Image.open(tmp_path / "photo.jpg") as stored:
        assert stored.size == (48, 16)
        shown = to_rgb(ImageOps.exif_transpose(stored))
    assert np.array_equal(crop_at(shown, sample, False), pixels_of(sample))


def test_crop_window_is_the_closed_form_cover_and_crop() -> None:
    # 100x50 (w x h) to 32x32: scaled to 64x32, free range 32 columns; center takes the floor of the middle
    assert crop_window((100, 50), (32, 32)).resized_size == (32, 64)
    assert crop_window((100, 50), (32, 32)).crop_top_left == (0, 16)
    assert crop_window((101, 50), (32, 32)).crop_top_left == (0, 16)  # 65 wide: 33 free, floor(33 / 2)
    assert crop_window((100, 50), (32, 32), "random", (0.0, 0.9)).crop_top_left == (0, 0)
    assert crop_window((100, 50), (32, 32), "random", (0.9999, 0.9)).crop_top_left == (0, 32)
    window = crop_window((100, 50), (32, 32), "random", (0.25, 0.0))
    assert window.crop_top_left == (0, 8) and window.mirrored().crop_top_left == (0, 64 - 8 - 32)
    assert window.mirrored().mirrored() == window


# --------------------------------------------------------------------------------------------------- determinism


def test_samples_are_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    image = noise((128, 16), seed=1)
    folder = captioned_folder(tmp_path, {"wide.png": image, "b.png": noise((16, 64), seed=2)}, {})
    rows = [{"file_name": "wide.png", "text": ["one", "two", "three"]}, {"file_name": "b.png", "text": "b"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    records = load_image_caption_records(str(folder))

    def sample(seed: int, epoch: int, index: int = 0) -> dict:
        dataset = ImageCaptionDataset(records, resolution=16, crop="random", seed=seed)
        dataset.set_epoch(epoch)
        return dataset[index]

    reference = np.asarray(image)
    seen_offsets, seen_captions = set(), set()
    for epoch in range(6):
        first, second = sample(0, epoch), sample(0, epoch)
        assert torch.equal(first["pixel_values"], second["pixel_values"]) and first["caption"] == second["caption"]
        crop = pixels_of(first)
        offsets = [x for x in range(128 - 16 + 1) if np.array_equal(reference[:, x : x + 16], crop)]
        assert len(offsets) == 1  # a random crop is a window of the image, nothing else
        seen_offsets.add(offsets[0])
        seen_captions.add(first["caption"])
    assert len(seen_offsets) >= 4 and seen_captions == {"one", "two", "three"}
    assert not torch.equal(sample(0, 0)["pixel_values"], sample(1, 0)["pixel_values"])
    assert not torch.equal(sample(0, 0, 1)["pixel_values"], sample(0, 1, 1)["pixel_values"])


def test_bucketing_gives_wide_images_a_wide_bucket(tmp_path: Path) -> None:
    images = {"wide.png": noise((96, 48)), "tall.png": noise((40, 80)), "square.png": noise((50, 50))}
    dataset = dataset_of(tmp_path, images, resolution=32, bucketing=True)
    by_caption = {dataset[i]["caption"]: i for i in range(3)}
    wide_w, wide_h = dataset.target_size(by_caption["wide.png"])
    assert wide_w * wide_h <= 32 * 32 and wide_w % 8 == 0 and wide_h % 8 == 0
    nearest = min(abs(math.log(w / h / 2)) for w, h in dataset.buckets)
    assert abs(math.log(wide_w / wide_h / 2)) == pytest.approx(nearest)
    assert wide_w / wide_h > 1.5 and dataset.target_size(by_caption["square.png"]) == (32, 32)
    tall = dataset[by_caption["tall.png"]]["pixel_values"]
    assert tall.shape[1] > tall.shape[2]
    records = load_image_caption_records(str(tmp_path), scan=False)
    assert all(record.size is None for record in records.records)
    with pytest.raises(ValueError, match="bucketing needs every image's size"):
        ImageCaptionDataset(records, resolution=32, bucketing=True)
    assert ImageCaptionDataset(records, resolution=32).buckets == [(32, 32)]
    assert scan_images(records).records[0].size is not None


def test_bad_dataset_arguments_name_the_fix(tmp_path: Path) -> None:
    records = load_image_caption_records(str(captioned_folder(tmp_path, {"a.png": solid(RED)}, {"a.png": "a"})))
    with pytest.raises(ValueError, match="crop must be one of center, random; got 'middle'"):
        ImageCaptionDataset(records, crop="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        ImageCaptionDataset(records, resolution=100)


# ---------------------------------------------------------------------------------------------------- DataLoader


def mixed_dataset(tmp_path: Path) -> ImageCaptionDataset:
    sizes = [(48, 24), (24, 48), (32, 32), (50, 26), (30, 30), (26, 52), (64, 32), (33, 31), (40, 20)]
    images = {f"{i}.png": noise(size, seed=i) for i, size in enumerate(sizes)}
    return dataset_of(tmp_path, images, resolution=32, bucketing=True, crop="random", seed=3)


def test_dataloader_with_bucket_batch_sampler_and_collate(tmp_path: Path) -> None:
    dataset = mixed_dataset(tmp_path)
    sampler = dataset.batch_sampler(2)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    dataset.set_epoch(1)  # moves the sampler too: they share the epoch
    assert sampler.epoch == 1
    batches = list(loader)
    assert len(batches) == len(sampler) == len(sampler.batches(1))
    seen = []
    for batch, indices in zip(batches, sampler.batches(1)):
        assert batch["indices"].dtype == torch.long and batch["indices"].tolist() == indices
        assert batch["pixel_values"].shape[0] == len(batch["captions"]) == len(indices)
        assert tuple(batch["pixel_values"].shape[2:]) == dataset.target_size(indices[0])[::-1]
        seen.extend(indices)
    assert sorted(seen) == list(range(len(dataset)))
    assert [b["indices"].tolist() for b in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)] == [
        b["indices"].tolist() for b in batches
    ]
    with pytest.raises(ValueError, match="samples of different sizes in one batch"):
        collate([dataset[i] for i in range(len(dataset))])


def test_persistent_workers_see_set_epoch(tmp_path: Path) -> None:
    dataset = mixed_dataset(tmp_path)
    loader = DataLoader(
        dataset, batch_sampler=dataset.batch_sampler(3), collate_fn=collate, num_workers=1, persistent_workers=True
    )
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for batch in loader:
            for row, index in enumerate(batch["indices"].tolist()):
                assert torch.equal(batch["pixel_values"][row], dataset[index]["pixel_values"])
