"""Tests for eval.inception: weights files, the features against torchvision's own forward pass, and the TF FID
pooling that pytorch-fid's weights switch on."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import inception_v3

from eval.features import load_feature_extractor
from eval.inception import InceptionV3Features, load_state_dict_file


def test_state_dict_files_unwrap_checkpoints(tmp_path: Path) -> None:
    weights = {"a.weight": torch.arange(3.0)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "ckpt.pth")
    assert load_state_dict_file(tmp_path / "ckpt.pth").keys() == weights.keys()
    torch.save({"a": [1, 2]}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "bad.pth")


def _images() -> list[Image.Image]:
    return [
        Image.new("RGB", (64, 48), (200, 30, 30)),
        Image.new("RGBA", (40, 40), (20, 40, 220, 128)),
        Image.effect_noise((50, 70), 60).convert("RGB"),
    ]


def test_inception_features_match_torchvision_forward(tmp_path: Path, caplog) -> None:
    model = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    torch.save(model.state_dict(), tmp_path / "imagenet.pth")
    with caplog.at_level(logging.WARNING, logger="eval.inception"):
        extractor = load_feature_extractor(f"inception:{tmp_path / 'imagenet.pth'}")
    assert "NOT comparable to published FIDs" in caplog.text
    assert isinstance(extractor, InceptionV3Features) and not extractor.tf_pooling and extractor.dim == 2048
    assert not extractor.standard_weights
    images = _images()
    features = extractor(images)
    # The reference: torchvision's own forward with the classifier removed, on pytorch-fid's preprocessing.
    model.fc = torch.nn.Identity()
    pixels = [
        torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        for image in (images[0], Image.alpha_composite(Image.new("RGBA", (40, 40), "white"), images[1]), images[2])
    ]
    x = torch.cat([torch.nn.functional.interpolate(p, size=(299, 299), mode="bilinear") for p in pixels])
    with torch.no_grad():
        expected = model(2 * x - 1)
    assert features.shape == (3, 2048)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_inception_tf_layout_switches_pooling(tmp_path: Path, caplog) -> None:
    # pytorch-fid's FID weights are a 1008-class Inception without the auxiliary head.
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "fid.safetensors")
    with caplog.at_level(logging.WARNING, logger="eval.inception"):
        tf = load_feature_extractor(f"inception:{tmp_path / 'fid.safetensors'}")
    assert "has the TF FID graph's layout but its hash cannot be checked" in caplog.text
    assert isinstance(tf, InceptionV3Features) and tf.tf_pooling and "TF FID pooling" in tf.name
    tv = InceptionV3Features(state, tf_pooling=False)
    images = _images()[:1]
    tf_features, tv_features = tf(images), tv(images)
    assert torch.isfinite(tf_features).all()
    scale = tv_features.abs().max().item()
    assert (tf_features - tv_features).abs().max().item() > 1e-3 * scale  # the pooling changed the features
    with pytest.raises(ValueError, match="is not an Inception-v3 state dict"):
        InceptionV3Features({"conv.weight": torch.zeros(1)})
