"""Tests for eval.clip_features: the extractors' features are each model's own normalised image embeddings
(open_clip's encode_image, transformers' CLIPModel.get_image_features)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from eval.clip_features import TransformersCLIPFeatures
from eval.features import load_feature_extractor


def test_open_clip_features_are_the_models_normalised_image_embeddings(tiny_open_clip: str) -> None:
    extractor = load_feature_extractor(f"open_clip:{tiny_open_clip}")
    images = [Image.effect_noise((32, 32), 50).convert("RGB"), Image.new("RGB", (32, 32), (10, 200, 90))]
    preprocess = open_clip.image_transform(32, is_train=False)  # open_clip's own transform (no resize at 32 px)
    with torch.no_grad():
        expected = extractor.model.encode_image(torch.stack([preprocess(i) for i in images]))
    torch.testing.assert_close(extractor(images), torch.nn.functional.normalize(expected, dim=-1))
    raw = load_feature_extractor(f"open_clip:{tiny_open_clip}", normalize=False)
    raw.model.load_state_dict(extractor.model.state_dict())
    torch.testing.assert_close(raw(images), expected)


def test_transformers_clip_features_are_the_models_normalised_image_embeddings(tiny_clip_dir: Path) -> None:
    extractor = load_feature_extractor(f"clip:{tiny_clip_dir}")
    assert isinstance(extractor, TransformersCLIPFeatures) and extractor.dim == 16
    images = [Image.effect_noise((32, 32), 50).convert("RGB"), Image.new("RGB", (32, 32), (10, 200, 90))]
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixel_values)
    if not isinstance(expected, torch.Tensor):  # transformers 5 returns the projection as the output's pooler_output
        expected = expected.pooler_output
    torch.testing.assert_close(extractor(images), torch.nn.functional.normalize(expected, dim=-1))
    raw = load_feature_extractor(f"clip:{tiny_clip_dir}", normalize=False)
    torch.testing.assert_close(raw(images), expected)
