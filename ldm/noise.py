"""Variants of the training noise eps that fine-tuning tools use: adaptive offset noise and pyramid (multi-resolution)
noise, as pure functions of tensors whose random draws come from a ``torch.Generator`` passed in.

The plain offset noise itself (``eps + s * n``, one ``n ~ N(0, 1)`` per sample and channel) is drawn by the trainer
(``training.objective.sample_noise``); these functions give its adaptive strength and the pyramid noise built on top,
in the order kohya-ss sd-scripts applies them (``library/train_util.py``, ``get_noise_noisy_latents_and_timesteps``:
offset first, then the pyramid).

References: Guttenberg 2023, "Diffusion With Offset Noise" (crosslabs.org); Whitaker 2023, "Multi-Resolution Noise for
Diffusion Model Training" (wandb.ai report); kohya-ss sd-scripts ``library/custom_train_functions.py``
(``apply_noise_offset``, ``pyramid_noise_like``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def adaptive_noise_offset(latents: Tensor, noise_offset: float, adaptive_noise_scale: float) -> Tensor:
    """The per-(sample, channel) strength of offset noise with kohya-ss' ``--adaptive_noise_scale``
    (``apply_noise_offset``): ``max(0, noise_offset + adaptive_noise_scale * |mean_{h,w} x_0|)``, shape
    ``(B, C, 1, 1)`` in ``latents.dtype``. A latent channel far from zero on average (a very bright or dark image)
    gets a stronger offset; the clamp keeps it non-negative when the scale is negative.

    Args:
        latents: x_0, ``(B, C, h, w)``.
        noise_offset: the base strength s of offset noise.
        adaptive_noise_scale: how much of each channel's absolute mean is added to s.
    """
    channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
    return (noise_offset + adaptive_noise_scale * channel_mean).clamp(min=0.0)


def pyramid_noise(noise: Tensor, generator: torch.Generator, iterations: int, discount: float = 0.3) -> Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023) as kohya-ss' ``pyramid_noise_like``
    (``--multires_noise_iterations``, ``--multires_noise_discount``):

        eps' = eps + sum_{i=0}^{n-1} discount^i * up(z_i),  z_i ~ N(0, I) of size (h / r_i^i, w / r_i^i), r_i ~ U[2, 4)

    then divided by its standard deviation (one number over the whole batch) to be about unit variance again. ``up``
    is bilinear upsampling to ``(h, w)``; sizes are floored and at least 1, and the sum stops after the first level
    that is 1 pixel high or wide. Level 0 is white noise at full size (``r^0 = 1``). Low-frequency components let the
    model change an image's large-scale content (colours, composition) more freely than white noise does.

    Per level, one ``r_i`` and then ``z_i`` are drawn from ``generator`` (kohya-ss draws ``r_i`` from Python's global
    RNG); they are drawn on the generator's device and moved to ``noise``'s.

    Args:
        noise: eps ``(B, C, h, w)`` (possibly already with offset noise).
        generator: the source of ``r_i`` and ``z_i``.
        iterations: the number of levels n (kohya-ss suggests 6-10); 0 returns ``noise`` unchanged.
        discount: the weight ratio between successive levels, in (0, 1].
    Returns:
        The pyramid noise, shape and dtype of ``noise``.
    """
    if iterations < 0 or not 0 < discount <= 1:
        raise ValueError(f"pyramid noise needs iterations >= 0, discount in (0, 1]; got {iterations} and {discount}")
    if iterations == 0:
        return noise
    batch, channels, height, width = noise.shape
    total = noise.float()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator, device=generator.device)) * 2 + 2
        low_height, low_width = max(1, int(height / r**i)), max(1, int(width / r**i))
        level = torch.randn((batch, channels, low_height, low_width), generator=generator, device=generator.device).to(
            noise.device
        )
        total = total + F.interpolate(level, size=(height, width), mode="bilinear") * discount**i
        if low_height == 1 or low_width == 1:
            break
    return (total / total.std()).to(noise.dtype)
