"""Generation throughput and peak memory: LatentDiffusionPipeline vs stock StableDiffusionPipeline, side by side.

Both pipelines share the same components (random weights of a named preset, or a model folder), scheduler, seeds
and arguments, and run alternately in one process, so the ratio is not skewed by the machine's state. Prints a table
and writes JSON. Example::

    python -m eval.benchmark --preset tiny --steps 20 --size 64
    python -m eval.benchmark --preset sd15 --device cuda --dtype float16 --steps 50 --size 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ldm.attention import ATTENTION_BACKENDS
from ldm.presets import PRESETS, build_components
from pipelines import LatentDiffusionPipeline
from pipelines.schedulers import make_scheduler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.benchmark``."""
    parser = argparse.ArgumentParser(prog="python -m eval.benchmark", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random-weight components (tiny)")
    source.add_argument("--model", help="a diffusers pipeline folder instead of a preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (DDIM)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each pipeline (after one warm-up)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark.json"))
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(pipe, device: torch.device, kwargs: dict) -> tuple[float, float | None]:
    """Seconds for one call, and the peak CUDA memory in GiB (None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    pipe(generator=torch.Generator(device).manual_seed(0), **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace) -> dict:
    """Benchmark both pipelines; returns the JSON-able result."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.model:
        components = LatentDiffusionPipeline.from_pretrained(args.model).components
    else:
        components = build_components(args.preset)
    components["scheduler"] = make_scheduler("ddim", components["scheduler"].config)
    ours = LatentDiffusionPipeline(**components).to(device, dtype)
    stock = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)  # fmt: skip
    ours.set_attention_backend(args.attention)  # shared modules: stock uses the same processors
    size = args.size or ours.default_size
    kwargs = {"prompt": ["a red circle on the left"] * args.batch_size, "num_inference_steps": args.steps,
              "guidance_scale": args.guidance_scale, "height": size, "width": size, "output_type": "np"}  # fmt: skip
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
        time_pipeline(pipe, device, kwargs)  # warm-up
    timings: dict[str, list[float]] = {"ours": [], "stock": []}
    peaks: dict[str, float | None] = {"ours": None, "stock": None}
    for _ in range(args.repeats):
        for name, pipe in (("ours", ours), ("stock", stock)):
            seconds, peaks[name] = time_pipeline(pipe, device, kwargs)
            timings[name].append(seconds)
    result = {
        "source": args.model or f"preset:{args.preset}",
        "device": _device_name(device),
        "dtype": args.dtype, "attention": args.attention, "size": size, "steps": args.steps,
        "batch_size": args.batch_size, "guidance_scale": args.guidance_scale, "repeats": args.repeats,
    }  # fmt: skip
    for name, values in timings.items():
        median = statistics.median(values)
        result[name] = {
            "seconds_per_call": median,
            "it_per_s": args.steps / median,
            "images_per_s": args.batch_size / median,
            "peak_memory_gib": peaks[name],
        }
    result["speed_ratio_ours_over_stock"] = result["stock"]["seconds_per_call"] / result["ours"]["seconds_per_call"]
    return result


def format_table(result: dict) -> str:
    """A small text table of the result."""
    lines = [f"{result['source']} on {result['device']}, {result['dtype']}, {result['attention']}, "
             f"{result['size']}px, {result['steps']} steps, batch {result['batch_size']}",
             f"{'pipeline':<10}{'s/call':>10}{'it/s':>10}{'img/s':>10}{'peak GiB':>10}"]  # fmt: skip
    for name in ("ours", "stock"):
        r = result[name]
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(
            f"{name:<10}{r['seconds_per_call']:>10.3f}{r['it_per_s']:>10.1f}{r['images_per_s']:>10.2f}{peak:>10}"
        )
    lines.append(f"speed ratio ours / stock: {result['speed_ratio_ours_over_stock']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON file."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        print("error: --steps, --repeats and --batch-size must be >= 1", file=sys.stderr)
        return 2
    result = run(args)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
