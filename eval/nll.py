"""The DDPM variational bound of a pipeline's U-Net on held-out images, in bits per latent dimension.

    python -m eval.nll --model runs/my-model/pipeline --data held_out/ --num-images 64 --timesteps-stride 10
    python -m eval.nll --model DIR --data held_out/ --unconditional --out results/nll_uncond.json

Each image is resized and centre-cropped to the model's resolution (``--resolution``), encoded with the pipeline's
VAE (the posterior mean times ``scaling_factor``: the latent the U-Net was trained on, without the encoder's
sampling noise) and its caption with the pipeline's text encoder (``--unconditional``: the empty prompt, the
unconditional branch of classifier-free guidance). The bound is DDPM eq. 5 computed by
:func:`ldm.likelihood.variational_bound_bpd`: the prior term L_T, the denoising KLs L_t (t = 1 .. T-1) and the
decoder term L_0, with the fixed model variance ``--model-variance`` and a *continuous* Gaussian decoder. Latents
are not quantised, so the number is a bound on a differential entropy per latent dimension (it can be negative): it
compares only models that share the same VAE and scaling factor, and it is not the pixel bits/dim that pixel-space
models report.

**Estimator.** The exact bound costs T U-Net calls per batch (T = 1000 for Stable Diffusion's schedule). With
``--timesteps-stride K > 1`` the prior and L_0 are still computed exactly and the T - 1 denoising terms are estimated
by systematic sampling: one offset u is drawn uniformly from {0, ..., K-1} (from ``--seed``), the terms at t = 1 + u,
1 + u + K, 1 + u + 2K, ... are evaluated and each counts K times. Every t is sampled with probability 1/K, so the
estimate is unbiased over the offset (averaging it over all K offsets gives the exact sum); its extra variance is
small because L_t changes slowly with t. With K = 1 every term is evaluated and the bound is exact (each term is
still a single-sample Monte Carlo estimate at x_t ~ q(x_t | x_0), as in improved-diffusion's ``calc_bpd_loop``).

Writes the JSON result and a PNG plot of the mean per-timestep terms beside it (same name, ``.png``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.images import list_image_files
from common.plots import line_chart
from eval.cli import configure_logging, run_evaluation
from ldm.diffusion import PredictionType
from ldm.errors import OneLineParser, UserError
from ldm.likelihood import ModelVariance, variational_bound_bpd
from pipelines import LatentDiffusionPipeline
from pipelines.loading import load_pipeline, resolve_device
from training.data import ImageCaptionDataset, collate
from training.record_formats import ImageCaptionRecord, ImageCaptionRecords
from training.records import load_image_caption_records

__all__ = [
    "StridedBound",
    "conditioned_unet",
    "encode_latents",
    "pipeline_bound",
    "plot_terms_png",
    "strided_timesteps",
    "strided_variational_bound_bpd",
]

logger = logging.getLogger(__name__)

LATENT_NOTE = (
    "bits per latent dimension with a continuous Gaussian decoder: a bound on the differential entropy of the VAE's "
    "latents (it can be negative); it compares only models that share this VAE and scaling factor, and is not the "
    "pixel bits/dim of pixel-space models"
)


@dataclass(frozen=True)
class StridedBound:
    """The variational bound per sample, in bits per dimension, with the denoising terms that were evaluated."""

    total_bpd: Tensor  # (B,): prior + decoder + stride * terms.sum(1); exact when stride == 1
    prior_bpd: Tensor  # (B,): L_T
    decoder_bpd: Tensor  # (B,): L_0
    timesteps: Tensor  # (K,): the evaluated denoising timesteps t >= 1
    terms_bpd: Tensor  # (B, K): L_t at those timesteps
    stride: int


def strided_timesteps(num_timesteps: int, stride: int, offset: int = 0) -> Tensor:
    """The denoising timesteps a stride evaluates: ``1 + offset, 1 + offset + stride, ...`` below ``num_timesteps``."""
    if stride < 1 or not 0 <= offset < stride:
        raise ValueError(f"stride must be >= 1 and 0 <= offset < stride; got stride={stride}, offset={offset}")
    return torch.arange(1 + offset, num_timesteps, stride)


def strided_variational_bound_bpd(
    model: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator,
    *,
    stride: int = 1,
    offset: int = 0,
    prediction_type: PredictionType = "epsilon",
    model_variance: ModelVariance = "posterior",
    show_progress: bool = False,
) -> StridedBound:
    """DDPM eq. 5 for latents ``x0`` ``(B, ...)``, evaluating the model at every ``stride``-th denoising term (module
    docstring): prior and L_0 exact, the sum of L_t over t = 1 .. T-1 estimated by ``stride`` times the sum over
    :func:`strided_timesteps`. ``stride=1`` is the exact bound of :func:`ldm.likelihood.variational_bound_bpd`.

    The terms come from :func:`~ldm.likelihood.variational_bound_bpd` with ``decoder_nll="continuous"``; at the
    timesteps not evaluated the model is replaced by a zero prediction whose terms are discarded, so x_t at every t
    is drawn from ``generator`` exactly as in the exact computation: with the same seed, the evaluated terms equal
    the exact run's at those timesteps.
    """
    timesteps = strided_timesteps(len(alphas_cumprod), stride, offset)
    evaluated = torch.zeros(len(alphas_cumprod), dtype=torch.bool)
    evaluated[timesteps] = True
    evaluated[0] = True

    def strided_model(x_t: Tensor, t: Tensor) -> Tensor:
        return model(x_t, t) if evaluated[int(t[0])] else torch.zeros_like(x_t)

    bound = variational_bound_bpd(
        strided_model,
        x0,
        alphas_cumprod,
        generator,
        prediction_type=prediction_type,
        model_variance=model_variance,
        decoder_nll="continuous",
        show_progress=show_progress,
    )
    terms = bound.terms_bpd[:, timesteps.to(bound.terms_bpd.device)]
    decoder = bound.terms_bpd[:, 0]
    total = bound.prior_bpd + decoder + stride * terms.sum(dim=1)
    return StridedBound(total, bound.prior_bpd, decoder, timesteps, terms, stride)


def conditioned_unet(unet: nn.Module, encoder_hidden_states: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``model(x_t, t)`` for :func:`strided_variational_bound_bpd`: the U-Net's prediction with fixed conditioning."""
    dtype = getattr(unet, "dtype", None)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        sample = x_t if dtype is None else x_t.to(dtype)
        return unet(sample, t, encoder_hidden_states=encoder_hidden_states).sample.to(x_t.dtype)

    return model


