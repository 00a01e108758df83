"""The classifier-free guidance trade-off: prompt adherence (and FID) of one model at several guidance scales.

For each scale the same prompts are drawn with the same seeds (image i gets ``seed + i``), so the only thing that
changes along the curve is g. Adherence is :mod:`eval.adherence` (no learned model); FID, when ``--real`` and
``--features`` are given, is :mod:`eval.fid` between the generated images and the real ones. Writes ``sweep.json``,
``guidance_sweep.png`` (the curve) and a grid of the first prompts at every scale. Example::

    python -m eval.guidance_sweep --model DIR --scales 1 2 3 5 7.5 10 --num-prompts 90 --out results/sweep
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from common.plots import line_chart
from eval.adherence import adherence_prompts, score_images
from eval.features import extract_features, load_feature_extractor
from eval.fid import fid_from_features, open_image_set
from ldm.errors import OneLineParser, UserError, run_reporting
from pipelines import DEFAULT_MODEL, LatentDiffusionPipeline
from pipelines.cli import add_guidance_interval_argument, scheduler_arg
from pipelines.loading import load_pipeline
from pipelines.schedulers import SAMPLERS, make_scheduler

logger = logging.getLogger(__name__)

DEFAULT_SCALES = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0)
GROUPS = ("one_object", "two_object")  # with --pair-prompts: each kind's rate of fully right images


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.guidance_sweep``."""
    parser = OneLineParser(prog="python -m eval.guidance_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or Hub id (default: the shipped one)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES), help="guidance scales")
    parser.add_argument("--num-prompts", type=int, default=90, help="one-object prompts from the shapes grammar")
    parser.add_argument(
        "--pair-prompts",
        type=int,
        default=0,
        help="two-object prompts of the pairings training has seen, added to the one-object ones (default 0)",
    )
    parser.add_argument("--prompt-seed", type=int, default=1, help="seed of the prompt choice")
    parser.add_argument("--seed", type=int, default=0, help="image i gets seed + i at every scale")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own default)")
    parser.add_argument(
        "--scheduler", type=scheduler_arg, metavar="NAME", help=f"default: the model's; one of {', '.join(SAMPLERS)}"
    )
    add_guidance_interval_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--real", default=None, help="real images (folder or dataset) for FID")
    parser.add_argument("--features", default=None, help="feature extractor spec for FID (see eval.fid)")
    parser.add_argument("--out", type=Path, default=Path("results/guidance_sweep"))
    return parser


def generate(
    pipe: LatentDiffusionPipeline,
    prompts: list[str],
    *,
    scale: float,
    seed: int,
    steps: int,
    batch_size: int,
    interval: tuple[float, float] | None = None,
) -> list:
    """Images of ``prompts`` at guidance ``scale`` (within ``interval``, default the model's); prompt i always uses
    seed ``seed + i``."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(batch))]
        images += pipe(
            batch, guidance_scale=scale, num_inference_steps=steps, guidance_interval=interval, generator=generators
        ).images
    return images


def sweep(args: argparse.Namespace) -> dict:
    """Run the sweep; returns the JSON-able result (one entry per scale)."""
    pipe = load_pipeline(args.model)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    steps, _, interval = pipe.sampling_settings(args.steps, None, args.guidance_interval)
    prompts = adherence_prompts(args.num_prompts, args.prompt_seed)
    prompts += adherence_prompts(args.pair_prompts, args.prompt_seed, objects=2, pairings="seen")
    extractor = real_features = None
    if args.real and args.features:
        extractor = load_feature_extractor(args.features)
        real = open_image_set(args.real)
        real_features = extract_features(extractor, real.images(), total=len(real), desc="real features")
    rows, grid_rows = [], []
    for scale in tqdm(args.scales, desc="guidance scales"):
        images = generate(
            pipe, prompts, scale=scale, seed=args.seed, steps=steps, batch_size=args.batch_size, interval=interval
        )
        report = score_images(images, prompts)
        row = {"guidance_scale": scale, "all_correct": report.all_correct_rate(), **report.part_accuracy()}
        if args.pair_prompts:
            summary = report.summary()
            row["one_object"] = summary["one_object"]["all_correct_rate"]
            row["two_object"] = summary["two_object_seen"]["all_correct_rate"]
        if extractor is not None:
            fake_features = extract_features(extractor, images, total=len(images), desc="generated features")
            row["fid"] = fid_from_features(real_features, fake_features)
        rows.append(row)
        grid_rows.append(images[: min(8, len(images))])
        logger.info("g=%s: %s", scale, row)
    return {
        "model": args.model,
        "steps": steps,
        "guidance_interval": list(interval),
        "scheduler": type(pipe.scheduler).__name__,
        "seed": args.seed,
        "num_prompts": len(prompts),
        "pair_prompts": args.pair_prompts,
        "features": args.features,
        "rows": rows,
        "grid_prompts": prompts[:8],
        "_grid": grid_rows,
    }


def write_outputs(result: dict, out: Path) -> list[Path]:
    """``sweep.json``, the trade-off curve PNG and the grid of images per scale; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    grid_rows = result.pop("_grid")
    rows = result["rows"]
    scales = [r["guidance_scale"] for r in rows]
    parts = [k for k in (*GROUPS, "colour", "shape", "position", "relation") if k in rows[0]]
    series = {"all parts": (scales, [r["all_correct"] for r in rows])}
    series |= {part: (scales, [r[part] for r in rows]) for part in parts}
    secondary = {"FID": (scales, [r["fid"] for r in rows])} if "fid" in rows[0] else None
    curve = line_chart(
        out / "guidance_sweep.png",
        series,
        title=f"guidance trade-off ({result['model']})",
        xlabel="guidance scale",
        ylabel="prompt adherence",
        secondary=secondary,
        secondary_label="FID (lower is better)",
    )
    grid = make_image_grid([im for row in grid_rows for im in row], rows=len(grid_rows), cols=len(grid_rows[0]))
    grid_path = out / "guidance_grid.png"
    grid.save(grid_path)
    result["grid"] = {"file": grid_path.name, "rows": "guidance scales, in order", "columns": result["grid_prompts"]}
    json_path = out / "sweep.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return [json_path, curve, grid_path]


def format_table(result: dict) -> str:
    """The sweep as a text table."""
    rows = result["rows"]
    keys = [k for k in ("all_correct", *GROUPS, "colour", "shape", "position", "relation", "fid") if k in rows[0]]
    lines = [f"{'g':>6}" + "".join(f"{k:>13}" for k in keys)]
    for row in rows:
        lines.append(f"{row['guidance_scale']:>6g}" + "".join(f"{row[k]:>13.3f}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table and the files written."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.num_prompts < 2 or args.batch_size < 1 or not args.scales or min(args.scales) < 0:
            raise UserError("--num-prompts must be >= 2, --batch-size >= 1 and every scale >= 0")
        if args.pair_prompts < 0:
            raise UserError(f"--pair-prompts must be >= 0; got {args.pair_prompts}")
        if bool(args.real) != bool(args.features):
            raise UserError("FID needs both --real and --features (or neither)")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        result = sweep(args)
        paths = write_outputs(result, args.out)
        print(format_table(result))
        for path in paths:
            print(path)

    return run_reporting(body, "the sweep")


if __name__ == "__main__":
    sys.exit(main())
