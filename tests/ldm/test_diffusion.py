"""Tests for ldm.diffusion against closed-form Gaussian math and stock diffusers (DDPMScheduler, compute_snr)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr

from ldm.diffusion import (
    PREDICTION_TYPES,
    diffusion_loss,
    eps_to_x0,
    get_velocity,
    loss_weights,
    posterior_log_variance_clipped,
    posterior_mean_variance,
    predict_x0,
    q_mean_variance,
    q_sample,
    q_sample_from,
    snr,
    training_target,
    v_to_x0,
)

T = 1000
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}


def _linear_alpha_bar(t: int, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = T) -> float:
    """alpha_bar at 0-indexed step t of DDPM's linear schedule, by a Python loop over the betas."""
    step = (beta_end - beta_start) / (num_timesteps - 1)
    return math.prod(1 - (beta_start + i * step) for i in range(t + 1))


def _alphas_cumprod(name: str = "linear", *, zero_terminal_snr: bool = False) -> torch.Tensor:
    """alpha_bar of DDPM's linear (1e-4 .. 0.02) or Stable Diffusion's scaled_linear schedule in float64 (diffusers'
    schedulers hold float32, too coarse for the closed-form checks), optionally rescaled by diffusers' zero-terminal-
    SNR function, the one the trainer uses through ``rescale_betas_zero_snr=True``."""
    if name == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    else:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, dim=0)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------------------- SNR


def test_snr_matches_diffusers_compute_snr() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    timesteps = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    ours = snr(scheduler.alphas_cumprod, timesteps)
    assert ours.shape == timesteps.shape
    torch.testing.assert_close(ours, compute_snr(scheduler, timesteps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_float64_test_schedules_are_diffusers_schedules(name: str) -> None:
    for zero_terminal_snr in (False, True):
        scheduler = DDPMScheduler(
            num_train_timesteps=T,
            beta_schedule=name,
            rescale_betas_zero_snr=zero_terminal_snr,
            **(SD_BETAS if name == "scaled_linear" else {}),
        )
        expected = scheduler.alphas_cumprod.double()
        torch.testing.assert_close(
            _alphas_cumprod(name, zero_terminal_snr=zero_terminal_snr), expected, atol=1e-6, rtol=0
        )


def test_snr_is_zero_at_the_last_step_of_a_zero_terminal_snr_schedule() -> None:
    scheduler = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="scaled_linear", rescale_betas_zero_snr=True, **SD_BETAS
    )
    values = snr(scheduler.alphas_cumprod, torch.tensor([0, T - 2, T - 1]))
    assert values[-1].item() == 0.0 and bool((values[:-1] > 0).all())
    torch.testing.assert_close(values, compute_snr(scheduler, torch.tensor([0, T - 2, T - 1])))


def test_snr_closed_form() -> None:
    alphas_cumprod = _alphas_cumprod("linear")
    for t in (0, 300, 999):
        ab = _linear_alpha_bar(t)
        assert snr(alphas_cumprod, t).item() == pytest.approx(ab / (1 - ab), rel=1e-10)


# ---------------------------------------------------------------------------------------------- forward q(x_t | x_0)


def test_q_sample_matches_diffusers_add_noise() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    x0, noise = _randn(4, 3, 8, 8, seed=1), _randn(4, 3, 8, 8, seed=2)
    t = torch.tensor([0, 17, 500, 999])
    ours = q_sample(x0, t, noise, scheduler.alphas_cumprod)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, t), rtol=0, atol=1e-6)


def test_q_sample_statistics_match_ddpm_eq4() -> None:
    n, t = 200_000, 300
    alphas_cumprod = _alphas_cumprod("linear")
    ab = _linear_alpha_bar(t)
    x0 = torch.tensor([[0.7], [-1.3]], dtype=torch.float64).repeat_interleave(n, dim=0)
    x_t = q_sample(x0, t, _randn(2 * n, 1, seed=3, dtype=torch.float64), alphas_cumprod).view(2, n)
    for row, value in zip(x_t, (0.7, -1.3)):
        assert row.mean().item() == pytest.approx(math.sqrt(ab) * value, abs=5 * math.sqrt((1 - ab) / n))
        assert row.var().item() == pytest.approx(1 - ab, abs=5 * math.sqrt(2 / n) * (1 - ab))


