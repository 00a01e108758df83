"""The kohya-ss loss, noise and timestep options of the objective and the optimizers of ``--optimizer``: each against a
closed form (the loss of a zero-predicting model computed in numpy from the replayed draws; an optimizer's first step),
the default loss unchanged bit for bit, the flags' checks, and short training runs (one resumed exactly)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm.diffusion import q_sample, training_target
from ldm.noise import pyramid_noise
from ldm.presets import build_components
from training.command import LoopConfig, make_optimizer, parse_optimizer_args
from training.config import ConfigError, parse_config
from training.objective import ObjectiveConfig, diffusion_training_loss, sample_timesteps
from training.train_text_to_image import TrainConfig, train

from .test_train_text_to_image import assert_same_weights, config, unet_weights

T = 1000


def _alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled_linear schedule in float32, as a diffusers scheduler holds it."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


class ZeroUNet(torch.nn.Module):
    """Predicts 0 and records the timesteps it was called with: the loss is then a closed form of the target."""

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        self.timesteps = t
        return (torch.zeros_like(x),)


def _latents() -> torch.Tensor:
    """(B=3, C=4, 6, 6) latents whose channel means are known: ``MEANS`` plus a zero-mean checkerboard."""
    checker = np.indices((6, 6)).sum(axis=0) % 2 * 2.0 - 1.0
    return torch.tensor(MEANS[:, :, None, None] + 0.5 * checker, dtype=torch.float32)


MEANS = np.array([[0.5, -1.0, 0.0, 2.0], [-0.25, 0.0, 1.5, -3.0], [1.0, 1.0, -1.0, 0.1]])


def _zero_model_loss(objective: ObjectiveConfig, seed: int = 0) -> tuple[float, torch.Tensor]:
    unet = ZeroUNet()
    loss = diffusion_training_loss(
        unet, _latents(), torch.zeros(3, 2, 8), _alphas_cumprod(), objective, torch.Generator().manual_seed(seed)
    )
    return loss.item(), unet.timesteps


# ---------------------------------------------------------------------------------------- the objective, closed form


def test_default_loss_is_unchanged_bit_for_bit() -> None:
    """The objective as it was before the variants (same draws in the same order, same arithmetic) on a tiny U-Net."""
    unet = build_components("tiny", seed=0)["unet"]
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 7, 32, generator=g)
    alphas_cumprod = _alphas_cumprod()
    for objective in (ObjectiveConfig(), ObjectiveConfig(noise_offset=0.1, snr_gamma=5.0)):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            loss = diffusion_training_loss(unet, latents, embeds, alphas_cumprod, objective, generator)
            replay = torch.Generator().manual_seed(1)
            t = torch.randint(0, T, (3,), generator=replay)
            noise = torch.randn(latents.shape, generator=replay)
            if objective.noise_offset:
                noise = noise + objective.noise_offset * torch.randn((3, 4, 1, 1), generator=replay)
            pred = unet(q_sample(latents, t, noise, alphas_cumprod), t, encoder_hidden_states=embeds).sample
            target = training_target(latents, noise, t, alphas_cumprod, "epsilon")
            per_sample = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            if objective.snr_gamma:
                snr_t = alphas_cumprod.double()[t] / (1 - alphas_cumprod.double()[t])
                per_sample = per_sample * (objective.snr_gamma / snr_t).clamp(max=1).float()
        assert torch.equal(loss, per_sample.mean()), objective
        assert torch.equal(generator.get_state(), replay.get_state()), "the RNG stream is the same"


def _replay(seed: int, *, offset: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The timesteps, white noise and offset draws the objective makes from ``seed``, in its order."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (3,), generator=g).numpy()
    noise = torch.randn(3, 4, 6, 6, generator=g).double().numpy()
    offset_draw = torch.randn(3, 4, 1, 1, generator=g).double().numpy() if offset else np.zeros((3, 4, 1, 1))
    return t, noise, offset_draw


def _alpha_bar() -> np.ndarray:
    return _alphas_cumprod().double().numpy()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_loss_closed_form(prediction_type: str) -> None:
    loss, _ = _zero_model_loss(ObjectiveConfig(prediction_type=prediction_type, debiased_estimation=True))
    t, noise, _ = _replay(0)
    ab = _alpha_bar()[t]
    snr_t = np.minimum(ab / (1 - ab), 1000)
    alpha, sigma = np.sqrt(ab)[:, None, None, None], np.sqrt(1 - ab)[:, None, None, None]
    if prediction_type == "epsilon":
        target, weight = noise, 1 / np.sqrt(snr_t)
    else:  # v = alpha eps - sigma x_0, kohya's weight 1 / (SNR + 1)
        target, weight = alpha * noise - sigma * _latents().double().numpy(), 1 / (snr_t + 1)
    expected = np.mean(weight * (target**2).mean(axis=(1, 2, 3)))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_debiased_estimation_multiplies_min_snr_weights() -> None:
    loss, _ = _zero_model_loss(ObjectiveConfig(debiased_estimation=True, snr_gamma=5.0))
    t, noise, _ = _replay(0)
    ab = _alpha_bar()[t]
    snr_t = ab / (1 - ab)
    weight = np.minimum(snr_t, 5.0) / snr_t / np.sqrt(np.minimum(snr_t, 1000))
    assert loss == pytest.approx(np.mean(weight * (noise**2).mean(axis=(1, 2, 3))), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_scheduled_huber_loss_closed_form(loss_type: str, schedule: str) -> None:
    c = 0.2
    loss, _ = _zero_model_loss(ObjectiveConfig(loss_type=loss_type, huber_schedule=schedule, huber_c=c))
    t, noise, _ = _replay(0)
    ab = _alpha_bar()[t]
    c_t = {
        "constant": np.full(3, c),
        "exponential": np.exp(math.log(c) / T * t),
        "snr": (1 - c) / (1 + np.sqrt((1 - ab) / ab)) ** 2 + c,
    }[schedule][:, None, None, None]
    pseudo_huber = 2 * (np.sqrt(noise**2 + c_t**2) - c_t)
    elementwise = c_t * pseudo_huber if loss_type == "huber" else pseudo_huber
    assert loss == pytest.approx(elementwise.mean(), rel=1e-5)


def test_l1_loss_closed_form() -> None:
    loss, _ = _zero_model_loss(ObjectiveConfig(loss_type="l1"))
    _, noise, _ = _replay(0)
    assert loss == pytest.approx(np.abs(noise).mean(), rel=1e-5)


def test_adaptive_noise_offset_closed_form() -> None:
    loss, _ = _zero_model_loss(ObjectiveConfig(noise_offset=0.1, adaptive_noise_scale=0.2))
    _, noise, offset_draw = _replay(0, offset=True)
    strength = np.maximum(0.1 + 0.2 * np.abs(MEANS), 0)[:, :, None, None]
    assert loss == pytest.approx(((noise + strength * offset_draw) ** 2).mean(), rel=1e-5)
    # without the adaptive part the strength is the plain offset
    plain, _ = _zero_model_loss(ObjectiveConfig(noise_offset=0.1))
    assert plain == pytest.approx(((noise + 0.1 * offset_draw) ** 2).mean(), rel=1e-5)


def test_pyramid_noise_is_drawn_after_the_offset_from_the_same_generator() -> None:
    objective = ObjectiveConfig(noise_offset=0.1, multires_noise_iterations=4, multires_noise_discount=0.5)
    loss, _ = _zero_model_loss(objective, seed=4)
    g = torch.Generator().manual_seed(4)
    torch.randint(0, T, (3,), generator=g)
    noise = torch.randn(3, 4, 6, 6, generator=g)
    noise = noise + 0.1 * torch.randn(3, 4, 1, 1, generator=g)
    noise = pyramid_noise(noise, g, 4, 0.5)
    assert loss == pytest.approx((noise.double() ** 2).mean().item(), rel=1e-5)
    assert loss == _zero_model_loss(objective, seed=4)[0] != _zero_model_loss(objective, seed=5)[0]


def test_timestep_range() -> None:
    t = sample_timesteps(20000, T, torch.Generator().manual_seed(0), 200, 300)
    assert t.min().item() == 200 and t.max().item() == 299
    counts = torch.bincount(t - 200, minlength=100)
    assert counts.min() > 120 and counts.max() < 280, "about uniform: 200 per value"
    # the default range is the same single draw as before
    default = sample_timesteps(8, T, torch.Generator().manual_seed(1))
    assert torch.equal(default, torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(1)))
    _, seen = _zero_model_loss(ObjectiveConfig(min_timestep=990))
    assert bool(((seen >= 990) & (seen < T)).all())


def test_objective_checks_the_timestep_range_against_the_schedule() -> None:
    ObjectiveConfig(min_timestep=10, max_timestep=T).check(T)
    for low, high in ((0, T + 1), (T, None), (5, 5)):
        with pytest.raises(ConfigError, match="0 <= min_timestep < max_timestep <= 1000"):
            ObjectiveConfig(min_timestep=low, max_timestep=high).check(T)
    with pytest.raises(ConfigError, match="debiased_estimation_loss is defined for epsilon and v_prediction"):
        ObjectiveConfig(prediction_type="sample", debiased_estimation=True).check(T)


# ----------------------------------------------------------------------------------------------------- the flags


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adaptive_noise_scale": 0.1}, "adaptive_noise_scale adapts --noise-offset"),
        ({"loss_type": "huber", "huber_c": 0.0}, "huber_c must be > 0"),
        ({"loss_type": "huber", "huber_c": 2.0}, "<= 1 with the snr and exponential schedules"),
        ({"huber_c": 0.3}, "huber_schedule and huber_c are settings of --loss-type huber or smooth_l1"),
        ({"multires_noise_iterations": 6, "multires_noise_discount": 1.5}, r"multires_noise_discount in \(0, 1\]"),
        ({"multires_noise_discount": 0.5}, "setting of --multires-noise-iterations"),
        ({"min_timestep": 500, "max_timestep": 500}, "0 <= min_timestep < max_timestep"),
        ({"min_timestep": -1}, "0 <= min_timestep < max_timestep"),
        ({"use_8bit_adam": True, "optimizer": "lion"}, "use_8bit_adam means --optimizer adamw8bit"),
        ({"optimizer_args": ["weight_decay"]}, "key=value items"),
        ({"optimizer_args": ["lr=1"]}, "cannot set lr"),
        ({"optimizer": "lion", "adam_beta1": 0.8}, "adam_beta1: settings of AdamW, not of --optimizer lion"),
    ],
)
def test_bad_settings_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(pretrained_model="model", dataset="data", **overrides).validate()


def test_flags_parse() -> None:
    argv = ["--pretrained-model", "m", "--dataset", "d", "--loss-type", "huber", "--huber-schedule", "exponential"]
    argv += ["--debiased-estimation-loss", "--min-timestep", "100", "--max-timestep", "900", "--noise-offset", "0.05"]
    argv += ["--adaptive-noise-scale", "0.01", "--multires-noise-iterations", "6", "--multires-noise-discount", "0.4"]
    argv += ["--optimizer", "prodigy", "--optimizer-args", "d_coef=2", "betas=(0.9,0.99)", "decouple=True"]
    parsed = parse_config(TrainConfig, argv, prog="train", description="")
    assert (parsed.loss_type, parsed.huber_schedule, parsed.debiased_estimation_loss) == ("huber", "exponential", True)
    assert (parsed.min_timestep, parsed.max_timestep, parsed.adaptive_noise_scale) == (100, 900, 0.01)
    assert (parsed.multires_noise_iterations, parsed.multires_noise_discount, parsed.optimizer) == (6, 0.4, "prodigy")
    assert parse_optimizer_args(parsed.optimizer_args) == {"d_coef": 2, "betas": (0.9, 0.99), "decouple": True}


def test_optimizer_args_values() -> None:
    parsed = parse_optimizer_args(["a=1", "b=1e-3", "c=false", "d=None", "e=(1, 2)", "f=name", "g='quoted'"])
    assert parsed == {"a": 1, "b": 1e-3, "c": False, "d": None, "e": (1, 2), "f": "name", "g": "quoted"}
    with pytest.raises(ConfigError, match="gives a twice"):
        parse_optimizer_args(["a=1", "a=2"])


# ------------------------------------------------------------------------------------------------------ optimizers


def _one_step(optimizer: str, *args: str, lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """One step of ``--optimizer`` on loss = sum(w * g) (gradient g): the weights before, after, and the optimizer."""
    grad = torch.tensor([0.5, -2.0, 1e-3, -0.1])
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0, 0.0]))
    before = weight.detach().clone()
    loop = LoopConfig(dataset="d", optimizer=optimizer, optimizer_args=list(args), learning_rate=lr)
    loop.validate()
    opt = make_optimizer([weight], loop)
    (weight * grad).sum().backward()
    opt.step()
    return before, weight.detach(), opt


def test_adamw_first_step_is_lr_times_sign_after_decay() -> None:
    before, after, _ = _one_step("adamw")
    grad = torch.tensor([0.5, -2.0, 1e-3, -0.1])
    # AdamW (Loshchilov & Hutter 2019): decoupled decay, then m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
    expected = before * (1 - 0.1 * 1e-2) - 0.1 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(after, expected)


def test_lion_first_step_is_lr_times_sign() -> None:
    before, after, opt = _one_step("lion", "weight_decay=0.5", lr=0.01)
    # Lion (Chen et al. 2023): update = sign(beta1 m + (1 - beta1) g) = sign(g) with m = 0; decay p *= 1 - lr * wd
    expected = before * (1 - 0.01 * 0.5) - 0.01 * torch.tensor([1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(after, expected)
    assert type(opt).__module__.startswith("lion_pytorch") and opt.param_groups[0]["weight_decay"] == 0.5


def test_adafactor_first_step_on_a_vector_is_lr_times_sign() -> None:
    before, after, opt = _one_step("adafactor")
    # Adafactor (Shazeer & Stern 2018) at a fixed lr: beta2 at step 1 is 0, so v = g^2 + eps1 and the update is
    # g / |g|, whose RMS 1 is within the clipping threshold
    torch.testing.assert_close(after, before - 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert opt.param_groups[0]["relative_step"] is False


def test_prodigy_first_step_uses_d0() -> None:
    before, after, opt = _one_step("prodigy", "d0=1e-4", lr=1.0)
    # Prodigy (Mishchenko & Defazio 2024): at step 1 the estimate of d is its start d0; the Adam-like step is
    # d0 * lr * (1 - beta1) d0 g / (d0 sqrt(1 - beta2) |g| + d0 eps), about d0 * 0.1 / sqrt(0.001) * sign(g)
    grad = torch.tensor([0.5, -2.0, 1e-3, -0.1])
    expected = before - 1e-4 * 0.1 * grad / (math.sqrt(0.001) * grad.abs() + 1e-8)
    torch.testing.assert_close(after, expected)
    assert type(opt).__module__.startswith("prodigyopt")


def test_missing_optimizer_packages_name_the_pip_install(monkeypatch) -> None:
    for name, module, package in (
        ("prodigy", "prodigyopt", "prodigyopt"),
        ("lion", "lion_pytorch", "lion-pytorch"),
        ("adamw8bit", "bitsandbytes", "bitsandbytes"),
    ):
        monkeypatch.setitem(sys.modules, module, None)  # a missing package: import raises ImportError
        with pytest.raises(ConfigError, match=f"optimizer {name} needs the {package} package: pip install {package}"):
            _one_step(name)


def test_optimizer_args_the_optimizer_cannot_take_are_refused() -> None:
    with pytest.raises(ConfigError, match="relative_step and warmup_init are not supported"):
        _one_step("adafactor", "relative_step=true")
    with pytest.raises(ConfigError, match="optimizer_args do not fit optimizer lion"):
        _one_step("lion", "momentum=0.9")


# ------------------------------------------------------------------------------------------------- training runs

VARIANTS = dict(
    debiased_estimation_loss=True,
    loss_type="huber",
    huber_schedule="snr",
    noise_offset=0.05,
    adaptive_noise_scale=0.02,
    multires_noise_iterations=4,
    min_timestep=50,
    max_timestep=950,
)


def test_training_with_every_variant_and_lion(tiny_sd_dir, shapes_dir, tmp_path, monkeypatch) -> None:
    import training.train_text_to_image as script

    real_loss, seen = script.diffusion_training_loss, []

    def recording(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        seen.append((args[4], loss.item()))
        return loss

    monkeypatch.setattr(script, "diffusion_training_loss", recording)
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path / "lion", max_train_steps=2, optimizer="lion", **VARIANTS))
    assert (final / "unet").is_dir()
    assert len(seen) == 2 and all(math.isfinite(loss) for _, loss in seen)
    objective = seen[0][0]
    assert (objective.loss_type, objective.debiased_estimation) == ("huber", True)
    assert objective.multires_noise_iterations == 4
    assert (objective.adaptive_noise_scale, objective.min_timestep, objective.max_timestep) == (0.02, 50, 950)
    with pytest.raises(ConfigError, match="max_timestep <= 1000"):
        train(config(tiny_sd_dir, shapes_dir, tmp_path / "range", max_timestep=1001))


def test_resume_with_the_variants_and_prodigy_continues_exactly(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    settings = dict(VARIANTS, optimizer="prodigy", learning_rate=1.0, optimizer_args=["d0=1e-4"])
    settings |= dict(checkpointing_steps=1, max_train_steps=2)
    straight = train(config(tiny_sd_dir, shapes_dir, tmp_path / "straight", **settings))
    train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", **(settings | {"max_train_steps": 1})))
    resumed = train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", resume="latest", **settings))
    assert_same_weights(unet_weights(straight), unet_weights(resumed))
    base = load_file(Path(tiny_sd_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(base["conv_in.weight"], unet_weights(straight)["conv_in.weight"])
