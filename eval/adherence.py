"""Prompt adherence on the "shapes" world, measured without any learned model.

:func:`shapes.analysis.analyze_image` reads the colour, shape and position of the one
object in an image by plain image analysis. :func:`score_images` compares the analysis with what each prompt asks
(:func:`shapes.world.parse_prompt`; a partial prompt asks fewer parts and is scored on those only) into an
:class:`AdherenceReport`: per-part accuracy and the rate of images with every asked part right, with a JSON writer;
:func:`misses_grid` draws the misses. :func:`adherence_prompts` makes evaluation prompts from the grammar.

A two-object prompt (one naming a relation, :func:`shapes.pairs.parse_pair_prompt`) is scored on the objects
:func:`shapes.analysis.analyze_objects` reads (:func:`score_pair_prompt`), in the parts :data:`PAIR_PARTS`:
``count`` (exactly two objects found), ``colour`` and ``shape`` (both objects right, where the prompt names them)
and ``relation`` (:func:`shapes.pairs.relation_of` of the two bounding-box centres). The found objects are matched
to the prompt's by the assignment that gets the most colours and shapes right. The report's summary gives the
one-object prompts, the two-object prompts of seen pairings and those of held-out pairings
(:func:`shapes.pairs.is_held_out`) apart (:data:`GROUPS`); its top-level figures are over all records. Command
line::

    python -m eval.adherence --write-prompts prompts.txt --num-prompts 90 --seed 1
    python -m eval.adherence --write-prompts pairs.txt --objects 2 --pairings held_out --num-prompts 80 --seed 1
    python -m pipelines.txt2img --model runs/shapes/pipeline --prompt-file prompts.txt --out samples/
    python -m eval.adherence --images samples/ --out results/adherence   # adherence.json + misses.png

``--images`` is a folder of PNGs written by ``pipelines.txt2img`` (the prompt is read from the ``prompt`` PNG text
metadata) or an image folder with ``metadata.jsonl`` (``file_name`` + ``text``; ``--use-attributes`` scores the
rows' ``colour``/``shape``/``position`` fields instead, or for rows with ``objects: 2`` their ``first``,
``relation`` and ``second``, e.g. to check the analyzer on ``shapes.make_dataset`` output), read by
:func:`eval.prompted_images.load_prompted_images`.
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
from shapes.analysis import NONE, Analysis, ImageLike, ObjectsAnalysis, analyze_image, analyze_objects, load_rgb
from shapes.pairs import RELATION_PHRASES, RELATIONS, is_held_out, pair_caption, parse_pair_prompt, relation_of
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
    "pair_prompts",
    "score_images",
    "score_pair_prompt",
    "score_prompt",
]

logger = logging.getLogger(__name__)

PAIR_PARTS = ("count", "colour", "shape", "relation")  # the parts a two-object prompt is scored on
OBJECT_PARTS = ("colour", "shape")
# Summary groups: one-object prompts, two-object prompts of seen pairings, of held-out ones (is_held_out).
GROUPS = ("one_object", "two_object_seen", "two_object_held_out")
PAIRINGS = ("seen", "held_out", "all")


@dataclass(frozen=True)
class PromptScore:
    """One image scored against its prompt: the parts ``asked``, the attributes ``found``, which parts matched.

    For a two-object prompt ``asked`` is :func:`shapes.pairs.parse_pair_prompt`'s answer, ``found`` is ``{"count":
    n, "first": {...}, "relation": ..., "second": {...}}`` (the found objects matched to the prompt's, ``{}`` for one
    not found, relation ``"none"`` without two objects), ``matched`` has the :data:`PAIR_PARTS` and ``analysis`` is
    an :class:`shapes.analysis.ObjectsAnalysis`.
    """

    index: int  # position in the sequence given to score_images
    image: str  # a path, or "#<index>" for an in-memory image
    prompt: str
    asked: dict[str, Any]
    found: dict[str, Any]
    matched: dict[str, bool]
    analysis: Analysis | ObjectsAnalysis

    @property
    def all_correct(self) -> bool:
        """Whether every asked part matched."""
        return all(self.matched.values())

    @property
    def objects(self) -> int:
        """How many objects the prompt asks for: 1, or 2 for a prompt naming a relation."""
        return 2 if "relation" in self.asked else 1

    @property
    def held_out(self) -> bool:
        """Whether the prompt asks for a pairing the training data leaves out (:func:`shapes.pairs.is_held_out` of
        the colours and shapes it names; False for a one-object prompt)."""
        if self.objects == 1:
            return False
        sides = (self.asked["first"], self.asked["second"])
        colours = tuple(side["colour"] for side in sides if "colour" in side)
        shapes = tuple(side["shape"] for side in sides if "shape" in side)
        return is_held_out(colours, shapes)

    @property
    def group(self) -> str:
        """The summary group (:data:`GROUPS`) of the record."""
        if self.objects == 1:
            return GROUPS[0]
        return GROUPS[2] if self.held_out else GROUPS[1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        if isinstance(self.analysis, ObjectsAnalysis):
            diagnostics = {
                "background": self.analysis.background,
                "contrast": self.analysis.contrast,
                "objects": [asdict(obj) for obj in self.analysis.objects],
            }
        else:
            diagnostics = {k: v for k, v in asdict(self.analysis).items() if k not in ATTRIBUTES}
        return {
            "image": self.image,
            "prompt": self.prompt,
            "objects": self.objects,
            "held_out": self.held_out,
            "asked": self.asked,
            "found": self.found,
            "matched": self.matched,
            "all_correct": self.all_correct,
            "diagnostics": diagnostics,
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


def _object_hits(asked: Mapping[str, str], found: Analysis | None) -> dict[str, bool]:
    """Per part of :data:`OBJECT_PARTS` the prompt's object names: whether ``found`` (None: missing) shows it."""
    return {part: found is not None and getattr(found, part) == asked[part] for part in OBJECT_PARTS if part in asked}