def test_q_sample_from_continues_the_forward_process() -> None:
    # q(x_t | x_s) is DDPM eq. 2 applied from step s + 1 to t: mean and variance from a loop over the single steps.
    n, s, t = 200_000, 200, 450
    alphas_cumprod = _alphas_cumprod("linear")
    ratio = _linear_alpha_bar(t) / _linear_alpha_bar(s)
    x_s = torch.tensor([[0.7], [-1.3]], dtype=torch.float64).repeat_interleave(n, dim=0)
    x_t = q_sample_from(x_s, s, t, _randn(2 * n, 1, seed=4, dtype=torch.float64), alphas_cumprod).view(2, n)
    for row, value in zip(x_t, (0.7, -1.3)):
        assert row.mean().item() == pytest.approx(math.sqrt(ratio) * value, abs=5 * math.sqrt((1 - ratio) / n))
        assert row.var().item() == pytest.approx(1 - ratio, abs=5 * math.sqrt(2 / n) * (1 - ratio))


def test_q_sample_from_the_data_is_q_sample_and_composes_to_it() -> None:
    alphas_cumprod = _alphas_cumprod("scaled_linear")
    x0, e1, e2 = (_randn(3, 4, 8, 8, seed=k, dtype=torch.float64) for k in (5, 6, 7))
    t = torch.tensor([0, 300, 999])
    torch.testing.assert_close(q_sample_from(x0, -1, t, e1, alphas_cumprod), q_sample(x0, t, e1, alphas_cumprod))
    # Markov: noising to s then from s to t is q(x_t | x_0) with the noise sqrt(a_t/a_s (1 - a_s)) e1 + ... e2.
    s, t = 100, 600
    a_s, a_t = alphas_cumprod[s].double(), alphas_cumprod[t].double()
    two_hops = q_sample_from(q_sample(x0, s, e1, alphas_cumprod), s, t, e2, alphas_cumprod)
    noise = ((a_t / a_s * (1 - a_s)).sqrt() * e1 + (1 - a_t / a_s).sqrt() * e2) / (1 - a_t).sqrt()
    torch.testing.assert_close(two_hops, q_sample(x0, t, noise, alphas_cumprod))
    with pytest.raises(ValueError, match="needs s < t"):
        q_sample_from(x0, 600, 600, e1, alphas_cumprod)


def test_q_mean_variance_closed_form() -> None:
    alphas_cumprod = _alphas_cumprod("linear")
    x0 = _randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([100, 700])
    mean, variance, log_variance = q_mean_variance(x0, t, alphas_cumprod)
    assert mean.shape == variance.shape == log_variance.shape == x0.shape
    for b, step in enumerate((100, 700)):
        ab = _linear_alpha_bar(step)
        torch.testing.assert_close(mean[b], math.sqrt(ab) * x0[b])
        torch.testing.assert_close(variance[b], torch.full_like(x0[b], 1 - ab))
        torch.testing.assert_close(log_variance[b], torch.full_like(x0[b], math.log(1 - ab)))


# ---------------------------------------------------------------------------------------- posterior q(x_{t-1}|x_t,x_0)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule(t: int) -> None:
    """Gaussian product of q(x_{t-1} | x_0) = N(sqrt(ab') x0, 1 - ab') and q(x_t | x_{t-1}) = N(sqrt(a) x_{t-1}, b)."""
    alphas_cumprod = _alphas_cumprod("linear")
    beta = 1e-4 + t * (0.02 - 1e-4) / (T - 1)
    ab_prev = _linear_alpha_bar(t - 1)
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    x0, x_t = 0.4, -0.9
    mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * x_t / beta) / precision

    ours_mean, ours_var, ours_log_var = posterior_mean_variance(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[x_t]], dtype=torch.float64), t, alphas_cumprod
    )
    assert ours_mean.item() == pytest.approx(mean, rel=1e-10)
    assert ours_var.item() == pytest.approx(1 / precision, rel=1e-10)
    assert ours_log_var.item() == pytest.approx(-math.log(precision), rel=1e-10)


