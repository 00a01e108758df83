"""Image–caption records: the five source formats, format detection, and bad or uncaptioned files skipped and
counted with a clear error when nothing is left. All images are drawn here, a few pixels each; the drawing helpers
are shared with ``test_data.py``."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from training.records import detect_format, load_image_caption_records

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def captioned_folder(folder: Path, images: dict[str, Image.Image | bytes], captions: dict[str, str]) -> Path:
    """A kohya-style folder: ``images`` (PIL images or raw bytes) and ``.txt`` side-cars for ``captions``."""
    for name, image in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            (folder / name).write_bytes(image)
        else:
            image.save(folder / name)
    for name, caption in captions.items():
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def sample_table() -> datasets.Dataset:
    """Three rows: an Image column and a caption column, one cell of which is a list of captions."""
    images = [solid(RED), solid(GREEN, (32, 16)), solid(BLUE)]
    table = datasets.Dataset.from_dict({"image": images, "text": [["red", "crimson"], ["green"], ["blue"]]})
    return table.cast_column("image", datasets.Image())


# ------------------------------------------------------------------------------------------------------- formats


def test_imagefolder_with_metadata_jsonl_and_subfolders(tmp_path: Path, caplog) -> None:
    captioned_folder(tmp_path, {"a.png": solid(RED), "b.png": solid(GREEN), "sub/c.png": solid(BLUE)}, {})
    captioned_folder(tmp_path, {"nested/d.png": solid(WHITE), "e.png": solid(RED), "f.png": solid(RED)}, {})
    rows = [
        {"file_name": "a.png", "text": "a red square"},
        {"file_name": "b.png", "text": ["green", "a green square"]},
        {"file_name": "sub/c.png", "text": "  blue  "},
        {"file_name": "f.png", "text": ""},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    (tmp_path / "nested" / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": "white"}))
    assert detect_format(str(tmp_path)) == "imagefolder"
    records = load_image_caption_records(str(tmp_path), image_column="image")  # datasets' name for file_name
    by_name = {Path(r.image).relative_to(tmp_path).as_posix(): r for r in records.records}
    assert {name: r.captions for name, r in by_name.items()} == {
        "a.png": ("a red square",),
        "b.png": ("green", "a green square"),
        "sub/c.png": ("blue",),
        "nested/d.png": ("white",),
    }
    assert by_name["b.png"].size == (16, 16)
    summary = records.summary()
    assert (summary.total, summary.used, summary.skipped_no_caption, summary.skipped_corrupt) == (6, 4, 2, 0)
    assert "metadata.jsonl:5 is not valid JSON" in caplog.text and "e.png" in caplog.text


def test_kohya_txt_captions(tmp_path: Path, caplog) -> None:
    images = {"a.png": solid(RED), "10_dog/b.jpg": solid(GREEN), "c.png": solid(BLUE), "d.png": solid(BLUE)}
    captioned_folder(tmp_path, images, {"a.png": "a red square\n", "10_dog/b.jpg": "first line\nsecond", "c.png": " "})
    (tmp_path / "._a.png").write_bytes(b"\x00\x05macOS resource fork")  # hidden files are not images
    assert detect_format(str(tmp_path)) == "captions"
    records = load_image_caption_records(str(tmp_path), caption_column="text")  # ignored for .txt captions
    assert sorted(r.captions for r in records.records) == [("a red square",), ("first line",)]
    assert (records.total, len(records), records.skipped_no_caption) == (4, 2, 2)
    assert "1 of 4 images" in caplog.text and "d.png" in caplog.text and "only the first is used" in caplog.text


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    sample_table().save_to_disk(tmp_path / "ds")
    records = load_image_caption_records(str(tmp_path / "ds"))
    assert records.format == "save_to_disk"
    assert [r.captions for r in records.records] == [("red", "crimson"), ("green",), ("blue",)]
    assert [r.size for r in records.records] == [(16, 16), (32, 16), (16, 16)]
    datasets.DatasetDict({"validation": sample_table().select([0, 2])}).save_to_disk(tmp_path / "dd")
    assert len(load_image_caption_records(str(tmp_path / "dd"), split="validation")) == 2
    with pytest.raises(ValueError, match="split 'train' not found in .*dd; it has splits: validation"):
        load_image_caption_records(str(tmp_path / "dd"))


def test_parquet_file_glob_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    sample_table().to_parquet(str(folder / "part-0.parquet"))
    sample_table().select([1]).to_parquet(str(folder / "part-1.parquet"))
    cache = str(tmp_path / "cache")
    one = load_image_caption_records(str(folder / "part-0.parquet"), cache_dir=cache)
    assert one.format == "parquet" and len(one) == 3
    assert [r.captions for r in one.records] == [("red", "crimson"), ("green",), ("blue",)]
    assert len(load_image_caption_records(str(folder / "part-*.parquet"), cache_dir=cache)) == 4
    whole = load_image_caption_records(str(folder), cache_dir=cache)
    assert whole.format == "parquet" and len(whole) == 4
    with whole.open_image(3) as image:
        assert image.size == (32, 16) and image.convert("RGB").getpixel((0, 0)) == GREEN


def test_hub_id_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, split: str | None = None, **kwargs) -> datasets.Dataset:
        calls.append((path, split))
        return sample_table().rename_column("text", "prompt")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert detect_format("user/shapes") == "hub"
    records = load_image_caption_records("user/shapes", split="train[:3]")
    assert calls == [("user/shapes", "train[:3]")]
    assert records.format == "hub" and [r.captions[0] for r in records.records] == ["red", "green", "blue"]

    def failing_load_dataset(*args, **kwargs) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(ValueError, match="not a local file or folder.*offline"):
        load_image_caption_records("user/missing")


def test_wrong_column_names_list_the_real_columns(tmp_path: Path) -> None:
    sample_table().save_to_disk(tmp_path / "ds")
    message = "caption column 'txt' not found; the dataset has columns: image, text; pass --caption-column"
    with pytest.raises(ValueError, match=message):
        load_image_caption_records(str(tmp_path / "ds"), caption_column="txt")
    with pytest.raises(ValueError, match="image column 'pic' not found; the dataset has columns: image, text"):
        load_image_caption_records(str(tmp_path / "ds"), image_column="pic")
    with pytest.raises(ValueError, match="column 'text' of .* does not hold images"):
        load_image_caption_records(str(tmp_path / "ds"), image_column="text", caption_column="text")
    sample_table().rename_column("text", "description").save_to_disk(tmp_path / "other")
    with pytest.raises(ValueError, match="no caption column found .*columns: image, description"):
        load_image_caption_records(str(tmp_path / "other"))
    captioned_folder(tmp_path / "folder", {"a.png": solid(RED)}, {})
    (tmp_path / "folder" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "red"}))
    with pytest.raises(ValueError, match="caption column 'text' not found; the dataset has columns: file_name, capt"):
        load_image_caption_records(str(tmp_path / "folder"), caption_column="text")


# ---------------------------------------------------------------------------------------------------- robustness


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    good = png_bytes(noise((24, 16)))
    images = {
        "good1.png": good,
        "good2.png": solid(BLUE),
        "random.png": np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
    }
    captioned_folder(tmp_path, images, {name: name for name in images})
    with caplog.at_level(logging.WARNING):
        records = load_image_caption_records(str(tmp_path))
    assert sorted(Path(r.image).name for r in records.records) == ["good1.png", "good2.png"]
    summary = records.summary()
    assert (summary.total, summary.used, summary.skipped_corrupt, summary.skipped_no_caption) == (5, 2, 3, 0)
    for name in ("random.png", "truncated.png", "empty.png"):
        assert str(tmp_path / name) in caplog.text
    assert "skipped 3 of 5 images" in caplog.text
    assert summary.as_dict()["skipped_corrupt"] == 3 and "2 of 5 images used" in str(summary)


def test_unreadable_warnings_are_capped_then_summarised(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr("training.records.MAX_LISTED", 1)
    images = {"good.png": solid(RED), "bad1.png": b"", "bad2.png": b"x", "bad3.png": b"yy"}
    captioned_folder(tmp_path, images, {name: name for name in images})
    with caplog.at_level(logging.WARNING, logger="training.records"):
        records = load_image_caption_records(str(tmp_path))
    assert records.skipped_corrupt == 3
    listed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(listed) == 1 and "bad1.png" in listed[0]
    assert "... and 2 more unreadable images" in caplog.text


def test_all_corrupt_or_no_caption_or_empty_raise_a_clear_error(tmp_path: Path) -> None:
    corrupt = captioned_folder(
        tmp_path / "corrupt", {"a.png": b"", "b.png": b"not an image"}, {"a.png": "a", "b.png": "b"}
    )
    with pytest.raises(ValueError, match="none of the 2 captioned images of .*corrupt could be read"):
        load_image_caption_records(str(corrupt))
    uncaptioned = captioned_folder(tmp_path / "uncaptioned", {f"{i}.png": solid(RED) for i in range(3)}, {})
    with pytest.raises(ValueError, match=r"0 of 3 images in .*uncaptioned have a caption; add a caption file"):
        load_image_caption_records(str(uncaptioned))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        load_image_caption_records(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is not an existing file or folder"):
        load_image_caption_records(str(tmp_path / "missing" / "data"))
    with pytest.raises(ValueError, match="not a .parquet file"):
        load_image_caption_records(str(tmp_path / "uncaptioned" / "0.png"))


def test_captions_not_in_utf8_stop_with_the_file_line_and_fix(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "jsonl", {"a.png": solid(RED), "b.png": solid(BLUE)}, {})
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "un carré bleu, café"}]
    (folder / "metadata.jsonl").write_bytes(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: byte 0xe9 is not UTF-8 .* save it as UTF-8"):
        load_image_caption_records(str(folder))
    side_car = captioned_folder(tmp_path / "txt", {"a.png": solid(RED)}, {})
    (side_car / "a.txt").write_bytes("a red square\nsecond line\ncafé".encode("cp1252"))
    with pytest.raises(ValueError, match=r"a.txt, line 3: byte 0xe9 is not UTF-8"):
        load_image_caption_records(str(side_car))
    # UTF-8 (with or without a byte-order mark) reads as it is
    (side_car / "a.txt").write_bytes("\ufeffun carré rouge".encode())
    assert load_image_caption_records(str(side_car)).records[0].captions == ("un carré rouge",)
