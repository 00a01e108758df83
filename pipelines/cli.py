"""What the generation commands (txt2img, img2img, inpaint) share: one-line argument errors, argument types, the
flag groups every one of them has, prompt files, and the run from parsed arguments to
:func:`pipelines.generate.generate`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from diffusers.utils import is_xformers_available

from ldm.attention import ATTENTION_BACKENDS, available_attention_backends
from ldm.errors import OneLineParser, UserError, run_reporting
from pipelines.families import require_supported_model
from pipelines.generate import MAX_SEED, GenerationRequest, Mode, SpeedSettings, generate
from pipelines.generation_defaults import check_guidance_interval
from pipelines.loading import DEFAULT_MODEL, DTYPES, Embedding, LoraWeights, ModelSettings, resolve_device
from pipelines.schedulers import ALIASES, SAMPLERS, canonical_name
from pipelines.token_merging import MAX_RATIO as MAX_TOME_RATIO

__all__ = ["DEFAULT_MODEL", "run_generation_command"]


# ------------------------------------------------------------------------------------------------ argument types


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer >= ``minimum``."""

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
    """An ``argparse`` type: a finite number in [low, high] (or >= low; ``inf`` and ``nan`` are refused)."""
    allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {allowed}; got {text!r}") from None
        if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be a number {allowed}; got {text}")
        return value

    return parse


