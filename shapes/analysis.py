"""Read the colour, shape and position of the one object in a "shapes" image by plain image analysis, no learned model.

:func:`analyze_image` works in five steps:

1. background: the per-channel median of the border pixels (a ring 3 % of the side wide);
2. object: pixels whose RGB distance to the background exceeds half the object's contrast (the largest
   3x3-median-filtered distance; half is where an anti-aliased edge pixel is half object), the largest
   8-connected component, holes filled; no object ("none") when the contrast or the area is too small;
3. colour: the hue band (:data:`shapes.world.HUE_BANDS`) of the median pixel of the object's interior, or
   ``other`` when that pixel is nearly grey, black or white (saturation < 0.25 or value < 0.2);
4. shape: from the object's per-pixel coverage (an anti-aliased edge pixel reads back as the fraction it covers,
   :func:`coverage`): the fill ratio of its bounding box (triangle 0.5, circle pi/4 ~ 0.785, square 1) and the
   mean width of its top third over its bottom third (~0.2 for the up-pointing triangle, ~1 otherwise);
5. position: the anchor (:data:`shapes.world.ANCHORS`) nearest to the bounding-box centre (for a triangle, the
   centroid sits 1/6 of the height below the box centre, so the box centre is what a caption's position means).

:mod:`eval.adherence` scores the result against prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from shapes.world import ANCHORS, POSITIONS, colour_of_hue, rgb_to_hsv

__all__ = [
    "NONE",
    "OTHER_COLOUR",
    "Analysis",
    "ImageLike",
    "analyze_image",
    "classify_colour",
    "classify_shape",
    "coverage",
    "load_rgb",
    "nearest_position",
    "segment",
]

NONE = "none"  # every attribute of an image where no object was found
OTHER_COLOUR = "other"  # an object whose colour is no named colour (grey, black, white)
BORDER_FRACTION = 0.03  # width of the border ring that estimates the background
MIN_CONTRAST = 40.0  # RGB distance (0..255 channels) below which nothing stands out of the background
MIN_AREA_FRACTION = 0.004  # smaller objects are noise (the smallest shape of the dataset covers ~4.5 %)
MIN_SATURATION, MIN_VALUE = 0.25, 0.2  # below either, the object's colour is grey/black/white: OTHER_COLOUR
# Box fill ratios: triangle 0.5, circle pi/4 ~ 0.785, square 1; the thresholds sit between them.
TRIANGLE_FILL = 0.67
SQUARE_FILL = 0.89
TRIANGLE_WIDTH_RATIO = 0.6  # top-third / bottom-third mean width: up-pointing triangle ~0.2, circle and square ~1
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

ImageLike = Image.Image | np.ndarray | str | Path


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze_image` found: the attributes (``"none"`` without an object) and the diagnostics.

    Coordinates are ``(x, y)`` fractions of the image side (``y`` down); ``area`` is the object's share of the image;
    ``fill_ratio`` its share of its bounding box; ``width_ratio`` the mean width of the top third of the box over the
    bottom third's; ``centre`` is the bounding-box centre, ``centroid`` the centre of mass; ``rgb`` the median colour
    of the object's interior; ``contrast`` the object's largest RGB distance to the ``background``. Areas and extents
    come from the object's per-pixel coverage (:func:`coverage`), so they are exact to a fraction of a pixel.
    """

    colour: str
    shape: str
    position: str
    background: tuple[int, int, int]
    contrast: float
    rgb: tuple[int, int, int] | None = None
    centre: tuple[float, float] | None = None
    centroid: tuple[float, float] | None = None
    area: float = 0.0
    fill_ratio: float | None = None
    width_ratio: float | None = None

    @property
    def found(self) -> bool:
        """Whether an object was found."""
        return self.shape != NONE

    def attributes(self) -> dict[str, str]:
        """``{"colour": ..., "shape": ..., "position": ...}``."""
        return {"colour": self.colour, "shape": self.shape, "position": self.position}


def load_rgb(image: ImageLike) -> np.ndarray:
    """``image`` (a PIL image, an ``(H, W, 3)`` uint8 array, or a path) as a float ``(H, W, 3)`` array in 0..255."""
    if isinstance(image, str | Path):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3) with 0..255 values; got shape {array.shape}")
    return array.astype(np.float32)


def _border_pixels(pixels: np.ndarray, ring: int) -> np.ndarray:
    inner = pixels[ring:-ring]
    parts = [pixels[:ring], pixels[-ring:], inner[:, :ring], inner[:, -ring:]]
    return np.concatenate([part.reshape(-1, 3) for part in parts])


