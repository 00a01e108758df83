"""CLIP score of images against their prompts: ``100 * max(cos(image embedding, text embedding), 0)``, averaged.

    python -m eval.clip_score --images outputs/ --model open_clip:ViT-B-32-quickgelu:/path/openai_vit_b32.bin
    python -m eval.clip_score --images outputs/ --model clip:runs/clip/clip --out results/clip_score.json

Hessel et al. 2021 ("CLIPScore") define ``CLIP-S = w * max(cos(c, v), 0)`` with w = 2.5; text-to-image papers and
torchmetrics' ``CLIPScore`` use w = 100, as here. Scores depend on the CLIP model: compare only scores of one model.

Prompts come from each PNG's ``prompt`` text chunk (what :mod:`pipelines.txt2img` writes) or, for images without one,
from the folder's captions as training reads them (``metadata.jsonl`` / ``metadata.csv`` rows with ``file_name`` and
``text``, or ``.txt`` side-cars; the first caption of a list): :func:`eval.prompted_images.load_prompted_images`.
Images without a prompt, and unreadable ones, are skipped and counted. Prompts longer than the text tower's context
(77 tokens) are truncated, as torchmetrics does. The model is an open_clip model with local weights
(``open_clip:NAME:FILE``) or a transformers ``CLIPModel`` folder (``clip:FOLDER``, e.g. ``OUT/clip`` of
:mod:`training.train_text_encoder`; a bare folder path means the same).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from common.images import open_rgb
from eval.cli import configure_logging, run_evaluation
from eval.clip_features import TransformersCLIPFeatures
from eval.features import FEATURE_KINDS, FeatureExtractor, load_feature_extractor
from eval.prompted_images import PromptedImages, load_prompted_images, png_prompt
from ldm.errors import OneLineParser, UserError
from pipelines.loading import resolve_device

__all__ = [
    "ImageTextEncoder",
    "PromptedImages",
    "clip_scores",
    "load_clip_model",
    "load_prompted_images",
    "png_prompt",
    "score_images",
]

logger = logging.getLogger(__name__)


class ImageTextEncoder(FeatureExtractor, Protocol):
    """A CLIP model: image features (the :class:`~eval.features.FeatureExtractor` call) and text embeddings."""

    def encode_text(self, texts: list[str]) -> Tensor: ...


def clip_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Per-pair CLIP scores ``100 * max(cos(image_i, text_i), 0)``, shape ``(N,)``, from embeddings ``(N, D)``
    (normalised or not: the cosine normalises them)."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be (N, D); got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    cosine = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cosine.clamp(min=0)


def score_images(
    model: ImageTextEncoder, images: list[Image.Image], prompts: list[str], *, batch_size: int = 32
) -> Tensor:
    """The CLIP score of each image against its prompt, ``(N,)`` float64, ``batch_size`` pairs a call."""
    if len(images) != len(prompts):
        raise UserError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    scores = []
    for start in range(0, len(images), batch_size):
        batch_images, batch_prompts = images[start : start + batch_size], prompts[start : start + batch_size]
        scores.append(clip_scores(model(batch_images), model.encode_text(batch_prompts)))
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def load_clip_model(spec: str, *, device: torch.device | str = "cpu") -> ImageTextEncoder:
    """The CLIP model a ``--model`` spec names: ``open_clip:NAME:FILE``, ``open_clip:local-dir:FOLDER``,
    ``clip:FOLDER`` or a bare folder (read as ``clip:FOLDER``)."""
    if spec.partition(":")[0] not in FEATURE_KINDS and Path(spec).expanduser().is_dir():
        spec = f"clip:{spec}"
    if spec.startswith("inception:"):
        raise UserError("Inception has no text tower; pass --model open_clip:NAME:FILE or clip:FOLDER")
    model = load_feature_extractor(spec, device=device)
    if isinstance(model, TransformersCLIPFeatures) and model.tokenizer is None:
        raise UserError(
            f"--model {spec} is an image tower only; pass a CLIPModel folder (both towers), such as "
            "the OUT/clip folder training.train_text_encoder writes"
        )
    return model


# --------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.clip_score``."""
    parser = OneLineParser(prog="python -m eval.clip_score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of images with prompts (PNG metadata or captions)")
    parser.add_argument("--model", required=True, help="open_clip:NAME:FILE, open_clip:local-dir:DIR or clip:DIR")
    parser.add_argument("--out", type=Path, default=Path("results/clip_score.json"), help="the JSON result")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=None, help="score the first N images with a prompt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """Score the images as ``args`` says; returns the JSON-able result."""
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        raise UserError("--batch-size and --max-images must be >= 1")
    data = load_prompted_images(args.images, max_images=args.max_images)
    model = load_clip_model(args.model, device=resolve_device(args.device))
    files, prompts, scores = [], [], []
    with tqdm(total=len(data.files), desc="CLIP score", unit="img") as bar:
        for start in range(0, len(data.files), args.batch_size):
            images, batch_files, batch_prompts = [], [], []
            for path, prompt in zip(data.files[start : start + args.batch_size], data.prompts[start:]):
                try:
                    images.append(open_rgb(path))
                except Exception as err:  # PIL's decoders raise many types; one bad file must not stop an evaluation
                    logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
                    data.unreadable += 1
                    continue
                batch_files.append(path)
                batch_prompts.append(prompt)
            if images:
                scores += score_images(model, images, batch_prompts, batch_size=len(images)).tolist()
            files += batch_files
            prompts += batch_prompts
            bar.update(min(args.batch_size, len(data.files) - start))
    if not scores:
        raise UserError(f"no readable images with prompts under {args.images}")
    return {
        "clip_score": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "count": len(scores),
        "skipped_no_prompt": data.skipped_no_prompt,
        "unreadable": data.unreadable,
        "model": model.name,
        "images": data.source,
        "definition": "100 * max(cos(image embedding, text embedding), 0), averaged over images",
        "scores": [{"file": str(f), "prompt": p, "score": s} for f, p, s in zip(files, prompts, scores)],
    }


def format_result(result: dict) -> str:
    """The one-line summary the command prints."""
    return (
        f"CLIP score {result['clip_score']:.4f} (std {result['std']:.4f}) over {result['count']} images with "
        f"{result['model']}; {result['skipped_no_prompt']} without a prompt, {result['unreadable']} unreadable"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints one ``error: ...`` line and returns 2."""
    return run_evaluation(build_parser().parse_args(argv), evaluate, format_result)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
