"""Generation throughput and peak memory (ours vs stock diffusers, side by side), and the training step rate.

Generation: our pipeline of the model's family and stock's (``LatentDiffusionPipeline`` and
``StableDiffusionPipeline``; ``LatentDiffusionXLPipeline`` and ``StableDiffusionXLPipeline`` for SDXL) share the
same components (random weights of a named preset, or a model folder), scheduler, seeds and arguments, and run
alternately in one process (each round starting with the next one), so the ratio is not skewed by the machine's
state; ``--memory`` applies one of the memory modes to both; ``--variants interval`` times ours guided only in the
model's guidance interval, as its defaults do (stock guides at every step). Training (``--task train``): the U-Net
step rate of ``training.train_text_to_image`` on a synthetic shapes dataset, with and without the latent cache.
Prints a table and writes JSON. Examples::

    python -m eval.benchmark --preset tiny --steps 20 --size 64
    python -m eval.benchmark --preset sd15 --device cuda --dtype float16 --steps 50 --size 512 --memory vae-tiling
    python -m eval.benchmark --preset sdxl --steps 2 --size 256 --repeats 1
    python -m eval.benchmark --task train --preset small --train-steps 20 --batch-size 16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from eval.flops import count_flops, generation_flops, matmul_flops_per_s
from ldm.attention import ATTENTION_BACKENDS, set_attention_backend
from ldm.errors import OneLineParser, UserError, run_reporting
from ldm.presets import PRESETS, build_components
from pipelines.cli import add_guidance_interval_argument
from pipelines.families import STABLE_DIFFUSION, STABLE_DIFFUSION_XL, family_of_unet, pipelines_of
from pipelines.generation_defaults import FULL_INTERVAL, GenerationDefaults
from pipelines.loading import load_pipeline
from pipelines.schedulers import make_scheduler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STOCK_PIPELINES: dict = {STABLE_DIFFUSION: StableDiffusionPipeline, STABLE_DIFFUSION_XL: StableDiffusionXLPipeline}
"""Stock diffusers' text-to-image pipeline of each family, the reference we time against."""
VARIANTS = ("default", "fast", "cached", "interval")
"""Our pipeline as it comes, with ``enable_fast_mode()``, with ``enable_step_caching()``, and guided only in a guidance
interval (the model's default one, or ``--guidance-interval``; stock guides at every step)."""
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
    parser.add_argument("--memory", choices=MEMORY_MODES, default="none", help="memory-saving mode for all")
    parser.add_argument(
        "--variants",
        default="default",
        help="ours to time against stock, comma-separated from default, fast, cached, interval (default: default)",
    )
    add_guidance_interval_argument(parser)
    parser.add_argument("--step-cache", type=int, default=3, help="step-caching interval of the cached variant (3)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the fast variant (its default)")
    parser.add_argument(
        "--no-flops", dest="count_flops", action="store_false", help="skip counting FLOPs (2 extra short calls)"
    )
    parser.add_argument("--task", choices=("generate", "train"), default="generate")
    parser.add_argument("--train-steps", type=int, default=20, help="timed optimizer steps (--task train)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark.json"))
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(pipe) -> int:
    """Bytes of the pipeline's own weights now on a CUDA device."""
    tensors = (
        tensor
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module)
        for tensor in (*module.parameters(), *module.buffers())
    )
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def time_pipeline(pipe, device: torch.device, kwargs: dict) -> tuple[float, float | None, np.ndarray]:
    """Seconds for one call, its peak CUDA memory in GiB (None off CUDA), and its images. The peak is the pipeline's
    own resident weights plus the most it allocated during the call, so pipelines that share a device (stock, ours,
    a fast-mode copy) are each measured as if alone."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    _sync(device)
    start = time.perf_counter()
    images = pipe(generator=torch.Generator(device).manual_seed(0), **kwargs).images
    _sync(device)
    seconds = time.perf_counter() - start
    peak = None
    if device.type == "cuda":
        peak = (_resident_bytes(pipe) + torch.cuda.max_memory_allocated(device) - before) / 2**30
    return seconds, peak, np.asarray(images, dtype=np.float64)


def stock_pipeline(cls: type[DiffusionPipeline], components: dict) -> DiffusionPipeline:
    """Stock ``cls`` on the ``components`` it takes, without a safety checker."""
    keys = cls._get_signature_keys(cls)[0]
    given = {name: components.get(name) for name in keys}
    given.update({name: None for name in ("safety_checker", "feature_extractor") if name in keys})
    extra = {"requires_safety_checker": False} if "safety_checker" in keys else {}
    return cls(**given, **extra)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def ours_variant(variant: str, family: str, components: dict, args: argparse.Namespace, device, dtype):
    """Our pipeline of ``family`` in one of :data:`VARIANTS`. ``default`` and ``cached`` share ``components`` with
    stock (step caching changes no module); ``fast`` gets its own copy, since it changes the modules (channels_last,
    fused projections, compiled forward)."""
    if variant == "fast":
        components = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    pipe = pipelines_of(family).text_to_image(**components)
    if args.memory != "cpu-offload":
        pipe.to(device=device, dtype=dtype)
    if variant == "fast":
        pipe.enable_fast_mode(compile=getattr(args, "compile", True), mode=args.compile_mode)
    elif variant == "cached":
        pipe.enable_step_caching(interval=args.step_cache)
    elif variant not in ("default", "interval"):  # interval: the same pipeline, called with guidance_interval
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return pipe


def parse_variants(text: str) -> tuple[str, ...]:
    """``--variants default,fast,cached`` -> the names, checked."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        choices = ", ".join(VARIANTS)
        raise UserError(f"--variants: unknown {unknown or text!r}; give a comma-separated list of {choices}")
    return names


