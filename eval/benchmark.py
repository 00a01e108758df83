"""Generation throughput and peak memory (ours vs stock diffusers, side by side), and the training step rate.

Generation: our pipeline of the model's family and stock's (``LatentDiffusionPipeline`` and
``StableDiffusionPipeline``; ``LatentDiffusionXLPipeline`` and ``StableDiffusionXLPipeline`` for SDXL) share the
same components (random weights of a named preset, or a model folder), scheduler, seeds and arguments, and run
alternately in one process, so the ratio is not skewed by the machine's state; ``--memory`` applies one of the memory
modes to both. Training (``--task train``): the U-Net step rate of ``training.train_text_to_image`` on a synthetic
shapes dataset, with and without the latent cache. Prints a table and writes JSON. Examples::

    python -m eval.benchmark --preset tiny --steps 20 --size 64
    python -m eval.benchmark --preset sd15 --device cuda --dtype float16 --steps 50 --size 512 --memory vae-tiling
    python -m eval.benchmark --preset sdxl --steps 2 --size 256 --repeats 1
    python -m eval.benchmark --task train --preset small --train-steps 20 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from ldm.attention import ATTENTION_BACKENDS
from ldm.errors import OneLineParser, UserError, run_reporting
from ldm.presets import PRESETS, build_components
from pipelines.families import STABLE_DIFFUSION, STABLE_DIFFUSION_XL, family_of_unet, pipelines_of
from pipelines.generation_defaults import GenerationDefaults
from pipelines.loading import load_pipeline
from pipelines.schedulers import make_scheduler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STOCK_PIPELINES: dict = {STABLE_DIFFUSION: StableDiffusionPipeline, STABLE_DIFFUSION_XL: StableDiffusionXLPipeline}
"""Stock diffusers' text-to-image pipeline of each family, the reference we time against."""
MEMORY_MODES = ("none", "attention-slicing", "vae-slicing", "vae-tiling", "cpu-offload")


