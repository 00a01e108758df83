"""The DDPM variational bound on -log p(x_0), in bits per dimension, for evaluating a model's likelihood.

DDPM eq. 5 splits the bound into the prior term L_T = KL(q(x_T | x_0) || N(0, I)), the denoising terms
L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) and the decoder term L_0 = -log p(x_0 | x_1); this module
follows improved-diffusion's ``_vb_terms_bpd`` and ``calc_bpd_loop``. Timesteps are 0-indexed like diffusers (see
:mod:`ldm.diffusion`): the term at index 0 is L_0 and the term at index t >= 1 is DDPM's L_t.

The decoder term has two choices. ``"discretized"`` (DDPM eq. 13) is the probability of the 8-bit bin that holds each
value of data scaled to [-1, 1]; the result is a true discrete likelihood, comparable with published bits/dim.
``"continuous"`` is the Gaussian density, for latents, which are not quantised: it is a differential entropy bound
per latent dimension (it can be negative) and only compares models that share the same autoencoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .diffusion import (
    PREDICTION_TYPES,
    PredictionType,
    _check_choice,
    _compute_dtype,
    _prev,
    posterior_log_variance_clipped,
    posterior_mean_variance,
    predict_x0,
    q_mean_variance,
    q_sample,
)

ModelVariance = Literal["posterior", "beta"]
DecoderNLL = Literal["discretized", "continuous"]

MODEL_VARIANCES: tuple[str, ...] = get_args(ModelVariance)
DECODER_NLLS: tuple[str, ...] = get_args(DecoderNLL)


def _mean_over_dims(x: Tensor) -> Tensor:
    """Mean over all dimensions but the batch: ``(B, ...) -> (B,)``."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (the Gaussian KLs of DDPM eq. 5):
    ``0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)``. Broadcasts."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) = erfc(-x / sqrt(2)) / 2, accurate to full relative precision in the lower tail (``ndtr`` is not)."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor, num_bins: int = 256) -> Tensor:
    """log P(x) for x on a grid of ``num_bins`` values in [-1, 1] under N(means, exp(log_scales)^2), elementwise, in
    nats: the Gaussian mass of x's bin of half-width 1 / (num_bins - 1), with the edge bins extended to -inf and +inf
    (DDPM eq. 13). Computed in float64 with the exact normal CDF; differences in a far tail use the survival function.
    """
    dtype = _compute_dtype(x.device)
    half_width = 1.0 / (num_bins - 1)
    centered = x.to(dtype) - means.to(dtype)
    inv_scale = torch.exp(-log_scales.to(dtype))
    upper, lower = inv_scale * (centered + half_width), inv_scale * (centered - half_width)
    # Phi(upper) - Phi(lower) cancels catastrophically when both are near 1; use the survival function there.
    mass = torch.where(
        centered > 0, _normal_cdf(-lower) - _normal_cdf(-upper), _normal_cdf(upper) - _normal_cdf(lower)
    )
    log_probs = torch.where(
        x < -1 + half_width,
        torch.special.log_ndtr(upper),
        torch.where(x > 1 - half_width, torch.special.log_ndtr(-lower), mass.clamp(min=1e-12).log()),
    )
    return log_probs.to(x.dtype)


def continuous_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log N(x; means, exp(log_scales)^2) elementwise, in nats: a density, for unquantised data such as latents."""
    dtype = _compute_dtype(x.device)
    z = (x.to(dtype) - means.to(dtype)) * torch.exp(-log_scales.to(dtype))
    return (-0.5 * (math.log(2 * math.pi) + z**2) - log_scales.to(dtype)).to(x.dtype)


def prior_bpd(x0: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) (DDPM eq. 5) in bits per dimension, shape ``(B,)``. Independent of the model;
    zero for a zero-terminal-SNR schedule."""
    t_last = torch.full((x0.shape[0],), len(alphas_cumprod) - 1, device=x0.device, dtype=torch.long)
    mean, _, log_variance = q_mean_variance(x0.to(_compute_dtype(x0.device)), t_last, alphas_cumprod)
    kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))
    return (_mean_over_dims(kl) / math.log(2.0)).to(x0.dtype)


def model_log_variance(alphas_cumprod: Tensor, t: Tensor | int, model_variance: ModelVariance) -> Tensor:
    """log sigma_t^2 of a model with fixed variance (DDPM sec. 3.2), shape of ``t``, in ``alphas_cumprod.dtype``.

    ``"posterior"``: sigma_t^2 = tilde_beta_t (DDPM eq. 7, "fixed_small"); ``"beta"``: sigma_t^2 = beta_t
    ("fixed_large"). At t = 0 both use tilde_beta_1, as improved-diffusion does (tilde_beta_0 = 0).
    """
    _check_choice("model_variance", model_variance, MODEL_VARIANCES)
    log_posterior_variance = posterior_log_variance_clipped(alphas_cumprod, t)
    if model_variance == "posterior":
        return log_posterior_variance
    alphas_cumprod64 = alphas_cumprod.to(_compute_dtype(alphas_cumprod.device))
    log_betas = torch.log1p(-alphas_cumprod64 / _prev(alphas_cumprod64)).to(alphas_cumprod.dtype)
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    return torch.where(t > 0, log_betas[t], log_posterior_variance)


