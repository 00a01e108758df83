"""Tests for ldm.diffusion against closed-form Gaussian math and stock diffusers (DDPMScheduler, compute_snr)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr
from torch.distributions import Normal

from ldm.diffusion import (
    PARAMETERISATIONS,
    alphas_cumprod_from_betas,
    convert_prediction,
    diffusion_loss,
    eps_to_score,
    eps_to_x0,
    get_velocity,
    loss_weights,
    make_beta_schedule,
    posterior_log_variance_clipped,
    posterior_mean_coefficients,
    posterior_mean_variance,
    posterior_variance,
    q_mean_variance,
    q_sample,
    q_sample_from,
    rescale_zero_terminal_snr,
    score_to_eps,
    snr,
    training_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
)

T = 1000
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
# (our schedule name, DDPMScheduler kwargs for the same schedule)
SCHEDULES = [
    ("linear", {"beta_schedule": "linear"}),
    ("scaled_linear", {"beta_schedule": "scaled_linear", **SD_BETAS}),
    ("cosine", {"beta_schedule": "squaredcos_cap_v2"}),
]


def _linear_alpha_bar(t: int, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = T) -> float:
    """alpha_bar at 0-indexed step t of DDPM's linear schedule, by a Python loop over the betas."""
    step = (beta_end - beta_start) / (num_timesteps - 1)
    return math.prod(1 - (beta_start + i * step) for i in range(t + 1))


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------- schedules


def test_linear_schedule_is_ddpm_default() -> None:
    betas = make_beta_schedule("linear")
    assert betas.shape == (T,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    torch.testing.assert_close(betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_scaled_linear_schedule_is_stable_diffusion() -> None:
    betas = make_beta_schedule("scaled_linear")
    assert betas[0].item() == pytest.approx(0.00085, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.012, abs=1e-15)
    step = (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)
    torch.testing.assert_close(betas.sqrt().diff(), torch.full((T - 1,), step, dtype=torch.float64))


@pytest.mark.parametrize("t", [0, 1, 250, 500, 900])
def test_cosine_alphas_cumprod_matches_nichol_dhariwal_formula(t: int) -> None:
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("cosine"))
    # 0-indexed step t is Nichol & Dhariwal's t + 1: alpha_bar = f((t + 1) / T) / f(0) (their eq. 17).
    assert alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-12)


def test_cosine_betas_are_clipped_at_0999() -> None:
    betas = make_beta_schedule("cosine")
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize(("name", "scheduler_kwargs"), SCHEDULES)
def test_schedules_match_diffusers(name: str, scheduler_kwargs: dict) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, **scheduler_kwargs)
    betas = make_beta_schedule(name, T, scheduler_kwargs.get("beta_start"), scheduler_kwargs.get("beta_end"))
    torch.testing.assert_close(betas, scheduler.betas.double(), rtol=0, atol=1e-6)
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    torch.testing.assert_close(alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_diffusers_schedule_name_is_an_alias_of_cosine() -> None:
    torch.testing.assert_close(make_beta_schedule("squaredcos_cap_v2", 50), make_beta_schedule("cosine", 50))


def test_schedule_dtype_and_alphas_cumprod_dtype() -> None:
    betas = make_beta_schedule("linear", 10, dtype=torch.float32)
    assert betas.dtype == torch.float32
    assert alphas_cumprod_from_betas(betas).dtype == torch.float32


def test_unknown_schedule_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="beta schedule name.*'linear'.*'scaled_linear'.*'cosine'.*got 'sigmoid'"):
        make_beta_schedule("sigmoid")  # type: ignore[arg-type]


def test_non_positive_num_timesteps_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_timesteps"):
        make_beta_schedule("linear", 0)


