"""Training fixtures: a tiny image-caption dataset drawn here, and the tiny model folders to train from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ldm.presets import build_components

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def draw_shapes_folder(folder: Path, n: int = 8, size: int = 64) -> Path:
    """``n`` images of a coloured disc or square on the left or right, captioned, in the imagefolder layout."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = "circle" if (i // 4) % 2 == 0 else "square"
        side = "left" if i % 2 == 0 else "right"
        image = Image.new("RGB", (size, size), (245, 245, 240))
        cx = size * (0.27 if side == "left" else 0.73)
        r = size * 0.18
        box = (cx - r, size / 2 - r, cx + r, size / 2 + r)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"{i:03d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape} on the {side}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    return str(draw_shapes_folder(tmp_path_factory.mktemp("shapes")))


@pytest.fixture(scope="session")
def frozen_parts_dir(tmp_path_factory) -> str:
    """A folder with vae/, text_encoder/ and tokenizer/ of the tiny preset (what training from scratch starts from)."""
    path = tmp_path_factory.mktemp("frozen")
    components = build_components("tiny", seed=0)
    components["vae"].save_pretrained(path / "vae")
    components["text_encoder"].save_pretrained(path / "text_encoder")
    components["tokenizer"].save_pretrained(path / "tokenizer")
    return str(path)
