"""Convert between diffusers folders and the one-file formats other Stable Diffusion tools use.

``python -m pipelines.convert --model DIR --to-single-file OUT.safetensors`` writes the pipeline as one checkpoint
in its family's original key layout, SD 1.x or SDXL (AUTOMATIC1111, ComfyUI); ``--from-single-file FILE --config
DIR --out DIR`` turns such a checkpoint back into a diffusers folder of ``--config``'s family (the architecture,
tokenizer and scheduler come from ``--config``, a folder or Hub id of the same architecture); ``--model DIR --lora
FILE --to-kohya-lora OUT.safetensors`` rewrites a diffusers LoRA (as ``training.train_text_to_image --lora-rank``
writes it) in kohya's layout. Files are written complete or not at all; the paths written are printed; a bad
argument stops with one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError

from ldm.errors import OneLineParser, UserError, check_writable_folder, run_reporting
from pipelines.families import require_supported_model, single_file_family, text_to_image_pipeline
from pipelines.kohya_lora import export_kohya_lora
from pipelines.loading import DTYPES, loading_bars_hidden
from pipelines.publish import load_for_publishing
from pipelines.single_file import SAFETENSORS_SUFFIX, check_checkpoint_format, export_single_file

logger = logging.getLogger(__name__)

LOAD_ERRORS = (OSError, ValueError, KeyError, SingleFileComponentError)
# mode flag -> (the arguments it needs, the ones it also takes)
MODE_ARGUMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "--to-single-file": (("--model",), ("--dtype",)),
    "--from-single-file": (("--config", "--out"), ()),
    "--to-kohya-lora": (("--model", "--lora"), ()),
}
OPTION_FLAGS = ("--model", "--config", "--out", "--lora", "--dtype")


class ConvertError(UserError):
    """A conversion step failed; the message says what and what to do."""


def _load_model(model: Path, allow_pickle: bool) -> DiffusionPipeline:
    """The ``--model`` folder's pipeline, from safetensors weights (pickle ones only with ``allow_pickle``).

    Raises:
        UserError: no such folder, a model of an unsupported family, pickle weights without ``allow_pickle``.
    """
    with loading_bars_hidden():
        return load_for_publishing(model, allow_pickle)


def _new_file(path: Path, flag: str) -> None:
    """``path`` must name a new ``.safetensors`` file, so nothing is overwritten by mistake."""
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ConvertError(f"{flag} {path} must end in {SAFETENSORS_SUFFIX} (weights are written as safetensors)")
    if path.exists():
        raise ConvertError(f"{flag} {path} exists; pass a new file name (or remove the old file)")
    check_writable_folder(path.parent, f"{flag} {path}: its folder")


def _check_format(path: Path, allow_pickle: bool) -> None:
    """The pickle gate, as a :class:`ConvertError`."""
    try:
        check_checkpoint_format(path, allow_pickle)
    except ValueError as err:
        raise ConvertError(str(err)) from None


def to_single_file(model: Path, out: Path, dtype: torch.dtype | None, allow_pickle: bool) -> Path:
    """Write the pipeline folder ``model`` as one original-layout checkpoint ``out``; returns ``out``."""
    _new_file(out, "--to-single-file")
    pipe = _load_model(model, allow_pickle)
    try:
        return export_single_file(pipe, out, dtype=dtype)
    except ValueError as err:
        raise ConvertError(f"cannot write --model {model} as a single file: {err}") from err


def from_single_file(file: Path, config: str, out: Path, allow_pickle: bool) -> Path:
    """Load the checkpoint ``file`` with the architecture of ``config`` and save it as the diffusers folder ``out``
    (safetensors), written under a temporary name and renamed into place; returns ``out``."""
    if not file.is_file():
        raise ConvertError(f"--from-single-file {file}: no such file; pass a .safetensors checkpoint")
    config_path = Path(config).expanduser()
    if config_path.exists() and not (config_path / "model_index.json").is_file():
        raise ConvertError(
            f"--config {config} is not a diffusers pipeline folder (no model_index.json); pass the folder or Hub id "
            "of a model with the checkpoint's architecture"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} exists and is not an empty folder; pass a new folder")
    _check_format(file, allow_pickle)
    pipeline_class = text_to_image_pipeline(require_supported_model(config, flag="--config"))
    if file.suffix == SAFETENSORS_SUFFIX:
        single_file_family(file)
    try:
        with loading_bars_hidden():
            pipe = pipeline_class.from_single_file(
                str(file), config=str(config_path) if config_path.exists() else config, allow_pickle=allow_pickle
            )
    except LOAD_ERRORS as err:
        raise ConvertError(
            f"could not load --from-single-file {file} with the architecture of --config {config} ({err}); pass the "
            "config folder of the model the checkpoint was made from"
        ) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()  # checked empty above; a directory rename cannot replace it on every platform
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def to_kohya_lora(model: Path, lora: Path, out: Path, allow_pickle: bool) -> Path:
    """Load the diffusers LoRA ``lora`` into the pipeline ``model`` and write it in kohya's layout to ``out``."""
    _new_file(out, "--to-kohya-lora")
    if not lora.is_file():
        raise ConvertError(f"--lora {lora}: no such file; pass a LoRA .safetensors file (pytorch_lora_weights...)")
    _check_format(lora, allow_pickle)
    pipe = _load_model(model, allow_pickle)
    try:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    except LOAD_ERRORS as err:
        raise ConvertError(
            f"could not load --lora {lora} into --model {model} ({err}); pass a LoRA of this model"
        ) from err
    try:
        return export_kohya_lora(pipe, out)
    except ValueError as err:
        raise ConvertError(f"cannot write --lora {lora} in kohya's layout: {err}") from err


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> OneLineParser:
    """The ``convert`` argument parser (errors: one line on stderr, exit status 2)."""
    parser = OneLineParser(prog="python -m pipelines.convert", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--to-single-file", type=Path, metavar="OUT", help="write --model as one original-layout file")
    mode.add_argument(
        "--from-single-file", type=Path, metavar="FILE", help="turn a single file into a diffusers folder"
    )
    mode.add_argument("--to-kohya-lora", type=Path, metavar="OUT", help="write --lora in kohya's LoRA layout")
    parser.add_argument("--model", type=Path, metavar="FOLDER", help="a diffusers pipeline folder")
    parser.add_argument("--config", metavar="FOLDER_OR_HUB_ID", help="with --from-single-file: its architecture")
    parser.add_argument("--out", type=Path, metavar="FOLDER", help="with --from-single-file: the folder to write")
    parser.add_argument("--lora", type=Path, metavar="FILE", help="with --to-kohya-lora: a diffusers LoRA file")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="with --to-single-file: cast the weights (default: keep)"
    )
    parser.add_argument("--allow-pickle", action="store_true", help="accept .bin/.ckpt weights (they can run code)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The checks that need no file: a mode and the arguments it takes; returns the mode's flag. Errors exit through
    ``parser.error``."""
    chosen = [flag for flag in MODE_ARGUMENTS if getattr(args, _dest(flag)) is not None]
    if not chosen:
        parser.error(f"pass one of {', '.join(MODE_ARGUMENTS)}")
    needs, takes = MODE_ARGUMENTS[chosen[0]]
    for flag in needs:
        if getattr(args, _dest(flag)) is None:
            parser.error(f"{chosen[0]} needs {flag}")
    for flag in OPTION_FLAGS:
        if getattr(args, _dest(flag)) is not None and flag not in (*needs, *takes):
            parser.error(f"{flag} does not apply to {chosen[0]}; leave it out")
    return chosen[0]


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; prints the path written. Errors: one line, exit status 2."""
    parser = build_parser()
    args = parser.parse_or_status(argv)
    if isinstance(args, int):
        return args
    try:
        mode = check_args(parser, args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2

    def body() -> None:
        if mode == "--to-single-file":
            dtype = DTYPES[args.dtype] if args.dtype else None
            written = to_single_file(args.model, args.to_single_file, dtype, args.allow_pickle)
        elif mode == "--from-single-file":
            written = from_single_file(args.from_single_file, args.config, args.out, args.allow_pickle)
        else:
            written = to_kohya_lora(args.model, args.lora, args.to_kohya_lora, args.allow_pickle)
        print(written, flush=True)

    return run_reporting(body, "conversion")


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    sys.exit(main())
