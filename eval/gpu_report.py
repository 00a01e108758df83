"""One command for a GPU session: generation speed and memory, ours vs stock, and the training step rate.

    python -m eval.gpu_report --out results/gpu

writes ``gpu_report.json`` and ``gpu_report.md`` (one table) into ``--out``, rewritten after every section, so a
run cut short still leaves what it measured. Within ``--budget-s`` seconds (default 420; the whole report was sized
for 8 minutes on one H100/H200), in order of importance, it measures:

1. the device: its measured float16 / bfloat16 matrix-multiply rate, and its dense peak where known (H100 / H200);
2. generation, random weights, 50 DDIM steps, guidance 7.5, one image: the SD 1.5 architecture at 512² and the
   SDXL architecture at 1024², float16, SDPA: stock diffusers, ours default, ours fast mode
   (``enable_fast_mode``; compile time reported apart), ours with step caching: it/s,
   s/image, peak memory, and the share of the dense peak (FLOPs counted with ``torch.utils.flop_counter``); ours
   with xFormers where it imports;
3. the training step rate and MFU of a cached-latent fine-tune of the SD 1.5 U-Net at 512² in bf16
   (``training.train_text_to_image``, through ``eval.benchmark --task train``);
4. memory modes on the SD 1.5 architecture (ours and stock): attention slicing, VAE tiling at 2048², model CPU
   offload: peak memory and s/image;
5. the generation rows again in bfloat16 (SDXL without fast mode: a second compile of its U-Net is too long).

A section that fails is recorded with its error and the report goes on. ``--tiny`` runs the same code on the tiny
presets at 64² in seconds (the test suite runs it on CPU).

On the GPU machine lent to this project (torch, transformers, accelerate and peft installed; no network), carry
these wheels (``pip download --no-deps`` for Python 3.12, manylinux x86-64) and install them first:
diffusers==0.42.1, open_clip_torch==3.3.0, ftfy, wcwidth, importlib_metadata, datasets==5.2.0, dill, multiprocess,
and xformers (optional; a wheel built for the machine's torch). With them in ``.whl/`` (ignored by git), the
device tool's command was::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 -m eval.gpu_report --out $OUT/gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eval import benchmark
from eval.flops import count_flops, matmul_flops_per_s
from ldm.errors import OneLineParser, run_reporting
from ldm.presets import build_components, build_unet, get_preset

logger = logging.getLogger(__name__)

DENSE_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense (no sparsity) bfloat16/float16 tensor-core peak of known GPUs, TFLOP/s (NVIDIA's data sheets)."""


