"""common.images: which files are images, and every image read as the same RGB pixels (EXIF rotation applied)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import list_image_files, open_rgb

RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_list_image_files_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt", ".hidden.png", ".cache/d.png", "__MACOSX/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_image_files(tmp_path) == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "sub" / "c.webp"]


def test_open_rgb_applies_exif_rotation_and_composites_transparency(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 1), RED)
    image.putpixel((1, 0), BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100, subsampling=0)
    opened = open_rgb(tmp_path / "rotated.jpg")
    assert opened.mode == "RGB" and opened.size == (1, 2)  # the stored 2x1 image, displayed upright as 1x2
    top, bottom = opened.getpixel((0, 0)), opened.getpixel((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red above blue after the rotation
    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    assert open_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("top", [1.0, 255.0, 65535.0])
def test_a_float_tiff_is_scaled_by_its_range_not_turned_black(tmp_path: Path, top: float) -> None:
    levels = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(levels * top, mode="F").save(tmp_path / "scan.tif")
    pixels = np.asarray(open_rgb(tmp_path / "scan.tif"))
    assert pixels.shape == (4, 4, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[..., 0], np.rint(levels * 255).astype(np.uint8))


def test_a_float_image_without_a_standard_scale_is_refused_with_its_range(tmp_path: Path) -> None:
    Image.fromarray(np.array([[-1.0, 2.0]], dtype=np.float32), mode="F").save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"values in \[-1, 2\] .* has no standard scale"):
        open_rgb(tmp_path / "hdr.tif")
