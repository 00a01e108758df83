"""The shapes recipe runs end to end at a toy size and yields a pipeline that loads in ours and in stock diffusers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines import LatentDiffusionPipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_toy_recipe_end_to_end(tmp_path):
    env = {**os.environ, "SCALE": "toy", "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", "training/recipes/shapes.sh", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = Path(result.stdout.strip().splitlines()[-1])
    assert final == tmp_path / "unet" / "pipeline"
    ours = LatentDiffusionPipeline.from_pretrained(final)
    assert ours.scheduler.config.prediction_type == "v_prediction" and ours.scheduler.config.rescale_betas_zero_snr
    assert ours.vae.config.scaling_factor != 0.18215  # measured by the autoencoder stage, not the SD default
    image = ours("a red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert image[0].size == (64, 64)
    assert StableDiffusionPipeline.from_pretrained(final, safety_checker=None).unet is not None
    # a second run finds every stage done and only prints the model's folder again
    again = subprocess.run(["bash", "training/recipes/shapes.sh", str(tmp_path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(final)
