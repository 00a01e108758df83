"""Tests for ldm.likelihood: Gaussian KLs and likelihoods against closed forms, and the variational bound of a perfect
denoiser on point-mass data, where every term of DDPM eq. 5 is known by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from torch.distributions import Normal, kl_divergence

from ldm.diffusion import get_velocity, q_sample
from ldm.likelihood import (
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    model_log_variance,
    normal_kl,
    prior_bpd,
    variational_bound_bpd,
    vb_term_bpd,
)

LN2 = math.log(2.0)


def _linear_alphas_cumprod(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """alpha_bar of a linear beta schedule (DDPM sec. 4) in float64."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64), dim=0)


def _phi(x: float) -> float:
    """Standard normal CDF by math.erf."""
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _linear_schedule_by_hand(
    num_timesteps: int, beta_start: float, beta_end: float
) -> tuple[list[float], list[float]]:
    """betas and alpha_bars of a linear schedule, in Python floats."""
    betas = [beta_start + i * (beta_end - beta_start) / (num_timesteps - 1) for i in range(num_timesteps)]
    return betas, [math.prod(1 - b for b in betas[: t + 1]) for t in range(num_timesteps)]


# ----------------------------------------------------------------------------------------- Gaussian building blocks


def test_normal_kl_of_identical_gaussians_is_zero() -> None:
    mean, logvar = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(10, dtype=torch.float64))


def test_normal_kl_hand_value() -> None:
    # KL(N(1, 2) || N(0, 3)) = 0.5 * (log(3 / 2) + 2 / 3 + 1 / 3 - 1)
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (1.0, math.log(2.0), 0.0, math.log(3.0))))
    assert kl.item() == pytest.approx(0.5 * math.log(1.5), rel=1e-12)


def test_normal_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.1), (0.3, 0.004), (-0.98, 0.02), (1.5, 0.7), (0.0, 1e-4)])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean: float, scale: float) -> None:
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_bins_by_hand() -> None:
    mean, scale, h = 0.1, 0.5, 1 / 255
    x = torch.tensor([-1.0, 2 * 140 / 255 - 1, 1.0], dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    middle = x[1].item()
    expected = [
        math.log(_phi((-1 + h - mean) / scale)),
        math.log(_phi((middle + h - mean) / scale) - _phi((middle - h - mean) / scale)),
        math.log(1 - _phi((1 - h - mean) / scale)),
    ]
    torch.testing.assert_close(log_probs, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_discretized_likelihood_keeps_precision_six_sigma_into_the_upper_tail() -> None:
    """Phi(b) - Phi(a) near 1 would lose ~7 digits; the exact mass is (erfc(a / sqrt 2) - erfc(b / sqrt 2)) / 2."""
    scale, h, x = 0.1, 1 / 255, 2 * 204 / 255 - 1  # x = 0.6: the bin spans ~5.96 to ~6.04 standard deviations
    lower, upper = (x - h) / scale, (x + h) / scale
    expected = math.log(0.5 * (math.erfc(lower / math.sqrt(2)) - math.erfc(upper / math.sqrt(2))))
    log_prob = discretized_gaussian_log_likelihood(
        torch.tensor([x], dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.full((1,), math.log(scale), dtype=torch.float64),
    )
    assert log_prob.item() == pytest.approx(expected, rel=1e-10)


def test_continuous_likelihood_matches_torch_distributions() -> None:
    x, mean, log_scale = (torch.randn(20, generator=torch.Generator().manual_seed(s)) for s in range(3))
    expected = Normal(mean, log_scale.exp()).log_prob(x)
    torch.testing.assert_close(continuous_gaussian_log_likelihood(x, mean, log_scale), expected)


# --------------------------------------------------------------------------------------------------------- VB terms


def test_prior_bpd_by_hand() -> None:
    betas, alpha_bars = _linear_schedule_by_hand(1000, 1e-4, 0.02)
    alphas_cumprod = _linear_alphas_cumprod()
    ab = alpha_bars[-1]
    # KL(N(sqrt(ab) c, 1 - ab) || N(0, 1)) per dimension, in bits
    for c in (0.0, 0.75):
        expected = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * c**2) / LN2
        x0 = torch.full((2, 3, 4, 4), c, dtype=torch.float64)
        torch.testing.assert_close(prior_bpd(x0, alphas_cumprod), torch.full((2,), expected, dtype=torch.float64))


def test_prior_bpd_is_zero_with_zero_terminal_snr() -> None:
    alphas_cumprod = torch.cumprod(
        1 - rescale_zero_terminal_snr(torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2), dim=0
    )
    assert prior_bpd(torch.ones(1, 4, 2, 2), alphas_cumprod).item() == 0.0


def test_model_log_variance_by_hand() -> None:
    betas, alpha_bars = _linear_schedule_by_hand(10, 0.05, 0.5)
    alphas_cumprod = _linear_alphas_cumprod(10, 0.05, 0.5)
    tilde_beta_1 = (1 - alpha_bars[0]) / (1 - alpha_bars[1]) * betas[1]
    t = torch.tensor([0, 1, 5, 9])
    expected_beta = [math.log(tilde_beta_1)] + [math.log(betas[s]) for s in (1, 5, 9)]
    expected_posterior = [math.log(tilde_beta_1)] + [
        math.log((1 - alpha_bars[s - 1]) / (1 - alpha_bars[s]) * betas[s]) for s in (1, 5, 9)
    ]
    torch.testing.assert_close(model_log_variance(alphas_cumprod, t, "beta"), torch.tensor(expected_beta).double())
    torch.testing.assert_close(
        model_log_variance(alphas_cumprod, t, "posterior"), torch.tensor(expected_posterior).double()
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_kl_term_is_zero_for_the_true_prediction(prediction_type: str) -> None:
    """With the noise that made x_t, the model's x_0 is the true x_0, so p(x_{t-1}|x_t) = q(x_{t-1}|x_t, x_0)."""
    alphas_cumprod = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 900, 998])
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    truth = {"epsilon": noise, "sample": x0, "v_prediction": get_velocity(x0, noise, t, alphas_cumprod)}
    terms = vb_term_bpd(truth[prediction_type], x0, x_t, t, alphas_cumprod, prediction_type)
    assert terms.abs().max().item() < 1e-10
    wrong = vb_term_bpd(truth[prediction_type] + 0.1, x0, x_t, t, alphas_cumprod, prediction_type)
    assert bool((wrong > 1e-8).all())


def test_clip_denoised_clamps_the_predicted_x0_to_the_data_range() -> None:
    alphas_cumprod = _linear_alphas_cumprod()
    x0 = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    x_t = q_sample(x0, 100, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).double(), alphas_cumprod)
    t = torch.tensor([1, 100])
    too_far, edge = torch.full_like(x0, 3.0), torch.ones_like(x0)
    clipped = vb_term_bpd(too_far, x0, x_t, t, alphas_cumprod, "sample", clip_denoised=True)
    torch.testing.assert_close(clipped, vb_term_bpd(edge, x0, x_t, t, alphas_cumprod, "sample"))
    assert bool((vb_term_bpd(too_far, x0, x_t, t, alphas_cumprod, "sample") > clipped).all())


