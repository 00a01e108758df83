"""What the generation commands (txt2img, img2img, inpaint, publish) share: one-line argument errors, argument types,
prompt files, per-image seeds, PNGs with metadata, device / dtype choice, and loading a pipeline safely."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
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

from ldm.attention import available_attention_backends
from pipelines.generation_defaults import check_guidance_interval
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL: str = str(Path(__file__).resolve().parents[1] / "models" / "shapes")
"""The model used when ``--model`` is not given: the small shapes model that ships in the repository
(``models/shapes``, trained by ``training/recipes/shapes.sh``)."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_SEED = 2**63 - 1
SLUG_LENGTH = 48
INDEX_PATTERN = re.compile(r"^(\d+)-")
# diffusers (by 0.42, huggingface/diffusers#14205) renamed from_pretrained's ``torch_dtype`` to ``dtype`` and warns
# on the old name, which older releases need.
DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``error: ...``) instead of the usage text and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_or_status(self, argv: list[str] | None) -> argparse.Namespace | int:
        """The parsed arguments, or the exit status (0 for ``--help``, 2 for a bad argument) for a ``main`` that
        returns its status instead of exiting."""
        try:
            return self.parse_args(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 2


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        return value

    return parse


def float_in(low: float, high: float | None = None) -> Callable[[str], float]:
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


def interval_arg(text: str) -> tuple[float, float]:
    """An ``argparse`` type: ``LO,HI`` -> ``(lo, hi)`` with 0 <= lo < hi <= 1 (a guidance interval)."""
    try:
        return check_guidance_interval(tuple(float(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI with 0 <= LO < HI <= 1 (0,1: guide every step; 0.5,1: the noisier half); got {text!r}"
        ) from None


def add_guidance_interval_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--guidance-interval LO,HI`` (default ``None``: the model's), as the generation commands take it."""
    parser.add_argument(
        "--guidance-interval",
        type=interval_arg,
        metavar="LO,HI",
        help="guide only at timesteps t with LO <= t/T <= HI, e.g. 0.5,1 (default: the model's; 0,1 for Stable "
        "Diffusion)",
    )


def format_interval(interval: tuple[float, float]) -> str:
    """``(0.5, 1.0)`` -> ``"0.5,1"``, the form ``interval_arg`` reads (for image metadata)."""
    return ",".join(f"{bound:g}" for bound in interval)


def seed_arg(text: str) -> int:
    value = int_at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1; got {value}")
    return value


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
    indices = [int(m.group(1)) for p in folder.glob("*.png") if (m := INDEX_PATTERN.match(p.name))]
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
        with loading_bars_hidden():
            return LatentDiffusionPipeline.from_pretrained(
                str(path) if path.is_dir() else model,
                use_safetensors=True if has_safetensors else None,
                **{DTYPE_KWARG: dtype},
            )
    except (OSError, ValueError) as err:
        tried = "" if path.is_dir() else " (no such folder, so it was tried as a Hub id)"
        raise ValueError(
            f"could not load --model {model}{tried}: {err}; pass a diffusers pipeline folder (with model_index.json) "
            "or a Hub id that is downloaded or reachable"
        ) from err


@contextlib.contextmanager
def loading_bars_hidden() -> Iterator[None]:
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


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], torch.device]:
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


def report_error(err: Exception, what: str) -> int:
    """Write ``err`` to stderr as one ``error: ...`` line (library messages can span lines; the traceback goes to the
    debug log) and return the exit status 2, for a command's ``main``."""
    logger.debug("%s failed", what, exc_info=err)
    sys.stderr.write(f"error: {' '.join(str(err).split())}\n")
    return 2
