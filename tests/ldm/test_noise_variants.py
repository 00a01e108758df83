"""The loss and noise variants of kohya-ss sd-scripts (debiased estimation, scheduled pseudo-Huber, adaptive offset and
pyramid noise) against closed-form computations in numpy on known inputs, and their draws replayed from the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    debiased_estimation_weights,
    diffusion_loss,
    elementwise_loss,
    huber_c_schedule,
    snr,
)
from ldm.noise import adaptive_noise_offset, pyramid_noise

T = 1000


def _sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled_linear alpha_bar in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _alpha_bar_numpy() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2
    return np.cumprod(1 - betas)


TIMESTEPS = torch.tensor([0, 1, 10, 250, 500, 999])


# ------------------------------------------------------------------------------------------ debiased estimation


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights_are_one_over_sqrt_snr_capped_at_1000(prediction_type: str) -> None:
    ab = _alpha_bar_numpy()[TIMESTEPS.numpy()]
    snr_np = np.minimum(ab / (1 - ab), 1000.0)
    expected = 1 / np.sqrt(snr_np) if prediction_type == "epsilon" else 1 / (snr_np + 1)
    weights = debiased_estimation_weights(snr(_sd_alphas_cumprod(), TIMESTEPS), prediction_type)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)
    # the cap is what sets the weight at t = 0, where SD's SNR is about 1175
    assert ab[0] / (1 - ab[0]) > 1000
    assert weights[0].item() == pytest.approx(1 / np.sqrt(1000) if prediction_type == "epsilon" else 1 / 1001)
    assert torch.all(weights[1:] > weights[:-1]), "noisier steps weigh more"


def test_debiased_weights_refuse_x0_prediction() -> None:
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'v_prediction'"):
        debiased_estimation_weights(torch.ones(2), "sample")


# ------------------------------------------------------------------------------------------------ pseudo-Huber


@pytest.mark.parametrize("c", [0.1, 0.5])
def test_huber_c_schedules_closed_form(c: float) -> None:
    ab = _alpha_bar_numpy()[TIMESTEPS.numpy()]
    t = TIMESTEPS.numpy().astype(float)
    expected = {
        "constant": np.full(len(t), c),
        "exponential": c ** (t / T),
        "snr": (1 - c) / (1 + np.sqrt((1 - ab) / ab)) ** 2 + c,
    }
    for schedule, values in expected.items():
        got = huber_c_schedule(_sd_alphas_cumprod(), TIMESTEPS, c, schedule)
        np.testing.assert_allclose(got.numpy(), values, rtol=1e-12, err_msg=schedule)
    # both schedules fall from about 1 (clean) towards c (all noise)
    for schedule in ("exponential", "snr"):
        got = huber_c_schedule(_sd_alphas_cumprod(), TIMESTEPS, c, schedule)
        assert got[0] > 0.9 and got[-1] < c + 0.05 and torch.all(got[1:] <= got[:-1])


def test_huber_c_schedule_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        huber_c_schedule(_sd_alphas_cumprod(), TIMESTEPS, 0.0, "constant")
    with pytest.raises(ValueError, match="huber_schedule must be one of 'constant', 'exponential', 'snr'"):
        huber_c_schedule(_sd_alphas_cumprod(), TIMESTEPS, 0.1, "linear")


def test_elementwise_losses_on_known_differences() -> None:
    d = np.array([0.0, 0.01, 0.1, 1.0, -3.0])
    c = 0.1
    expected = {
        "l2": d**2,
        "l1": np.abs(d),
        "huber": 2 * c * (np.sqrt(d**2 + c**2) - c),
        "smooth_l1": 2 * (np.sqrt(d**2 + c**2) - c),
    }
    pred, target = torch.tensor(d, dtype=torch.float32).reshape(1, 5), torch.zeros(1, 5)
    for loss_type, values in expected.items():
        got = elementwise_loss(pred, target, loss_type, huber_c=torch.tensor([c]))
        np.testing.assert_allclose(got.numpy()[0], values, rtol=1e-5, atol=1e-9, err_msg=loss_type)
    huber = expected["huber"]
    # pseudo-Huber: quadratic well inside c, linear (slope 2c) well outside
    assert huber[1] == pytest.approx(d[1] ** 2, rel=0.01)
    assert huber[4] == pytest.approx(2 * c * abs(d[4]) - 2 * c**2, rel=0.01)


def test_huber_c_is_per_sample_and_diffusion_loss_averages_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    c = torch.tensor([0.1, 1.0])
    weights = torch.tensor([2.0, 0.5])
    d = (pred - target).numpy().astype(np.float64)
    c_np = c.numpy().astype(np.float64).reshape(2, 1, 1, 1)
    per_sample = (2 * c_np * (np.sqrt(d**2 + c_np**2) - c_np)).mean(axis=(1, 2, 3)) * weights.numpy()
    got = diffusion_loss(pred, target, weights, loss_type="huber", huber_c=c)
    np.testing.assert_allclose(got.numpy(), per_sample, rtol=1e-5)
    with pytest.raises(ValueError, match="needs huber_c"):
        diffusion_loss(pred, target, loss_type="smooth_l1")


def test_default_diffusion_loss_is_the_mean_squared_error() -> None:
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    reference = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    assert torch.equal(diffusion_loss(pred, target), reference)


# --------------------------------------------------------------------------------------------- adaptive offset


def test_adaptive_noise_offset_uses_each_channels_absolute_mean() -> None:
    means = np.array([[0.5, -1.0, 0.0, 2.0], [-0.25, 0.0, 1.5, -3.0]])
    checker = np.indices((6, 6)).sum(axis=0) % 2 * 2.0 - 1.0  # +-1, mean 0
    latents = torch.tensor(means[:, :, None, None] + 0.7 * checker, dtype=torch.float32)
    got = adaptive_noise_offset(latents, noise_offset=0.05, adaptive_noise_scale=0.1)
    assert got.shape == (2, 4, 1, 1)
    np.testing.assert_allclose(got.numpy()[:, :, 0, 0], 0.05 + 0.1 * np.abs(means), rtol=1e-5)
    # a negative scale lowers the offset, never below zero
    lowered = adaptive_noise_offset(latents, noise_offset=0.05, adaptive_noise_scale=-0.1)
    np.testing.assert_allclose(lowered.numpy()[:, :, 0, 0], np.maximum(0.05 - 0.1 * np.abs(means), 0), atol=1e-7)


# ------------------------------------------------------------------------------------------------ pyramid noise


def test_pyramid_noise_with_one_level_adds_white_noise_and_normalises() -> None:
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    got = pyramid_noise(noise, torch.Generator().manual_seed(7), iterations=1, discount=0.3)
    replay = torch.Generator().manual_seed(7)
    torch.rand(1, generator=replay)  # r_0 (unused: r^0 = 1)
    total = noise + torch.randn(2, 3, 8, 8, generator=replay)
    torch.testing.assert_close(got, total / total.std(), rtol=1e-6, atol=1e-6)


def test_pyramid_noise_stops_after_the_one_pixel_level() -> None:
    # on 2x2 noise level 1 is 1x1 for every r in [2, 4): a per-(sample, channel) constant, and the last level drawn
    noise = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    got = pyramid_noise(noise, generator, iterations=6, discount=0.5)
    replay = torch.Generator().manual_seed(3)
    torch.rand(1, generator=replay)
    level0 = torch.randn(2, 3, 2, 2, generator=replay)
    torch.rand(1, generator=replay)
    level1 = torch.randn(2, 3, 1, 1, generator=replay)
    total = noise + level0 + 0.5 * level1
    torch.testing.assert_close(got, total / total.std(), rtol=1e-6, atol=1e-6)
    assert torch.equal(generator.get_state(), replay.get_state()), "no draws after the 1x1 level"


def test_pyramid_noise_statistics_and_reproduction() -> None:
    shape = (4, 4, 64, 64)
    white = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = pyramid_noise(white, torch.Generator().manual_seed(1), iterations=6, discount=0.8)
    b = pyramid_noise(white, torch.Generator().manual_seed(1), iterations=6, discount=0.8)
    c = pyramid_noise(white, torch.Generator().manual_seed(2), iterations=6, discount=0.8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(1.0, abs=1e-5)
    assert a.shape == white.shape and a.dtype == white.dtype

    def lag1_correlation(x: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()

    # white noise has no spatial correlation; the low-resolution levels add it
    assert abs(lag1_correlation(white)) < 0.02
    assert lag1_correlation(a) > 0.15


def test_pyramid_noise_without_iterations_is_the_input_and_checks_discount() -> None:
    noise = torch.randn(1, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert pyramid_noise(noise, generator, iterations=0) is noise
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match=r"discount in \(0, 1\]"):
        pyramid_noise(noise, generator, iterations=2, discount=0.0)
