"""Write the synthetic "shapes" dataset (:mod:`shapes.world`) as an image folder for training and evaluation.

::

    python -m shapes.make_dataset --out data/shapes-train --n 20000 --size 64 --seed 0
    python -m shapes.make_dataset --out data/shapes-test --n 1000 --size 64 --seed 1 --split-name test

The folder holds ``<split>-NNNNNN.png`` images and a ``metadata.jsonl`` (the ``datasets`` imagefolder layout that
``training.train_text_to_image --dataset`` reads) whose rows carry ``file_name`` and ``text`` (the caption) plus the
scene's full attributes for evaluation: ``colour``, ``shape``, ``position`` (whatever the caption says), the
``caption_form``, ``rgb``, ``background``, ``centre``, ``size`` and ``split``, and ``regions``: the phrase naming each
object (``red circle``; ``circle`` or ``red shape`` in the partial forms) with its bounding box, and a one-object
caption's position word (``left``) with the same box, for the trainer's grounding loss (``--grounding-loss-weight``).

Sample ``i`` is drawn from its own generator seeded with ``(seed, i)``, so the same seed gives byte-identical PNGs
and metadata, and the first ``k`` samples do not depend on ``--n``. A held-out split is written with a different
seed (``--seed 1``) to a separate folder: its renders differ from training's, though with 90 attribute
combinations it repeats the combinations themselves. A fraction ``--short-caption-fraction`` of the one-object
captions is in one of the partial forms (``a red circle``, ``a circle on the left``, ``a red shape on the left``),
chosen uniformly.

``--two-object-fraction F`` makes that share of the scenes two-object scenes (:class:`shapes.pairs.PairSpec`,
captioned ``a red circle to the left of a blue square``); their rows carry ``objects: 2``, ``first`` and ``second``
(each ``colour``, ``shape``, ``rgb``, ``centre``, ``size``), ``relation`` and ``held_out``. ``--held-out`` says
which pairings they may be: ``exclude`` (default, for training: never a purple object together with a triangle),
``only`` (those alone, to evaluate composition the model never saw) or ``include`` (any). Whether sample ``i`` is a
two-object scene is drawn from a generator of its own, so ``--two-object-fraction 0`` writes exactly the one-object
dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ldm.errors import OneLineParser, UserError, run_reporting
from shapes.pairs import PairSpec, is_held_out, pair_caption, sample_pair
from shapes.world import CAPTION_FORMS, FORM_ATTRIBUTES, PARTIAL_FORMS, ShapeSpec, caption_of, render, sample_spec

METADATA_FILE = "metadata.jsonl"
MAX_SEED = 2**63 - 1
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
HELD_OUT_MODES = {"exclude": False, "only": True, "include": None}  # --held-out: sample_pair's held_out
PAIR_FORM = "pair"  # the caption form recorded for two-object scenes


def sample_row(
    seed: int,
    index: int,
    short_caption_fraction: float = 0.25,
    two_object_fraction: float = 0.0,
    held_out: str = "exclude",
) -> tuple[ShapeSpec | PairSpec, str]:
    """The scene and caption form (``pair`` for two objects) of sample ``index`` of the dataset drawn with ``seed``."""
    if held_out not in HELD_OUT_MODES:
        raise UserError(f"held_out must be one of {', '.join(HELD_OUT_MODES)}; got {held_out!r}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    if two_object_fraction > 0.0:
        kind = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1)))
        if kind.random() < two_object_fraction:
            return sample_pair(rng, held_out=HELD_OUT_MODES[held_out]), PAIR_FORM
    spec = sample_spec(rng)
    form = str(rng.choice(PARTIAL_FORMS)) if rng.random() < short_caption_fraction else CAPTION_FORMS[0]
    return spec, form


def _object_row(obj: Any) -> dict[str, Any]:
    return {
        "colour": obj.colour,
        "shape": obj.shape,
        "rgb": list(obj.rgb),
        "centre": [round(c, 6) for c in obj.centre],
        "size": round(obj.size, 6),
    }


def object_region(phrase: str, obj: Any) -> dict[str, Any]:
    """A metadata ``regions`` entry: ``phrase`` and the bounding box of ``obj`` (fractions of the image)."""
    (x, y), half = obj.centre, obj.size / 2
    return {"phrase": phrase, "box": [round(x - half, 6), round(y - half, 6), round(x + half, 6), round(y + half, 6)]}


def _object_phrase(attributes: dict[str, str]) -> str:
    """How a caption names its object: its colour and shape words (``red circle``, ``circle``, ``red shape``)."""
    return " ".join([*([attributes["colour"]] if "colour" in attributes else []), attributes.get("shape", "shape")])


def metadata_row(file_name: str, spec: ShapeSpec | PairSpec, form: str, split: str) -> dict[str, Any]:
    """The ``metadata.jsonl`` row of one image: ``file_name``, ``text``, the full attributes of ``spec`` and
    ``regions``: where the caption's phrase for each object is (for ``--grounding-loss-weight``)."""
    if isinstance(spec, PairSpec):
        return {
            "file_name": file_name,
            "text": pair_caption(spec),
            "objects": 2,
            "first": _object_row(spec.first),
            "relation": spec.relation,
            "second": _object_row(spec.second),
            "held_out": is_held_out((spec.first.colour, spec.second.colour), (spec.first.shape, spec.second.shape)),
            "caption_form": form,
            "background": list(spec.background),
            "split": split,
            "regions": [object_region(f"{o.colour} {o.shape}", o) for o in spec.objects],
        }
    return {
        "file_name": file_name,
        "text": caption_of(spec, form),
        **spec.attributes(),
        "caption_form": form,
        "rgb": list(spec.rgb),
        "background": list(spec.background),
        "centre": [round(c, 6) for c in spec.centre],
        "size": round(spec.size, 6),
        "split": split,
        "regions": _one_object_regions(spec, form),
    }


