"""The latent-diffusion training objective for one batch, from ``ldm``'s DDPM math.

Every random draw (timesteps, noise, noise offset, caption dropout, the VAE posterior sample) comes from one
``torch.Generator`` that the training loop checkpoints, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion import diffusion_loss, loss_weights, q_sample, snr, training_target


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the loss is: the U-Net's parameterisation and how samples are weighted and perturbed."""

    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty prompt with ``probability`` (classifier-free guidance training).

    One draw per caption is made even when ``probability`` is 0, so the RNG stream does not depend on the setting.
    """
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> Tensor:
    """t ~ Uniform{0, ..., T-1}, one per sample (DDPM Algorithm 1, line 3, with diffusers' 0-based indices)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


def sample_noise(shape: torch.Size, generator: torch.Generator, noise_offset: float = 0.0) -> Tensor:
    """eps ~ N(0, I), plus ``noise_offset`` times a per-(sample, channel) constant (Guttenberg 2023's offset noise,
    which lets the model learn to change an image's mean brightness)."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
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
) -> Tensor:
    """The weighted noise-prediction loss of one batch (DDPM's L_simple, or min-SNR-gamma weighted; eps or v target).

    Args:
        unet: eps_theta(x_t, t, c) (or v_theta).
        latents: x_0, the scaled VAE latents ``(B, C, h, w)``.
        encoder_hidden_states: the text embeddings c ``(B, L, D)``.
        alphas_cumprod: the training schedule's alpha_bar ``(T,)``.
        config: parameterisation, weighting and noise offset.
        generator: the source of the timesteps and noise (CPU).
        added_cond_kwargs: the U-Net's extra conditioning (SDXL's pooled text embedding and size/crop ids), if any.
    Returns:
        The scalar loss (float32).
    """
    batch_size = latents.shape[0]
    timesteps = sample_timesteps(batch_size, alphas_cumprod.shape[0], generator)
    noise = sample_noise(latents.shape, generator, config.noise_offset)
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
    if config.snr_gamma is not None:
        weights = loss_weights(snr(alphas_cumprod, timesteps), config.prediction_type, config.snr_gamma)
    return diffusion_loss(model_pred, target, weights).mean()
