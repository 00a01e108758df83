"""Train the KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``) on images, from scratch or onwards.

    python -m training.train_autoencoder --dataset DATA --preset tiny --output-dir runs/vae --validation-split 0.1
    python -m training.train_autoencoder --dataset DATA --pretrained-vae runs/vae --output-dir runs/vae-2

The objective is a reconstruction loss (L1 or L2, per pixel) plus ``kl_weight`` times the KL divergence of the
posterior from N(0, I) (Rombach et al. 2022, the "KL-reg" autoencoder; Stable Diffusion's weight is 1e-6). Stable
Diffusion's VAE also had an LPIPS perceptual loss and a patch-GAN loss; neither is here: LPIPS needs pretrained
VGG/AlexNet weights, which cannot be fetched in this environment, and the GAN loss is what makes SD's decoder sharp
but needs its own discriminator schedule. Expect blurrier reconstructions than SD's VAE at the same PSNR. A
perceptual term would be added to :func:`autoencoder_loss`, the one place the loss is computed.

Held-out images (``--validation-dataset`` or ``--validation-split``) are reconstructed from the posterior mean every
``--validation-steps``; their PSNR goes to the log and ``OUT/metrics.json``, and a PNG of originals over
reconstructions to ``OUT/samples/``. At the end the latent scale is measured, ``scaling_factor = 1 / std`` of the
posterior-mean latents of (up to ``--scaling-images``) training images, stored in the VAE's config, and the VAE is
saved to ``OUT/vae/`` (safetensors): ``AutoencoderKL.from_pretrained("OUT/vae")`` loads it and
``python -m training.train_text_to_image --vae OUT`` trains on it.

Work is never lost (:mod:`training.loop`): atomic checkpoints every ``--checkpointing-steps``, ``--resume latest``
continues exactly, Ctrl-C / SIGTERM write a checkpoint before exiting, and a non-finite loss skips its step. Images
are read by the shared image-caption loader (:mod:`training.data`), so each needs a caption, which is ignored here.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import make_image_grid
from torch import Tensor

from common.files import atomic_folder
from ldm.presets import PRESETS, build_vae, get_preset
from training.command import (
    LoopConfig,
    evaluation_batches,
    evaluation_mode,
    load_records,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    run_command,
    start_run,
    step_logs,
)
from training.config import ConfigError, help_field, to_dict
from training.data import ImageCaptionDataset
from training.models import load_component

logger = logging.getLogger("training")

SHOWN_IMAGES = 8  # columns of the originals-over-reconstructions PNG


@dataclass
class AutoencoderTrainConfig(LoopConfig):
    """Every setting of a run; each is a flag (``--kl-weight``) and a config-file key (``kl_weight``)."""

    # what to start from
    preset: str | None = help_field(None, f"ldm preset whose VAE to train from scratch: {', '.join(PRESETS)}")
    pretrained_vae: str | None = help_field(None, "or continue from this AutoencoderKL folder (or one with vae/)")
    # data
    resolution: int | None = help_field(None, "training image side (default: the VAE's sample_size)")
    crop: Literal["center", "random"] = help_field("random", "crop after resizing the shorter side")
    flip: bool = help_field(True, "random horizontal flips")
    # objective
    reconstruction_loss: Literal["l1", "l2"] = help_field("l1", "per-pixel reconstruction loss")
    kl_weight: float = help_field(1e-6, "weight of the KL term (Stable Diffusion: 1e-6)")
    sample_posterior: bool = help_field(True, "decode a posterior sample (off: the posterior mean)")
    scaling_images: int = help_field(1024, "training images used to measure the latent scaling_factor")
    # defaults of this command
    learning_rate: float = help_field(1e-4, "peak learning rate")
    train_batch_size: int = help_field(8, "images per process per step")
    output_dir: str = help_field("runs/autoencoder", "where checkpoints, metrics, samples and the VAE go")

    def validate(self) -> None:
        """Cross-field checks, each naming the fix."""
        super().validate()
        if (self.preset is None) == (self.pretrained_vae is None):
            raise ConfigError("pass exactly one of --preset (train from scratch) and --pretrained-vae (continue)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        if self.resolution is not None:
            factor = get_preset(self.preset).vae_scale_factor if self.preset else 8
            _check_resolution(self.resolution, factor)
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ConfigError(f"kl_weight must be a finite number >= 0; got {self.kl_weight}")
        if self.scaling_images < 1:
            raise ConfigError(f"scaling_images must be >= 1; got {self.scaling_images}")


def _check_resolution(resolution: int, factor: int) -> None:
    if resolution < 1 or resolution % factor:
        raise ConfigError(
            f"resolution must be a positive multiple of {factor} (the VAE downsamples by {factor}); got {resolution}"
        )


# --------------------------------------------------------------------------------------------------------------------
# The model and its loss


def build_autoencoder(config: AutoencoderTrainConfig) -> AutoencoderKL:
    """The VAE to train: loaded from ``pretrained_vae``, or the preset's, initialised from ``seed`` alone."""
    if config.pretrained_vae is not None:
        return load_component(AutoencoderKL, config.pretrained_vae, "vae")
    with torch.random.fork_rng(devices=[]):  # initialise from the seed, leaving the caller's RNG untouched
        torch.manual_seed(config.seed)
        return build_vae(get_preset(config.preset))


