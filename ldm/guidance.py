"""Classifier-free guidance (Ho & Salimans 2022) and guidance rescale (Lin et al. 2024, sec. 3.4).

The model is trained with captions dropped (replaced by the empty prompt) a fraction of the time, so one network
predicts both eps(x_t, c) and eps(x_t, empty). At sampling the two are extrapolated:

    eps_guided = eps_uncond + g * (eps_cond - eps_uncond)

g = 1 is the plain conditional model, g > 1 trades diversity for prompt adherence. All functions here work on any
parameterisation (eps, v or x0 predictions combine the same way) and on tensors of shape ``(batch, ...)``.
"""

from __future__ import annotations

from torch import Tensor


def uses_classifier_free_guidance(guidance_scale: float) -> bool:
    """Whether the unconditional pass is needed: for g <= 1 the guided prediction needs only the conditional one.

    (g = 1 gives eps_cond exactly; 0 <= g < 1 would interpolate towards the unconditional model, which, as in stock
    diffusers, is not done: the conditional prediction alone is used.)
    """
    return guidance_scale > 1.0


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """eps_uncond + g * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6). Shapes ``(batch, C, H, W)``."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def rescale_guidance(eps_guided: Tensor, eps_cond: Tensor, guidance_rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, eqs. 15-16): match the guided prediction's per-sample std to eps_cond's.

    Strong guidance inflates the prediction's standard deviation, which over-exposes images (most visibly with
    zero-terminal-SNR models). ``guidance_rescale`` = phi in [0, 1] blends the rescaled prediction with the plain one:
    phi * eps_guided * std(eps_cond) / std(eps_guided) + (1 - phi) * eps_guided. phi = 0 returns ``eps_guided``.
    """
    dims = list(range(1, eps_cond.ndim))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_guided = eps_guided.std(dim=dims, keepdim=True)
    eps_rescaled = eps_guided * (std_cond / std_guided)
    return guidance_rescale * eps_rescaled + (1 - guidance_rescale) * eps_guided


def guide(model_output: Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> Tensor:
    """Combine a batched U-Net output ``[uncond; cond]`` (shape ``(2B, ...)``) into the guided prediction ``(B, ...)``.

    This is the order a pipeline stacks its two passes in (one forward over a doubled batch), as in stock diffusers.
    """
    eps_uncond, eps_cond = model_output.chunk(2)
    eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
    if guidance_rescale > 0.0:
        eps = rescale_guidance(eps, eps_cond, guidance_rescale)
    return eps
