"""Command line inpainting and outpainting.

``python -m pipelines.inpaint --model FOLDER --image in.png --mask mask.png --prompt "..."`` regenerates the white
area of the mask (same size as the image) and keeps the rest; ``--outpaint left=64,right=32`` instead extends the
image by that many pixels per side (``left``, ``right``, ``top``, ``bottom``) and fills the new area. Works with a
plain text-to-image model and with a 9-channel inpainting model; with a plain one ``--resamples 2`` makes the new
area agree with the kept one (RePaint's resampling, 3x the time). The unmasked pixels are pasted back from the
original unless ``--no-keep-unmasked-pixels`` (then the whole image is the decoded one, as stock diffusers returns
it). Every other flag and output convention is ``txt2img``'s.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.errors import OneLineParser, UserError
from pipelines.cli import float_in, int_at_least
from pipelines.cli import run_generation_command as run
from pipelines.generate import OUTPAINT_SIDES, Inpaint, Outpaint
from pipelines.img2img import build_edit_parser, load_image
from pipelines.pipeline_inpaint import INPAINT_STRENGTH


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


def build_parser() -> OneLineParser:
    """``img2img``'s arguments plus ``--mask`` / ``--outpaint`` and how the new area is blended in."""
    parser = build_edit_parser(
        "python -m pipelines.inpaint",
        "Regenerate the masked area of an image, or extend it (outpainting); prints the path of each PNG written.",
        default_strength=INPAINT_STRENGTH,
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
    area.add_argument(
        "--keep-unmasked-pixels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="paste the original pixels back outside the mask (default: on; --no-keep-unmasked-pixels returns the "
        "decoded image everywhere, as stock diffusers does)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``inpaint`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 for bad arguments)."""

    def mode(args: argparse.Namespace) -> Inpaint | Outpaint:
        if (args.mask is None) == (args.outpaint is None):
            raise UserError("pass exactly one of --mask FILE or --outpaint SIDE=PX,...")
        image = load_image(args.image)
        blend = {"mask_blur": args.mask_blur, "resamples": args.resamples}
        blend |= {"keep_unmasked_pixels": args.keep_unmasked_pixels, "source": str(args.image)}
        if args.outpaint is not None:
            return Outpaint(image, args.outpaint, **blend)
        mask = load_image(args.mask, mode="L", what="mask (white = regenerate)")
        return Inpaint(image, mask, strength=args.strength, mask_source=str(args.mask), **blend)

    return run(build_parser(), argv, mode)


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("pipelines.generate").setLevel(logging.INFO)
    logging.getLogger("pipelines.fast_mode").setLevel(logging.INFO)  # compile time, apart from the images
    sys.exit(main())
