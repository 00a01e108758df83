"""Tests for eval.features: spec parsing and its errors, the errors of missing files, PIL images and tensors, and
ModuleFeatures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.features import FeatureSpec, ModuleFeatures, load_feature_extractor, parse_feature_spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("inception:/w/pt_inception.pth", FeatureSpec("inception", None, "/w/pt_inception.pth")),
        ("open_clip:ViT-B-32:/w/open_clip.bin", FeatureSpec("open_clip", "ViT-B-32", "/w/open_clip.bin")),
        ("open_clip:ViT-B-32", FeatureSpec("open_clip", "ViT-B-32", None)),
        ("open_clip:local-dir:/w/oc", FeatureSpec("open_clip", "local-dir:/w/oc", None)),
        ("clip:/runs/clip/clip", FeatureSpec("clip", None, "/runs/clip/clip")),
    ],
)
def test_parse_feature_spec(spec: str, expected: FeatureSpec) -> None:
    assert parse_feature_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet:/w.pth", "unknown feature extractor spec 'resnet:/w.pth'; use one of inception, open_clip, clip"),
        ("inception", "unknown feature extractor spec"),
        ("inception:", "names no model"),
        ("open_clip::/w.bin", "names no open_clip model"),
    ],
)
def test_parse_feature_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_feature_spec(spec)


def test_missing_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"not found; download pytorch-fid's pt_inception-2015-12-05-6726825d.pth.*"
        r"pass --features inception:/path/to/it",
    ):
        load_feature_extractor(f"inception:{tmp_path / 'missing.pth'}")
    with pytest.raises(ValueError, match=r"not found; download the weights of ViT-B-32 .*open_clip:ViT-B-32:/path"):
        load_feature_extractor(f"open_clip:ViT-B-32:{tmp_path / 'missing.bin'}")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        load_feature_extractor("open_clip:ViT-Q-99:/w.bin")
    with pytest.raises(ValueError, match="no such folder; pass a CLIPModel folder"):
        load_feature_extractor(f"clip:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="no config.json"):
        load_feature_extractor(f"clip:{tmp_path}")
    (tmp_path / "weights.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="must be .safetensors or a PyTorch"):
        load_feature_extractor(f"inception:{tmp_path / 'weights.npy'}")


def test_tensors_and_pil_images_give_the_same_features(tiny_open_clip: str) -> None:
    extractor = load_feature_extractor(f"open_clip:{tiny_open_clip}")
    image = Image.effect_noise((48, 40), 70).convert("RGB")
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(extractor([image]), extractor(tensor))
    with pytest.raises(ValueError, match=r"float \(N, 3, H, W\)"):
        extractor(torch.zeros(3, 32, 32))


def test_module_features_wrap_any_module() -> None:
    extractor = ModuleFeatures(torch.nn.AdaptiveAvgPool2d(1), dim=3, name="mean colour", size=(8, 8))
    features = extractor([Image.new("RGB", (20, 10), (255, 0, 51))])
    torch.testing.assert_close(features, torch.tensor([[1.0, 0.0, 0.2]]))