def score_pair_prompt(analysis: ObjectsAnalysis, prompt: str, index: int = 0, image: str = "") -> PromptScore:
    """Score the objects of ``analysis`` against the two-object ``prompt`` (see the module docstring).

    The image is fully right only with exactly two objects, each of the named colour and shape, in the named
    relation. With more than two objects, the two that match best are scored (count is wrong); with one, it is
    matched to the prompt's object it fits best and the other's parts and the relation are wrong. Raises
    ``ValueError`` for a prompt that names no relation, or names it badly (see ``parse_pair_prompt``).
    """
    asked = parse_pair_prompt(prompt)
    if asked is None:
        raise UserError(
            f"prompt {prompt!r} names no relation ({', '.join(RELATION_PHRASES.values())}); score it with score_prompt"
        )
    sides = (asked["first"], asked["second"])
    candidates: list[Analysis | None] = [*analysis.objects, None, None]
    best: tuple[Analysis | None, Analysis | None] = (None, None)
    best_key = (-1, False, False)
    # Every assignment of two distinct found objects (or none) to the prompt's two: the most colours and shapes right
    # wins, then one with both objects, then one that shows the relation; the first such wins, so ties go to the
    # larger objects (analyze_objects lists them largest first).
    for i, j in itertools.permutations(range(len(candidates)), 2):
        pair = (candidates[i], candidates[j])
        complete = pair[0] is not None and pair[1] is not None
        key = (
            sum(sum(_object_hits(side, obj).values()) for side, obj in zip(sides, pair)),
            complete,
            complete and relation_of(pair[0].centre, pair[1].centre) == asked["relation"],
        )
        if key > best_key:
            best, best_key = pair, key
    hits = [_object_hits(side, obj) for side, obj in zip(sides, best)]
    first, second = best
    relation = NONE if first is None or second is None else relation_of(first.centre, second.centre)
    matched = {"count": analysis.count == 2}
    for part in OBJECT_PARTS:
        named = [side_hits[part] for side_hits in hits if part in side_hits]
        if named:
            matched[part] = all(named)
    matched["relation"] = relation == asked["relation"]
    found = {
        "count": analysis.count,
        "first": {} if first is None else {part: getattr(first, part) for part in OBJECT_PARTS},
        "relation": relation,
        "second": {} if second is None else {part: getattr(second, part) for part in OBJECT_PARTS},
    }
    return PromptScore(index, image or f"#{index}", prompt, asked, found, matched, analysis)