@pytest.mark.parametrize(("name", "scheduler_kwargs"), SCHEDULES)
def test_zero_terminal_snr_matches_diffusers(name: str, scheduler_kwargs: dict) -> None:
    betas = make_beta_schedule(name, T, scheduler_kwargs.get("beta_start"), scheduler_kwargs.get("beta_end"))
    rescaled = rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(rescaled, diffusers_rescale_zero_terminal_snr(betas.clone()), rtol=0, atol=1e-12)
    scheduler = DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True, **scheduler_kwargs)
    alphas_cumprod = alphas_cumprod_from_betas(rescaled)
    torch.testing.assert_close(alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_zero_terminal_snr_zeroes_last_and_keeps_first_alpha_bar() -> None:
    betas = make_beta_schedule("scaled_linear")
    alphas_cumprod = alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas))
    assert alphas_cumprod[-1].item() == 0.0
    assert alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    assert snr(alphas_cumprod, T - 1).item() == 0.0
    assert bool((alphas_cumprod.diff() < 0).all())


# ------------------------------------------------------------------------------------------------------------- SNR


def test_snr_matches_diffusers_compute_snr() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    timesteps = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    ours = snr(scheduler.alphas_cumprod, timesteps)
    assert ours.shape == timesteps.shape
    torch.testing.assert_close(ours, compute_snr(scheduler, timesteps), rtol=1e-6, atol=1e-6)


def test_snr_closed_form() -> None:
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear"))
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
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear"))
    ab = _linear_alpha_bar(t)
    x0 = torch.tensor([[0.7], [-1.3]], dtype=torch.float64).repeat_interleave(n, dim=0)
    x_t = q_sample(x0, t, _randn(2 * n, 1, seed=3, dtype=torch.float64), alphas_cumprod).view(2, n)
    for row, value in zip(x_t, (0.7, -1.3)):
        assert row.mean().item() == pytest.approx(math.sqrt(ab) * value, abs=5 * math.sqrt((1 - ab) / n))
        assert row.var().item() == pytest.approx(1 - ab, abs=5 * math.sqrt(2 / n) * (1 - ab))


def test_q_sample_from_continues_the_forward_process() -> None:
    # q(x_t | x_s) is DDPM eq. 2 applied from step s + 1 to t: mean and variance from a loop over the single steps.
    n, s, t = 200_000, 200, 450
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear"))
    ratio = _linear_alpha_bar(t) / _linear_alpha_bar(s)
    x_s = torch.tensor([[0.7], [-1.3]], dtype=torch.float64).repeat_interleave(n, dim=0)
    x_t = q_sample_from(x_s, s, t, _randn(2 * n, 1, seed=4, dtype=torch.float64), alphas_cumprod).view(2, n)
    for row, value in zip(x_t, (0.7, -1.3)):
        assert row.mean().item() == pytest.approx(math.sqrt(ratio) * value, abs=5 * math.sqrt((1 - ratio) / n))
        assert row.var().item() == pytest.approx(1 - ratio, abs=5 * math.sqrt(2 / n) * (1 - ratio))


def test_q_sample_from_the_data_is_q_sample_and_composes_to_it() -> None:
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("scaled_linear"))
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
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear"))
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
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear"))
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
    assert posterior_variance(alphas_cumprod, t).item() == pytest.approx(1 / precision, rel=1e-10)


def test_posterior_at_first_step_is_the_data() -> None:
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("linear"))
    coef_x0, coef_xt = posterior_mean_coefficients(alphas_cumprod, 0)
    assert (coef_x0.item(), coef_xt.item()) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert posterior_variance(alphas_cumprod, 0).item() == 0.0
    # improved-diffusion's clipping: log tilde_beta_0 (= -inf) is replaced by log tilde_beta_1.
    clipped = posterior_log_variance_clipped(alphas_cumprod, torch.tensor([0, 1]))
    assert clipped[0].item() == clipped[1].item() == pytest.approx(math.log(posterior_variance(alphas_cumprod, 1)))


