"""Turn a full fine-tuning checkpoint into a pipeline folder, to sample or evaluate a run while it trains.

A checkpoint (``training.checkpoint``) holds the trained models' states, not a pipeline: the frozen parts (the
autoencoder, the tokenizer, the scheduler, an untrained text encoder) are the base model's. This puts the
checkpoint's U-Net, by default its EMA weights, and its trained text encoders into the base pipeline::

    python -m training.export_checkpoint --checkpoint RUN/checkpoints/step-004000 --base RUN_BASE --out OUT

``--base`` is the model the run started from (``--pretrained-model``), or for a run trained from scratch, any pipeline
folder with the same frozen parts (the run's own final one). LoRA, textual-inversion and DreamBooth runs keep their
weights apart: their checkpoints are not exported here (their final folders load with ``--lora``/``--embedding``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.files import atomic_folder
from ldm.errors import OneLineParser, UserError, run_reporting
from pipelines.loading import load_pipeline
from training.checkpoint import read_object_state
from training.checkpoint_folders import read_manifest, require_complete

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    misfits = sorted(own.keys() ^ state.keys()) + [
        k for k in own.keys() & state.keys() if own[k].shape != state[k].shape
    ]
    if misfits:
        raise UserError(
            f"the checkpoint's {what} does not fit the base model's ({len(misfits)} weights missing, extra or of"
            f" another shape, e.g. {misfits[0]}): pass --base the model the run was trained from"
        )
    module.load_state_dict(state)


@torch.no_grad()
def export_checkpoint(checkpoint: str | Path, base: str, ema: bool = True):
    """The base pipeline ``base`` with the trained weights of ``checkpoint``: the U-Net (its EMA weights when the run
    kept an EMA and ``ema`` is true) and every text encoder the run trained. Raises ``UserError`` for an incomplete
    checkpoint, one without a full U-Net (LoRA runs), an EMA of part of the U-Net, or weights that do not fit."""
    checkpoint = Path(checkpoint)
    require_complete(checkpoint, "export", checkpoint.parent)
    objects = read_manifest(checkpoint)["objects"]
    if "unet" not in objects:
        raise UserError(
            f"{checkpoint} holds no full U-Net ({', '.join(objects)}): only full fine-tuning checkpoints export"
        )
    pipe = load_pipeline(base)
    _load(pipe.unet, read_object_state(checkpoint, "unet"), "U-Net")
    if ema and "ema" in objects:
        shadow = read_object_state(checkpoint, "ema")["shadow_params"]
        params = list(pipe.unet.parameters())
        if len(shadow) != len(params) or any(s.shape != p.shape for s, p in zip(shadow, params)):
            raise UserError(f"the EMA of {checkpoint} does not cover the whole U-Net; export it with --no-ema")
        for param, value in zip(params, shadow):
            param.copy_(value)
    for name in TEXT_ENCODERS:
        if name in objects:
            _load(getattr(pipe, name), read_object_state(checkpoint, name), name.replace("_", " "))
    return pipe


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m training.export_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, RUN/checkpoints/step-NNNNNN")
    parser.add_argument("--base", required=True, help="the pipeline the run started from (folder or Hub id)")
    parser.add_argument("--out", required=True, help="the pipeline folder to write (replaced whole if it exists)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="the U-Net's EMA weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        pipe = export_checkpoint(args.checkpoint, args.base, ema=args.ema)
        with atomic_folder(Path(args.out)) as staging:
            pipe.save_pretrained(staging)
        print(args.out)

    return run_reporting(body, "training.export_checkpoint")


if __name__ == "__main__":
    sys.exit(main())