def test_posterior_at_first_step_is_the_data() -> None:
    alphas_cumprod = _alphas_cumprod("linear")
    x0, x_t = _randn(1, 4, dtype=torch.float64, seed=1), _randn(1, 4, dtype=torch.float64, seed=2)
    mean, variance, _ = posterior_mean_variance(x0, x_t, 0, alphas_cumprod)
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-12)
    assert variance.abs().max().item() == 0.0
    # improved-diffusion's clipping: log tilde_beta_0 (= -inf) is replaced by log tilde_beta_1.
    _, variance_1, _ = posterior_mean_variance(x0, x_t, 1, alphas_cumprod)
    clipped = posterior_log_variance_clipped(alphas_cumprod, torch.tensor([0, 1]))
    assert clipped[0].item() == clipped[1].item() == pytest.approx(math.log(variance_1[0, 0].item()))


def test_posterior_variance_matches_diffusers_fixed_small() -> None:
    scheduler = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="scaled_linear", variance_type="fixed_small", **SD_BETAS
    )
    timesteps = torch.tensor([0, 1, 2, 50, 500, 998, 999])
    expected = torch.stack([scheduler._get_variance(int(t)) for t in timesteps])
    x = torch.zeros(len(timesteps), 1)
    _, variance, _ = posterior_mean_variance(x, x, timesteps, scheduler.alphas_cumprod)
    torch.testing.assert_close(variance[:, 0], expected, rtol=1e-6, atol=1e-6)


def _float64_ddpm_scheduler(**kwargs) -> DDPMScheduler:
    """A stock DDPMScheduler whose schedule tensors are upcast to float64.

    In float32, 1 - alpha_bar at small t loses ~4 significant digits to cancellation, so stock float32 steps differ
    from exact arithmetic by ~1e-5; in float64 both sides evaluate the same formulas and must agree to 1e-6.
    """
    scheduler = DDPMScheduler(num_train_timesteps=T, **kwargs)
    scheduler.betas, scheduler.alphas = scheduler.betas.double(), scheduler.alphas.double()
    scheduler.alphas_cumprod, scheduler.one = scheduler.alphas_cumprod.double(), scheduler.one.double()
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [0, 1, 10, 500, 998, 999])
def test_posterior_mean_matches_diffusers_step(prediction_type: str, t: int) -> None:
    """DDPMScheduler.step returns mu + sqrt(tilde_beta_t) * z; subtract the same z (same seed) to get mu."""
    scheduler = _float64_ddpm_scheduler(
        beta_schedule="scaled_linear",
        variance_type="fixed_small",
        prediction_type=prediction_type,
        clip_sample=False,
        **SD_BETAS,
    )
    model_output = _randn(2, 4, 8, 8, seed=4, dtype=torch.float64)
    x_t = _randn(2, 4, 8, 8, seed=5, dtype=torch.float64)
    out = scheduler.step(model_output, t, x_t, generator=torch.Generator().manual_seed(6))
    z = _randn(2, 4, 8, 8, seed=6, dtype=torch.float64)
    expected_mean = out.prev_sample - scheduler._get_variance(t).sqrt() * z if t > 0 else out.prev_sample

    ac = scheduler.alphas_cumprod
    x0_pred = predict_x0(model_output, x_t, t, ac, prediction_type)
    torch.testing.assert_close(x0_pred, out.pred_original_sample, rtol=1e-6, atol=1e-6)
    mean, _, _ = posterior_mean_variance(x0_pred, x_t, t, ac)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- parameterisations


