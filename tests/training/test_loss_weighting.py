"""A batch's per-sample ``loss_weight`` (a subset's weight, DreamBooth's prior loss weight) and ``loss_mask``
(``--masked-loss``) in the objective, against the closed form of a zero-predicting model's loss, and end to end:
a subset of weight 0 does not move the model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from tests.training.test_loss_variants import T, ZeroUNet, _alphas_cumprod, _latents, _replay
from tests.training.test_train_text_to_image import assert_same_weights, config, unet_weights
from training.objective import ObjectiveConfig, diffusion_training_loss
from training.train_text_to_image import train


def zero_model_loss(**kwargs) -> float:
    generator = torch.Generator().manual_seed(0)
    objective = ObjectiveConfig()
    loss = diffusion_training_loss(
        ZeroUNet(), _latents(), torch.zeros(3, 2, 8), _alphas_cumprod(), objective, generator, **kwargs
    )
    return loss.item()


def per_element_loss() -> np.ndarray:
    """(B, C, h, w) squared error of a zero prediction of eps: the noise squared (the draws replayed)."""
    _, noise, _ = _replay(0)
    return noise**2


def test_per_sample_weights_scale_each_samples_loss():
    weights = np.array([2.0, 0.0, 0.5])
    expected = (per_element_loss().mean(axis=(1, 2, 3)) * weights).mean()
    got = zero_model_loss(loss_weight=torch.tensor(weights, dtype=torch.float32))
    assert abs(got - expected) < 1e-5
    assert zero_model_loss(loss_weight=torch.ones(3)) == zero_model_loss()  # ones change nothing, bit for bit


def test_a_mask_averages_each_samples_loss_over_its_masked_elements():
    mask = np.zeros((3, 1, 6, 6))
    mask[0, :, :3] = 1.0  # top half
    mask[1] = 0.25  # everywhere, at a quarter: the plain mean
    mask[2, :, :, 5] = 1.0  # last column
    loss = per_element_loss()
    expected = np.mean([loss[0, :, :3].mean(), loss[1].mean(), loss[2, :, :, 5].mean()])
    got = zero_model_loss(loss_mask=torch.tensor(mask, dtype=torch.float32))
    assert abs(got - expected) < 1e-5
    assert T == _alphas_cumprod().shape[0]


def test_a_subset_of_weight_zero_does_not_move_the_model(tiny_sd_dir, shapes_dir, tmp_path):
    """Two subsets, the second weighted 0: its pixels do not matter (a run with them inverted ends with the
    bit-identical U-Net), while at weight 1 they do."""
    shutil.copytree(shapes_dir, tmp_path / "a")
    shutil.copytree(shapes_dir, tmp_path / "b")
    shutil.copytree(shapes_dir, tmp_path / "inverted")
    for path in (tmp_path / "inverted").glob("*.png"):
        PIL.ImageOps.invert(PIL.Image.open(path).convert("RGB")).save(path)

    def run(second: str, weight: float) -> dict[str, torch.Tensor]:
        subsets = [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / second), "loss_weight": weight}]
        data = tmp_path / f"{second}-{weight}.json"
        data.write_text(json.dumps({"subsets": subsets}))
        out = tmp_path / f"run-{second}-{weight}"
        return unet_weights(train(config(tiny_sd_dir, str(data), out, max_train_steps=2, caption_dropout=0.0)))

    assert_same_weights(run("b", 0.0), run("inverted", 0.0))
    at_one, inverted_at_one = run("b", 1.0), run("inverted", 1.0)
    assert any(not torch.equal(at_one[k], inverted_at_one[k]) for k in at_one)
