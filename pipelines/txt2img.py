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

from ldm.errors import OneLineParser
from pipelines.cli import build_generation_parser, int_at_least, run_generation_command
from pipelines.generate import TextToImage


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit status: 0, or 2 with one
    ``error: ...`` line for a bad argument, model or input (``--help`` returns 0)."""

    def mode(args: argparse.Namespace) -> TextToImage:
        return TextToImage(height=args.height, width=args.width)

    return run_generation_command(build_parser(), argv, mode)


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("pipelines.generate").setLevel(logging.INFO)
    sys.exit(main())
