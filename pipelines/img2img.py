"""Command line img2img (SDEdit): ``python -m pipelines.img2img --model FOLDER --image in.png --prompt "..."``.

Redraws an image with a prompt; ``--strength`` (0, 1] says how much of it is redone (low keeps the layout). The
output conventions are ``txt2img``'s: PNGs numbered on in ``--out`` with their settings as PNG text metadata, image
``i`` of a run drawn with seed ``seed + i``, the paths written printed, and a bad argument stopping with one line.
The parser and the generation loop here are shared with ``python -m pipelines.inpaint``.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import torch

from ldm.attention import ATTENTION_BACKENDS
from pipelines.cli import (
    DEFAULT_MODEL,
    DTYPES,
    OneLineParser,
    add_guidance_interval_argument,
    check_args,
    float_in,
    format_interval,
    generators_for,
    image_seeds,
    int_at_least,
    load_pipeline,
    next_index,
    resolve_dtype,
    save_png,
    seed_arg,
)
from pipelines.pipeline_latent_diffusion_edit import LatentDiffusionEditPipeline
from pipelines.schedulers import SCHEDULERS, make_scheduler, scheduler_name

logger = logging.getLogger(__name__)


def _strength(text: str) -> float:
    value = float_in(0.0, 1.0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be in (0, 1]; 0 would return the image unchanged")
    return value


def build_parser(prog: str, description: str, default_strength: float) -> argparse.ArgumentParser:
    """The arguments common to the editing commands (errors are one line on stderr, exit status 2)."""
    parser = OneLineParser(prog=prog, description=description)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--image", type=Path, required=True, metavar="FILE", help="the image to edit (PNG, JPEG, ...)")
    inputs.add_argument("--prompt", required=True, metavar="TEXT", help="what the result should show")
    inputs.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (default: none)")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="FOLDER_OR_HUB_ID",
        help="a diffusers pipeline folder (with model_index.json) or a Hub id (default: the shipped shapes model)",
    )
    model.add_argument("--device", default="auto", metavar="DEVICE", help="cuda, cuda:1, mps, cpu, or auto")
    model.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weights' precision")
    model.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa", help="attention implementation")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--strength",
        type=_strength,
        default=default_strength,
        metavar="S",
        help=f"fraction of the denoising redone, in (0, 1] (default {default_strength})",
    )
    sampling.add_argument("--scheduler", choices=list(SCHEDULERS), help="sampler (default: the model's)")
    sampling.add_argument(
        "--steps", type=int_at_least(1), metavar="N", help="steps at strength 1 (default: the model's; SD: 50)"
    )
    sampling.add_argument(
        "--guidance-scale", type=float_in(0.0), metavar="G", help="guidance (default: the model's; SD: 7.5)"
    )
    add_guidance_interval_argument(sampling)
    sampling.add_argument("--eta", type=float_in(0.0), default=0.0, metavar="ETA", help="DDIM eta (0)")
    sampling.add_argument("--seed", type=seed_arg, metavar="N", help="seed of the first image; image i gets seed + i")
    sampling.add_argument("--num-images", type=int_at_least(1), default=1, metavar="N", help="images (default 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), metavar="FOLDER", help="output folder")
    return parser


def load_image(path: Path, mode: str = "RGB", what: str = "image") -> PIL.Image.Image:
    """The image at ``path`` converted to ``mode`` (``"L"`` for a mask); ``what`` names it in errors.

    Raises:
        ValueError: the file is missing or not an image.
    """
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist; pass an existing image file") from None
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise ValueError(f"cannot read {what} {path} ({err}); pass a PNG or JPEG file") from None


def check_edit_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """txt2img's checks (model, prompt, output folder, device, attention) plus a readable ``--image``."""
    args.prompt_file = None
    _, device = check_args(parser, args)
    try:
        args.input_image = load_image(args.image)
    except ValueError as err:
        parser.error(str(err))
    return device


def edit(
    args: argparse.Namespace,
    device: torch.device,
    inputs: Callable[[LatentDiffusionEditPipeline], tuple[PIL.Image.Image, PIL.Image.Image | None, dict[str, str]]],
) -> list[Path]:
    """Load the model, edit ``args.num_images`` times and save the PNGs; returns the paths written.

    ``inputs(pipe)`` returns the image, the mask (``None`` for img2img) and extra metadata.
    """
    pipe = load_pipeline(args.model, resolve_dtype(args.dtype, device))
    pipe = LatentDiffusionEditPipeline.sharing(pipe)
    steps, guidance_scale, interval = pipe.sampling_settings(args.steps, args.guidance_scale, args.guidance_interval)
    pipe.set_attention_backend(args.attention)
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)
    image, mask, extra = inputs(pipe)

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    seeds = image_seeds(seed, args.num_images)
    images = pipe(
        prompt=args.prompt,
        image=image,
        mask_image=mask,
        strength=args.strength,
        negative_prompt=args.negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        guidance_interval=interval,
        num_images_per_prompt=args.num_images,
        eta=args.eta,
        generator=generators_for(seeds),
        output_type="pil",
        mask_blur=getattr(args, "mask_blur", 0.0),
        resamples=getattr(args, "resamples", 0),
    ).images
    metadata = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "image": str(args.image),
        "strength": str(args.strength),
        "steps": str(steps),
        "guidance_scale": str(guidance_scale),
        "guidance_interval": format_interval(interval),
        "eta": str(args.eta),
        "scheduler": scheduler_name(pipe.scheduler),
        "height": str(image.height),
        "width": str(image.width),
        "model": args.model,
        **extra,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for result, image_seed in zip(images, seeds, strict=True):
        path = save_png(result, args.out, next_index(args.out), image_seed, {**metadata, "seed": str(image_seed)})
        print(path, flush=True)
        paths.append(path)
    if args.seed is None:
        logger.info("random seed %d (image i of this run has seed %d + i)", seed, seed)
    return paths


def run_edit_command(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    inputs: Callable[[argparse.Namespace], Callable],
) -> int:
    """Parse, check, edit; argument and pipeline errors print one ``error: ...`` line and return 2."""
    try:
        args = parser.parse_args(argv)
        device = check_edit_args(parser, args)
        make_inputs = inputs(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        edit(args, device, make_inputs)
    except (ValueError, OSError) as err:
        logger.debug("editing failed", exc_info=True)
        sys.stderr.write(f"error: {' '.join(str(err).split())}\n")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``img2img`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 for bad arguments)."""
    parser = build_parser(
        "python -m pipelines.img2img",
        "Redraw an image with a prompt (SDEdit); prints the path of each PNG written.",
        default_strength=0.8,
    )

    def inputs(args: argparse.Namespace) -> Callable:
        return lambda pipe: (args.input_image, None, {})

    return run_edit_command(parser, argv, inputs)


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