def dense_peak_flops_per_s(device: torch.device, measured: float) -> tuple[float, str]:
    """The device's dense half-precision peak (FLOP/s) and where it comes from: the data sheet of a known GPU, else
    the measured matrix-multiply rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DENSE_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{key} data sheet"
    return measured, "measured matmul rate"


class Report:
    """The JSON and markdown files, rewritten after every section; a time budget for the sections."""

    def __init__(self, out: Path, budget_s: float, only: list[str] | None = None):
        self.out, self.budget_s, self.only, self.start = out, budget_s, only, time.perf_counter()
        self.data: dict[str, Any] = {"sections": {}, "skipped": [], "errors": {}}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one section unless the budget is spent (or ``only`` names others); record its result or its error,
        then write the files."""
        if self.only and name not in self.only and name != "device":  # the device's peak is needed by the rest
            return None
        if self.elapsed > self.budget_s:
            self.data["skipped"].append(name)
            logger.warning("skipped %s: the %.0f s budget is spent", name, self.budget_s)
            return None
        started = time.perf_counter()
        try:
            result = fn()
        except Exception as error:  # a report goes on past one failing measurement
            self.data["errors"][name] = f"{type(error).__name__}: {error}"
            logger.error("%s failed:\n%s", name, traceback.format_exc())
            result = None
        else:
            self.data["sections"][name] = result
        self.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
        self.write()
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed, 1)
        (self.out / "gpu_report.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "gpu_report.md").write_text(format_markdown(self.data))


def device_section(device: torch.device, dtypes: list[str]) -> dict:
    """Versions, the measured matrix-multiply rate per dtype, and the dense peak used for shares."""
    import diffusers
    import transformers

    rates = {name: matmul_flops_per_s(device, benchmark.DTYPES[name]) for name in dtypes}
    peak, source = dense_peak_flops_per_s(device, max(rates.values()))
    return {
        "device": benchmark._device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "matmul_tflops": {name: rate / 1e12 for name, rate in rates.items()},
        "dense_peak_tflops": peak / 1e12,
        "dense_peak_source": source,
    }


def generation_args(args: argparse.Namespace, preset: str, size: int, dtype: str, **overrides: Any):
    """The ``eval.benchmark`` arguments of one generation measurement."""
    values = {
        "preset": preset,
        "model": None,
        "device": args.device,
        "dtype": dtype,
        "attention": "sdpa",
        "steps": args.steps,
        "size": size,
        "batch_size": 1,
        "guidance_scale": 7.5,
        "repeats": args.repeats,
        "memory": "none",
        "variants": args.variants,
        "step_cache": 3,
        "compile_mode": args.compile_mode,
        "compile": not args.tiny,
        "count_flops": True,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def generation_section(args: argparse.Namespace, preset: str, size: int, dtype: str, peak: float, **overrides: Any):
    """One ``eval.benchmark`` run built on the device (random weights), with each pipeline's share of ``peak``.

    If the fast variant fails (a compile error), it is recorded and the others are measured without it."""
    device = torch.device(args.device)
    with torch.device(device):
        components = build_components(preset)
    bench_args = generation_args(args, preset, size, dtype, **overrides)
    try:
        result = benchmark.run(bench_args, components=components)
    except Exception as error:
        if "fast" not in bench_args.variants:
            raise
        logger.error("fast mode failed, measuring without it:\n%s", traceback.format_exc())
        bench_args.variants = ",".join(v for v in bench_args.variants.split(",") if v != "fast")
        result = benchmark.run(bench_args, components=components)
        result["fast_error"] = f"{type(error).__name__}: {error}"
    for name in result["variants"]:
        row = result[name]
        row["share_of_dense_peak"] = row["gflops_per_s"] * 1e9 / peak
        row["compile_seconds"] = max(row["first_call_seconds"] - row["seconds_per_call"], 0.0)
    del components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def training_section(args: argparse.Namespace, preset: str, size: int, peak: float) -> dict:
    """The cached-latent fine-tune step rate (``eval.benchmark --task train``) and its MFU: the FLOPs of one
    U-Net forward and backward at the batch (counted), times the step rate, over the dense peak."""
    device = torch.device(args.device)
    bench_args = argparse.Namespace(
        preset=preset,
        size=size,
        batch_size=args.train_batch_size,
        train_steps=args.train_steps,
        device=args.device,
        dtype="bfloat16",
    )
    result = benchmark.run_training(bench_args, caches=(True,))
    config = get_preset(preset)
    with torch.device(device):
        unet = build_unet(config).train()
    batch, side = args.train_batch_size, size // config.vae_scale_factor
    latents = torch.randn(batch, unet.config.in_channels, side, side, device=device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    flops = count_flops(step)
    rate = result["runs"]["cached"]["steps_per_s"]
    result["flops_per_step"] = flops
    result["mfu"] = flops * rate / peak
    return result


def memory_section(args: argparse.Namespace, preset: str, size: int, mode: str) -> dict:
    """Ours and stock under one memory mode (few steps: the peak, not the speed, is the point)."""
    device = torch.device(args.device)
    if mode == "cpu-offload" and device.type != "cuda":
        return {"memory": mode, "note": "needs CUDA"}
    components = build_components(preset)
    if mode != "cpu-offload":
        components = {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    overrides = {"variants": "default", "memory": mode, "steps": args.memory_steps, "repeats": 1, "count_flops": False}
    dtype = "float16" if device.type == "cuda" else "float32"
    return benchmark.run(generation_args(args, preset, size, dtype, **overrides), components=components)


def xformers_available() -> str | None:
    """None if xFormers' attention runs here, else why not."""
    try:
        import xformers.ops

        q = torch.randn(1, 16, 1, 8, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as error:  # any import or kernel failure means: no xformers row
        return f"{type(error).__name__}: {error}"
    return None


def run(args: argparse.Namespace) -> Report:
    """All sections in order of importance, within the budget."""
    report = Report(args.out, args.budget_s, args.only)
    device = torch.device(args.device)
    dtypes = ["float16", "bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"]
    sd15, sdxl = ("tiny", "tiny-sdxl") if args.tiny else ("sd15", "sdxl")
    sd_size, xl_size, train_size, tile_size = (64, 64, 64, 128) if args.tiny else (512, 1024, 512, 2048)
    info = report.section("device", lambda: device_section(device, dtypes)) or {}
    peak = info.get("dense_peak_tflops", 1.0) * 1e12
    first, second = dtypes
    report.section(f"sd15 {first}", lambda: generation_section(args, sd15, sd_size, first, peak))
    report.section(f"sdxl {first}", lambda: generation_section(args, sdxl, xl_size, first, peak))
    report.section("training sd15 bf16", lambda: training_section(args, sd15, train_size, peak))
    report.section("memory attention-slicing", lambda: memory_section(args, sd15, sd_size, "attention-slicing"))
    report.section("memory vae-tiling", lambda: memory_section(args, sd15, tile_size, "vae-tiling"))
    report.section("memory cpu-offload", lambda: memory_section(args, sd15, sd_size, "cpu-offload"))
    report.section(f"sd15 {second}", lambda: generation_section(args, sd15, sd_size, second, peak))
    # SDXL's fast mode is measured once: a second compile of its U-Net would take a fifth of the budget.
    no_fast = {"variants": ",".join(v for v in args.variants.split(",") if v != "fast")}
    report.section(f"sdxl {second}", lambda: generation_section(args, sdxl, xl_size, second, peak, **no_fast))
    if device.type == "cuda":
        why_not = xformers_available()
        if why_not is None:
            overrides = {"attention": "xformers", "variants": "default"}
            report.section(
                f"sd15 {first} xformers", lambda: generation_section(args, sd15, sd_size, first, peak, **overrides)
            )
        else:
            report.data["xformers"] = why_not
    report.write()
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_markdown(data: dict) -> str:
    """The report as one markdown table per kind of measurement."""
    sections = data["sections"]
    lines = ["# GPU report", ""]
    info = sections.get("device")
    if info:
        rates = ", ".join(f"{k} {v:.3g}" for k, v in info["matmul_tflops"].items())
        lines += [
            f"{info['device']}; torch {info['torch']}, diffusers {info['diffusers']}, "
            f"transformers {info['transformers']}. Matrix-multiply rate (TFLOP/s): {rates}; dense peak "
            f"{info['dense_peak_tflops']:.3g} TFLOP/s ({info['dense_peak_source']}).",
            "",
        ]
    lines += [
        "| model | dtype | attention | pipeline | it/s | s/image | vs stock | peak GiB | of dense peak | compile s "
        "| max \\|Δ\\| vs stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in sections.items():
        if "variants" not in result or result.get("memory", "none") != "none":
            continue
        for variant in result["variants"]:
            r = result[variant]
            lines.append(
                f"| {result['source'].removeprefix('preset:')} {result['size']}² | {result['dtype']} | "
                f"{result['attention']} | {variant} | {r['it_per_s']:.2f} | {r['seconds_per_call']:.3f} | "
                f"{r['speed_vs_stock']:.2f}x | {_fmt(r['peak_memory_gib'], '.2f')} | "
                f"{r.get('share_of_dense_peak', 0):.1%} | {_fmt(r.get('compile_seconds'), '.0f')} | "
                f"{r['max_abs_diff_vs_stock']:.3g} |"
            )
        if "fast_error" in result:
            lines.append(f"| {name} | | | fast failed: {result['fast_error'][:120]} | | | | | | | |")
    memory = [(n, r) for n, r in sections.items() if n.startswith("memory ")]
    if memory:
        lines += ["", "| memory mode | size | pipeline | s/image | peak GiB |", "|---|---|---|---|---|"]
        for _, result in memory:
            if "variants" not in result:
                lines.append(f"| {result['memory']} | | | {result.get('note', '')} | |")
                continue
            for variant in result["variants"]:
                r = result[variant]
                lines.append(
                    f"| {result['memory']} | {result['size']}² | {variant} | {r['seconds_per_call']:.2f} | "
                    f"{_fmt(r['peak_memory_gib'], '.2f')} |"
                )
    training = sections.get("training sd15 bf16")
    if training:
        run = training["runs"]["cached"]
        lines += [
            "",
            f"Training ({training['preset']} U-Net, {training['size']}², batch {training['batch_size']}, bf16, cached "
            f"latents): {run['steps_per_s']:.2f} steps/s, {run['images_per_s']:.1f} images/s, "
            f"MFU {training['mfu']:.1%}.",
        ]
    for name in data["skipped"]:
        lines.append(f"\nSkipped (time budget): {name}")
    for name, error in data["errors"].items():
        lines.append(f"\nFailed: {name}: {error[:300]}")
    if "xformers" in data:
        lines.append(f"\nxFormers not measured: {data['xformers'][:200]}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.gpu_report``."""
    parser = OneLineParser(prog="python -m eval.gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny presets at 64² (a check of the script, on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per pipeline (default 3; 1 --tiny)")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of fast mode")
    parser.add_argument("--variants", default="default,fast,cached", help="ours to time against stock (all three)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 40)")
    parser.add_argument("--train-batch-size", type=int, default=None, help="training batch (default 8; 2 --tiny)")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps of the memory modes (default 5)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections (names as in the JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the report and print where it is."""
    args = build_parser().parse_args(argv)
    tiny = args.tiny
    for name, full, small in (
        ("steps", 50, 2),
        ("repeats", 3, 1),
        ("train_steps", 40, 2),
        ("train_batch_size", 8, 2),
        ("memory_steps", 5, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)

    def body() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        report = run(args)
        print((args.out / "gpu_report.md").read_text())
        print(args.out / "gpu_report.json")
        if report.data["errors"]:
            print(f"{len(report.data['errors'])} section(s) failed: {', '.join(report.data['errors'])}")

    return run_reporting(body, "the GPU report")


if __name__ == "__main__":
    sys.exit(main())