def strength_arg(text: str) -> float:
    """An ``argparse`` type: an img2img / inpainting strength in (0, 1]."""
    value = float_in(0.0, 1.0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be in (0, 1]; 0 would return the image unchanged")
    return value


def interval_arg(text: str) -> tuple[float, float]:
    """An ``argparse`` type: ``LO,HI`` -> ``(lo, hi)`` with 0 <= lo < hi <= 1 (a guidance interval)."""
    try:
        return check_guidance_interval(tuple(float(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI with 0 <= LO < HI <= 1 (0,1: guide every step; 0.5,1: the noisier half); got {text!r}"
        ) from None


def seed_arg(text: str) -> int:
    """An ``argparse`` type: a seed, 0 to 2**63 - 1."""
    value = int_at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1; got {value}")
    return value


def scheduler_arg(text: str) -> str:
    """An ``argparse`` type: a sampler name of :data:`pipelines.schedulers.SAMPLERS` (or an old alias)."""
    try:
        return canonical_name(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def lora_arg(text: str) -> LoraWeights:
    """An ``argparse`` type: ``PATH[:SCALE]`` (a trailing ``:number`` is the scale; default 1)."""
    path, _, scale = text.rpartition(":")
    try:
        return LoraWeights(Path(path), float(scale)) if path else LoraWeights(Path(text))
    except ValueError:
        return LoraWeights(Path(text))


def embedding_arg(text: str) -> Embedding:
    """An ``argparse`` type: ``PATH[:TOKEN]`` (a trailing ``:word`` with no path separator is the token)."""
    path, _, token = text.rpartition(":")
    is_token = path and len(path) > 1 and token and not any(sep in token for sep in "/\\")
    return Embedding(Path(path), token) if is_token else Embedding(Path(text))


# ---------------------------------------------------------------------------------------------------- flag groups


def add_guidance_interval_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--guidance-interval LO,HI`` (default ``None``: the model's), as the generation commands take it."""
    parser.add_argument(
        "--guidance-interval",
        type=interval_arg,
        metavar="LO,HI",
        help="guide only at timesteps t with LO <= t/T <= HI, e.g. 0.5,1 (default: the model's; 0,1 for Stable "
        "Diffusion)",
    )


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt`` / ``--prompt-file``, ``--negative-prompt``, ``--batch-size``, ``--prompt-weighting``,
    ``--long-prompts``."""
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
        "--batch-size", type=int_at_least(1), metavar="N", default=1, help="prompts generated together (default 1)"
    )
    prompts.add_argument(
        "--prompt-weighting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read (word:1.3), (word) and [word] as weights, as AUTOMATIC1111 does (default: on; "
        "--no-prompt-weighting reads the prompt as plain text, as stock diffusers does)",
    )
    prompts.add_argument(
        "--long-prompts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode prompts longer than 75 tokens in 75-token chunks (default: on; --no-long-prompts cuts them to "
        "their first 75 tokens, as stock diffusers does)",
    )


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--attention``, ``--lora`` and ``--embedding``."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=default_model,
        metavar="FOLDER_OR_HUB_ID",
        help="a Stable Diffusion 1.x/2.x diffusers pipeline folder (with model_index.json) or a Hub id (default: "
        "the shipped shapes model, models/shapes)",
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
        "--lora",
        type=lora_arg,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA (.safetensors in diffusers' or kohya's layout, or the folder training wrote) at SCALE "
        "(default 1); repeat for several",
    )
    model.add_argument(
        "--embedding",
        type=embedding_arg,
        action="append",
        default=[],
        metavar="PATH[:TOKEN]",
        help="add a textual-inversion embedding (diffusers' learned_embeds or AUTOMATIC1111's file) as TOKEN "
        "(default: the token in a diffusers file, else the file name); repeat for several",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The sampling flags every generation command has; returns the group, for a command's own sampling flags."""
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--scheduler",
        type=scheduler_arg,
        metavar="NAME",
        help=f"sampler (default: the one saved with the model): {', '.join(SAMPLERS)} (also {', '.join(ALIASES)})",
    )
    sampling.add_argument(
        "--steps",
        type=int_at_least(1),
        metavar="N",
        help="denoising steps (at strength 1) (default: the model's generation_defaults.json; 50 for Stable "
        "Diffusion)",
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
        "--clip-skip",
        type=int_at_least(1),
        metavar="N",
        help="condition on the text encoder's hidden states this many layers before the last (AUTOMATIC1111's "
        "Clip skip N+1)",
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
    return sampling


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fast``, ``--step-cache N`` and ``--tome RATIO``."""
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--fast",
        action="store_true",
        help="fast mode: channels_last weights, fused attention projections and torch.compile of the U-Net and VAE "
        "decoder; the same images up to float rounding. The first image of each size pays the compilation (about a "
        "minute or more on a CPU), cached on disk for the next run (~/.cache/ldm-toolkit/inductor)",
    )
    speed.add_argument(
        "--step-cache",
        type=int_at_least(1),
        metavar="N",
        help="step caching (DeepCache): the full U-Net every N steps, its shallow layers with cached deep features "
        "in between; faster, slightly different images (default, or 1: off; try 3)",
    )
    speed.add_argument(
        "--tome",
        type=float_in(0.0, MAX_TOME_RATIO),
        default=0.0,
        metavar="RATIO",
        help=f"token merging (ToMe for SD, needs pip install tomesd): merge this share of the image tokens before "
        f"self-attention, 0 to {MAX_TOME_RATIO}; faster at large sizes, slightly different images (default 0: off)",
    )


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """``--out``."""
    parser.add_argument(
        "--out", type=Path, default=Path("outputs"), metavar="FOLDER", help="output folder (default outputs/)"
    )


def build_generation_parser(prog: str, description: str) -> tuple[OneLineParser, argparse._ArgumentGroup]:
    """A parser with every shared generation flag; returns it and its sampling group (for a command's own flags)."""
    parser = OneLineParser(prog=prog, description=description)
    add_prompt_arguments(parser)
    add_model_arguments(parser)
    sampling = add_sampling_arguments(parser)
    add_speed_arguments(parser)
    add_output_argument(parser)
    return parser, sampling


# ------------------------------------------------------------------------------------------------------- checks


def read_prompts(path: Path) -> list[str]:
    """The prompts in a text file: one a line, stripped; blank lines and lines starting with ``#`` are skipped.

    Raises:
        UserError: the file is missing, unreadable, not UTF-8, or holds no prompt.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist; pass an existing text file to --prompt-file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {path} is not UTF-8 text ({err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read prompt file {path}: {err.strerror}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts; write one prompt a line ('#' lines are comments)")
    return prompts


def check_args(args: argparse.Namespace) -> list[str]:
    """The checks that need no model weights (the prompts, the output folder, the device, the attention backend,
    the model's family); returns the prompts.

    Raises:
        UserError: naming the fix.
    """
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("pass exactly one of --prompt TEXT or --prompt-file FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; pass the text to draw")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; pass a folder (it is created if missing)")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    device = resolve_device(args.device)
    require_supported_model(args.model)
    if args.attention not in available_attention_backends(device):
        reason = "is not installed (pip install xformers)" if not is_xformers_available() else "needs a CUDA device"
        raise UserError(f"--attention xformers: xformers {reason}; use --attention sdpa (or sliced)")
    return prompts


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The model part of the parsed arguments."""
    return ModelSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        loras=tuple(args.lora),
        embeddings=tuple(args.embedding),
    )


def speed_settings(args: argparse.Namespace) -> SpeedSettings:
    """The speed part of the parsed arguments (``--fast``, ``--step-cache``, ``--tome``)."""
    return SpeedSettings(fast=args.fast, step_cache=args.step_cache, tome=args.tome)


def generation_request(args: argparse.Namespace, prompts: list[str], mode: Mode) -> GenerationRequest:
    """The request the parsed arguments describe."""
    return GenerationRequest(
        prompts=tuple(prompts),
        mode=mode,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        batch_size=args.batch_size,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        guidance_rescale=args.guidance_rescale,
        clip_skip=args.clip_skip,
        eta=args.eta,
        scheduler=args.scheduler,
        seed=args.seed,
        prompt_weighting=args.prompt_weighting,
        long_prompts=args.long_prompts,
        speed=speed_settings(args),
    )


def run_generation_command(
    parser: OneLineParser, argv: list[str] | None, make_mode: Callable[[argparse.Namespace], Mode]
) -> int:
    """Parse ``argv``, check, generate and print each path written; returns the exit status. A bad argument or any
    :class:`~ldm.errors.UserError` is one ``error: ...`` line and status 2; other errors keep their traceback."""
    args = parser.parse_or_status(argv)
    if isinstance(args, int):
        return args

    def body() -> None:
        prompts = check_args(args)
        request = generation_request(args, prompts, make_mode(args))
        generate(request, model_settings(args), args.out, on_saved=lambda path: print(path, flush=True))

    return run_reporting(body, "generation")