@torch.no_grad()
def encode_latents(vae: nn.Module, pixel_values: Tensor) -> Tensor:
    """The diffusion latents of images in [-1, 1]: the VAE posterior mean, ``(mean - shift_factor) *
    scaling_factor`` (no shift for Stable Diffusion 1.x/2.x VAEs), in float32."""
    mean = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift) * vae.config.scaling_factor


@torch.no_grad()
def pipeline_bound(
    pipe: LatentDiffusionPipeline,
    pixel_values: Tensor,
    captions: list[str],
    generator: torch.Generator,
    *,
    stride: int = 1,
    offset: int = 0,
    model_variance: ModelVariance = "posterior",
    show_progress: bool = False,
) -> StridedBound:
    """The bound of ``pipe``'s U-Net for images ``(B, 3, H, W)`` in [-1, 1] with their captions (``""`` for
    unconditional), on the scheduler's training schedule and prediction type. ``generator`` is on the U-Net's
    device."""
    device = pipe.unet.device
    latents = encode_latents(pipe.vae, pixel_values)
    embeds, _ = pipe.encode_prompt(captions, device, do_classifier_free_guidance=False)
    alphas_cumprod = torch.as_tensor(pipe.scheduler.alphas_cumprod).to(device)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in get_args(PredictionType):
        raise UserError(
            f"the scheduler's prediction_type {prediction_type!r} is not one of {get_args(PredictionType)}"
        )
    return strided_variational_bound_bpd(
        conditioned_unet(pipe.unet, embeds),
        latents.to(device),
        alphas_cumprod,
        generator,
        stride=stride,
        offset=offset,
        prediction_type=prediction_type,
        model_variance=model_variance,
        show_progress=show_progress,
    )


# --------------------------------------------------------------------------------------------------------------------
# The plot


