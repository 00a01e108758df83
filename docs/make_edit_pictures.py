"""Make the README's editing pictures with the shipped model: ``python docs/make_edit_pictures.py``.

Renders the inputs with the training data's renderer, runs the ``img2img`` and ``inpaint`` commands exactly as the
README shows them, and writes ``docs/edit/*.png``: the inputs, and one before / (mask) / after strip per command
(inpainting: after without and with ``--resamples 2``; a second object painted in beside a kept one), enlarged 4x
with nearest-neighbour so the 64x64 pixels stay visible.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import img2img, inpaint  # noqa: E402
from shapes.pairs import canonical_pair  # noqa: E402
from shapes.world import canonical_scene  # noqa: E402

OUT = REPO / "docs" / "edit"
SCALE = 4


def run(main, argv: list[str]) -> Path:
    """Run a command's ``main`` and return the one image path it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if main(argv) != 0:
            raise SystemExit(f"failed: {argv}")
    return Path(printed.getvalue().split()[-1])


def strip(images: list[Image.Image], path: Path) -> Path:
    """The images side by side (each enlarged ``SCALE`` times, 4 px apart on white)."""
    big = [im.convert("RGB").resize((im.width * SCALE, im.height * SCALE), Image.NEAREST) for im in images]
    canvas = Image.new("RGB", (sum(b.width for b in big) + 4 * (len(big) - 1), max(b.height for b in big)), "white")
    x = 0
    for b in big:
        canvas.paste(b, (x, 0))
        x += b.width + 4
    canvas.save(path)
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    circle = OUT / "red_circle_left.png"
    canonical_scene("red", "circle", "left").save(circle)
    square = OUT / "red_square_left.png"
    canonical_scene("red", "square", "left").save(square)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask_path = OUT / "mask_left_half.png"
    mask.save(mask_path)
    lone = OUT / "red_circle_alone.png"
    canonical_pair(("red", "circle"), "left_of", ("blue", "square"), first_only=True).save(lone)
    right_mask = Image.new("L", (64, 64), 0)
    right_mask.paste(255, (32, 0, 64, 64))
    right_mask_path = OUT / "mask_right_half.png"
    right_mask.save(right_mask_path)
    half = OUT / "green_triangle_half.png"
    canonical_scene("green", "triangle", "left").crop((0, 0, 32, 64)).save(half)
    work = OUT / "outputs"

    changed = run(
        img2img.main,
        [
            "--image",
            str(circle),
            "--prompt",
            "a blue circle on the left",
            "--strength",
            "0.8",
            "--seed",
            "0",
            "--out",
            str(work),
        ],
    )
    painted = [
        run(
            inpaint.main,
            [
                "--image",
                str(square),
                "--mask",
                str(mask_path),
                "--prompt",
                "a blue triangle on the left",
                "--seed",
                "0",
                "--out",
                str(work),
                *resampling,
            ],
        )
        for resampling in ([], ["--resamples", "2"])
    ]
    second = run(
        inpaint.main,
        [
            "--image",
            str(lone),
            "--mask",
            str(right_mask_path),
            "--prompt",
            "a red circle to the left of a blue square",
            "--seed",
            "0",
            "--out",
            str(work),
        ],
    )
    extended = run(
        inpaint.main,
        [
            "--image",
            str(half),
            "--outpaint",
            "right=32",
            "--prompt",
            "a green triangle on the left",
            "--seed",
            "0",
            "--out",
            str(work),
        ],
    )
    print(strip([Image.open(circle), Image.open(changed)], OUT / "img2img.png"))
    print(strip([Image.open(path) for path in (square, mask_path, *painted)], OUT / "inpaint.png"))
    print(strip([Image.open(path) for path in (lone, right_mask_path, second)], OUT / "second_object.png"))
    print(strip([Image.open(half), Image.open(extended)], OUT / "outpaint.png"))
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