@dataclass
class AdherenceReport:
    """The scores of a set of images; ``skipped`` lists prompts outside the grammar (image, prompt, reason)."""

    records: list[PromptScore]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def part_counts(self) -> dict[str, dict[str, int]]:
        """Per part: how many prompts asked it and how many of those matched.

        The one-object parts (colour, shape, position) are always listed; ``count`` and ``relation`` when a
        two-object prompt asked them. Colour and shape count both kinds of prompt.
        """
        counts = {part: {"asked": 0, "correct": 0} for part in ATTRIBUTES}
        for record in self.records:
            for part, ok in record.matched.items():
                counts.setdefault(part, {"asked": 0, "correct": 0})
                counts[part]["asked"] += 1
                counts[part]["correct"] += int(ok)
        order = [*ATTRIBUTES, *PAIR_PARTS]
        return dict(sorted(counts.items(), key=lambda item: order.index(item[0])))

    def part_accuracy(self) -> dict[str, float | None]:
        """Per part: the share of the prompts asking it that matched (None when none asked it)."""
        return {part: c["correct"] / c["asked"] if c["asked"] else None for part, c in self.part_counts().items()}

    def all_correct_rate(self) -> float | None:
        """The share of images with every asked part right (None for no images)."""
        return sum(r.all_correct for r in self.records) / len(self.records) if self.records else None

    def misses(self) -> list[PromptScore]:
        """The records with at least one asked part wrong."""
        return [r for r in self.records if not r.all_correct]

    def group(self, name: str) -> AdherenceReport:
        """The report of the records of summary group ``name`` (:data:`GROUPS`: ``one_object``,
        ``two_object_seen``, ``two_object_held_out``)."""
        if name not in GROUPS:
            raise ValueError(f"group must be one of {', '.join(GROUPS)}; got {name!r}")
        return AdherenceReport([r for r in self.records if r.group == name])

    def figures(self, parts: Sequence[str] | None = None) -> dict[str, Any]:
        """``images``, ``all_correct_rate``, ``part_accuracy``, ``part_counts`` and ``misses`` of the records
        (``parts``: the parts to list; default every part as :meth:`part_counts` lists them)."""
        counts = self.part_counts()
        if parts is not None:
            counts = {part: counts.get(part, {"asked": 0, "correct": 0}) for part in parts}
        return {
            "images": len(self.records),
            "all_correct_rate": self.all_correct_rate(),
            "part_accuracy": {p: c["correct"] / c["asked"] if c["asked"] else None for p, c in counts.items()},
            "part_counts": counts,
            "misses": len(self.misses()),
        }

    def summary(self) -> dict[str, Any]:
        """The set's figures: counts, per-part accuracy, the all-parts-correct rate, images with no object, over all
        records; and the same per group (:data:`GROUPS`), one-object and two-object prompts apart."""
        groups = {name: self.group(name).figures(ATTRIBUTES if name == GROUPS[0] else PAIR_PARTS) for name in GROUPS}
        return {
            "images": len(self.records),
            "all_correct_rate": self.all_correct_rate(),
            "part_accuracy": self.part_accuracy(),
            "part_counts": self.part_counts(),
            "misses": len(self.misses()),
            "no_object": sum(not r.analysis.found for r in self.records),
            "skipped": len(self.skipped),
            **groups,
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
        pair = None
        try:
            pair = parse_pair_prompt(prompt)
            asked = pair or parse_prompt(prompt)
        except ValueError as err:
            asked, reason = {}, str(err)
        else:
            reason = "names no colour, shape or position of the shapes grammar"
        if not asked:
            logger.warning("skipping %s: prompt %r %s", name, prompt, reason)
            skipped.append({"image": name, "prompt": prompt, "reason": reason})
            continue
        if pair is not None:
            records.append(score_pair_prompt(analyze_objects(image), prompt, index=index, image=name))
        else:
            records.append(score_prompt(analyze_image(image), prompt, index=index, image=name))
    return AdherenceReport(records, skipped)


def _describe(attributes: dict[str, str], parts: Sequence[str]) -> str:
    return " ".join(attributes[p] for p in ATTRIBUTES if p in parts)


def _label_lines(record: PromptScore) -> tuple[list[str], list[str]]:
    """The label lines under a miss: what the prompt asked, and what was found of the asked parts."""
    if record.objects == 1:
        return ["exp " + _describe(record.asked, record.asked)], ["got " + _describe(record.found, record.asked)]

    def side(attributes: dict[str, Any], asked: dict[str, str]) -> str:
        if not attributes:
            return "(missing)"
        return " ".join(attributes[p] for p in OBJECT_PARTS if p in asked) or "object"

    asked, found = record.asked, record.found
    relation = RELATION_PHRASES.get(found["relation"], found["relation"]).removeprefix("to the ")
    expected = RELATION_PHRASES[asked["relation"]].removeprefix("to the ")
    return (
        [f"exp {side(asked['first'], asked['first'])}", f"  {expected} {side(asked['second'], asked['second'])}"],
        [
            f"got {found['count']} obj: {side(found['first'], asked['first'])}",
            f"  {relation} {side(found['second'], asked['second'])}",
        ],
    )


def misses_grid(
    report: AdherenceReport, images: Sequence[ImageLike], columns: int = 6, cell: int = 160, limit: int = 96
) -> Image.Image:
    """A grid of the first ``limit`` misses (``images`` as given to :func:`score_images`), each labelled.

    Under each image: ``exp`` and the asked parts, then ``got`` and what was found for them (in red); a two-object
    miss takes two lines each: the first object, then the relation and the second (``got`` starts with the number
    of objects found).
    """
    misses = report.misses()[:limit]
    font = ImageFont.load_default()
    line = 12
    label = 4 + line * (4 if any(r.objects == 2 for r in misses) else 2)
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
        expected, got = _label_lines(record)
        for k_line, text in enumerate(expected):
            draw.text((x + 3, y + cell + 2 + line * k_line), text, fill="black", font=font)
        for k_line, text in enumerate(got, start=len(expected)):
            draw.text((x + 3, y + cell + 2 + line * k_line), text, fill=(200, 0, 0), font=font)
    if len(report.misses()) > limit:
        logger.info("misses grid: showing %d of %d misses", limit, len(report.misses()))
    return grid


def adherence_prompts(n: int, seed: int, form: str = "full", objects: int = 1, pairings: str = "all") -> list[str]:
    """``n`` evaluation prompts of caption ``form`` (default full), balanced over the attribute combinations.

    The combinations are taken in a random order (a fresh one each round), so ``n`` = 90 full prompts name each
    colour-shape-position combination once. Deterministic for ``seed``. ``objects=2`` makes two-object prompts
    (:func:`pair_prompts`; ``form`` must stay ``full``) of the ``pairings`` asked: ``seen``, ``held_out`` or
    ``all``; one-object prompts take only ``all``.
    """
    if form not in CAPTION_FORMS:
        raise UserError(f"form must be one of {', '.join(CAPTION_FORMS)}; got {form!r}")
    if n < 0:
        raise UserError(f"n must be >= 0; got {n}")
    if pairings not in PAIRINGS:
        raise UserError(f"pairings must be one of {', '.join(PAIRINGS)}; got {pairings!r}")
    if objects == 2:
        if form != "full":
            raise UserError(f"two-object prompts have one form (full); got form {form!r}")
        return pair_prompts(n, seed, pairings)
    if objects != 1:
        raise UserError(f"objects must be 1 or 2; got {objects}")
    if pairings != "all":
        raise UserError(f"pairings ({pairings!r}) apply to two-object prompts; pass objects=2 or pairings='all'")
    parts = FORM_ATTRIBUTES[form]
    values = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
    combos = list(itertools.product(*(values[p] for p in parts)))
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        for j in rng.permutation(len(combos))[: n - len(prompts)]:
            prompts.append(caption_from_attributes(dict(zip(parts, combos[j]))))
    return prompts


def pair_prompts(n: int, seed: int, pairings: str = "all") -> list[str]:
    """``n`` two-object prompts (``a red circle to the left of a blue square``) of the ``pairings`` asked
    (``seen``: not :func:`shapes.pairs.is_held_out`; ``held_out``: only those; ``all``), balanced: the relations take
    turns and, within each, the colour-shape combinations (two different colours) come in a random order, a fresh one
    each round, so no combination repeats before all of its relation's have come. Deterministic for ``seed``."""
    if pairings not in PAIRINGS:
        raise UserError(f"pairings must be one of {', '.join(PAIRINGS)}; got {pairings!r}")
    if n < 0:
        raise UserError(f"n must be >= 0; got {n}")
    objects = [
        (c1, s1, c2, s2)
        for c1, c2 in itertools.permutations(COLOURS, 2)
        for s1, s2 in itertools.product(SHAPES, repeat=2)
        if pairings == "all" or is_held_out((c1, c2), (s1, s2)) == (pairings == "held_out")
    ]
    rng = np.random.default_rng(seed)
    queues: dict[str, list[int]] = {relation: [] for relation in RELATIONS}
    prompts: list[str] = []
    for k in range(n):
        relation = RELATIONS[k % len(RELATIONS)]
        if not queues[relation]:
            queues[relation] = list(rng.permutation(len(objects)))
        c1, s1, c2, s2 = objects[queues[relation].pop()]
        attributes = {
            "first": {"colour": c1, "shape": s1},
            "relation": relation,
            "second": {"colour": c2, "shape": s2},
        }
        prompts.append(pair_caption(attributes))
    return prompts


def attribute_prompt(row: Mapping[str, Any]) -> str:
    """The full caption of a ``metadata.jsonl`` row's ``colour``, ``shape`` and ``position`` (the attributes
    :mod:`shapes.make_dataset` writes), or for a row with ``objects: 2`` the pair caption of its ``first``,
    ``relation`` and ``second``, for ``--use-attributes``; a ``ValueError`` for a row without them."""
    if row.get("objects") == 2:
        missing = [key for key in ("first", "relation", "second") if key not in row]
        missing += [
            f"{key}.{part}" for key in ("first", "second") for part in OBJECT_PARTS if part not in row.get(key, {})
        ]
        if missing:
            raise UserError(f"is a two-object row without {', '.join(missing)}; drop --use-attributes")
        return pair_caption({"first": row["first"], "relation": row["relation"], "second": row["second"]})
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
    parser.add_argument(
        "--objects", type=int, choices=(1, 2), default=1, help="with --write-prompts: objects per prompt (default 1)"
    )
    parser.add_argument(
        "--pairings",
        choices=PAIRINGS,
        default="all",
        help="with --write-prompts --objects 2: seen, held_out (purple with a triangle) or all (default all)",
    )
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
            prompts = adherence_prompts(args.num_prompts, args.seed, args.form, args.objects, args.pairings)
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
        for name in GROUPS:
            if summary[name]["images"]:
                figures = summary[name]
                logger.info(
                    "%s: %d images, all parts correct %s; per part %s",
                    name,
                    figures["images"],
                    figures["all_correct_rate"],
                    figures["part_accuracy"],
                )
        print(json_path, flush=True)
        print(grid_path, flush=True)

    return run_reporting(body, "the adherence evaluation")


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
