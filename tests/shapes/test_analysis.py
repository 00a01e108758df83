"""shapes.analysis reads colour, shape and position back from images it was not tuned on, and finds no object in
blank and noisy blank images."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from eval.adherence import score_images
from shapes.analysis import analyze_image
from shapes.world import ANCHORS, COLOURS, POSITIONS, SHAPES, ShapeSpec, render

# A palette of CSS named colours, chosen here and nowhere else: the analyzer never saw these shades.
CSS_PALETTE = {
    "red": [(220, 20, 60), (178, 34, 34), (205, 92, 92), (200, 0, 0)],
    "orange": [(255, 140, 0), (255, 127, 40), (230, 120, 20), (210, 105, 30)],
    "yellow": [(255, 215, 0), (255, 255, 0), (240, 230, 60), (218, 200, 32)],
    "green": [(50, 205, 50), (34, 139, 34), (46, 139, 87), (124, 220, 0)],
    "blue": [(65, 105, 225), (30, 144, 255), (0, 0, 160), (70, 130, 180)],
    "purple": [(128, 0, 128), (148, 0, 211), (138, 43, 226), (186, 85, 211)],
}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """A CSS swatch of ``colour`` jittered in HSV (hue +-3 degrees, saturation and value +-0.08)."""
    r, g, b = CSS_PALETTE[colour][rng.integers(len(CSS_PALETTE[colour]))]
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    return _hsv(h + rng.uniform(-3, 3) / 360, s + rng.uniform(-0.08, 0.08), v + rng.uniform(-0.08, 0.08))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Mid greys, tinted light and tinted dark backgrounds: none of them the generator's near-greys."""
    kind = rng.integers(3)
    if kind == 0:
        return _hsv(0, 0, rng.uniform(0.35, 0.65))
    if kind == 1:
        return _hsv(rng.uniform(), rng.uniform(0.10, 0.25), rng.uniform(0.80, 0.97))
    return _hsv(rng.uniform(), rng.uniform(0.20, 0.45), rng.uniform(0.10, 0.30))


def _draw_independently(spec: ShapeSpec, size: int, equilateral: bool) -> Image.Image:
    """The test's own drawing: 2x supersampling and a box filter (the project renders at 4x with Lanczos)."""
    big = 2 * size
    canvas = Image.new("RGB", (big, big), spec.background)
    draw = ImageDraw.Draw(canvas)
    cx, cy, half = spec.centre[0] * big, spec.centre[1] * big, spec.size * big / 2
    if spec.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=spec.rgb)
    elif spec.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=spec.rgb)
    else:
        h = half * (3**0.5 / 2 if equilateral else 1.0)
        draw.polygon([(cx, cy - h), (cx + half, cy + h), (cx - half, cy + h)], fill=spec.rgb)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _held_out_scenes(n: int, seed: int) -> tuple[list[Image.Image], list[str], list[dict[str, str]]]:
    """Ground-truth renders drawn unlike the dataset: CSS shades, other backgrounds, sizes, jitter and renderers."""
    rng = np.random.default_rng(seed)
    images, prompts, truths = [], [], []
    for i in range(n):
        colour, shape, position = COLOURS[i % 6], SHAPES[(i // 6) % 3], POSITIONS[(i // 18) % 5]
        size = (32, 64, 96)[rng.integers(3)]
        extent = rng.uniform(0.27, 0.42)
        jitter = rng.uniform(-0.035, 0.035, size=2)
        centre = (ANCHORS[position][0] + jitter[0], ANCHORS[position][1] + jitter[1])
        spec = ShapeSpec(colour, shape, position, _shade(rng, colour), centre, extent, _background(rng))
        own = rng.random() < 0.5
        images.append(_draw_independently(spec, size, rng.random() < 0.5) if own else render(spec, size))
        prompts.append(f"a {colour} {shape} {position}")
        truths.append(spec.attributes())
    return images, prompts, truths


def test_analyzer_reads_held_out_renders_it_was_not_tuned_on():
    images, prompts, _ = _held_out_scenes(360, seed=20240917)
    report = score_images(images, prompts)
    accuracy, rate = report.part_accuracy(), report.all_correct_rate()
    misses = [(r.prompt, r.found, round(r.analysis.fill_ratio or 0, 3)) for r in report.misses()[:5]]
    message = f"all parts correct {rate:.3f}; per part {accuracy}; first misses {misses}"
    assert len(report.records) == 360 and rate >= 0.99, message
    assert all(value >= 0.99 for value in accuracy.values()), message


def test_blank_and_noisy_blank_images_have_no_object():
    rng = np.random.default_rng(0)
    noisy = np.clip(128 + rng.normal(0, 4, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    for image in (Image.new("RGB", (64, 64), (240, 240, 235)), Image.new("RGB", (32, 32), (20, 20, 60)), noisy):
        analysis = analyze_image(image)
        assert analysis.attributes() == {"colour": "none", "shape": "none", "position": "none"}
        assert not analysis.found and analysis.centre is None