def segment(pixels: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, float]:
    """The hard object mask (None when nothing stands out), the background RGB and the contrast of ``pixels``.

    The mask is the largest 8-connected component of the pixels farther than half the contrast from the
    background, holes filled.
    """
    height, width = pixels.shape[:2]
    ring = max(1, round(BORDER_FRACTION * min(height, width)))
    border = _border_pixels(pixels, ring)
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    # Noise on the border (a generated image's background is never flat) raises the bar for an object.
    noise = float(np.percentile(np.linalg.norm(border - background, axis=-1), 90))
    contrast = float(ndimage.median_filter(distance, size=3).max())
    if contrast < max(MIN_CONTRAST, 2.0 * noise + MIN_CONTRAST / 2.0):
        return None, background, contrast
    mask = _largest_component(distance > max(contrast / 2.0, 2.0 * noise))
    if mask is None or mask.sum() < max(6, MIN_AREA_FRACTION * height * width):
        return None, background, contrast
    return mask, background, contrast


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def coverage(pixels: np.ndarray, mask: np.ndarray, background: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """How much of each pixel the object covers, in [0, 1], near ``mask`` (0 elsewhere).

    An anti-aliased pixel is ``background + a * (rgb - background)``; ``a`` is read back by projecting onto that
    line, so sums of coverage measure areas and extents to a fraction of a pixel.
    """
    direction = rgb - background
    alpha = np.clip(((pixels - background) @ direction) / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    return alpha * ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED, iterations=2)


def classify_colour(rgb: Sequence[float]) -> str:
    """The named colour of ``rgb`` (0..255 channels) by hue band, or ``"other"`` when it is nearly achromatic."""
    hue, saturation, value = rgb_to_hsv(tuple(rgb))
    if saturation < MIN_SATURATION or value < MIN_VALUE:
        return OTHER_COLOUR
    return colour_of_hue(hue)


def classify_shape(fill_ratio: float, width_ratio: float) -> str:
    """``circle``, ``square`` or ``triangle`` from the fill ratio of the bounding box and the width ratio."""
    if fill_ratio < TRIANGLE_FILL or width_ratio < TRIANGLE_WIDTH_RATIO:
        return "triangle"
    return "square" if fill_ratio > SQUARE_FILL else "circle"


def nearest_position(centre: tuple[float, float]) -> str:
    """The position whose anchor is nearest to ``centre`` (``(x, y)`` fractions)."""
    return min(POSITIONS, key=lambda name: math.dist(ANCHORS[name], centre))


def analyze_image(image: ImageLike) -> Analysis:
    """Read the colour, shape and position of the one object in ``image`` (see the module docstring)."""
    pixels = load_rgb(image)
    height, width = pixels.shape[:2]
    if min(height, width) < 8:
        raise ValueError(f"the image is {width}x{height}; the analyzer needs at least 8x8 pixels")
    mask, background, contrast = segment(pixels)
    background_rgb = tuple(int(round(c)) for c in background)
    if mask is None:
        return Analysis(colour=NONE, shape=NONE, position=NONE, background=background_rgb, contrast=contrast)

    # The interior avoids the anti-aliased rim, whose pixels are mixed with the background.
    interior = ndimage.binary_erosion(mask)
    rgb = np.median(pixels[interior] if interior.sum() >= 4 else pixels[mask], axis=0)
    alpha = coverage(pixels, mask, background, rgb)
    columns, rows = alpha.max(axis=0), alpha.max(axis=1)  # soft extents: the box is their sums
    area = float(alpha.sum())
    fill_ratio = area / max(float(columns.sum() * rows.sum()), 1e-6)
    row_widths = alpha.sum(axis=1)[rows > 0.5]
    third = max(1, len(row_widths) // 3)
    width_ratio = float(row_widths[:third].mean() / max(row_widths[-third:].mean(), 1e-6))
    x, y = np.arange(width) + 0.5, np.arange(height) + 0.5
    centre = (float(x @ columns / columns.sum() / width), float(y @ rows / rows.sum() / height))
    centroid = (float(alpha.sum(axis=0) @ x / area / width), float(alpha.sum(axis=1) @ y / area / height))
    return Analysis(
        colour=classify_colour(rgb),
        shape=classify_shape(fill_ratio, width_ratio),
        position=nearest_position(centre),
        background=background_rgb,
        contrast=contrast,
        rgb=tuple(int(round(c)) for c in rgb),
        centre=centre,
        centroid=centroid,
        area=area / (height * width),
        fill_ratio=fill_ratio,
        width_ratio=width_ratio,
    )