def autoencoder_loss(
    pixels: Tensor,
    reconstruction: Tensor,
    posterior: DiagonalGaussianDistribution,
    *,
    reconstruction_loss: Literal["l1", "l2"],
    kl_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, reconstruction term, KL term)`` of a batch; every term is a scalar.

    ``loss = mean |x - x̂|^p + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)`` with p = 1 (``"l1"``) or 2 (``"l2"``),
    the KL summed over the latent's elements and averaged over the batch (``posterior.kl()``). Stable Diffusion sums
    the reconstruction loss over the pixels instead (``LPIPSWithDiscriminator``); dividing both terms by the pixel
    count keeps its balance at ``kl_weight=1e-6`` while the loss scale, so the learning rate and gradient clipping,
    do not depend on the resolution. The KL term returned is the per-pixel one that enters the loss (unweighted).
    """
    error = reconstruction.float() - pixels.float()
    rec = error.abs().mean() if reconstruction_loss == "l1" else error.square().mean()
    kl = posterior.kl().float().mean() / pixels[0].numel()
    return rec + kl_weight * kl, rec.detach(), kl.detach()


class AutoencoderObjective(torch.nn.Module):
    """The VAE and its loss as one module, so that accelerate's wrapper (DDP, autocast) runs the whole forward."""

    def __init__(self, vae: AutoencoderKL, config: AutoencoderTrainConfig) -> None:
        super().__init__()
        self.vae = vae
        self.reconstruction_loss = config.reconstruction_loss
        self.kl_weight = config.kl_weight
        self.sample_posterior = config.sample_posterior

    def forward(self, pixels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw ``z`` from the posterior with ``generator`` (or take its mean), decode, and the loss."""
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        reconstruction = self.vae.decode(latents).sample
        return autoencoder_loss(
            pixels, reconstruction, posterior, reconstruction_loss=self.reconstruction_loss, kl_weight=self.kl_weight
        )


# --------------------------------------------------------------------------------------------------------------------
# Measurements


def psnr(images: Tensor, references: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of each image, ``10 log10(1 / MSE)``, for images in [0, 1] (peak 1).

    ``images`` and ``references``: (B, C, H, W); returns (B,). Identical images give ``inf``.
    """
    mse = (images.double() - references.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).float()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: Tensor) -> Tensor:
    """Decode the posterior mean of ``pixels`` ([-1, 1]); returns the reconstructions in [0, 1]."""
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return ((reconstruction.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def evaluate_reconstructions(
    vae: AutoencoderKL, dataset: ImageCaptionDataset, *, batch_size: int, limit: int, device: torch.device
) -> tuple[float, PIL.Image.Image]:
    """Mean PSNR (dB, per image then averaged) of the first ``limit`` images of ``dataset`` reconstructed from the
    posterior mean, and a PNG-ready grid: up to 8 originals over their reconstructions."""
    scores, shown = [], []
    with evaluation_mode(vae):
        for batch in evaluation_batches(dataset, batch_size, limit):
            originals = ((batch["pixel_values"].to(device) + 1) / 2).clamp(0, 1)
            reconstructions = reconstruct(vae, batch["pixel_values"].to(device))
            scores.append(psnr(reconstructions, originals).cpu())
            if len(shown) < SHOWN_IMAGES:
                shown += list(zip(originals.cpu(), reconstructions.cpu()))[: SHOWN_IMAGES - len(shown)]
    images = [_to_pil(o) for o, _ in shown] + [_to_pil(r) for _, r in shown]
    return float(torch.cat(scores).mean()), make_image_grid(images, rows=2, cols=len(shown))


def _to_pil(image: Tensor) -> PIL.Image.Image:
    return PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def latent_scaling_factor(
    vae: AutoencoderKL, dataset: ImageCaptionDataset, *, batch_size: int, limit: int, device: torch.device
) -> tuple[float, int]:
    """``(1 / std, images used)`` of the posterior-mean latents of the first ``limit`` images of ``dataset``.

    The standard deviation is over every element of every latent (channels and positions together, with Bessel's
    correction, as ``torch.std``), from float64 sums; scaling by it gives the diffusion model unit-variance latents,
    as Stable Diffusion's 0.18215 does for its VAE.
    """
    total = squares = torch.zeros((), dtype=torch.float64)
    count = images = 0
    with evaluation_mode(vae):
        for batch in evaluation_batches(dataset, batch_size, limit):
            latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.mean.double().cpu()
            total, squares = total + latents.sum(), squares + latents.square().sum()
            count, images = count + latents.numel(), images + latents.shape[0]
    variance = (squares - total**2 / count) / (count - 1)
    return float(1 / variance.sqrt()), images


# --------------------------------------------------------------------------------------------------------------------
# Training


def train(config: AutoencoderTrainConfig) -> Path:
    """Run (or resume) the training described by ``config``; returns the output folder (with ``vae/`` inside), or
    the checkpoints folder when a stop signal ended the run early."""
    # ---------------------------------------------------------------------------------------------------- set-up
    run = start_run(config, "autoencoder")
    accelerator, output_dir = run.accelerator, run.output_dir

    # ---------------------------------------------------------------------------------------------------- model
    vae = build_autoencoder(config)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = config.resolution or vae.config.sample_size
    _check_resolution(resolution, factor)
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    objective = AutoencoderObjective(vae, config)

    # ------------------------------------------------------------------------------------------------------ data
    records, held_out_records = load_records(config)
    dataset = ImageCaptionDataset(records, resolution=resolution, crop=config.crop, flip=config.flip, seed=config.seed)
    dataloader, batch_sampler = make_train_dataloader(dataset, config, accelerator)
    # The measurements see every image whole and unflipped.
    measure_train = ImageCaptionDataset(records, resolution=resolution, seed=config.seed)
    held_out = None if held_out_records is None else ImageCaptionDataset(held_out_records, resolution=resolution)

    # ------------------------------------------------------------------------------------------------- optimizer
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, accelerator)
    objective, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        objective, optimizer, dataloader, lr_scheduler
    )
    stateful = {"vae": vae, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    loop, metrics = run.start_loop(dataloader, stateful, epoch_setters=(batch_sampler, dataset))

    def validate() -> None:
        if held_out is None or not accelerator.is_main_process:
            return
        value, grid = evaluate_reconstructions(
            vae,
            held_out,
            batch_size=config.train_batch_size,
            limit=config.max_validation_images,
            device=accelerator.device,
        )
        path = output_dir / "samples" / f"step-{loop.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        metrics.add(loop.step, {"psnr": value})
        accelerator.log({"val_psnr": value}, step=loop.step)
        logger.info(
            "step %d: held-out PSNR %.2f dB (posterior mean), originals over reconstructions: %s",
            loop.step,
            value,
            path,
        )

    # ------------------------------------------------------------------------------------------------- the loop
    logger.info("%s; %d batches an epoch, %d steps", dataset.summary(), len(dataloader), config.max_train_steps)
    if loop.resumed_step is None:
        validate()  # the baseline, before any update
    with loop:
        for batch in loop.batches():
            with accelerator.accumulate(objective):
                loss, rec, kl = objective(batch["pixel_values"].to(accelerator.device), run.generator)
                grad_norm = loop.backward_and_step(loss, optimizer, lr_scheduler, params)
            if not accelerator.sync_gradients:
                continue
            loop.end_step(step_logs(lr_scheduler, grad_norm, reconstruction=rec.item(), kl=kl.item()))
            loop.checkpoint_if_due()
            if loop.due(config.validation_steps):
                validate()
    if loop.stopped_early:
        accelerator.end_training()
        return run.checkpoints_dir

    # ------------------------------------------------------------------------------------------- the final model
    if accelerator.is_main_process:
        scaling_factor, used = latent_scaling_factor(
            vae,
            measure_train,
            batch_size=config.train_batch_size,
            limit=config.scaling_images,
            device=accelerator.device,
        )
        vae.register_to_config(scaling_factor=scaling_factor)
        with atomic_folder(output_dir / "vae") as folder:  # whole or not at all
            vae.save_pretrained(folder, safe_serialization=True)
        logger.info(
            "latent scaling_factor %.5f (1 / std over %d training images); VAE saved to %s",
            scaling_factor,
            used,
            output_dir / "vae",
        )
        summary = loop.summary() | {
            "scaling_factor": scaling_factor,
            "scaling_images": used,
            "data": dataset.summary_dict(),
            "config": to_dict(config),
        }
        if metrics.data["history"]:
            summary["final_psnr"] = metrics.data["history"][-1]["psnr"]
            last = output_dir / "samples" / f"step-{metrics.data['history'][-1]['step']:06d}.png"
            if last.is_file():
                (output_dir / "reconstructions.png").write_bytes(last.read_bytes())
        metrics.update(**summary)
        loop.save_loss_curve(output_dir / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """The command line: train as the flags (and/or ``--config FILE``) say; print the output folder."""
    return run_command(AutoencoderTrainConfig, train, argv, "training.train_autoencoder", __doc__)


if __name__ == "__main__":
    sys.exit(main())
