"""Command line inpainting and outpainting.

``python -m pipelines.inpaint --model FOLDER --image in.png --mask mask.png --prompt "..."`` regenerates the white
area of the mask (same size as the image) and keeps the rest; ``--outpaint left=64,right=32`` instead extends the
image by that many pixels per side (``left``, ``right``, ``top``, ``bottom``) and fills the new area. Works with a
plain text-to-image model and with a 9-channel inpainting model; with a plain one ``--resamples 2`` makes the new
area agree with the kept one (RePaint's resampling, 3x the time). Output conventions as ``txt2img`` / ``img2img``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipelines.cli import float_in, int_at_least
from pipelines.img2img import build_parser, load_image, run_edit_command
from pipelines.pipeline_latent_diffusion_edit import LatentDiffusionEditPipeline, outpaint_canvas

logger = logging.getLogger(__name__)

OUTPAINT_SIDES = ("left", "right", "top", "bottom")


def parse_outpaint(text: str) -> dict[str, int]:
    """``"left=64,right=32"`` -> ``{"left": 64, "right": 32}`` (pixels to add per side)."""
    sides: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in OUTPAINT_SIDES or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"expected SIDE=PIXELS[,SIDE=PIXELS...] with SIDE in {', '.join(OUTPAINT_SIDES)}; got {part!r}"
            )
        sides[name] = int(value)
    if not any(sides.values()):
        raise argparse.ArgumentTypeError(f"add at least one pixel on some side; got {text!r}")
    return sides


def build_inpaint_parser() -> argparse.ArgumentParser:
    """``img2img``'s arguments plus ``--mask`` / ``--outpaint`` and ``--mask-blur``."""
    parser = build_parser(
        "python -m pipelines.inpaint",
        "Regenerate the masked area of an image, or extend it (outpainting); prints the path of each PNG written.",
        default_strength=1.0,
    )
    area = parser.add_argument_group("area to regenerate (one of --mask / --outpaint)")
    area.add_argument("--mask", type=Path, metavar="FILE", help="a mask of the image's size: white = regenerate")
    area.add_argument(
        "--outpaint", type=parse_outpaint, metavar="SIDE=PX,...", help="extend the image, e.g. left=64,bottom=32"
    )
    area.add_argument(
        "--mask-blur", type=float_in(0.0), default=0.0, metavar="PX", help="feather the final blend (px, default 0)"
    )
    area.add_argument(
        "--resamples",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="redo each step N more times from its re-noised result (RePaint) so the new area matches the kept one; "
        "costs (1 + N) x the time; text-to-image models with DDIM or DDPM (default 0)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``inpaint`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 for bad arguments)."""
    parser = build_inpaint_parser()

    def inputs(args: argparse.Namespace) -> Callable:
        if (args.mask is None) == (args.outpaint is None):
            parser.error("pass exactly one of --mask FILE or --outpaint SIDE=PX,...")
        common = {"mask_blur": str(args.mask_blur), "resamples": str(args.resamples)}
        if args.mask is not None:
            try:
                mask = load_image(args.mask, mode="L", what="mask (white = regenerate)")
            except ValueError as err:
                parser.error(str(err))
            return lambda pipe: (args.input_image, mask, {"mask": str(args.mask), **common})

        def outpaint(pipe: LatentDiffusionEditPipeline) -> tuple:
            canvas, mask = outpaint_canvas(args.input_image, **args.outpaint, multiple=pipe.vae_scale_factor)
            spec = ",".join(f"{side}={px}" for side, px in args.outpaint.items())
            return canvas, mask, {"outpaint": spec, **common}

        return outpaint

    return run_edit_command(parser, argv, inputs)


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
