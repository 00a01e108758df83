"""Command line text-to-image: ``python -m pipelines.txt2img --model FOLDER --prompt "a red fox in the snow"``.

Writes PNGs to ``--out`` (``00000-<seed>-<prompt slug>.png``, numbering on from the files already there, never
overwriting one) with the generation settings in their PNG text metadata, and prints the path of each image it wrote.
Image ``i`` of a run (counted over all prompts) is drawn with its own ``torch.Generator`` seeded ``seed + i``, so any
image can be made again on its own with ``--seed <its seed> --num-images 1`` and the same other arguments. The noise
is drawn on the CPU, so a seed gives the same starting noise on every device.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import secrets
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import diffusers
import PIL.Image
import torch
import transformers
from diffusers.utils import is_xformers_available
from packaging.version import Version
from PIL.PngImagePlugin import PngInfo

from ldm.attention import ATTENTION_BACKENDS, available_attention_backends
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from pipelines.schedulers import SCHEDULERS, make_scheduler, scheduler_name

logger = logging.getLogger(__name__)

DEFAULT_MODEL: str | None = None
"""The model used when ``--model`` is not given (a folder or Hub id); ``None`` makes ``--model`` required."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_SEED = 2**63 - 1
SLUG_LENGTH = 48
_INDEX_PATTERN = re.compile(r"^(\d+)-")
# diffusers (by 0.42, huggingface/diffusers#14205) renamed from_pretrained's ``torch_dtype`` to ``dtype`` and warns
# on the old name, which older releases need.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``error: ...``) instead of the usage text and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None = None) -> Callable[[str], float]:
    allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {allowed}; got {text!r}") from None
        if not (value >= low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be a number {allowed}; got {text}")
        return value

    return parse


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``txt2img`` argument parser (its errors are one line on stderr, exit status 2)."""
    parser = _Parser(
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
        type=_int_at_least(1),
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
        help="a diffusers pipeline folder (with model_index.json) or a Hub id"
        + (f" (default: {DEFAULT_MODEL})" if DEFAULT_MODEL else " (required)"),
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
        type=_int_at_least(1),
        metavar="N",
        help="condition on the text encoder's hidden states this many layers before the last",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--scheduler", choices=list(SCHEDULERS), help="sampler (default: the one saved with the model)"
    )
    sampling.add_argument(
        "--steps", type=_int_at_least(1), default=50, metavar="N", help="denoising steps (default 50)"
    )
    sampling.add_argument(
        "--guidance-scale",
        type=_float_in(0.0),
        default=7.5,
        metavar="G",
        help="classifier-free guidance; <= 1 disables it (7.5)",
    )
    sampling.add_argument(
        "--guidance-rescale",
        type=_float_in(0.0, 1.0),
        default=0.0,
        metavar="PHI",
        help="guidance rescale phi in [0, 1] (0: off)",
    )
    sampling.add_argument(
        "--eta", type=_float_in(0.0), default=0.0, metavar="ETA", help="DDIM eta (0: deterministic); ddim only"
    )
    sampling.add_argument(
        "--seed",
        type=_seed,
        metavar="N",
        help="seed of the first image; image i gets seed + i (default: a random seed)",
    )
    sampling.add_argument(
        "--num-images", type=_int_at_least(1), default=1, metavar="N", help="images per prompt (default 1)"
    )
    sampling.add_argument(
        "--height", type=_int_at_least(1), metavar="PX", help="image height in pixels (default: the model's)"
    )
    sampling.add_argument(
        "--width", type=_int_at_least(1), metavar="PX", help="image width in pixels (default: the model's)"
    )

    parser.add_argument(
        "--out", type=Path, default=Path("outputs"), metavar="FOLDER", help="output folder (default outputs/)"
    )
    return parser


# ------------------------------------------------------------------------------------------------------- helpers


def read_prompts(path: Path) -> list[str]:
    """The prompts in a text file: one a line, stripped; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: the file is missing, unreadable, not UTF-8, or holds no prompt.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"prompt file {path} does not exist; pass an existing text file to --prompt-file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise ValueError(f"cannot read prompt file {path}: {err.strerror}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts; write one prompt a line ('#' lines are comments)")
    return prompts


def image_seeds(seed: int, num_images: int, start: int = 0) -> list[int]:
    """The seeds of images ``start .. start + num_images - 1`` of a run whose first image has seed ``seed``."""
    return [seed + start + i for i in range(num_images)]


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded with its seed (CPU noise is the same on every device)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def slugify(text: str, max_length: int = SLUG_LENGTH) -> str:
    """A file-name-safe ASCII slug of a prompt: ``"A Fox, (snow:1.2)!"`` -> ``"a-fox-snow-1-2"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


def next_index(folder: Path) -> int:
    """The number after the highest ``NNNNN-`` prefix of the PNGs in ``folder`` (0 for none)."""
    indices = [int(m.group(1)) for p in folder.glob("*.png") if (m := _INDEX_PATTERN.match(p.name))]
    return max(indices, default=-1) + 1


def save_png(image: PIL.Image.Image, folder: Path, index: int, seed: int, metadata: dict[str, str]) -> Path:
    """Write ``image`` as ``<index>-<seed>-<slug of the prompt>.png`` with ``metadata`` as PNG text chunks.

    Never overwrites: a taken name moves on to the next index. Returns the path written.
    """
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    slug = slugify(metadata.get("prompt", ""))
    while True:
        path = folder / f"{index:05d}-{seed}-{slug}.png"
        try:
            with path.open("xb") as file:
                image.save(file, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            index += 1


def batches(items: list[str], size: int) -> Iterator[tuple[int, list[str]]]:
    """``(index of the first item, items)`` for consecutive batches of ``size`` items."""
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda, then mps, then cpu; otherwise the named device, which must be available.

    Raises:
        ValueError: an unknown device name, or a CUDA / MPS device this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:<n> or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices; use cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> float16 on cuda and mps, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return DTYPES[name]


def check_model(model: str) -> None:
    """Cheap checks on ``--model`` before loading: an existing folder must be a diffusers pipeline folder, and a
    name that is clearly a path (absolute, ``./``, ``~``, nested folders) must exist.

    Raises:
        ValueError: naming the fix.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ValueError(
                f"--model {model} is not a diffusers pipeline folder (no model_index.json); pass a folder saved with "
                "save_pretrained, or a Hub id"
            )
        return
    looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) and ".." not in model
    if not looks_like_hub_id or model.startswith((".", "~")):
        raise ValueError(f"--model {model}: no such folder; pass a diffusers pipeline folder or a Hub id")


