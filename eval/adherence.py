"""Prompt adherence on the "shapes" world, measured without any learned model.

:func:`shapes.analysis.analyze_image` reads the colour, shape and position of the one
object in an image by plain image analysis. :func:`score_images` compares the analysis with what each prompt asks
(:func:`shapes.world.parse_prompt`; a partial prompt asks fewer parts and is scored on those only) into an
:class:`AdherenceReport`: per-part accuracy and the rate of images with every asked part right, with a JSON writer;
:func:`misses_grid` draws the misses. :func:`adherence_prompts` makes evaluation prompts from the grammar. Command
line::

    python -m eval.adherence --write-prompts prompts.txt --num-prompts 90 --seed 1
    python -m pipelines.txt2img --model runs/shapes/pipeline --prompt-file prompts.txt --out samples/
    python -m eval.adherence --images samples/ --out results/adherence   # adherence.json + misses.png

``--images`` is a folder of PNGs written by ``pipelines.txt2img`` (the prompt is read from the ``prompt`` PNG text
metadata) or an image folder with ``metadata.jsonl`` (``file_name`` + ``text``; ``--use-attributes`` scores the
rows' ``colour``/``shape``/``position`` fields instead, e.g. to check the analyzer on ``shapes.make_dataset``
output), read by :func:`eval.prompted_images.load_prompted_images`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from eval.prompted_images import load_prompted_images
from ldm.errors import OneLineParser, UserError, run_reporting
from shapes.analysis import Analysis, ImageLike, analyze_image, load_rgb
from shapes.world import (
    ATTRIBUTES,
    CAPTION_FORMS,
    COLOURS,
    FORM_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    caption_from_attributes,
    parse_prompt,
)

__all__ = [
    "AdherenceReport",
    "PromptScore",
    "adherence_prompts",
    "attribute_prompt",
    "main",
    "misses_grid",
    "score_images",
    "score_prompt",
]

logger = logging.getLogger(__name__)


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
        raise UserError(
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
        raise UserError(f"form must be one of {', '.join(CAPTION_FORMS)}; got {form!r}")
    if n < 0:
        raise UserError(f"n must be >= 0; got {n}")
    parts = FORM_ATTRIBUTES[form]
    values = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
    combos = list(itertools.product(*(values[p] for p in parts)))
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        for j in rng.permutation(len(combos))[: n - len(prompts)]:
            prompts.append(caption_from_attributes(dict(zip(parts, combos[j]))))
    return prompts


def attribute_prompt(row: Mapping[str, Any]) -> str:
    """The full caption of a ``metadata.jsonl`` row's ``colour``, ``shape`` and ``position`` (the attributes
    :mod:`shapes.make_dataset` writes), for ``--use-attributes``; a ``ValueError`` for a row without them."""
    missing = [part for part in ATTRIBUTES if part not in row]
    if missing:
        raise UserError(f"has no {', '.join(missing)}; drop --use-attributes")
    return caption_from_attributes({part: row[part] for part in ATTRIBUTES})


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.adherence``."""
    parser = OneLineParser(
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
    args = parser.parse_or_status(argv)
    if isinstance(args, int):
        return args

    def body() -> None:
        if args.write_prompts is not None:
            if args.num_prompts < 1:
                raise UserError(f"--num-prompts must be at least 1; got {args.num_prompts}")
            prompts = adherence_prompts(args.num_prompts, args.seed, args.form)
            args.write_prompts.parent.mkdir(parents=True, exist_ok=True)
            args.write_prompts.write_text("\n".join(prompts) + "\n", encoding="utf-8")
            print(args.write_prompts, flush=True)
            return
        data = load_prompted_images(args.images, row_prompt=attribute_prompt if args.use_attributes else None)
        report = score_images(data.files, data.prompts)
        json_path = report.write_json(args.out / "adherence.json")
        grid_path = args.out / "misses.png"
        misses_grid(report, data.files).save(grid_path)
        summary = report.summary()
        logger.info("all parts correct: %s; per part: %s", summary["all_correct_rate"], summary["part_accuracy"])
        print(json_path, flush=True)
        print(grid_path, flush=True)

    return run_reporting(body, "the adherence evaluation")


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
