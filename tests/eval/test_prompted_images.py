"""Tests for eval.prompted_images, the one reader of "images with their prompts" that eval.clip_score and
eval.adherence share: PNG prompt chunks first, then the folder's captions, or prompts made from metadata rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from eval.prompted_images import load_prompted_images, png_prompt
from tests.eval.conftest import PROMPTS, txt2img_folder
from tests.training.conftest import draw_shapes_folder


def test_prompts_come_from_png_metadata_then_captions(tmp_path: Path) -> None:
    folder = txt2img_folder(tmp_path / "gen")
    Image.new("RGB", (32, 32)).save(folder / "no_prompt.png")
    data = load_prompted_images(folder)
    assert data.prompts == PROMPTS and data.skipped_no_prompt == 1
    assert png_prompt(data.files[0]) == PROMPTS[0] and png_prompt(folder / "no_prompt.png") is None
    shapes = draw_shapes_folder(tmp_path / "shapes", n=3, size=32)  # metadata.jsonl captions, no PNG prompts
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    data = load_prompted_images(shapes)
    assert data.prompts == [row["text"] for row in rows] and [p.name for p in data.files] == [
        row["file_name"] for row in rows
    ]
    assert load_prompted_images(shapes, max_images=2).prompts == data.prompts[:2]
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (8, 8)).save(plain / "a.png")
    with pytest.raises(ValueError, match="none of the 1 images .* has a prompt; expected PNGs written by"):
        load_prompted_images(plain)


def test_skipped_and_unreadable_images_are_counted_and_named(tmp_path: Path, caplog) -> None:
    folder = txt2img_folder(tmp_path / "gen", n=2)
    Image.new("RGB", (8, 8)).save(folder / "no-prompt.png")
    (folder / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="eval.prompted_images"):
        data = load_prompted_images(folder)
    assert data.prompts == PROMPTS[:2] and data.skipped_no_prompt == 1 and data.unreadable == 1
    assert "broken.png" in caplog.text and "no-prompt.png" in caplog.text


def test_row_prompts_read_metadata_rows_and_a_metadata_file_names_its_folder(tmp_path: Path) -> None:
    shapes = draw_shapes_folder(tmp_path / "shapes", n=3, size=32)
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    data = load_prompted_images(shapes / "metadata.jsonl", row_prompt=lambda row: row["file_name"].upper())
    assert data.source == str(shapes) and data.prompts == [row["file_name"].upper() for row in rows]

    def refuse(row: dict) -> str:
        raise ValueError("has no colour; drop --use-attributes")

    with pytest.raises(ValueError, match=r"metadata.jsonl:1 has no colour; drop --use-attributes"):
        load_prompted_images(shapes, row_prompt=refuse)
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        load_prompted_images(txt2img_folder(tmp_path / "gen", n=1), row_prompt=refuse)


def test_missing_sources_and_other_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist .no such folder.; pass a folder of images"):
        load_prompted_images(tmp_path / "nowhere")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(ValueError, match="is a file; pass a folder of images or its metadata.jsonl"):
        load_prompted_images(tmp_path / "prompts.txt")
    with pytest.raises(ValueError, match="no prompted images in .*: it holds no image files"):
        load_prompted_images(tmp_path)
