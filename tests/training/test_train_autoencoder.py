"""Autoencoder training on tiny models: PSNR rises when overfitting, the latent scale, exact resume, stop signals,
non-finite losses, and the saved VAE in stock diffusers and in text-to-image training."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

import training.train_autoencoder as train_autoencoder
from training.checkpoint_folders import latest_checkpoint
from training.command import split_validation
from training.config import ConfigError
from training.records import load_image_caption_records
from training.train_autoencoder import AutoencoderTrainConfig, build_autoencoder, main, psnr, train
from training.train_text_to_image import TrainConfig
from training.train_text_to_image import train as train_text_to_image


def config(shapes_dir: str, out: Path, **overrides) -> AutoencoderTrainConfig:
    settings = dict(
        preset="tiny",
        dataset=shapes_dir,
        output_dir=str(out),
        train_batch_size=3,
        max_train_steps=6,
        checkpointing_steps=3,
        learning_rate=1e-3,
        lr_warmup_steps=2,
        report_to="none",
        log_steps=1,
        validation_split=0.25,
    )
    settings.update(overrides)
    return AutoencoderTrainConfig(**settings)


def shapes_pixels(shapes_dir: str) -> torch.Tensor:
    """The 8 training images in [-1, 1], read with PIL alone (they are 64x64: no resizing or cropping)."""
    files = sorted(Path(shapes_dir).glob("*.png"))
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 127.5 - 1 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def mean_psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Per-image PSNR of posterior-mean reconstructions in [0, 1], from numpy, averaged."""
    reconstruction = vae.eval().decode(vae.encode(pixels).latent_dist.mean).sample
    a = ((reconstruction.double().numpy() + 1) / 2).clip(0, 1)
    b = (pixels.double().numpy() + 1) / 2
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(1 / mse)))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_psnr_of_a_known_error():
    reference = torch.zeros(2, 3, 4, 4)
    images = torch.full((2, 3, 4, 4), 0.1)  # MSE 0.01 -> 20 dB
    images[1] = 0.01  # MSE 1e-4 -> 40 dB
    assert torch.allclose(psnr(images, reference), torch.tensor([20.0, 40.0]), atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"preset": "huge"}, "preset"),
        ({"resolution": 60}, "resolution"),
        ({"pretrained_vae": "some/folder"}, "--pretrained-vae"),
        ({"preset": None}, "--preset"),
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"validation_dataset": "held/out"}, "--validation-dataset"),
        ({"max_nan_steps": 0}, "max_nan_steps"),
    ],
)
def test_bad_configs_name_the_field(shapes_dir, tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        config(shapes_dir, tmp_path, **overrides).validate()


def test_command_line_reports_a_bad_preset_in_one_line(shapes_dir, tmp_path, capsys):
    assert main(["--dataset", shapes_dir, "--preset", "huge", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preset must be one of tiny, ") and err.endswith("got 'huge'\n")
    assert err.count("\n") == 1


def test_a_missing_pretrained_vae_is_a_one_line_error(shapes_dir, tmp_path, capsys):
    args = ["--dataset", shapes_dir, "--pretrained-vae", str(tmp_path / "nowhere"), "--report-to", "none"]
    code = main([*args, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: could not load the vae from") and err.count("\n") == 1


def test_validation_split_is_a_fixed_seeded_choice(shapes_dir):
    records = load_image_caption_records(shapes_dir)
    train_part, held_out = split_validation(records, 0.25, seed=0)
    assert len(held_out) == 2 and len(train_part) == 6
    assert sorted(r.image for r in train_part.records + held_out.records) == sorted(r.image for r in records.records)
    again = split_validation(records, 0.25, seed=0)[1]
    assert [r.image for r in again.records] == [r.image for r in held_out.records]
    others = {tuple(r.image for r in split_validation(records, 0.25, seed=s)[1].records) for s in range(1, 6)}
    assert len(others | {tuple(r.image for r in held_out.records)}) > 1  # the seed picks the images
    with pytest.raises(ConfigError, match="validation_split"):
        split_validation(records, 0.95, seed=0)


@pytest.fixture(scope="module")
def overfit(shapes_dir, tmp_path_factory) -> tuple[AutoencoderTrainConfig, Path]:
    """A tiny VAE trained on the 8 shape images, evaluated on the same 8."""
    settings = config(
        shapes_dir,
        tmp_path_factory.mktemp("vae"),
        train_batch_size=8,
        max_train_steps=30,
        checkpointing_steps=30,
        validation_steps=15,
        learning_rate=2e-3,
        validation_split=0.0,
        validation_dataset=shapes_dir,
        log_steps=10,
    )
    return settings, train(settings)


def test_overfitting_raises_psnr(overfit, shapes_dir):
    settings, out = overfit
    pixels = shapes_pixels(shapes_dir)
    before = mean_psnr(build_autoencoder(settings), pixels)  # the same seed: the run's initial weights
    after = mean_psnr(AutoencoderKL.from_pretrained(out / "vae"), pixels)
    assert after > before + 3.0, (before, after)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["history"]] == [0, 15, 30]
    assert metrics["history"][0]["psnr"] == pytest.approx(before, abs=1e-3)
    assert metrics["final_psnr"] == pytest.approx(after, abs=1e-3)
    assert Image.open(out / "reconstructions.png").size == (8 * 64, 2 * 64)  # originals over reconstructions
    assert (out / "loss.png").is_file()


def test_scaling_factor_is_one_over_the_latent_std(overfit, shapes_dir):
    _, out = overfit
    vae = AutoencoderKL.from_pretrained(out / "vae")
    with torch.no_grad():
        latents = vae.encode(shapes_pixels(shapes_dir)).latent_dist.mean
    expected = 1 / latents.flatten().std().item()
    assert vae.config.scaling_factor == pytest.approx(expected, rel=1e-4)
    assert vae.config.scaling_factor != pytest.approx(0.18215, rel=1e-2)  # measured, not the preset's default
    assert json.loads((out / "metrics.json").read_text())["scaling_factor"] == vae.config.scaling_factor
    assert {p.name for p in (out / "vae").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_trained_vae_is_the_vae_of_text_to_image_training(overfit, shapes_dir, frozen_parts_dir, tmp_path):
    _, out = overfit
    final = train_text_to_image(
        TrainConfig(
            preset="tiny",
            vae=str(out),
            text_encoder=frozen_parts_dir,
            dataset=shapes_dir,
            output_dir=str(tmp_path),
            resolution=64,
            train_batch_size=4,
            max_train_steps=2,
            checkpointing_steps=2,
            lr_warmup_steps=0,
            report_to="none",
        )
    )
    saved = AutoencoderKL.from_pretrained(final / "vae")
    ours = AutoencoderKL.from_pretrained(out / "vae")
    assert saved.config.scaling_factor == ours.config.scaling_factor
    assert_same_weights(weights(final), weights(out))


def test_resume_and_stop_signal_continue_exactly(shapes_dir, tmp_path, monkeypatch):
    straight = train(config(shapes_dir, tmp_path / "straight"))
    # the same run in two parts: 3 steps, then --resume latest to 6
    train(config(shapes_dir, tmp_path / "parts", max_train_steps=3))
    resumed = train(config(shapes_dir, tmp_path / "parts", resume="latest"))
    assert_same_weights(weights(straight), weights(resumed))
    initial = build_autoencoder(config(shapes_dir, tmp_path)).state_dict()
    assert not torch.equal(weights(straight)["encoder.conv_in.weight"], initial["encoder.conv_in.weight"])

    # Ctrl-C during step 4: the step finishes, a checkpoint is written, train returns; resuming gives the same model
    loss_fn, calls = train_autoencoder.autoencoder_loss, []

    def interrupted_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train_autoencoder, "autoencoder_loss", interrupted_at_step_4)
    stopped = train(config(shapes_dir, tmp_path / "signal"))
    assert stopped == tmp_path / "signal" / "checkpoints"
    assert latest_checkpoint(stopped).name == "step-000004" and not (tmp_path / "signal" / "vae").exists()
    monkeypatch.setattr(train_autoencoder, "autoencoder_loss", loss_fn)
    resumed = train(config(shapes_dir, tmp_path / "signal", resume="latest"))
    assert_same_weights(weights(straight), weights(resumed))


def test_resume_with_gradient_accumulation_across_epoch_ends(shapes_dir, tmp_path):
    # 6 training images in batches of 2: 3 micro-batches an epoch, so accelerate ends a step of 1 at each epoch end
    settings = {"train_batch_size": 2, "gradient_accumulation_steps": 2}
    straight = train(config(shapes_dir, tmp_path / "straight", **settings))
    train(config(shapes_dir, tmp_path / "parts", max_train_steps=3, **settings))
    resumed = train(config(shapes_dir, tmp_path / "parts", resume="latest", **settings))
    assert_same_weights(weights(straight), weights(resumed))


def test_non_finite_losses_skip_the_update_then_stop(shapes_dir, tmp_path, monkeypatch):
    loss_fn = train_autoencoder.autoencoder_loss

    def nan_loss(*args, **kwargs):
        loss, rec, kl = loss_fn(*args, **kwargs)
        return loss * float("nan"), rec, kl

    monkeypatch.setattr(train_autoencoder, "autoencoder_loss", nan_loss)
    # two non-finite steps, under the limit of three: the run ends with the initial weights
    out = train(config(shapes_dir, tmp_path / "skipped", max_train_steps=2, max_nan_steps=3))
    initial = build_autoencoder(config(shapes_dir, tmp_path)).state_dict()
    assert_same_weights(weights(out), initial)
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row at step 2"):
        train(config(shapes_dir, tmp_path / "stopped", max_nan_steps=2))
