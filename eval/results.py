"""Regenerate the headline results in ``results/``: one command, the figures the README quotes.

    python -m eval.results                     # CPU figures: speed (stock / ours / fast / cached), training step
                                               # rates, the memory pre-flight's check, the adherence analyzer
    python -m eval.results --model DIR         # plus the guidance sweep and the likelihood of a trained model

Each part is the project's own command (``eval.benchmark``, ``eval.memory_check``, ``eval.adherence``,
``eval.guidance_sweep``, ``eval.nll``) run with fixed arguments; their JSON files go to ``results/`` and
``results/README.md`` is rewritten with a table of the headline numbers, the machine they were measured on, and the
command that gives each. The GPU figures come from ``python -m eval.gpu_report --out results/gpu`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval import benchmark, guidance_sweep, memory_check, nll
from eval.adherence import score_images
from ldm.errors import OneLineParser
from pipelines.cli import DEFAULT_MODEL
from shapes.pairs import pair_caption, sample_pair
from shapes.world import caption_of, render, sample_spec


def analyzer_self_check(n: int = 300, seed: int = 12345, objects: int = 1) -> dict:
    """The adherence analyzer on ``n`` ground-truth renders of the shapes grammar: one-object scenes at 32, 64 and
    96 px, or (``objects=2``) two-object scenes of every pairing, held-out ones included, at 64, 96 and 128 px."""
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for i in range(n):
        if objects == 2:
            pair = sample_pair(rng, held_out=None)
            images.append(render(pair, size=(64, 96, 128)[i % 3]))
            prompts.append(pair_caption(pair))
        else:
            spec = sample_spec(rng)
            images.append(render(spec, size=(32, 64, 96)[i % 3]))
            prompts.append(caption_of(spec))
    report = score_images(images, prompts)
    return {"images": n, "seed": seed, "all_correct": report.all_correct_rate(), **report.part_accuracy()}


SPEED_RUNS = (
    (
        "the shipped model: 4 images at its defaults",
        "shipped",
        ["--model", DEFAULT_MODEL, "--batch-size", "4", "--repeats", "5"],
    ),
    (
        "SD 1.5 architecture, random weights, 256², 20 DDIM steps, g=7.5",
        "sd15_256",
        ["--preset", "sd15", "--size", "256", "--steps", "20", "--repeats", "3"],
    ),
)
"""The CPU speed table: each (what, file name, eval.benchmark arguments), timed for stock, ours, ours fast and ours
with step caching side by side."""


def speed_summary(result: dict) -> str:
    """s per call of stock and each of ours with its speed-up, and ours' achieved GFLOP/s against the machine's."""
    parts = [f"stock {result['stock']['seconds_per_call']:.3f} s"]
    for name in result["variants"][1:]:
        row = result[name]
        parts.append(f"{name} {row['seconds_per_call']:.3f} s ({row['speed_vs_stock']:.2f}x)")
    ours = result["ours"]
    parts.append(
        f"ours {ours['gflops_per_s']:.1f} GFLOP/s = {ours['share_of_matmul_rate']:.0%} of the "
        f"{result['matmul_gflops_per_s']:.0f} GFLOP/s matmul rate"
    )
    return "; ".join(parts)


def _run(module, argv: list[str]) -> None:
    code = module.main(argv)
    if code != 0:
        raise SystemExit(f"error: python -m {module.__name__} {' '.join(argv)} failed with status {code}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.results``."""
    parser = OneLineParser(prog="python -m eval.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--model", default=None, help="a trained pipeline folder for the sweep and the likelihood")
    parser.add_argument("--data", default=None, help="held-out images of the model's data (for eval.nll)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every part, write the JSON files and ``results/README.md``, print the paths."""
    args = build_parser().parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []

    for what, name, argv in SPEED_RUNS:
        generate_json = out / f"benchmark_generate_{name}.json"
        generate_cmd = [*argv, "--variants", "default,fast,cached", "--out", str(generate_json)]
        _run(benchmark, generate_cmd)
        rows.append(
            (
                what,
                speed_summary(json.loads(generate_json.read_text())),
                "python -m eval.benchmark " + " ".join(generate_cmd),
            )
        )

    for preset in ("tiny", "small"):
        train_json = out / f"benchmark_train_{preset}.json"
        train_cmd = [
            "--task",
            "train",
            "--preset",
            preset,
            "--train-steps",
            "30",
            "--batch-size",
            "16",
            "--out",
            str(train_json),
        ]
        _run(benchmark, train_cmd)
        tr = json.loads(train_json.read_text())["runs"]
        rows.append(
            (
                f"U-Net training steps/s, {preset} preset, batch 16: uncached / cached latents",
                f"{tr['uncached']['steps_per_s']:.2f} / {tr['cached']['steps_per_s']:.2f}",
                "python -m eval.benchmark " + " ".join(train_cmd),
            )
        )

    memory_json = out / "memory_check.json"
    memory_cmd = ["--json", str(memory_json)]
    _run(memory_check, memory_cmd)
    memory_rows = json.loads(memory_json.read_text())
    rows.append(
        (
            "training memory pre-flight: estimate / measured peak RSS, per case",
            "; ".join(
                f"{r['case']} {r['estimate'] / 2**20:.0f} / {r['measured'] / 2**20:.0f} MiB ({r['ratio']:.2f})"
                for r in memory_rows
            ),
            "python -m eval.memory_check " + " ".join(memory_cmd),
        )
    )

    check = analyzer_self_check()
    pair_check = analyzer_self_check(objects=2)
    checks = {"one_object": check, "two_object": pair_check}
    (out / "adherence_analyzer_check.json").write_text(json.dumps(checks, indent=2) + "\n")
    parts = " / ".join(f"{check[k]:.3f}" for k in ("all_correct", "colour", "shape", "position"))
    pair_parts = " / ".join(f"{pair_check[k]:.3f}" for k in ("all_correct", "count", "colour", "shape", "relation"))
    rows.append(
        (
            "adherence analyzer on 300 ground-truth one-object renders: all parts / colour / shape / position",
            parts,
            "python -m eval.results (analyzer_self_check)",
        )
    )
    rows.append(
        (
            "adherence analyzer on 300 ground-truth two-object renders: all parts / count / colour / shape / relation",
            pair_parts,
            "python -m eval.results (analyzer_self_check, objects=2)",
        )
    )

    if args.model:
        sweep_cmd = ["--model", args.model, "--out", str(out / "guidance_sweep")]
        _run(guidance_sweep, sweep_cmd)
        sweep = json.loads((out / "guidance_sweep" / "sweep.json").read_text())
        best = max(sweep["rows"], key=lambda r: r["all_correct"])
        rows.append(
            (
                "prompt adherence, best guidance scale (all parts right)",
                f"{best['all_correct']:.3f} at g={best['guidance_scale']:g}",
                "python -m eval.guidance_sweep " + " ".join(sweep_cmd),
            )
        )
        if args.data:
            nll_cmd = [
                "--model",
                args.model,
                "--data",
                args.data,
                "--num-images",
                "32",
                "--timesteps-stride",
                "10",
                "--out",
                str(out / "nll.json"),
            ]
            _run(nll, nll_cmd)
            bound = json.loads((out / "nll.json").read_text())
            rows.append(
                (
                    "variational bound on held-out latents (bits/dim)",
                    f"{bound['bpd']['total']:.4f}",
                    "python -m eval.nll " + " ".join(nll_cmd),
                )
            )

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    lines = [
        "# Results",
        "",
        f"Regenerated by `python -m eval.results` on {time.strftime('%Y-%m-%d')}, {machine}.",
        "Timings vary with the machine's load; the ratios come from runs side by side in one process.",
        "",
        "| what | result | command |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {what} | {result} | `{command}` |" for what, result, command in rows]
    readme = out / "README.md"
    readme.write_text("\n".join(lines) + "\n")
    print(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
