"""Prompt adherence on the "shapes" world, measured without any learned model.

:func:`analyze_image` reads the colour, shape and position of the one object in an image by plain image analysis:

1. background: the per-channel median of the border pixels (a ring 3 % of the side wide);
2. object: pixels whose RGB distance to the background exceeds half the object's contrast (the largest
   3x3-median-filtered distance; half is where an anti-aliased edge pixel is half object), the largest
   8-connected component, holes filled; no object ("none") when the contrast or the area is too small;
3. colour: the hue band (:data:`training.shapes.HUE_BANDS`) of the median pixel of the object's interior, or
   ``other`` when that pixel is nearly grey, black or white (saturation < 0.25 or value < 0.2);
4. shape: from the object's per-pixel coverage (an anti-aliased edge pixel reads back as the fraction it covers,
   :func:`coverage`): the fill ratio of its bounding box (triangle 0.5, circle pi/4 ~ 0.785, square 1) and the
   mean width of its top third over its bottom third (~0.2 for the up-pointing triangle, ~1 otherwise);
5. position: the anchor (:data:`training.shapes.ANCHORS`) nearest to the bounding-box centre (for a triangle, the
   centroid sits 1/6 of the height below the box centre, so the box centre is what a caption's position means).

:func:`score_images` compares the analysis with what each prompt asks (:func:`training.shapes.parse_prompt`; a
partial prompt asks fewer parts and is scored on those only) into an :class:`AdherenceReport`: per-part accuracy and
the rate of images with every asked part right, with a JSON writer; :func:`misses_grid` draws the misses.
:func:`adherence_prompts` makes evaluation prompts from the grammar. Command line::

    python -m eval.adherence --write-prompts prompts.txt --num-prompts 90 --seed 1
    python -m pipelines.txt2img --model runs/shapes/pipeline --prompt-file prompts.txt --out samples/
    python -m eval.adherence --images samples/ --out results/adherence   # adherence.json + misses.png

``--images`` is a folder of PNGs written by ``pipelines.txt2img`` (the prompt is read from the ``prompt`` PNG text
metadata) or an image folder with ``metadata.jsonl`` (``file_name`` + ``text``; ``--use-attributes`` scores the
rows' ``colour``/``shape``/``position`` fields instead, e.g. to check the analyzer on ``training.make_shapes_dataset``
output).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from training.shapes import (
    ANCHORS,
    ATTRIBUTES,
    CAPTION_FORMS,
    COLOURS,
    FORM_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    caption_from_attributes,
    colour_of_hue,
    parse_prompt,
    rgb_to_hsv,
)

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class PromptScore:
    """One image scored against its prompt: the parts ``asked``, the attributes ``found``, which parts matched."""

    index: int  # position in the sequence given to score_images
    image: str  # a path, or "#<index>" for an in-memory image
    prompt: str
    asked: dict[str, str]
    found: dict[str, str]
    matched: dict[str, bool]
    analysis: Analysis

    @property
    def all_correct(self) -> bool:
        """Whether every asked part matched."""
        return all(self.matched.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "image": self.image,
            "prompt": self.prompt,
            "asked": self.asked,
            "found": self.found,
            "matched": self.matched,
            "all_correct": self.all_correct,
            "diagnostics": {k: v for k, v in asdict(self.analysis).items() if k not in ATTRIBUTES},
        }


def score_prompt(analysis: Analysis, prompt: str, index: int = 0, image: str = "") -> PromptScore:
    """Score ``analysis`` against ``prompt``; only the parts the prompt names count.

    Raises ``ValueError`` for a prompt naming no colour, shape or position, or two of one (see ``parse_prompt``).
    """
    asked = parse_prompt(prompt)
    if not asked:
        raise ValueError(
            f"prompt {prompt!r} names no colour, shape or position of the shapes grammar "
            f"(colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; positions {', '.join(POSITIONS)})"
        )
    found = analysis.attributes()
    matched = {part: found[part] == value for part, value in asked.items()}
    return PromptScore(index, image or f"#{index}", prompt, asked, found, matched, analysis)


@dataclass
class AdherenceReport:
    """The scores of a set of images; ``skipped`` lists prompts outside the grammar (image, prompt, reason)."""

    records: list[PromptScore]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def part_counts(self) -> dict[str, dict[str, int]]:
        """Per part: how many prompts asked it and how many of those matched."""
        counts = {part: {"asked": 0, "correct": 0} for part in ATTRIBUTES}
        for record in self.records:
            for part, ok in record.matched.items():
                counts[part]["asked"] += 1
                counts[part]["correct"] += int(ok)
        return counts

    def part_accuracy(self) -> dict[str, float | None]:
        """Per part: the share of the prompts asking it that matched (None when none asked it)."""
        return {part: c["correct"] / c["asked"] if c["asked"] else None for part, c in self.part_counts().items()}

    def all_correct_rate(self) -> float | None:
        """The share of images with every asked part right (None for no images)."""
        return sum(r.all_correct for r in self.records) / len(self.records) if self.records else None

    def misses(self) -> list[PromptScore]:
        """The records with at least one asked part wrong."""
        return [r for r in self.records if not r.all_correct]

    def summary(self) -> dict[str, Any]:
        """The set's figures: counts, per-part accuracy, the all-parts-correct rate, images with no object."""
        return {
            "images": len(self.records),
            "all_correct_rate": self.all_correct_rate(),
            "part_accuracy": self.part_accuracy(),
            "part_counts": self.part_counts(),
            "misses": len(self.misses()),
            "no_object": sum(not r.analysis.found for r in self.records),
            "skipped": len(self.skipped),
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"summary": ..., "records": [...], "skipped": [...]}``."""
        return {"summary": self.summary(), "records": [r.to_dict() for r in self.records], "skipped": self.skipped}

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def score_images(images: Sequence[ImageLike], prompts: Sequence[str]) -> AdherenceReport:
    """Analyze each image and score it against its prompt; prompts outside the grammar are skipped and listed."""
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image; got {len(images)} images and {len(prompts)} prompts")
    records, skipped = [], []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        name = str(image) if isinstance(image, str | Path) else f"#{index}"
        try:
            asked = parse_prompt(prompt)
        except ValueError as err:
            asked, reason = {}, str(err)
        else:
            reason = "names no colour, shape or position of the shapes grammar"
        if not asked:
            logger.warning("skipping %s: prompt %r %s", name, prompt, reason)
            skipped.append({"image": name, "prompt": prompt, "reason": reason})
            continue
        records.append(score_prompt(analyze_image(image), prompt, index=index, image=name))
    return AdherenceReport(records, skipped)


def _describe(attributes: dict[str, str], parts: Sequence[str]) -> str:
    return " ".join(attributes[p] for p in ATTRIBUTES if p in parts)


def misses_grid(
    report: AdherenceReport, images: Sequence[ImageLike], columns: int = 6, cell: int = 160, limit: int = 96
) -> Image.Image:
    """A grid of the first ``limit`` misses (``images`` as given to :func:`score_images`), each labelled.

    Under each image: ``exp`` and the asked parts, then ``got`` and what was found for them (in red).
    """
    misses = report.misses()[:limit]
    font = ImageFont.load_default()
    label = 28
    if not misses:
        grid = Image.new("RGB", (cell, cell // 2), "white")
        ImageDraw.Draw(grid).text((8, cell // 4 - 6), "no misses", fill="black", font=font)
        return grid
    columns = max(1, min(columns, len(misses)))
    rows = -(-len(misses) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(grid)
    for k, record in enumerate(misses):
        x, y = (k % columns) * cell, (k // columns) * (cell + label)
        tile = Image.fromarray(load_rgb(images[record.index]).astype(np.uint8))
        upscale = tile.width < cell
        grid.paste(
            tile.resize((cell, cell), Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS), (x, y)
        )
        draw.text((x + 3, y + cell + 2), "exp " + _describe(record.asked, record.asked), fill="black", font=font)
        draw.text((x + 3, y + cell + 14), "got " + _describe(record.found, record.asked), fill=(200, 0, 0), font=font)
    if len(report.misses()) > limit:
        logger.info("misses grid: showing %d of %d misses", limit, len(report.misses()))
    return grid


def adherence_prompts(n: int, seed: int, form: str = "full") -> list[str]:
    """``n`` evaluation prompts of caption ``form`` (default full), balanced over the attribute combinations.

    The combinations are taken in a random order (a fresh one each round), so ``n`` = 90 full prompts name each
    colour-shape-position combination once. Deterministic for ``seed``.
    """
    if form not in CAPTION_FORMS:
        raise ValueError(f"form must be one of {', '.join(CAPTION_FORMS)}; got {form!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    parts = FORM_ATTRIBUTES[form]
    values = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
    combos = list(itertools.product(*(values[p] for p in parts)))
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        for j in rng.permutation(len(combos))[: n - len(prompts)]:
            prompts.append(caption_from_attributes(dict(zip(parts, combos[j]))))
    return prompts


def read_prompted_images(source: Path, use_attributes: bool = False) -> tuple[list[Path], list[str]]:
    """The images of ``source`` and their prompts.

    ``source`` is an image folder with ``metadata.jsonl`` (or that file): prompts from ``text``, or with
    ``use_attributes`` the caption of the row's ``colour``/``shape``/``position``; or a folder of PNGs carrying a
    ``prompt`` text chunk (``pipelines.txt2img``'s output; PNGs without one are skipped with a warning).
    """
    metadata = source if source.is_file() else source / "metadata.jsonl"
    if source.is_file() and source.name != "metadata.jsonl":
        raise ValueError(f"--images {source} is a file; pass a folder of PNGs or a metadata.jsonl")
    if not source.exists():
        raise ValueError(f"--images {source} does not exist; pass a folder of PNGs or an image folder")
    paths, prompts = [], []
    if metadata.is_file():
        for line_number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ValueError(f"{metadata}:{line_number} is not a JSON object with a 'file_name'; fix the row")
            if use_attributes:
                missing = [p for p in ATTRIBUTES if p not in row]
                if missing:
                    raise ValueError(f"{metadata}:{line_number} has no {', '.join(missing)}; drop --use-attributes")
                prompt = caption_from_attributes({p: row[p] for p in ATTRIBUTES})
            else:
                prompt = row.get("text")
                if not isinstance(prompt, str):
                    raise ValueError(f"{metadata}:{line_number} has no 'text' caption; add one per row")
            paths.append(metadata.parent / row["file_name"])
            prompts.append(prompt)
    else:
        if use_attributes:
            raise ValueError(f"--use-attributes needs a metadata.jsonl with attributes; {source} has none")
        for path in sorted(source.glob("*.png")):
            with Image.open(path) as image:
                prompt = image.info.get("prompt")
            if isinstance(prompt, str):
                paths.append(path)
                prompts.append(prompt)
            else:
                logger.warning("skipping %s: it has no 'prompt' PNG text metadata", path)
    if not paths:
        raise ValueError(
            f"no prompted images in {source}; pass a folder written by pipelines.txt2img or one with metadata.jsonl"
        )
    return paths, prompts


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``error: ...``) instead of the usage text and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.adherence``."""
    parser = _Parser(
        prog="python -m eval.adherence",
        description="Score prompt adherence of shapes images without a learned model; prints the paths written.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--images", type=Path, metavar="DIR", help="PNGs with 'prompt' metadata, or an image folder")
    mode.add_argument("--write-prompts", type=Path, metavar="FILE", help="write evaluation prompts, one a line")
    parser.add_argument("--out", type=Path, default=Path("results/adherence"), help="folder for the JSON and grid")
    parser.add_argument("--use-attributes", action="store_true", help="score metadata attributes, not the text")
    parser.add_argument("--num-prompts", type=int, default=90, help="with --write-prompts (default 90)")
    parser.add_argument("--seed", type=int, default=1, help="with --write-prompts (default 1)")
    parser.add_argument("--form", choices=CAPTION_FORMS, default="full", help="with --write-prompts (default full)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.write_prompts is not None:
            prompts = adherence_prompts(args.num_prompts, args.seed, args.form)
            args.write_prompts.parent.mkdir(parents=True, exist_ok=True)
            args.write_prompts.write_text("\n".join(prompts) + "\n", encoding="utf-8")
            print(args.write_prompts, flush=True)
            return 0
        paths, prompts = read_prompted_images(args.images, args.use_attributes)
        report = score_images(paths, prompts)
        json_path = report.write_json(args.out / "adherence.json")
        grid_path = args.out / "misses.png"
        misses_grid(report, paths).save(grid_path)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    summary = report.summary()
    logger.info("all parts correct: %s; per part: %s", summary["all_correct_rate"], summary["part_accuracy"])
    print(json_path, flush=True)
    print(grid_path, flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
