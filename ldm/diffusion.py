"""The DDPM process as pure math: SNR, q(x_t | x_0), the posterior, parameterisations and the training objective.

Every function takes the schedule as a tensor (``betas`` or ``alphas_cumprod``, length T) and timesteps as an ``int``
or a ``LongTensor`` of shape ``(B,)``; nothing is stored between calls. Timesteps are 0-indexed like diffusers:
index ``t`` here is DDPM's ``t + 1``, so ``alphas_cumprod[t]`` is DDPM's alpha_bar_{t+1}, and the step before index 0
is the data itself (alpha_bar = 1). The schedule is a diffusers scheduler's ``alphas_cumprod``: the schedules
themselves (linear, scaled_linear, cosine) and the zero-terminal-SNR rescaling (``rescale_betas_zero_snr=True``,
Lin et al. 2024) are diffusers', not ours.

Schedule arithmetic is done in float64 (float32 on Apple MPS, which has no float64) and results come back in the
dtype of the sample tensors. Prediction types use diffusers' names (``"epsilon"``, ``"sample"``, ``"v_prediction"``)
so callers can pass ``scheduler.config.prediction_type``.

References: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM); Kingma et al. 2021, "Variational
Diffusion Models" (SNR); Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
(v-prediction); Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"; Yu et al. 2024,
"Unmasking Bias in Diffusion Model Training" (debiased estimation); Khrapov & Popov 2024, "Improving Diffusion Models's
Data-Corruption Resistance using Scheduled Pseudo-Huber Loss" (pseudo-Huber loss and its schedules).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

PredictionType = Literal["epsilon", "sample", "v_prediction"]

PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
"""kohya-ss sd-scripts' ``--loss_type`` names: squared error, absolute error, and two scalings of pseudo-Huber."""

LOSS_TYPES: tuple[str, ...] = get_args(LossType)

HuberSchedule = Literal["constant", "exponential", "snr"]
"""How the pseudo-Huber parameter c depends on the timestep (kohya-ss sd-scripts' ``--huber_schedule``)."""

HUBER_SCHEDULES: tuple[str, ...] = get_args(HuberSchedule)