def _true_predictions(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t and the true eps, x_0 and v for it, from DDPM eq. 4 and Salimans & Ho's v by hand."""
    alphas_cumprod = _alphas_cumprod("scaled_linear")
    t = torch.tensor([0, 3, 400, 999])
    x0, eps = (
        _randn(4, 3, 5, 5, seed=seed, dtype=torch.float64),
        _randn(4, 3, 5, 5, seed=seed + 1, dtype=torch.float64),
    )
    alpha = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}
    return truth, x_t, t, alphas_cumprod


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_x0_from_every_prediction_type(prediction_type: str) -> None:
    truth, x_t, t, alphas_cumprod = _true_predictions()
    x0_pred = predict_x0(truth[prediction_type], x_t, t, alphas_cumprod, prediction_type)
    torch.testing.assert_close(x0_pred, truth["sample"], rtol=1e-9, atol=1e-9)
    with pytest.raises(
        ValueError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction'; got 'x0'"
    ):
        predict_x0(x_t, x_t, t, alphas_cumprod, "x0")  # type: ignore[arg-type]


def test_individual_conversions_match_the_truth() -> None:
    truth, x_t, t, ac = _true_predictions(seed=7)
    eps, x0, v = truth["epsilon"], truth["sample"], truth["v_prediction"]
    torch.testing.assert_close(eps_to_x0(eps, x_t, t, ac), x0)
    torch.testing.assert_close(v_to_x0(v, x_t, t, ac), x0)
    torch.testing.assert_close(get_velocity(x0, eps, t, ac), v)


def test_get_velocity_matches_diffusers() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    x0, noise = _randn(3, 4, 8, 8, seed=10), _randn(3, 4, 8, 8, seed=11)
    t = torch.tensor([0, 600, 999])
    expected = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(get_velocity(x0, noise, t, scheduler.alphas_cumprod), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_target_matches_diffusers(prediction_type: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    x0, noise = _randn(3, 4, 8, 8, seed=12), _randn(3, 4, 8, 8, seed=13)
    t = torch.tensor([5, 600, 999])
    expected = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    ours = training_target(x0, noise, t, scheduler.alphas_cumprod, prediction_type)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_unknown_prediction_type_lists_the_allowed_ones() -> None:
    x0 = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction'"):
        training_target(x0, x0, 0, torch.ones(10) * 0.5, "flow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction'"):
        loss_weights(torch.ones(2), "eps")  # type: ignore[arg-type]


def _diffusers_min_snr_weights(snr_values: torch.Tensor, timesteps: torch.Tensor, prediction_type: str, gamma: float):
    """The weighting in diffusers' examples/text_to_image/train_text_to_image.py, verbatim."""
    mse_loss_weights = torch.stack([snr_values, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr_values
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr_values + 1)
    return mse_loss_weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_script(prediction_type: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    timesteps = torch.tensor([0, 1, 50, 200, 400, 700, 999])
    snr_values = compute_snr(scheduler, timesteps)
    expected = _diffusers_min_snr_weights(snr_values, timesteps, prediction_type, 5.0)
    ours = loss_weights(snr(scheduler.alphas_cumprod, timesteps), prediction_type, min_snr_gamma=5.0)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_l_simple_weights_are_ones_and_gamma_must_be_positive() -> None:
    snr_values = torch.tensor([0.1, 1.0, 100.0])
    torch.testing.assert_close(loss_weights(snr_values, "epsilon"), torch.ones(3))
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        loss_weights(snr_values, "epsilon", min_snr_gamma=0.0)


def test_min_snr_eps_weight_is_finite_at_zero_terminal_snr() -> None:
    alphas_cumprod = _alphas_cumprod("scaled_linear", zero_terminal_snr=True)
    weights = loss_weights(snr(alphas_cumprod, torch.tensor([T - 2, T - 1])), "epsilon", min_snr_gamma=5.0)
    assert weights.tolist() == [1.0, 1.0]
    assert loss_weights(torch.tensor([0.0]), "v_prediction", 5.0).item() == 0.0


def test_diffusion_loss_is_per_sample_weighted_mse() -> None:
    pred, target = _randn(3, 4, 8, 8, seed=14), _randn(3, 4, 8, 8, seed=15)
    weights = torch.tensor([1.0, 0.5, 2.0])
    per_sample = diffusion_loss(pred, target)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), torch.nn.functional.mse_loss(pred, target))
    for b in range(3):
        expected = ((pred[b] - target[b]) ** 2).mean() * weights[b]
        torch.testing.assert_close(diffusion_loss(pred, target, weights)[b], expected)
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(pred, target[:, :2])