def plot_terms_png(timesteps: list[int], terms_bpd: list[float], path: str | Path, *, title: str = "") -> Path:
    """Plot denoising terms L_t (bits/dim) against t on a log scale as a PNG (:func:`common.plots.line_chart`).

    Terms are floored at 1e-8 for the log scale (a term can round to 0). Returns the path written.
    """
    values = np.maximum(np.asarray(terms_bpd, dtype=np.float64), 1e-8).tolist()
    return line_chart(
        path,
        {"L_t": (timesteps, values)},
        title=title or "L_t (bits/dim) vs timestep t",
        xlabel="timestep t",
        ylabel="L_t (bits/dim)",
        logy=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Command line


def load_eval_records(source: str, *, num_images: int | None, unconditional: bool) -> ImageCaptionRecords:
    """The first ``num_images`` image-caption records of ``source``; with ``unconditional``, a folder of images
    without captions is read too (each with the empty caption)."""
    try:
        records = load_image_caption_records(source)
    except ValueError:
        folder = Path(source).expanduser()
        if not unconditional or not folder.is_dir():
            raise
        files = list_image_files(folder)
        if not files:
            raise
        logger.info("%s has no captions: every image is evaluated with the empty prompt", source)
        records = ImageCaptionRecords(
            source, "captions", [ImageCaptionRecord(str(p), ("",)) for p in files], total=len(files)
        )
    if num_images is not None:
        records = replace(records, records=records.records[:num_images])
    return records


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.nll``."""
    parser = OneLineParser(prog="python -m eval.nll", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers pipeline folder")
    parser.add_argument("--data", required=True, help="held-out images with captions (any training data format)")
    parser.add_argument("--num-images", type=int, default=64, help="evaluate the first N images (default 64)")
    parser.add_argument(
        "--timesteps-stride",
        type=int,
        default=1,
        help="evaluate every K-th denoising term and scale by K (unbiased; 1 = exact)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--unconditional", action="store_true", help="condition on the empty prompt")
    parser.add_argument(
        "--model-variance",
        choices=get_args(ModelVariance),
        default="posterior",
        help="the fixed variance of p(x_{t-1} | x_t): posterior (tilde beta_t) or beta",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise of every term and the stride offset")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", type=Path, default=Path("results/nll.json"), help="the JSON result (plot: .png)")
    return parser


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Compute the bound as ``args`` says and write the plot; returns the JSON-able result."""
    if args.num_images < 1 or args.batch_size < 1 or args.timesteps_stride < 1:
        raise UserError("--num-images, --batch-size and --timesteps-stride must be >= 1")
    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, torch.float32).to(device)
    resolution = args.resolution or pipe.default_size
    records = load_eval_records(args.data, num_images=args.num_images, unconditional=args.unconditional)
    dataset = ImageCaptionDataset(records, resolution=resolution, crop="center")
    num_timesteps = len(pipe.scheduler.alphas_cumprod)
    stride = min(args.timesteps_stride, num_timesteps - 1)
    offset = int(torch.randint(stride, (), generator=torch.Generator().manual_seed(args.seed)))
    generator = torch.Generator(device).manual_seed(args.seed)
    bounds: list[StridedBound] = []
    for start in tqdm(range(0, len(dataset), args.batch_size), desc="variational bound", unit="batch"):
        batch = collate([dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))])
        captions = [""] * len(batch["captions"]) if args.unconditional else batch["captions"]
        bounds.append(
            pipeline_bound(
                pipe,
                batch["pixel_values"],
                captions,
                generator,
                stride=stride,
                offset=offset,
                model_variance=args.model_variance,
            )
        )
    total = torch.cat([b.total_bpd for b in bounds]).double().cpu()
    prior = torch.cat([b.prior_bpd for b in bounds]).double().cpu()
    decoder = torch.cat([b.decoder_bpd for b in bounds]).double().cpu()
    terms = torch.cat([b.terms_bpd for b in bounds]).double().cpu()
    timesteps = [0] + bounds[0].timesteps.tolist()
    per_timestep = [float(decoder.mean())] + terms.mean(dim=0).tolist()
    n = len(total)
    std = float(total.std()) if n > 1 else 0.0
    latent_shape = list(encode_latents(pipe.vae, dataset[0]["pixel_values"][None]).shape[1:])
    plot = plot_terms_png(
        timesteps[1:],
        per_timestep[1:],
        args.out.with_suffix(".png"),
        title=f"L_t (bits/latent dim, log scale); total {float(total.mean()):.4f}, "
        f"L_0 {float(decoder.mean()):.4f}, L_T {float(prior.mean()):.2e}",
    )
    return {
        "model": args.model,
        "data": args.data,
        "images": n,
        "resolution": resolution,
        "latent_shape": latent_shape,
        "conditioning": "unconditional (empty prompt)" if args.unconditional else "captions",
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "model_variance": args.model_variance,
        "num_train_timesteps": num_timesteps,
        "timesteps_stride": stride,
        "timestep_offset": offset,
        "model_calls_per_batch": len(timesteps),
        "seed": args.seed,
        "bpd": {
            "total": float(total.mean()),
            "total_std": std,
            "total_sem": std / math.sqrt(n),
            "prior": float(prior.mean()),
            "decoder": float(decoder.mean()),
            "denoising": float((total - prior - decoder).mean()),
        },
        "estimator": "exact: all T terms"
        if stride == 1
        else (
            f"prior and L_0 exact; L_t summed over t = {1 + offset}, {1 + offset + stride}, ... (every {stride}th) "
            f"and scaled by {stride}: systematic sampling with a random offset, unbiased"
        ),
        "note": LATENT_NOTE,
        "per_timestep": {"timesteps": timesteps, "mean_bpd": per_timestep},
        "per_image_total_bpd": total.tolist(),
        "plot": str(plot),
    }


def format_result(result: dict[str, Any]) -> str:
    """The summary the command prints: the bound, its parts, the estimator and what latent bits/dim compare."""
    bpd = result["bpd"]
    return (
        f"variational bound {bpd['total']:.4f} ± {bpd['total_sem']:.4f} (s.e.m.) bits per latent dim over "
        f"{result['images']} images ({result['conditioning']}); prior L_T {bpd['prior']:.3g}, decoder L_0 "
        f"{bpd['decoder']:.4f}, denoising {bpd['denoising']:.4f}\nestimator: {result['estimator']}\n"
        f"note: {LATENT_NOTE}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints one ``error: ...`` line and returns 2."""
    return run_evaluation(build_parser().parse_args(argv), evaluate, format_result)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
