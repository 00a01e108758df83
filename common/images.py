"""Reading images the same way everywhere: which files are images, and any image mode as plain RGB.

Training (:mod:`training.data`) and evaluation (:mod:`eval.features`, :mod:`eval.fid`) read pixels through these, so
a transparent PNG or a 16-bit grayscale scan means the same RGB image to the trainer and to the metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "list_image_files", "open_rgb", "to_rgb"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"})


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image``: transparency composited on white, palette and grayscale expanded, 16-bit scaled."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I"):  # 16-bit grayscale: convert("L") would clip at 255 instead of scaling
        values = np.asarray(image, dtype=np.float64)
        scale = 255 / 65535 if image.mode.startswith("I;16") or values.max() > 255 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # float grayscale (TIFF): convert("L") would turn 0..1 into black
        return Image.fromarray(float_to_uint8(np.asarray(image, dtype=np.float64))).convert("RGB")
    return image.convert("RGB")


def float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float pixels to 0..255 by their range: 0..1 (the usual float convention), 0..255, or 0..65535 (16-bit values
    stored as floats). Anything else (negative values, HDR, NaN) has no agreed meaning: a ``ValueError`` naming the
    range, so the caller can name the file."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(values).all() or low < 0:
        raise ValueError(
            f"a float image with values in [{low:g}, {high:g}] (or NaN/inf) has no standard scale; save it as 8- or "
            "16-bit, or as floats in 0..1"
        )
    scale = next(255 / top for top in (1.0, 255.0, 65535.0) if high <= top) if high <= 65535 else None
    if scale is None:
        raise ValueError(f"a float image with values up to {high:g} has no standard scale; save it as 8- or 16-bit")
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def open_rgb(image: str | Path | Image.Image) -> Image.Image:
    """An RGB, EXIF-rotated, fully decoded copy of an image file or PIL image (transparency composited on white)."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    with Image.open(image) as opened:
        return to_rgb(ImageOps.exif_transpose(opened))


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted; hidden files and folders skipped)."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(Path(root, name))
    return paths
