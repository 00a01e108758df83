"""Command line img2img (SDEdit): ``python -m pipelines.img2img --model FOLDER --image in.png --prompt "..."``.

Redraws an image with a prompt; ``--strength`` (0, 1] says how much of it is redone (low keeps the layout). Every
flag and output convention of ``txt2img`` applies (the generation is :func:`pipelines.generate.generate`): PNGs
numbered on in ``--out`` with their settings as PNG text metadata, image ``i`` of a run drawn with seed ``seed + i``,
the paths written printed, and a bad argument stopping with one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import PIL.Image

from ldm.errors import OneLineParser, UserError
from pipelines.cli import build_generation_parser, run_generation_command, strength_arg
from pipelines.generate import ImageToImage
from pipelines.pipeline_img2img import IMG2IMG_STRENGTH


def load_image(path: Path, mode: str = "RGB", what: str = "image") -> PIL.Image.Image:
    """The image at ``path`` converted to ``mode`` (``"L"`` for a mask); ``what`` names it in errors.

    Raises:
        UserError: the file is missing or not an image.
    """
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; pass an existing image file") from None
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise UserError(f"cannot read {what} {path} ({err}); pass a PNG or JPEG file") from None


def build_edit_parser(prog: str, description: str, default_strength: float) -> OneLineParser:
    """``txt2img``'s flags (less the size: the image sets it) plus ``--image`` and ``--strength``."""
    parser, sampling = build_generation_parser(prog, description)
    parser.add_argument("--image", type=Path, required=True, metavar="FILE", help="the image to edit (PNG, JPEG, ...)")
    sampling.add_argument(
        "--strength",
        type=strength_arg,
        default=default_strength,
        metavar="S",
        help=f"fraction of the denoising redone, in (0, 1] (default {default_strength})",
    )
    return parser


def build_parser() -> OneLineParser:
    """The ``img2img`` argument parser (errors are one line on stderr, exit status 2)."""
    return build_edit_parser(
        "python -m pipelines.img2img",
        "Redraw an image with a prompt (SDEdit); prints the path of each PNG written.",
        default_strength=IMG2IMG_STRENGTH,
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``img2img`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 for bad arguments)."""

    def mode(args: argparse.Namespace) -> ImageToImage:
        return ImageToImage(load_image(args.image), strength=args.strength, source=str(args.image))

    return run_generation_command(build_parser(), argv, mode)


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("pipelines.generate").setLevel(logging.INFO)
    logging.getLogger("pipelines.fast_mode").setLevel(logging.INFO)  # compile time, apart from the images
    sys.exit(main())