def run(args: argparse.Namespace, components: dict | None = None) -> dict:
    """Benchmark stock's pipeline and ours (each of ``args.variants``) side by side; returns the JSON-able result.

    ``components`` (random weights already built, e.g. on the GPU) replace ``--preset`` / ``--model``."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    variants = parse_variants(args.variants)
    defaults = GenerationDefaults(num_inference_steps=20)
    if components is None and args.model:
        loaded = load_pipeline(args.model)
        components, defaults = loaded.components, loaded.generation_defaults
    elif components is None:
        components = build_components(args.preset)
    args.steps = defaults.num_inference_steps if args.steps is None else args.steps
    args.guidance_scale = defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale
    interval = getattr(args, "guidance_interval", None) or defaults.guidance_interval
    if "interval" in variants and tuple(interval) == FULL_INTERVAL:
        raise UserError(
            "--variants interval: the model's defaults guide at every step (no guidance interval); give "
            "--guidance-interval LO,HI, e.g. 0.5,1"
        )
    components["scheduler"] = make_scheduler("ddim", components["scheduler"].config)
    family = family_of_unet(components["unet"].config)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if components.get(name) is not None and components[name].dtype != dtype:
            components[name].to(dtype=dtype)
    set_attention_backend([components["unet"], components["vae"]], args.attention)  # shared by every pipeline
    stock = stock_pipeline(STOCK_PIPELINES[family], components)
    if args.memory == "cpu-offload":  # each pipeline moves the shared modules itself
        apply_memory_mode(stock, args.memory, device)
    else:
        stock.to(device)
        apply_memory_mode(stock, args.memory, device)  # the switches live on the shared modules
    pipes = {"stock": stock}
    for variant in variants:
        name = "ours" if variant == "default" else f"ours-{variant}"
        pipes[name] = ours_variant(variant, family, components, args, device, dtype)
        if args.memory == "cpu-offload" or variant == "fast":
            apply_memory_mode(pipes[name], args.memory, device)
    size = args.size or pipes["stock"].unet.config.sample_size * pipes["stock"].vae_scale_factor
    kwargs = {
        "prompt": ["a red circle on the left"] * args.batch_size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": size,
        "width": size,
        "output_type": "np",
    }
    calls = {name: kwargs for name in pipes}
    if "ours-interval" in pipes:
        calls["ours-interval"] = {**kwargs, "guidance_interval": tuple(interval)}
    first_call: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        first_call[name], _, images[name] = time_pipeline(pipe, device, calls[name])  # warm-up (fast mode compiles)
    timings: dict[str, list[float]] = {name: [] for name in pipes}
    peaks: dict[str, float | None] = dict.fromkeys(pipes)
    names = list(pipes)
    for repeat in range(args.repeats):
        # each round starts with the next pipeline, so none always runs right after the same one
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, peaks[name], _ = time_pipeline(pipes[name], device, calls[name])
            timings[name].append(seconds)
    # Every pipeline but the step-cached and interval ones runs the same products (fused projections included): count
    # stock's; those two skip work, so theirs are counted as they run.
    flops = dict.fromkeys(pipes, generation_flops(stock, kwargs).total(args.steps) if args.count_flops else 0)
    for name in ("ours-cached", "ours-interval"):
        if name in pipes and args.count_flops:
            flops[name] = count_flops(lambda name=name: time_pipeline(pipes[name], device, calls[name]))
    matmul = matmul_flops_per_s(device, dtype)
    result = {
        "source": args.model or f"preset:{args.preset}",
        "pipelines": [pipelines_of(family).text_to_image.__name__, type(stock).__name__],
        "device": _device_name(device),
        "dtype": args.dtype,
        "attention": args.attention,
        "memory": args.memory,
        "size": size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "guidance_scale": args.guidance_scale,
        "repeats": args.repeats,
        "variants": list(pipes),
        "step_cache_interval": args.step_cache if "cached" in variants else None,
        "guidance_interval": list(interval) if "interval" in variants else None,
        "matmul_gflops_per_s": matmul / 1e9,
    }
    for name, values in timings.items():
        median = statistics.median(values)
        result[name] = {
            "seconds_per_call": median,
            "first_call_seconds": first_call[name],
            "it_per_s": args.steps / median,
            "images_per_s": args.batch_size / median,
            "peak_memory_gib": peaks[name],
            "gflop_per_call": flops[name] / 1e9,
            "gflops_per_s": flops[name] / median / 1e9,
            "share_of_matmul_rate": flops[name] / median / matmul,
            "speed_vs_stock": statistics.median(timings["stock"]) / median,
            # how far the images are from stock's (same seeds), on the [0, 1] scale
            "max_abs_diff_vs_stock": float(np.abs(images[name] - images["stock"]).max()),
            "mean_abs_diff_vs_stock": float(np.abs(images[name] - images["stock"]).mean()),
        }
    if "ours" in result:
        result["speed_ratio_ours_over_stock"] = result["ours"]["speed_vs_stock"]
    return result


def run_training(args: argparse.Namespace, caches: tuple[bool, ...] = (False, True)) -> dict:
    """Train a preset's U-Net from scratch for ``--train-steps`` on 64 synthetic shape images, without and with the
    latent cache (``caches``); the step rates are the loops' own (set-up and cache building excluded)."""
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
        for cache in caches:
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
            rate = metrics.get("train_steps_per_s_steady") or metrics["train_steps_per_s"]  # warmed up, if known
            result["runs"]["cached" if cache else "uncached"] = {
                "steps_per_s": rate,
                "images_per_s": rate * args.batch_size,
                "steps_per_s_whole_loop": metrics["train_steps_per_s"],
            }
    if len(result["runs"]) == 2:
        result["cache_speedup"] = result["runs"]["cached"]["steps_per_s"] / result["runs"]["uncached"]["steps_per_s"]
    return result


