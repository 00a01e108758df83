"""Exporting a checkpoint as a pipeline: the weights the run would have saved had it stopped there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import LatentDiffusionPipeline
from training.checkpoint_folders import latest_checkpoint
from training.export_checkpoint import export_checkpoint, main
from training.train_text_to_image import TrainConfig, train


def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(folder / part / name)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def run(tiny_sd_dir, shapes_dir, tmp_path_factory) -> Path:
    """A 4-step run with an EMA and a trained text encoder, checkpointed at its last step."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        pretrained_model=tiny_sd_dir,
        dataset=shapes_dir,
        output_dir=str(out),
        resolution=64,
        train_batch_size=4,
        max_train_steps=4,
        checkpointing_steps=4,
        learning_rate=1e-3,
        ema_decay=0.5,
        train_text_encoder=True,
        text_encoder_lr=1e-3,
        report_to="none",
    )
    config.validate()
    train(config)
    return out


def test_the_last_checkpoint_exports_to_the_runs_own_final_pipeline(run, tiny_sd_dir, tmp_path):
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert main(["--checkpoint", str(checkpoint), "--base", tiny_sd_dir, "--out", str(tmp_path / "ema")]) == 0
    for part in ("unet", "text_encoder"):  # the EMA U-Net and the trained text encoder, as the run saved them
        assert_same(weights(tmp_path / "ema", part), weights(run / "pipeline", part))
    base_encoder = weights(Path(tiny_sd_dir), "text_encoder")
    assert any(not torch.equal(base_encoder[k], v) for k, v in weights(run / "pipeline", "text_encoder").items())
    LatentDiffusionPipeline.from_pretrained(tmp_path / "ema")  # a pipeline folder that loads

    raw = export_checkpoint(checkpoint, tiny_sd_dir, ema=False)  # the U-Net's own weights: the run's unet-raw
    assert_same(raw.unet.state_dict(), weights(run, "unet-raw"))


def test_export_refuses_an_incomplete_checkpoint_and_a_base_of_another_shape(
    run, tiny_sd_dir, tiny_sdxl_dir, tmp_path, capsys
):
    broken = tmp_path / "checkpoints" / "step-000004"
    shutil.copytree(latest_checkpoint(run / "checkpoints"), broken)
    (broken / "unet.safetensors").write_bytes(b"cut")
    assert main(["--checkpoint", str(broken), "--base", tiny_sd_dir, "--out", str(tmp_path / "out")]) != 0
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    good = latest_checkpoint(run / "checkpoints")
    assert main(["--checkpoint", str(good), "--base", tiny_sdxl_dir, "--out", str(tmp_path / "out")]) != 0
    assert "does not fit the base model's" in capsys.readouterr().err