def _one_object_regions(spec: ShapeSpec, form: str) -> list[dict[str, Any]]:
    """The regions of a one-object caption: the phrase naming the object and, where the caption names a position,
    its position word (``left``, ``center``), both at the object's box: a position word's attention belongs where
    the caption puts the object."""
    attributes = FORM_ATTRIBUTES[form]
    regions = [object_region(_object_phrase({k: getattr(spec, k) for k in attributes}), spec)]
    if "position" in attributes:
        regions.append(object_region(spec.position, spec))
    return regions


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, remove the PNGs and metadata a run writes."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder (it is created if missing)")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty; pass an empty or new folder, or --overwrite to replace it")
    # Only what this command writes goes, so a stale image of a larger run cannot end up in the new dataset.
    for path in out.iterdir():
        if path.is_file() and (path.suffix.lower() == ".png" or path.name == METADATA_FILE):
            path.unlink()


def make_dataset(
    out: Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    short_caption_fraction: float = 0.25,
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
    two_object_fraction: float = 0.0,
    held_out: str = "exclude",
) -> Path:
    """Write ``n`` rendered scenes of ``size`` px and their ``metadata.jsonl`` to ``out``; returns ``out``.

    Raises ``ValueError`` for a non-empty ``out`` (unless ``overwrite``) or a bad argument.
    """
    if n < 1:
        raise UserError(f"n must be >= 1; got {n}")
    if not 0.0 <= short_caption_fraction <= 1.0:
        raise UserError(f"short_caption_fraction must be in [0, 1]; got {short_caption_fraction}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise UserError(f"two_object_fraction must be in [0, 1]; got {two_object_fraction}")
    if held_out not in HELD_OUT_MODES:
        raise UserError(f"held_out must be one of {', '.join(HELD_OUT_MODES)}; got {held_out!r}")
    if not _SPLIT_NAME.fullmatch(split):
        raise UserError(f"split must be letters, digits or underscores (it prefixes file names); got {split!r}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed must be in [0, 2**63 - 1]; got {seed}")
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n - 1)))
    rows = []
    for index in tqdm(range(n), desc=f"shapes {split}", unit="img", disable=not progress):
        spec, form = sample_row(seed, index, short_caption_fraction, two_object_fraction, held_out)
        file_name = f"{split}-{index:0{width}d}.png"
        render(spec, size).save(out / file_name, format="PNG")
        rows.append(json.dumps(metadata_row(file_name, spec, form, split)))
    # The metadata goes last and atomically: a folder with a metadata file is a complete dataset.
    tmp = out / f".{METADATA_FILE}.tmp"
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, out / METADATA_FILE)
    return out


def _number(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} in [{low}, {high}]; got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}]; got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m shapes.make_dataset``."""
    parser = OneLineParser(
        prog="python -m shapes.make_dataset",
        description="Write the synthetic shapes dataset as an image folder with metadata.jsonl; prints the folder.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the dataset folder (new or empty)")
    parser.add_argument("--n", type=_number(int, 1, 10**8), required=True, help="number of images")
    parser.add_argument("--size", type=_number(int, 8, 4096), default=64, help="image side in pixels (default 64)")
    parser.add_argument(
        "--seed",
        type=_number(int, 0, MAX_SEED),
        default=0,
        help="0 for training (default); use another seed, e.g. 1, for a held-out split",
    )
    parser.add_argument(
        "--short-caption-fraction",
        type=_number(float, 0.0, 1.0),
        default=0.25,
        metavar="F",
        help="fraction of partial captions: 'a red circle', 'a circle on the left', 'a red shape on the left' "
        "(default 0.25)",
    )
    parser.add_argument(
        "--two-object-fraction",
        type=_number(float, 0.0, 1.0),
        default=0.0,
        metavar="F",
        help="share of two-object scenes, 'a red circle to the left of a blue square' (default 0)",
    )
    parser.add_argument(
        "--held-out",
        choices=tuple(HELD_OUT_MODES),
        default="exclude",
        help="two-object pairings of a purple object with a triangle: exclude (default, for training), only, include",
    )
    parser.add_argument("--split-name", default="train", help="recorded in each row and prefixes file names")
    parser.add_argument("--overwrite", action="store_true", help="replace the PNGs and metadata of a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_or_status(argv)
    if isinstance(args, int):
        return args

    def body() -> None:
        out = make_dataset(
            args.out,
            args.n,
            size=args.size,
            seed=args.seed,
            short_caption_fraction=args.short_caption_fraction,
            split=args.split_name,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            two_object_fraction=args.two_object_fraction,
            held_out=args.held_out,
        )
        print(out, flush=True)

    return run_reporting(body, "python -m shapes.make_dataset")


if __name__ == "__main__":
    sys.exit(main())