def format_training_table(result: dict) -> str:
    """The training benchmark as a text table."""
    title = f"train {result['preset']} U-Net from scratch, {result['size']}px, batch {result['batch_size']}"
    lines = [f"{title}, {result['steps']} steps on {result['device']}", f"{'latents':<10}{'steps/s':>10}{'img/s':>10}"]
    for name, run_result in result["runs"].items():
        lines.append(f"{name:<10}{run_result['steps_per_s']:>10.2f}{run_result['images_per_s']:>10.1f}")
    if "cache_speedup" in result:
        lines.append(f"cache speed-up: {result['cache_speedup']:.2f}x")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A small text table of the result: each pipeline's time, rate, peak memory and achieved GFLOP/s."""
    lines = [
        f"{result['source']} on {result['device']}, {result['dtype']}, {result['attention']}, "
        f"{result['size']}px, {result['steps']} steps, batch {result['batch_size']}",
        f"{'pipeline':<13}{'s/call':>9}{'1st call':>10}{'it/s':>8}{'img/s':>8}{'peak GiB':>10}"
        f"{'GFLOP/s':>9}{'of matmul':>11}{'vs stock':>10}{'max |d|':>9}",
    ]
    for name in result["variants"]:
        r = result[name]
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(
            f"{name:<13}{r['seconds_per_call']:>9.3f}{r['first_call_seconds']:>10.2f}{r['it_per_s']:>8.1f}"
            f"{r['images_per_s']:>8.2f}{peak:>10}{r['gflops_per_s']:>9.1f}{r['share_of_matmul_rate']:>11.1%}"
            f"{r['speed_vs_stock']:>9.2f}x{r['max_abs_diff_vs_stock']:>9.3g}"
        )
    rate = result["matmul_gflops_per_s"]
    lines.append(f"matrix-multiply rate of this device in {result['dtype']}: {rate:.1f} GFLOP/s")
    if "speed_ratio_ours_over_stock" in result:
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
