"""Read the objects of a "shapes" image (colour, shape, position) by plain image analysis, no learned model.

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

:func:`analyze_objects` reads every object of a two-object scene (:class:`shapes.pairs.PairSpec`) the same way:

1. background and noise as above (the noise from the median border distance, since objects may touch the border);
2. candidates: the 8-connected components of the pixels farther from the background than a quarter of the image's
   contrast; each candidate is thresholded again at half of its own contrast (objects differ in contrast: a yellow
   shape on a light background stands out less than a blue one), holes filled; components under
   :data:`MIN_OBJECT_AREA_FRACTION` of the image are noise and dropped;
3. each object is read as above (colour, shape, centre), with its coverage limited to the pixels nearer to it than
   to any other object, so a neighbour's pixels never count towards its area or extents.

Objects that touch form one component and are read as one object (whatever shape and colour it shows), so a scene
whose objects merged never passes as two. :mod:`eval.adherence` scores the results against prompts.
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
    "ObjectsAnalysis",
    "analyze_image",
    "analyze_objects",
    "classify_colour",
    "classify_shape",
    "coverage",
    "load_rgb",
    "nearest_position",
    "read_object",
    "segment",
    "segment_objects",
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
# Two-object scenes: the smallest object (a triangle 0.2 of the side) covers ~2 % of the image, so a component under
# 0.6 % (25 px at 64 px) is a speck, not an object.
MIN_OBJECT_AREA_FRACTION = 0.006
CANDIDATE_FRACTION = 0.25  # candidates stand out by a quarter of the image's contrast, objects by half their own
# For Gaussian noise the 90th percentile of the RGB distance is ~1.6x its median; the median ignores object pixels
# on up to half of the border ring.
NOISE_MEDIAN_FACTOR = 1.6
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


@dataclass(frozen=True)
class ObjectsAnalysis:
    """What :func:`analyze_objects` found: the ``background``, the image's ``contrast`` and each object read as an
    :class:`Analysis` (largest first; its ``contrast`` is the object's own)."""

    background: tuple[int, int, int]
    contrast: float
    objects: tuple[Analysis, ...] = ()

    @property
    def count(self) -> int:
        """How many objects were found."""
        return len(self.objects)

    @property
    def found(self) -> bool:
        """Whether any object was found."""
        return bool(self.objects)


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
    background, distance, border_distance = _background(pixels)
    # Noise on the border (a generated image's background is never flat) raises the bar for an object.
    noise = float(np.percentile(border_distance, 90))
    contrast = float(ndimage.median_filter(distance, size=3).max())
    if contrast < max(MIN_CONTRAST, 2.0 * noise + MIN_CONTRAST / 2.0):
        return None, background, contrast
    mask = _largest_component(distance > max(contrast / 2.0, 2.0 * noise))
    if mask is None or mask.sum() < max(6, MIN_AREA_FRACTION * height * width):
        return None, background, contrast
    return mask, background, contrast


def _background(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The background RGB (per-channel median of the border ring), every pixel's RGB distance to it, and the
    border pixels' distances."""
    ring = max(1, round(BORDER_FRACTION * min(pixels.shape[:2])))
    border = _border_pixels(pixels, ring)
    background = np.median(border, axis=0)
    return background, np.linalg.norm(pixels - background, axis=-1), np.linalg.norm(border - background, axis=-1)


def segment_objects(pixels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, float, list[float]]:
    """The hard masks of every object in ``pixels`` (largest first; empty when nothing stands out), the background
    RGB, the image's contrast and each object's own contrast (see the module docstring)."""
    height, width = pixels.shape[:2]
    background, distance, border_distance = _background(pixels)
    noise = NOISE_MEDIAN_FACTOR * float(np.median(border_distance))
    smoothed = ndimage.median_filter(distance, size=3)
    contrast = float(smoothed.max())
    if contrast < max(MIN_CONTRAST, 2.0 * noise + MIN_CONTRAST / 2.0):
        return [], background, contrast, []
    min_area = max(6.0, MIN_OBJECT_AREA_FRACTION * height * width)
    candidates, count = ndimage.label(distance > max(CANDIDATE_FRACTION * contrast, 2.0 * noise), _EIGHT_CONNECTED)
    found: list[tuple[np.ndarray, float]] = []
    for label, box in enumerate(ndimage.find_objects(candidates), start=1):
        candidate = candidates[box] == label
        own = float(smoothed[box][candidate].max())
        if candidate.sum() < min_area or own < MIN_CONTRAST:
            continue
        parts, part_count = ndimage.label(candidate & (distance[box] > max(own / 2.0, 2.0 * noise)), _EIGHT_CONNECTED)
        for part in range(1, part_count + 1):
            mask = np.zeros((height, width), dtype=bool)
            mask[box] = ndimage.binary_fill_holes(parts == part)
            if mask.sum() >= min_area:
                found.append((mask, own))
    found.sort(key=lambda item: -int(item[0].sum()))
    return [mask for mask, _ in found], background, contrast, [own for _, own in found]


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


def _checked_pixels(image: ImageLike) -> np.ndarray:
    pixels = load_rgb(image)
    height, width = pixels.shape[:2]
    if min(height, width) < 8:
        raise ValueError(f"the image is {width}x{height}; the analyzer needs at least 8x8 pixels")
    return pixels


def analyze_image(image: ImageLike) -> Analysis:
    """Read the colour, shape and position of the one object in ``image`` (see the module docstring)."""
    pixels = _checked_pixels(image)
    mask, background, contrast = segment(pixels)
    if mask is None:
        background_rgb = tuple(int(round(c)) for c in background)
        return Analysis(colour=NONE, shape=NONE, position=NONE, background=background_rgb, contrast=contrast)
    return read_object(pixels, mask, background, contrast)


def analyze_objects(image: ImageLike) -> ObjectsAnalysis:
    """Read every object of ``image`` (see the module docstring): colour, shape, centre and diagnostics of each."""
    pixels = _checked_pixels(image)
    masks, background, contrast, contrasts = segment_objects(pixels)
    region = None
    if len(masks) > 1:
        # Each pixel belongs to the object it is nearest to, so a neighbour's pixels never leak into a coverage.
        labels = np.zeros(pixels.shape[:2], dtype=np.int32)
        for k, mask in enumerate(masks, start=1):
            labels[mask] = k
        _, (rows, cols) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        region = labels[rows, cols]
    objects = tuple(
        read_object(pixels, mask, background, own, None if region is None else region == k)
        for k, (mask, own) in enumerate(zip(masks, contrasts), start=1)
    )
    return ObjectsAnalysis(background=tuple(int(round(c)) for c in background), contrast=contrast, objects=objects)


def read_object(
    pixels: np.ndarray, mask: np.ndarray, background: np.ndarray, contrast: float, region: np.ndarray | None = None
) -> Analysis:
    """Read the object of hard ``mask`` in ``pixels``: colour, shape, position and diagnostics (steps 3-5 of the
    module docstring). ``region`` (a boolean mask) limits its coverage to the pixels that are its own when the
    image holds other objects."""
    height, width = pixels.shape[:2]
    # The interior avoids the anti-aliased rim, whose pixels are mixed with the background.
    interior = ndimage.binary_erosion(mask)
    rgb = np.median(pixels[interior] if interior.sum() >= 4 else pixels[mask], axis=0)
    alpha = coverage(pixels, mask, background, rgb)
    if region is not None:
        alpha = alpha * region
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
        background=tuple(int(round(c)) for c in background),
        contrast=contrast,
        rgb=tuple(int(round(c)) for c in rgb),
        centre=centre,
        centroid=centroid,
        area=area / (height * width),
        fill_ratio=fill_ratio,
        width_ratio=width_ratio,
    )