def load_pipeline(model: str, dtype: torch.dtype) -> LatentDiffusionPipeline:
    """``LatentDiffusionPipeline.from_pretrained`` with safetensors weights where the folder has them.

    Raises:
        ValueError: the model could not be loaded (the message says which model and why).
    """
    path = Path(model).expanduser()
    has_safetensors = path.is_dir() and any(path.rglob("*.safetensors"))
    try:
        with _loading_bars_hidden():
            return LatentDiffusionPipeline.from_pretrained(
                str(path) if path.is_dir() else model,
                use_safetensors=True if has_safetensors else None,
                **{_DTYPE_KWARG: dtype},
            )
    except (OSError, ValueError) as err:
        tried = "" if path.is_dir() else " (no such folder, so it was tried as a Hub id)"
        raise ValueError(
            f"could not load --model {model}{tried}: {err}; pass a diffusers pipeline folder (with model_index.json) "
            "or a Hub id that is downloaded or reachable"
        ) from err


@contextlib.contextmanager
def _loading_bars_hidden() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars, so stderr holds the sampling progress bar (and
    an error is one line); their global switches are restored afterwards."""
    switches = [diffusers.utils.logging, transformers.utils.logging]
    enabled = [switch.is_progress_bar_enabled() for switch in switches]
    for switch in switches:
        switch.disable_progress_bar()
    try:
        yield
    finally:
        for switch, was_enabled in zip(switches, enabled, strict=True):
            if was_enabled:
                switch.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------------- main


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], torch.device]:
    """The checks that need no model; returns the prompts and the device. Errors exit through ``parser.error``."""
    if args.model is None:
        parser.error("--model is required: pass a diffusers pipeline folder or a Hub id")
    if (args.prompt is None) == (args.prompt_file is None):
        parser.error("pass exactly one of --prompt TEXT or --prompt-file FILE")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty; pass the text to draw")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder (it is created if missing)")
    try:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
        device = resolve_device(args.device)
        check_model(args.model)
    except ValueError as err:
        parser.error(str(err))
    if args.attention not in available_attention_backends(device):
        reason = "is not installed (pip install xformers)" if not is_xformers_available() else "needs a CUDA device"
        parser.error(f"--attention xformers: xformers {reason}; use --attention sdpa (or sliced)")
    return prompts, device


def generate(args: argparse.Namespace, prompts: list[str], device: torch.device) -> list[Path]:
    """Load the model, generate ``args.num_images`` images per prompt and save them; returns the paths written."""
    pipe = load_pipeline(args.model, resolve_dtype(args.dtype, device))
    pipe.set_attention_backend(args.attention)
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    metadata = {
        "negative_prompt": args.negative_prompt or "",
        "steps": str(args.steps),
        "guidance_scale": str(args.guidance_scale),
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
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            guidance_rescale=args.guidance_rescale,
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
        prompts, device = _check_args(parser, args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        generate(args, prompts, device)
    except (ValueError, OSError) as err:
        logger.debug("generation failed", exc_info=True)
        message = " ".join(str(err).split())  # library messages can span lines; keep the error on one
        sys.stderr.write(f"error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.exit(main())
