"""Command line text-to-image: ``python -m pipelines.txt2img --model FOLDER --prompt "a red fox in the snow"``.

Writes PNGs to ``--out`` (``00000-<seed>-<prompt slug>.png``, numbering on from the files already there, never
overwriting one) with the generation settings in their PNG text metadata (and an AUTOMATIC1111-style ``parameters``
chunk), and prints the path of each image it wrote. Image ``i`` of a run (counted over all prompts) is drawn with its
own ``torch.Generator`` seeded ``seed + i``, so any image can be made again on its own with ``--seed <its seed>
--num-images 1`` and the same other arguments. The noise is drawn on the CPU, so a seed gives the same starting noise
on every device. The generation itself is :func:`pipelines.generate.generate`, shared with ``img2img``, ``inpaint``
and the web app.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.errors import OneLineParser, UserError
from pipelines.cli import build_generation_parser, int_at_least, run_generation_command
from pipelines.generate import TextToImage
from pipelines.hires import UPSCALES, HiresFix


def build_parser() -> OneLineParser:
    """The ``txt2img`` argument parser (its errors are one line on stderr, exit status 2)."""
    parser, sampling = build_generation_parser(
        "python -m pipelines.txt2img",
        "Generate images from text with a latent diffusion model; prints the path of each PNG written.",
    )
    sampling.add_argument(
        "--height", type=int_at_least(1), metavar="PX", help="image height in pixels (default: the model's)"
    )
    sampling.add_argument(
        "--width", type=int_at_least(1), metavar="PX", help="image width in pixels (default: the model's)"
    )
    hires = parser.add_argument_group("hires fix (a base pass at --height x --width, upscaled, then img2img)")
    hires.add_argument(
        "--hires-scale", type=float, metavar="X", help="turn the hires fix on: the final image is X times larger"
    )
    hires.add_argument(
        "--hires-strength", type=float, metavar="S", help=f"img2img strength of the pass (default {HiresFix.strength})"
    )
    hires.add_argument(
        "--hires-upscale", choices=UPSCALES, help=f"resize the latents or the pixels (default {HiresFix.upscale})"
    )
    hires.add_argument(
        "--hires-steps", type=int_at_least(1), metavar="N", help="sampling steps of the pass (default: --steps)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit status: 0, or 2 with one
    ``error: ...`` line for a bad argument, model or input (``--help`` returns 0)."""

    def mode(args: argparse.Namespace) -> TextToImage:
        settings = {"strength": args.hires_strength, "upscale": args.hires_upscale, "steps": args.hires_steps}
        given = {name: value for name, value in settings.items() if value is not None}
        if args.hires_scale is None:
            if given:
                raise UserError(f"--hires-{next(iter(given))} is a setting of the hires fix; add --hires-scale X")
            return TextToImage(height=args.height, width=args.width)
        hires = HiresFix(args.hires_scale, **given)
        return TextToImage(height=args.height, width=args.width, hires=hires)

    return run_generation_command(build_parser(), argv, mode)


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("pipelines.generate").setLevel(logging.INFO)
    logging.getLogger("pipelines.fast_mode").setLevel(logging.INFO)  # compile time, apart from the images
    sys.exit(main())
