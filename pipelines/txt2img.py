"""Command line text-to-image: ``python -m pipelines.txt2img --model FOLDER --prompt "a red fox in the snow"``.

Writes PNGs to ``--out`` (``00000-<seed>-<prompt slug>.png``, numbering on from the files already there, never
overwriting one) with the generation settings in their PNG text metadata, and prints the path of each image it wrote.
Image ``i`` of a run (counted over all prompts) is drawn with its own ``torch.Generator`` seeded ``seed + i``, so any
image can be made again on its own with ``--seed <its seed> --num-images 1`` and the same other arguments. The noise
is drawn on the CPU, so a seed gives the same starting noise on every device.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

import torch

from ldm.attention import ATTENTION_BACKENDS
from pipelines.cli import (
    DEFAULT_MODEL,
    DTYPES,
    OneLineParser,
    add_guidance_interval_argument,
    batches,
    check_args,
    float_in,
    format_interval,
    generators_for,
    image_seeds,
    int_at_least,
    load_pipeline,
    next_index,
    report_error,
    resolve_dtype,
    save_png,
    seed_arg,
)
from pipelines.schedulers import SCHEDULERS, make_scheduler, scheduler_name

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``txt2img`` argument parser (its errors are one line on stderr, exit status 2)."""
    parser = OneLineParser(
        prog="python -m pipelines.txt2img",
        description="Generate images from text with a latent diffusion model; prints the path of each PNG written.",
    )
    prompts = parser.add_argument_group("prompts (one of --prompt / --prompt-file)")
    prompts.add_argument("--prompt", metavar="TEXT", help="the text to draw; (word:1.3) weights a part")
    prompts.add_argument(
        "--prompt-file",
        type=Path,
        metavar="FILE",
        help="a UTF-8 file with one prompt a line (blank lines and lines starting with '#' are skipped)",
    )
    prompts.add_argument(
        "--negative-prompt", metavar="TEXT", help="what to steer away from (default: the empty prompt)"
    )
    prompts.add_argument(
        "--batch-size",
        type=int_at_least(1),
        metavar="N",
        default=1,
        help="prompts generated together (default 1); prompts longer than 75 tokens are padded to the longest one "
        "in their batch, so batch them alone for images that --num-images 1 reproduces exactly",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="FOLDER_OR_HUB_ID",
        help="a diffusers pipeline folder (with model_index.json) or a Hub id (default: the shipped shapes model, "
        "models/shapes)",
    )
    model.add_argument(
        "--device", default="auto", metavar="DEVICE", help="cuda, cuda:1, mps, cpu, or auto (default: cuda, mps, cpu)"
    )
    model.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights' precision (default auto: float16 on cuda and mps, float32 on cpu)",
    )
    model.add_argument(
        "--attention", choices=ATTENTION_BACKENDS, default="sdpa", help="attention implementation (default sdpa)"
    )
    model.add_argument(
        "--clip-skip",
        type=int_at_least(1),
        metavar="N",
        help="condition on the text encoder's hidden states this many layers before the last",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--scheduler", choices=list(SCHEDULERS), help="sampler (default: the one saved with the model)"
    )
    sampling.add_argument(
        "--steps",
        type=int_at_least(1),
        metavar="N",
        help="denoising steps (default: the model's generation_defaults.json; 50 for Stable Diffusion)",
    )
    sampling.add_argument(
        "--guidance-scale",
        type=float_in(0.0),
        metavar="G",
        help="classifier-free guidance; <= 1 disables it (default: the model's; 7.5 for Stable Diffusion)",
    )
    add_guidance_interval_argument(sampling)
    sampling.add_argument(
        "--guidance-rescale",
        type=float_in(0.0, 1.0),
        default=0.0,
        metavar="PHI",
        help="guidance rescale phi in [0, 1] (0: off)",
    )
    sampling.add_argument(
        "--eta", type=float_in(0.0), default=0.0, metavar="ETA", help="DDIM eta (0: deterministic); ddim only"
    )
    sampling.add_argument(
        "--seed",
        type=seed_arg,
        metavar="N",
        help="seed of the first image; image i gets seed + i (default: a random seed)",
    )
    sampling.add_argument(
        "--num-images", type=int_at_least(1), default=1, metavar="N", help="images per prompt (default 1)"
    )
    sampling.add_argument(
        "--height", type=int_at_least(1), metavar="PX", help="image height in pixels (default: the model's)"
    )
    sampling.add_argument(
        "--width", type=int_at_least(1), metavar="PX", help="image width in pixels (default: the model's)"
    )

    parser.add_argument(
        "--out", type=Path, default=Path("outputs"), metavar="FOLDER", help="output folder (default outputs/)"
    )
    return parser


def generate(args: argparse.Namespace, prompts: list[str], device: torch.device) -> list[Path]:
    """Load the model, generate ``args.num_images`` images per prompt and save them; returns the paths written."""
    pipe = load_pipeline(args.model, resolve_dtype(args.dtype, device))
    pipe.set_attention_backend(args.attention)
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)

    steps, guidance_scale, interval = pipe.sampling_settings(args.steps, args.guidance_scale, args.guidance_interval)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    metadata = {
        "negative_prompt": args.negative_prompt or "",
        "steps": str(steps),
        "guidance_scale": str(guidance_scale),
        "guidance_interval": format_interval(interval),
        "guidance_rescale": str(args.guidance_rescale),
        "eta": str(args.eta),
        "scheduler": scheduler_name(pipe.scheduler),
        "height": str(args.height or pipe.default_size),
        "width": str(args.width or pipe.default_size),
        "model": args.model,
    }
    if args.clip_skip is not None:
        metadata["clip_skip"] = str(args.clip_skip)

    args.out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    num_batches = -(-len(prompts) // args.batch_size)
    for batch_number, (first, batch) in enumerate(batches(prompts, args.batch_size), start=1):
        seeds = image_seeds(seed, len(batch) * args.num_images, start=first * args.num_images)
        if num_batches > 1:
            pipe.set_progress_bar_config(desc=f"batch {batch_number}/{num_batches}")
        images = pipe(
            prompt=batch,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            guidance_rescale=args.guidance_rescale,
            guidance_interval=interval,
            num_images_per_prompt=args.num_images,
            eta=args.eta,
            generator=generators_for(seeds),
            clip_skip=args.clip_skip,
            output_type="pil",
        ).images
        # The pipeline orders images prompt by prompt: [p0 #0, p0 #1, ..., p1 #0, ...], as the seeds are.
        for i, (image, image_seed) in enumerate(zip(images, seeds, strict=True)):
            prompt = batch[i // args.num_images]
            image_metadata = {"prompt": prompt, "seed": str(image_seed), **metadata}
            path = save_png(image, args.out, next_index(args.out), image_seed, image_metadata)
            print(path, flush=True)
            paths.append(path)
    if args.seed is None:
        logger.info("random seed %d (image i of this run has seed %d + i)", seed, seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Argument errors, and the errors the pipeline raises for unusable inputs or a model that does not load, print
    one ``error: ...`` line to stderr and return 2 (``--help`` returns 0) instead of exiting.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        prompts, device = check_args(parser, args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        generate(args, prompts, device)
    except (ValueError, OSError) as err:
        return report_error(err, "generation")
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