DEBIASED_SNR_CAP = 1000.0
"""kohya-ss caps SNR at 1000 before the debiased weight (its comment: SNR is infinite at t = 0 on some schedules)."""


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the field and its allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _compute_dtype(device: torch.device) -> torch.dtype:
    """float64 for schedule arithmetic, except on backends that lack it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _at(values: Tensor, t: Tensor | int, ndim: int, device: torch.device) -> Tensor:
    """``values[t]`` in compute precision on ``device``, with trailing singleton dims up to ``ndim`` (broadcasting)."""
    out = values.to(device=device, dtype=_compute_dtype(device))[torch.as_tensor(t, device=device).long()]
    return out.reshape(out.shape + (1,) * max(ndim - out.ndim, 0))


def _prev(alphas_cumprod: Tensor) -> Tensor:
    """alpha_bar_{t-1} for every t, with alpha_bar before the first step equal to 1 (the data)."""
    return torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])


# ------------------------------------------------------------------------------------------------------------ SNR


def snr(alphas_cumprod: Tensor, timesteps: Tensor | int) -> Tensor:
    """Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, eq. 2 with
    alpha_t^2 = alpha_bar_t, sigma_t^2 = 1 - alpha_bar_t). Shape of ``timesteps``, in ``alphas_cumprod.dtype``, on the
    timesteps' device. Matches diffusers' ``training_utils.compute_snr``.
    """
    device = timesteps.device if isinstance(timesteps, Tensor) else alphas_cumprod.device
    ab = _at(alphas_cumprod, timesteps, 0, device)
    return (ab / (1 - ab)).to(alphas_cumprod.dtype)


# ------------------------------------------------------------------------------------------ forward process q(x_t|x_0)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) by reparameterisation (DDPM eq. 4):
    ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps``.

    ``x0`` and ``noise`` (eps) have shape ``(B, ...)``; ``t`` is an int or ``(B,)``. Same as diffusers' ``add_noise``.
    """
    ab = _at(alphas_cumprod, t, x0.ndim, x0.device)
    return (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(x0.dtype)


def q_sample_from(x_s: Tensor, s: Tensor | int, t: Tensor | int, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x_s) for an earlier step ``s`` < ``t``: the forward process continued from x_s,
    ``x_t = sqrt(alpha_bar_t / alpha_bar_s) * x_s + sqrt(1 - alpha_bar_t / alpha_bar_s) * eps`` (the product of
    DDPM eq. 2 from s + 1 to t). ``s`` = -1 is the data (alpha_bar = 1), where this is :func:`q_sample`. RePaint
    (Lugmayr et al. 2022) re-noises a sample this way to redo a denoising step.

    Raises:
        ValueError: ``s`` is not earlier than ``t``.
    """
    s_index, t_index = torch.as_tensor(s, device=x_s.device), torch.as_tensor(t, device=x_s.device)
    if (s_index >= t_index).any():
        raise ValueError(f"q(x_t | x_s) needs s < t (noise is only added going forward); got s={s}, t={t}")
    ab_s = _at(_prev(alphas_cumprod), s_index + 1, x_s.ndim, x_s.device)
    ab_t = _at(alphas_cumprod, t_index, x_s.ndim, x_s.device)
    ratio = ab_t / ab_s
    return (ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise).to(x_s.dtype)


def q_mean_variance(x0: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and log variance of q(x_t | x_0) (DDPM eq. 4), each expanded to ``x0.shape``."""
    ab = _at(alphas_cumprod, t, x0.ndim, x0.device)
    mean = ab.sqrt() * x0
    variance = (1 - ab).expand(x0.shape)
    return mean.to(x0.dtype), variance.to(x0.dtype), variance.log().to(x0.dtype)


# --------------------------------------------------------------------------------------- posterior q(x_{t-1}|x_t,x_0)


def _posterior_coefficients(ab: Tensor, ab_prev: Tensor) -> tuple[Tensor, Tensor]:
    """DDPM eq. 7 coefficients of x_0 and x_t in the posterior mean, from alpha_bar_t and alpha_bar_{t-1}."""
    beta = 1 - ab / ab_prev
    return ab_prev.sqrt() * beta / (1 - ab), (ab / ab_prev).sqrt() * (1 - ab_prev) / (1 - ab)


def _posterior_variance(ab: Tensor, ab_prev: Tensor) -> Tensor:
    """DDPM eq. 7 tilde_beta_t from alpha_bar_t and alpha_bar_{t-1}."""
    return (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)


def _posterior_terms(alphas_cumprod: Tensor, t: Tensor | int, ndim: int, device: torch.device) -> tuple[Tensor, ...]:
    """(coef_x0, coef_xt, tilde_beta_t, clipped log tilde_beta_t) at t in compute precision, ``ndim`` dims."""
    prev = _prev(alphas_cumprod)
    ab, ab_prev = _at(alphas_cumprod, t, ndim, device), _at(prev, t, ndim, device)
    # tilde_beta_0 = 0 has no log; improved-diffusion uses tilde_beta_1 there.
    t1 = torch.as_tensor(t, device=device).long().clamp(min=1)
    log_variance = _posterior_variance(_at(alphas_cumprod, t1, ndim, device), _at(prev, t1, ndim, device)).log()
    return *_posterior_coefficients(ab, ab_prev), _posterior_variance(ab, ab_prev), log_variance


def posterior_log_variance_clipped(alphas_cumprod: Tensor, t: Tensor | int) -> Tensor:
    """log tilde_beta_t (DDPM eq. 7) with the value at ``t = 0`` (where tilde_beta is 0) replaced by that at ``t = 1``,
    as improved-diffusion's ``posterior_log_variance_clipped``. Shape of ``t``, in ``alphas_cumprod.dtype``.
    """
    _, _, _, log_variance = _posterior_terms(alphas_cumprod, t, 0, alphas_cumprod.device)
    return log_variance.to(alphas_cumprod.dtype)


def posterior_mean_variance(
    x0: Tensor, x_t: Tensor, t: Tensor | int, alphas_cumprod: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) = N(tilde_mu_t, tilde_beta_t I) (DDPM eqs.
    6-7), each of ``x_t.shape`` in ``x_t.dtype``. ``x0`` may be a model's x_0 prediction (giving p's mean, eq. 11).
    """
    coef_x0, coef_xt, variance, log_variance = _posterior_terms(alphas_cumprod, t, x_t.ndim, x_t.device)
    mean = coef_x0 * x0 + coef_xt * x_t
    return mean.to(x_t.dtype), variance.expand(x_t.shape).to(x_t.dtype), log_variance.expand(x_t.shape).to(x_t.dtype)


# -------------------------------------------------------------------------------------------------- parameterisations


def _alpha_sigma(alphas_cumprod: Tensor, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), broadcastable against ``like``."""
    ab = _at(alphas_cumprod, t, like.ndim, like.device)
    return ab.sqrt(), (1 - ab).sqrt()


