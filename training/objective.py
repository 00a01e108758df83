"""The latent-diffusion training objective for one batch, from ``ldm``'s DDPM math.

Every random draw (timesteps, noise, noise offset, caption dropout, the VAE posterior sample) comes from one
``torch.Generator`` that the training loop checkpoints, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion import (
    debiased_estimation_weights,
    diffusion_loss,
    elementwise_loss,
    huber_c_schedule,
    loss_weights,
    q_sample,
    snr,
    training_target,
)
from ldm.noise import adaptive_noise_offset, pyramid_noise
from training.config import ConfigError
from training.masks import masked_mean


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the loss is: the U-Net's parameterisation, how samples are weighted and perturbed, which timesteps are
    trained and the per-element loss. The defaults are DDPM's L_simple (eps, squared error, t uniform on all steps)."""

    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    debiased_estimation: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    adaptive_noise_scale: float | None = None
    min_timestep: int = 0
    max_timestep: int | None = None

    def check(self, num_train_timesteps: int) -> None:
        """The checks that need the noise schedule's length T (the trainer's config checks the rest), naming the flag.

        Raises:
            ConfigError: the timestep range is not within [0, T], or debiased estimation with x_0 prediction.
        """
        max_timestep = num_train_timesteps if self.max_timestep is None else self.max_timestep
        if not 0 <= self.min_timestep < max_timestep <= num_train_timesteps:
            raise ConfigError(
                f"min_timestep and max_timestep must satisfy 0 <= min_timestep < max_timestep <= "
                f"{num_train_timesteps} (the scheduler's num_train_timesteps); got {self.min_timestep} and "
                f"{max_timestep}"
            )
        if self.debiased_estimation and self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"debiased_estimation_loss is defined for epsilon and v_prediction models; this one predicts "
                f"{self.prediction_type!r}: drop the flag"
            )


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty prompt with ``probability`` (classifier-free guidance training).

    One draw per caption is made even when ``probability`` is 0, so the RNG stream does not depend on the setting.
    """
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator,
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> Tensor:
    """t ~ Uniform{min_timestep, ..., max_timestep - 1}, one per sample (DDPM Algorithm 1, line 3, with diffusers'
    0-based indices; by default all of 0 .. T-1). A narrower range is kohya-ss' ``--min_timestep``/``--max_timestep``;
    it takes the same single draw, so the rest of the RNG stream does not depend on it."""
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < high <= num_train_timesteps:
        raise ValueError(f"timesteps need 0 <= min < max <= {num_train_timesteps}; got {min_timestep} and {high}")
    return torch.randint(min_timestep, high, (batch_size,), generator=generator)


def sample_noise(latents: Tensor, generator: torch.Generator, config: ObjectiveConfig) -> Tensor:
    """eps ~ N(0, I) of ``latents``' shape on the CPU, with the perturbations ``config`` asks for, in kohya-ss'
    order: offset noise (Guttenberg 2023: ``noise_offset`` times a per-(sample, channel) constant, which lets the
    model change an image's mean brightness), its strength made adaptive to each latent channel's mean
    (:func:`ldm.noise.adaptive_noise_offset`), then pyramid noise (:func:`ldm.noise.pyramid_noise`).

    The offset draws happen only with ``noise_offset`` and the pyramid's only with ``multires_noise_iterations``, so a
    run without them draws exactly what it did before they existed."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator)
    if config.noise_offset:
        strength: float | Tensor = config.noise_offset
        if config.adaptive_noise_scale is not None:
            strength = adaptive_noise_offset(latents.float(), config.noise_offset, config.adaptive_noise_scale).cpu()
        noise = noise + strength * torch.randn((*shape[:2], 1, 1), generator=generator)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, config.multires_noise_iterations, config.multires_noise_discount)
    return noise


def diffusion_training_loss(
    unet: torch.nn.Module,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    alphas_cumprod: Tensor,
    config: ObjectiveConfig,
    generator: torch.Generator,
    *,
    added_cond_kwargs: Mapping[str, Tensor] | None = None,
    loss_weight: Tensor | None = None,
    loss_mask: Tensor | None = None,
) -> Tensor:
    """The weighted noise-prediction loss of one batch: DDPM's L_simple by default; min-SNR-gamma and/or debiased
    estimation weights, a pseudo-Huber or L1 loss, offset/pyramid noise and a timestep range as ``config`` asks;
    each sample's loss averaged over its mask and multiplied by its subset's weight when the batch has them.

    Args:
        unet: eps_theta(x_t, t, c) (or v_theta).
        latents: x_0, the scaled VAE latents ``(B, C, h, w)``.
        encoder_hidden_states: the text embeddings c ``(B, L, D)``.
        alphas_cumprod: the training schedule's alpha_bar ``(T,)``.
        config: parameterisation, weighting, loss, noise variants and timestep range.
        generator: the source of the timesteps and noise (CPU).
        added_cond_kwargs: the U-Net's extra conditioning (SDXL's pooled text embedding and size/crop ids), if any.
        loss_weight: a weight per sample ``(B,)`` (a subset's ``loss_weight``, DreamBooth's prior loss weight).
        loss_mask: where each sample's loss counts, at the latent size ``(B, 1, h, w)`` (``--masked-loss``).
    Returns:
        The scalar loss (float32).
    """
    batch_size = latents.shape[0]
    timesteps = sample_timesteps(
        batch_size, alphas_cumprod.shape[0], generator, config.min_timestep, config.max_timestep
    )
    noise = sample_noise(latents, generator, config)
    timesteps, noise = timesteps.to(latents.device), noise.to(latents.device, latents.dtype)
    alphas_cumprod = alphas_cumprod.to(latents.device)
    noisy_latents = q_sample(latents, timesteps, noise, alphas_cumprod)
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        added_cond_kwargs=None if added_cond_kwargs is None else dict(added_cond_kwargs),
        return_dict=False,
    )[0]
    target = training_target(latents, noise, timesteps, alphas_cumprod, config.prediction_type)
    weights = None
    if config.snr_gamma is not None or config.debiased_estimation:
        snr_t = snr(alphas_cumprod, timesteps)
        weights = loss_weights(snr_t, config.prediction_type, config.snr_gamma)
        if config.debiased_estimation:
            weights = weights * debiased_estimation_weights(snr_t, config.prediction_type)
    huber_c = None
    if config.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_c_schedule(alphas_cumprod, timesteps, config.huber_c, config.huber_schedule)
    if loss_mask is None:
        per_sample = diffusion_loss(model_pred, target, weights, loss_type=config.loss_type, huber_c=huber_c)
    else:
        per_sample = masked_mean(
            elementwise_loss(model_pred, target, config.loss_type, huber_c), loss_mask.to(latents.device)
        )
        per_sample = per_sample if weights is None else per_sample * weights.float()
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