def apply_memory_mode(pipe, mode: str, device: torch.device) -> None:
    """Switch on one memory-saving mode (the same diffusers switches exist on both pipelines)."""
    if mode == "attention-slicing":
        pipe.enable_attention_slicing()
    elif mode == "vae-slicing":
        pipe.vae.enable_slicing()
    elif mode == "vae-tiling":
        pipe.vae.enable_tiling()
    elif mode == "cpu-offload":
        if device.type != "cuda":
            raise UserError("--memory cpu-offload needs a CUDA device (it moves models between CPU and GPU)")
        pipe.enable_model_cpu_offload(device=device)
    elif mode != "none":
        raise UserError(f"unknown memory mode {mode!r}; choose one of {MEMORY_MODES}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.benchmark``."""
    parser = OneLineParser(prog="python -m eval.benchmark", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random-weight components (tiny)")
    source.add_argument("--model", help="a diffusers pipeline folder instead of a preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (DDIM; default: the model's, or 20)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's, or 7.5")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each pipeline (after one warm-up)")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="none", help="memory-saving mode for both")
    parser.add_argument("--task", choices=("generate", "train"), default="generate")
    parser.add_argument("--train-steps", type=int, default=20, help="timed optimizer steps (--task train)")
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


def stock_pipeline(cls: type[DiffusionPipeline], components: dict) -> DiffusionPipeline:
    """Stock ``cls`` on the ``components`` it takes, without a safety checker."""
    keys = cls._get_signature_keys(cls)[0]
    given = {name: components.get(name) for name in keys}
    given.update({name: None for name in ("safety_checker", "feature_extractor") if name in keys})
    extra = {"requires_safety_checker": False} if "safety_checker" in keys else {}
    return cls(**given, **extra)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace) -> dict:
    """Benchmark both pipelines; returns the JSON-able result."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    defaults = GenerationDefaults(num_inference_steps=20)
    if args.model:
        loaded = load_pipeline(args.model)
        components, defaults = loaded.components, loaded.generation_defaults
    else:
        components = build_components(args.preset)
    args.steps = defaults.num_inference_steps if args.steps is None else args.steps
    args.guidance_scale = defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale
    components["scheduler"] = make_scheduler("ddim", components["scheduler"].config)
    family = family_of_unet(components["unet"].config)
    ours = pipelines_of(family).text_to_image(**components).to(dtype=dtype)
    stock = stock_pipeline(STOCK_PIPELINES[family], components)
    ours.set_attention_backend(args.attention)  # shared modules: stock uses the same processors
    if args.memory == "cpu-offload":  # each pipeline moves the shared modules itself
        apply_memory_mode(ours, args.memory, device)
        apply_memory_mode(stock, args.memory, device)
    else:
        ours.to(device)
        apply_memory_mode(ours, args.memory, device)  # the switches live on the shared modules
    size = args.size or ours.default_size
    kwargs = {
        "prompt": ["a red circle on the left"] * args.batch_size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": size,
        "width": size,
        "output_type": "np",
    }
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
        "pipelines": [type(ours).__name__, type(stock).__name__],
        "device": _device_name(device),
        "dtype": args.dtype,
        "attention": args.attention,
        "memory": args.memory,
        "size": size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "guidance_scale": args.guidance_scale,
        "repeats": args.repeats,
    }
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


def run_training(args: argparse.Namespace) -> dict:
    """Train a preset's U-Net from scratch for ``--train-steps`` on 64 synthetic shape images, without and with the
    latent cache; the step rates are the loops' own (set-up and cache building excluded)."""
    import tempfile

    from shapes.make_dataset import make_dataset
    from training.train_text_to_image import TrainConfig, train

    preset = PRESETS[args.preset]
    size = args.size or preset.image_size
    result = {
        "task": "train",
        "preset": args.preset,
        "size": size,
        "batch_size": args.batch_size,
        "steps": args.train_steps,
        "device": _device_name(torch.device(args.device)),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "data", 64, size=size, seed=0, progress=False)
        parts = build_components(preset)
        parts["vae"].save_pretrained(root / "frozen" / "vae")
        parts["text_encoder"].save_pretrained(root / "frozen" / "text_encoder")
        parts["tokenizer"].save_pretrained(root / "frozen" / "tokenizer")
        for cache in (False, True):
            out = root / f"run-cache-{cache}"
            train(
                TrainConfig(
                    preset=args.preset,
                    vae=str(root / "frozen"),
                    text_encoder=str(root / "frozen"),
                    dataset=str(data),
                    output_dir=str(out),
                    resolution=size,
                    cache=cache,
                    train_batch_size=args.batch_size,
                    max_train_steps=args.train_steps,
                    checkpointing_steps=10**9,
                    report_to="none",
                    log_steps=10**9,
                    mixed_precision="bf16" if args.dtype == "bfloat16" else "no",
                )
            )
            metrics = json.loads((out / "metrics.json").read_text())
            rate = metrics["train_steps_per_s"]
            result["runs"]["cached" if cache else "uncached"] = {
                "steps_per_s": rate,
                "images_per_s": rate * args.batch_size,
            }
    result["cache_speedup"] = result["runs"]["cached"]["steps_per_s"] / result["runs"]["uncached"]["steps_per_s"]
    return result


def format_training_table(result: dict) -> str:
    """The training benchmark as a text table."""
    title = f"train {result['preset']} U-Net from scratch, {result['size']}px, batch {result['batch_size']}"
    lines = [f"{title}, {result['steps']} steps on {result['device']}", f"{'latents':<10}{'steps/s':>10}{'img/s':>10}"]
    for name, run_result in result["runs"].items():
        lines.append(f"{name:<10}{run_result['steps_per_s']:>10.2f}{run_result['images_per_s']:>10.1f}")
    lines.append(f"cache speed-up: {result['cache_speedup']:.2f}x")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A small text table of the result."""
    lines = [
        f"{result['source']} on {result['device']}, {result['dtype']}, {result['attention']}, "
        f"{result['size']}px, {result['steps']} steps, batch {result['batch_size']}",
        f"{'pipeline':<10}{'s/call':>10}{'it/s':>10}{'img/s':>10}{'peak GiB':>10}",
    ]
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

    def body() -> None:
        if min(1 if args.steps is None else args.steps, args.repeats, args.batch_size, args.train_steps) < 1:
            raise UserError("--steps, --repeats, --batch-size and --train-steps must be >= 1")
        result = run(args) if args.task == "generate" else run_training(args)
        print(format_table(result) if args.task == "generate" else format_training_table(result))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(args.out)

    return run_reporting(body, "the benchmark")


if __name__ == "__main__":
    sys.exit(main())