def test_posterior_variance_matches_diffusers_fixed_small() -> None:
    scheduler = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="scaled_linear", variance_type="fixed_small", **SD_BETAS
    )
    timesteps = torch.tensor([0, 1, 2, 50, 500, 998, 999])
    expected = torch.stack([scheduler._get_variance(int(t)) for t in timesteps])
    torch.testing.assert_close(posterior_variance(scheduler.alphas_cumprod, timesteps), expected, rtol=1e-6, atol=1e-6)


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
    x0_pred = convert_prediction(model_output, x_t, t, ac, prediction_type, "sample")
    torch.testing.assert_close(x0_pred, out.pred_original_sample, rtol=1e-6, atol=1e-6)
    mean, _, _ = posterior_mean_variance(x0_pred, x_t, t, ac)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- parameterisations


def _true_predictions(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t and the true eps, x_0, v and score for it, from DDPM eq. 4 and Salimans & Ho's v by hand."""
    alphas_cumprod = alphas_cumprod_from_betas(make_beta_schedule("scaled_linear"))
    t = torch.tensor([0, 3, 400, 999])
    x0, eps = (
        _randn(4, 3, 5, 5, seed=seed, dtype=torch.float64),
        _randn(4, 3, 5, 5, seed=seed + 1, dtype=torch.float64),
    )
    alpha = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "score": -eps / sigma}
    return truth, x_t, t, alphas_cumprod


@pytest.mark.parametrize("source", PARAMETERISATIONS)
@pytest.mark.parametrize("target", PARAMETERISATIONS)
def test_convert_prediction_between_all_parameterisations(source: str, target: str) -> None:
    truth, x_t, t, alphas_cumprod = _true_predictions()
    converted = convert_prediction(truth[source], x_t, t, alphas_cumprod, source, target)
    torch.testing.assert_close(converted, truth[target], rtol=1e-9, atol=1e-9)


def test_individual_conversions_round_trip() -> None:
    truth, x_t, t, ac = _true_predictions(seed=7)
    eps, x0, v = truth["epsilon"], truth["sample"], truth["v_prediction"]
    torch.testing.assert_close(eps_to_x0(x0_to_eps(x0, x_t, t, ac), x_t, t, ac), x0)
    torch.testing.assert_close(x0_to_eps(eps_to_x0(eps, x_t, t, ac), x_t, t, ac), eps)
    torch.testing.assert_close(get_velocity(v_to_x0(v, x_t, t, ac), v_to_eps(v, x_t, t, ac), t, ac), v)
    torch.testing.assert_close(score_to_eps(eps_to_score(eps, t, ac), t, ac), eps)


def test_score_is_the_gradient_of_log_q() -> None:
    """-eps / sigma_t equals grad_{x_t} log N(x_t; sqrt(ab) x0, 1 - ab) computed by autograd."""
    truth, x_t, t, alphas_cumprod = _true_predictions(seed=9)
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = x_t.clone().requires_grad_(True)
    Normal(ab.sqrt() * truth["sample"], (1 - ab).sqrt()).log_prob(x_t).sum().backward()
    torch.testing.assert_close(eps_to_score(truth["epsilon"], t, alphas_cumprod), x_t.grad)


def test_get_velocity_matches_diffusers() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD_BETAS)
    x0, noise = _randn(3, 4, 8, 8, seed=10), _randn(3, 4, 8, 8, seed=11)
    t = torch.tensor([0, 600, 999])
    expected = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(get_velocity(x0, noise, t, scheduler.alphas_cumprod), expected, rtol=0, atol=1e-6)


def test_unknown_parameterisation_lists_the_allowed_ones() -> None:
    truth, x_t, t, ac = _true_predictions()
    with pytest.raises(ValueError, match="'epsilon', 'sample', 'v_prediction', 'score'; got 'x0'"):
        convert_prediction(truth["epsilon"], x_t, t, ac, "epsilon", "x0")  # type: ignore[arg-type]


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
    alphas_cumprod = alphas_cumprod_from_betas(rescale_zero_terminal_snr(make_beta_schedule("scaled_linear")))
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