def eps_to_x0(eps: Tensor, x_t: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """x_0 = (x_t - sigma_t eps) / alpha_t: DDPM eq. 4 solved for x_0 (their eq. 15). Undefined if alpha_bar_t = 0."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, t, x_t)
    return ((x_t - sigma * eps) / alpha).to(x_t.dtype)


def get_velocity(x0: Tensor, eps: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, sec. 4). Same as diffusers' ``get_velocity(x0, eps, t)``."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, t, x0)
    return (alpha * eps - sigma * x0).to(x0.dtype)


def v_to_x0(v: Tensor, x_t: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """x_0 = alpha_t x_t - sigma_t v (Salimans & Ho 2022, sec. 4, using alpha_t^2 + sigma_t^2 = 1)."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, t, x_t)
    return (alpha * x_t - sigma * v).to(x_t.dtype)


def predict_x0(
    model_output: Tensor, x_t: Tensor, t: Tensor | int, alphas_cumprod: Tensor, prediction_type: PredictionType
) -> Tensor:
    """The model's x_0 estimate from its output in ``prediction_type``: eps (DDPM eq. 15, :func:`eps_to_x0`), x_0
    itself, or v (:func:`v_to_x0`). Shapes as ``x_t``. From eps it is undefined where alpha_bar_t = 0."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps_to_x0(model_output, x_t, t, alphas_cumprod)
    if prediction_type == "v_prediction":
        return v_to_x0(model_output, x_t, t, alphas_cumprod)
    return model_output.to(x_t.dtype)


# ---------------------------------------------------------------------------------------------------------- objective


def training_target(
    x0: Tensor, noise: Tensor, t: Tensor | int, alphas_cumprod: Tensor, prediction_type: PredictionType
) -> Tensor:
    """The regression target for a model with ``prediction_type``: eps (DDPM eq. 14), x_0, or v (Salimans & Ho 2022,
    sec. 4). ``x0`` and ``noise`` have shape ``(B, ...)``; the target has the same shape and dtype as ``x0``.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise.to(x0.dtype)
    if prediction_type == "sample":
        return x0
    return get_velocity(x0, noise, t, alphas_cumprod)


def loss_weights(snr: Tensor, prediction_type: PredictionType, min_snr_gamma: float | None = None) -> Tensor:
    """Per-sample weights of the squared error, same shape and dtype as ``snr``.

    ``min_snr_gamma=None`` gives L_simple (DDPM eq. 14): all ones. Otherwise min-SNR-gamma (Hang et al. 2023, eq. 9
    and sec. 4.2) re-expressed for the prediction type, as in diffusers' ``train_text_to_image.py``:
    ``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma) / (SNR + 1)`` for v, ``min(SNR, gamma)`` for x_0. For eps at
    SNR = 0 (zero-terminal-SNR schedules) the weight is its limit 1 rather than 0/0.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    if min_snr_gamma <= 0:
        raise ValueError(
            f"min_snr_gamma must be positive (Hang et al. use 5.0) or None for L_simple; got {min_snr_gamma}"
        )
    if prediction_type == "epsilon":
        return (min_snr_gamma / snr).clamp(max=1.0)
    clipped = snr.clamp(max=min_snr_gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped


def debiased_estimation_weights(snr: Tensor, prediction_type: PredictionType) -> Tensor:
    """Per-sample weights of the debiased estimation loss (Yu et al. 2024, "Unmasking Bias in Diffusion Model
    Training", arXiv:2310.08442), as kohya-ss sd-scripts applies them with ``--debiased_estimation_loss``
    (``library/custom_train_functions.py``, ``apply_debiased_estimation``): with SNR capped at 1000 first,
    ``1 / sqrt(SNR)`` for eps and kohya's v-prediction variant ``1 / (SNR + 1)``. Same shape and dtype as ``snr``.

    The eps weight is infinite where SNR = 0 (the last step of a zero-terminal-SNR schedule, which is trained with v).
    The weights multiply those of :func:`loss_weights` when both are used, as in kohya-ss.

    Raises:
        ValueError: ``prediction_type`` is ``"sample"``, for which the loss is not defined.
    """
    _check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
    capped = snr.clamp(max=DEBIASED_SNR_CAP)
    return 1 / capped.sqrt() if prediction_type == "epsilon" else 1 / (capped + 1)


def huber_c_schedule(
    alphas_cumprod: Tensor, timesteps: Tensor, huber_c: float, schedule: HuberSchedule = "snr"
) -> Tensor:
    """The pseudo-Huber parameter c_t of each sample (Khrapov & Popov 2024, arXiv:2403.16728), as kohya-ss sd-scripts
    computes it (``library/train_util.py``, ``get_huber_threshold_if_needed``), shape ``(B,)`` in
    ``alphas_cumprod.dtype``:

    - ``"constant"``: ``c_t = c``.
    - ``"exponential"``: ``c_t = exp(-a t)`` with ``a = -ln(c) / T``, i.e. ``c^(t / T)``: 1 at t = 0 falling to ``c``
      at t = T (the schedule's length).
    - ``"snr"``: ``c_t = (1 - c) / (1 + sigma_t)^2 + c`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (the
      noise level of the variance-exploding view, 1 / sqrt(SNR)): about 1 where the sample is clean, ``c`` where it
      is all noise. So the loss is close to L2 at low noise and robust (close to L1) at high noise.
    """
    _check_choice("huber_schedule", schedule, HUBER_SCHEDULES)
    if not huber_c > 0:
        raise ValueError(f"huber_c must be > 0; got {huber_c}")
    device = timesteps.device
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, dtype=alphas_cumprod.dtype, device=device)
    if schedule == "exponential":
        rate = -math.log(huber_c) / alphas_cumprod.shape[0]
        return torch.exp(-rate * timesteps.to(_compute_dtype(device))).to(alphas_cumprod.dtype)
    ab = _at(alphas_cumprod, timesteps, 0, device)
    sigma = ((1 - ab) / ab).sqrt()
    return ((1 - huber_c) / (1 + sigma) ** 2 + huber_c).to(alphas_cumprod.dtype)


def elementwise_loss(
    model_pred: Tensor, target: Tensor, loss_type: LossType = "l2", huber_c: Tensor | None = None
) -> Tensor:
    """The per-element loss of ``d = model_pred - target`` in float32, shape of the inputs (kohya-ss sd-scripts'
    ``conditional_loss``, ``--loss_type``):

    - ``"l2"``: ``d^2``; ``"l1"``: ``|d|``.
    - ``"huber"``: ``2 c (sqrt(d^2 + c^2) - c)``, the pseudo-Huber loss scaled by ``2c`` (Khrapov & Popov 2024): about
      ``d^2`` for ``|d| << c`` and ``2 c |d|`` for ``|d| >> c``.
    - ``"smooth_l1"``: ``2 (sqrt(d^2 + c^2) - c)``: about ``d^2 / c`` for ``|d| << c`` and ``2 |d|`` beyond.

    ``huber_c`` is c per sample ``(B,)`` (:func:`huber_c_schedule`), needed by the last two.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred and target must have the same shape; got {model_pred.shape} and {target.shape}")
    if loss_type == "l2":
        return F.mse_loss(model_pred.float(), target.float(), reduction="none")
    diff = model_pred.float() - target.float()
    if loss_type == "l1":
        return diff.abs()
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c, the pseudo-Huber parameter per sample")
    c = huber_c.float().to(diff.device).reshape(-1, *([1] * (diff.ndim - 1)))
    pseudo_huber = 2 * ((diff**2 + c**2).sqrt() - c)
    return c * pseudo_huber if loss_type == "huber" else pseudo_huber


def diffusion_loss(
    model_pred: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    *,
    loss_type: LossType = "l2",
    huber_c: Tensor | None = None,
) -> Tensor:
    """Per-sample weighted loss ``w_b * mean_{c,h,w} l(model_pred - target)``, shape ``(B,)`` in float32 (as
    diffusers' training scripts compute it). Take ``.mean()`` for the batch loss. With the default ``loss_type="l2"``
    it is the weighted squared error of DDPM eq. 14; the other losses are :func:`elementwise_loss`'s.
    """
    loss = elementwise_loss(model_pred, target, loss_type, huber_c)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    return loss if weights is None else loss * weights.float()