# ------------------------------------------------------------------------------------------------ the full bound


NUM_STEPS, BETA_START, BETA_END = 10, 0.05, 0.5


def _point_mass_setup() -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Data: a fixed 8-bit image x0 in [-1, 1] (a point mass). Its exact denoiser knows x0, so it predicts the true
    eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) (DDPM eq. 4) from x_t alone."""
    alphas_cumprod = _linear_alphas_cumprod(NUM_STEPS, BETA_START, BETA_END)
    levels = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    levels[0, 0, 0, 0], levels[1, 0, 0, 0] = 0, 255  # both edge bins
    x0 = (levels.double() / 255) * 2 - 1

    def perfect_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    return x0, alphas_cumprod, perfect_model


def _decoder_bits_by_hand(x0: torch.Tensor, sigma: float) -> list[float]:
    """-log2 P(x0 | mean = x0, std = sigma) per dimension, for each sample, from Phi by math.erf."""
    h = 1 / 255
    inner = -math.log(_phi(h / sigma) - _phi(-h / sigma))
    edge = -math.log(_phi(h / sigma))  # the edge bin extends to infinity: P = Phi(h / sigma)
    out = []
    for sample in x0:
        is_edge = (sample.abs() == 1).double()
        out.append(((is_edge * edge + (1 - is_edge) * inner).mean().item()) / LN2)
    return out


def _prior_bits_by_hand(x0: torch.Tensor, ab: float) -> list[float]:
    return [(0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * (s**2).mean().item()) / LN2) for s in x0]


def test_variational_bound_of_perfect_model_with_posterior_variance() -> None:
    x0, alphas_cumprod, model = _point_mass_setup()
    betas, alpha_bars = _linear_schedule_by_hand(NUM_STEPS, BETA_START, BETA_END)
    bound = variational_bound_bpd(model, x0, alphas_cumprod, torch.Generator().manual_seed(1))
    assert bound.terms_bpd.shape == (2, NUM_STEPS)
    assert bound.terms_bpd[:, 1:].abs().max().item() < 1e-10

    sigma = math.sqrt((1 - alpha_bars[0]) / (1 - alpha_bars[1]) * betas[1])
    decoder = torch.tensor(_decoder_bits_by_hand(x0, sigma), dtype=torch.float64)
    prior = torch.tensor(_prior_bits_by_hand(x0, alpha_bars[-1]), dtype=torch.float64)
    torch.testing.assert_close(bound.terms_bpd[:, 0], decoder, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bound.prior_bpd, prior, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bound.total_bpd, decoder + prior, rtol=1e-9, atol=1e-10)


def test_variational_bound_of_perfect_model_with_beta_variance() -> None:
    """Same means, but p has variance beta_t: each L_t is KL(N(m, tilde_beta_t) || N(m, beta_t)) per dimension."""
    x0, alphas_cumprod, model = _point_mass_setup()
    betas, alpha_bars = _linear_schedule_by_hand(NUM_STEPS, BETA_START, BETA_END)
    bound = variational_bound_bpd(model, x0, alphas_cumprod, torch.Generator().manual_seed(1), model_variance="beta")
    for t in range(1, NUM_STEPS):
        tilde = (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]) * betas[t]
        expected = 0.5 * (math.log(betas[t] / tilde) + tilde / betas[t] - 1) / LN2
        assert bound.terms_bpd[:, t].tolist() == pytest.approx([expected, expected], rel=1e-9)
    sigma = math.sqrt((1 - alpha_bars[0]) / (1 - alpha_bars[1]) * betas[1])
    assert bound.terms_bpd[:, 0].tolist() == pytest.approx(_decoder_bits_by_hand(x0, sigma), rel=1e-9)


def test_variational_bound_continuous_decoder_is_gaussian_entropy() -> None:
    """-log N(x0; x0, sigma^2) = 0.5 log(2 pi sigma^2) nats per dimension, for the continuous (latent) decoder."""
    x0, alphas_cumprod, model = _point_mass_setup()
    betas, alpha_bars = _linear_schedule_by_hand(NUM_STEPS, BETA_START, BETA_END)
    bound = variational_bound_bpd(
        model, x0, alphas_cumprod, torch.Generator().manual_seed(1), decoder_nll="continuous"
    )
    variance = (1 - alpha_bars[0]) / (1 - alpha_bars[1]) * betas[1]
    expected = 0.5 * math.log(2 * math.pi * variance) / LN2
    assert bound.terms_bpd[:, 0].tolist() == pytest.approx([expected, expected], rel=1e-9)


def test_variational_bound_is_reproducible_and_worse_for_a_wrong_model() -> None:
    x0, alphas_cumprod, model = _point_mass_setup()

    def zero_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)

    first = variational_bound_bpd(zero_model, x0, alphas_cumprod, torch.Generator().manual_seed(3))
    again = variational_bound_bpd(zero_model, x0, alphas_cumprod, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first.total_bpd, again.total_bpd, rtol=0, atol=0)
    perfect = variational_bound_bpd(model, x0, alphas_cumprod, torch.Generator().manual_seed(3))
    assert bool((first.total_bpd > perfect.total_bpd + 1.0).all())


def test_float32_input_gives_float32_bound() -> None:
    x0, alphas_cumprod, model = _point_mass_setup()
    bound = variational_bound_bpd(
        lambda x_t, t: model(x_t.double(), t).float(), x0.float(), alphas_cumprod, torch.Generator().manual_seed(1)
    )
    assert bound.total_bpd.dtype == torch.float32
    assert bound.terms_bpd[:, 1:].abs().max().item() < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_variance": "learned"}, "model_variance must be one of 'posterior', 'beta'; got 'learned'"),
        ({"decoder_nll": "logistic"}, "decoder_nll must be one of 'discretized', 'continuous'; got 'logistic'"),
        ({"prediction_type": "x0"}, "prediction_type must be one of 'epsilon', 'sample', 'v_prediction'; got 'x0'"),
    ],
)
def test_bad_choices_are_rejected_before_any_model_call(kwargs: dict, message: str) -> None:
    x0, alphas_cumprod, _ = _point_mass_setup()

    def model_that_must_not_run(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model was called")

    with pytest.raises(ValueError, match=message):
        variational_bound_bpd(model_that_must_not_run, x0, alphas_cumprod, torch.Generator(), **kwargs)
