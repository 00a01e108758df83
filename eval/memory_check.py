"""The memory pre-flight's estimate against the measured peak, on the CPU: one short training run per case.

Each case trains a preset's U-Net from scratch (``python -m training.train_text_to_image``, two steps, synthetic
shapes) in a fresh process, whose ``run_stats.json`` holds the estimate (:mod:`training.memory`) and the measured
peak resident set; the measured figure is that peak minus the resident set before the models were built. Prints a
table (preset, batch, estimate, measured, ratio) and, with ``--json``, writes it.

glibc's malloc raises its mmap threshold (up to 32 MiB) after freeing a large block, and keeps later blocks below it
in its heap after they are freed: the resident set then follows the heap's high-water mark, not the live tensors (a
step's activations are freed and allocated again elsewhere next step). The runs fix the threshold at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so that freed tensors go back to the system; ``--default-malloc`` measures without it::

    python -m eval.memory_check                      # the three cases
    python -m eval.memory_check --cases tiny-b8      # one
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import OneLineParser, run_reporting
from ldm.presets import build_text_encoder, build_vae, get_preset
from ldm.tokenizer import build_clip_tokenizer


@dataclass(frozen=True)
class Case:
    """One measured run: a preset trained from scratch at a batch size and resolution, with extra flags."""

    name: str
    preset: str
    batch_size: int
    resolution: int
    flags: tuple[str, ...] = ()


CASES = (
    Case("small-b4-ema", "small", 4, 256, ("--ema-decay", "0.999")),
    Case("small-b8-ckpt", "small", 8, 256, ("--gradient-checkpointing",)),
    Case("sd15-lora-b1-ckpt", "sd15", 1, 256, ("--lora-rank", "8", "--gradient-checkpointing")),
    Case("tiny-b8", "tiny", 8, 256),
)
"""Presets, batch sizes and modes: full fine-tunes with AdamW (with EMA; with checkpointing), LoRA on SD 1.5's
architecture, and the tiny preset, whose few MiB of tensors are below the libraries' own (see the README)."""

REPO = Path(__file__).resolve().parents[1]


def frozen_parts(preset_name: str, folder: Path) -> Path:
    """Write the preset's VAE, text encoder and tokenizer (random weights) to ``folder``; returns it."""
    preset = get_preset(preset_name)
    build_vae(preset).save_pretrained(folder / "vae")
    build_text_encoder(preset).save_pretrained(folder / "text_encoder")
    build_clip_tokenizer(preset.text_encoder.pad_token).save_pretrained(folder / "tokenizer")
    return folder


MMAP_THRESHOLD = 65536
"""The malloc mmap threshold of the measured runs (bytes), unless ``--default-malloc``."""


def measure(case: Case, root: Path, data: Path, threads: int = 2, default_malloc: bool = False) -> dict:
    """Run ``case`` for two steps in a fresh process and return its row: estimate, measured, ratio (bytes)."""
    parts = root / f"frozen-{case.preset}"
    if not parts.is_dir():
        frozen_parts(case.preset, parts)
    out = root / case.name
    command = [
        sys.executable,
        "-m",
        "training.train_text_to_image",
        *("--preset", case.preset, "--vae", str(parts), "--text-encoder", str(parts)),
        *("--dataset", str(data), "--output-dir", str(out), "--resolution", str(case.resolution)),
        *("--train-batch-size", str(case.batch_size), "--max-train-steps", "2", "--checkpointing-steps", "1000"),
        *("--report-to", "none", "--log-steps", "1000", "--lr-warmup-steps", "0"),
        *case.flags,
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True, text=True)
    stats = json.loads((out / "run_stats.json").read_text())
    measured = stats["measured_peak"] - stats["measured_baseline"]
    estimate = stats["memory_estimate"]["total"]
    return {
        "case": case.name,
        "preset": case.preset,
        "batch_size": case.batch_size,
        "resolution": case.resolution,
        "flags": " ".join(case.flags),
        "estimate": estimate,
        "measured": measured,
        "ratio": estimate / measured,
        "terms": stats["memory_estimate"],
    }


def format_table(rows: list[dict]) -> str:
    """The rows as a text table (MiB)."""
    lines = [f"{'case':<20}{'preset':<8}{'batch':>6}{'px':>5}{'estimate':>11}{'measured':>11}{'ratio':>7}"]
    for row in rows:
        lines.append(
            f"{row['case']:<20}{row['preset']:<8}{row['batch_size']:>6}{row['resolution']:>5}"
            f"{row['estimate'] / 2**20:>8.0f}MiB{row['measured'] / 2**20:>8.0f}MiB{row['ratio']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen cases and print the table (and write ``--json``)."""
    names = [case.name for case in CASES]
    parser = OneLineParser(prog="python -m eval.memory_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=names, default=names, help="which cases (default: all)")
    parser.add_argument("--default-malloc", action="store_true", help="measure with glibc's dynamic mmap threshold")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    def body() -> None:
        from shapes.make_dataset import make_dataset

        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data = make_dataset(root / "data", 8, size=64, seed=0, progress=False)
            for case in CASES:
                if case.name in args.cases:
                    rows.append(measure(case, root, data, default_malloc=args.default_malloc))
                    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        print(format_table(rows))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
            print(args.json)

    return run_reporting(body, "python -m eval.memory_check")


if __name__ == "__main__":
    sys.exit(main())