def vb_term_bpd(
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor | int,
    alphas_cumprod: Tensor,
    prediction_type: PredictionType = "epsilon",
    model_variance: ModelVariance = "posterior",
    decoder_nll: DecoderNLL = "discretized",
    clip_denoised: bool = False,
) -> Tensor:
    """One term of DDPM eq. 5 in bits per dimension, shape ``(B,)``: L_t = KL(q(x_{t-1} | x_t, x_0) ||
    p(x_{t-1} | x_t)) where ``t > 0`` and the decoder NLL L_0 = -log p(x_0 | x_1) where ``t == 0``.

    ``model_output`` is the model's prediction at (x_t, t) in ``prediction_type``; p's mean is the posterior mean
    (DDPM eq. 7) at the predicted x_0 (eq. 11 for eps), optionally clipped to [-1, 1] for pixel data; p's variance is
    fixed (:func:`model_log_variance`). ``x0``, ``x_t``: ``(B, ...)``; ``t``: an int or ``(B,)``.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("decoder_nll", decoder_nll, DECODER_NLLS)
    dtype, out_dtype = _compute_dtype(x_t.device), x0.dtype
    t = torch.as_tensor(t, device=x_t.device).long()
    x0, x_t, model_output = x0.to(dtype), x_t.to(dtype), model_output.to(dtype)
    true_mean, _, true_log_variance = posterior_mean_variance(x0, x_t, t, alphas_cumprod)
    x0_pred = predict_x0(model_output, x_t, t, alphas_cumprod, prediction_type)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1, 1)
    model_mean, _, _ = posterior_mean_variance(x0_pred, x_t, t, alphas_cumprod)
    log_variance = model_log_variance(alphas_cumprod.to(device=x_t.device, dtype=dtype), t, model_variance)
    log_variance = log_variance.reshape(log_variance.shape + (1,) * (x_t.ndim - log_variance.ndim))

    kl = _mean_over_dims(normal_kl(true_mean, true_log_variance, model_mean, log_variance))
    log_scales = 0.5 * log_variance.expand_as(x0)
    if decoder_nll == "discretized":
        decoder = -_mean_over_dims(discretized_gaussian_log_likelihood(x0, model_mean, log_scales))
    else:
        decoder = -_mean_over_dims(continuous_gaussian_log_likelihood(x0, model_mean, log_scales))
    return (torch.where(t.expand(kl.shape) == 0, decoder, kl) / math.log(2.0)).to(out_dtype)


@dataclass(frozen=True)
class VariationalBound:
    """The terms of DDPM eq. 5 per sample, in bits per dimension."""

    total_bpd: Tensor  # (B,): the bound, prior_bpd + terms_bpd.sum(1)
    prior_bpd: Tensor  # (B,): L_T
    terms_bpd: Tensor  # (B, T): [:, 0] is L_0, [:, t] is L_t


def variational_bound_bpd(
    model: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator,
    *,
    prediction_type: PredictionType = "epsilon",
    model_variance: ModelVariance = "posterior",
    decoder_nll: DecoderNLL = "discretized",
    clip_denoised: bool = False,
    show_progress: bool = False,
) -> VariationalBound:
    """The full variational bound of DDPM eq. 5 for a batch ``x0`` ``(B, ...)``, in bits per dimension.

    ``model(x_t, t)`` returns a ``prediction_type`` prediction for x_t ``(B, ...)`` at timesteps ``t`` ``(B,)`` (close
    over any conditioning). Each of the T terms is a single-sample estimate at x_t ~ q(x_t | x_0), drawn with
    ``generator`` (on ``x0``'s device) from t = T - 1 down to 0 like improved-diffusion's ``calc_bpd_loop``. Runs
    under ``torch.no_grad()``; costs T model calls.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("model_variance", model_variance, MODEL_VARIANCES)
    _check_choice("decoder_nll", decoder_nll, DECODER_NLLS)
    batch_size, num_timesteps = x0.shape[0], len(alphas_cumprod)
    terms = torch.zeros(batch_size, num_timesteps, dtype=_compute_dtype(x0.device), device=x0.device)
    with torch.no_grad():
        for step in tqdm(range(num_timesteps - 1, -1, -1), desc="variational bound", disable=not show_progress):
            t = torch.full((batch_size,), step, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = q_sample(x0, t, noise, alphas_cumprod)
            terms[:, step] = vb_term_bpd(
                model(x_t, t), x0, x_t, t, alphas_cumprod, prediction_type, model_variance, decoder_nll, clip_denoised
            )
        prior = prior_bpd(x0, alphas_cumprod).to(terms.dtype)
    total = prior + terms.sum(dim=1)
    return VariationalBound(total_bpd=total.to(x0.dtype), prior_bpd=prior.to(x0.dtype), terms_bpd=terms.to(x0.dtype))
