"""Tests for eval.clip_score: 100 * max(cos, 0) by hand, against each model's own embeddings (open_clip's encoders,
transformers' CLIPModel forward), and the command line (prompts: tests/eval/test_prompted_images.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

from eval.clip_score import clip_scores, load_clip_model, main, score_images
from eval.features import load_feature_extractor
from ldm.tokenizer import build_clip_tokenizer
from tests.eval.conftest import PROMPTS, prompt_images, txt2img_folder


def _cosine_by_hand(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---------------------------------------------------------------------------------------------------- the formula


def test_clip_scores_are_100_times_the_clipped_cosine() -> None:
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    expected = [100 * max(_cosine_by_hand(a, b), 0.0) for a, b in zip(images.tolist(), texts.tolist())]
    assert any(e == 0 for e in expected) and any(e > 0 for e in expected)  # both sides of the clipping
    assert clip_scores(images, texts).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    v = torch.tensor([[1.0, 2.0, -1.0]])
    assert clip_scores(v, 3 * v).item() == pytest.approx(100)
    assert clip_scores(v, -v).item() == 0.0
    assert clip_scores(v, torch.tensor([[2.0, -1.0, 0.0]])).item() == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match=r"both be \(N, D\)"):
        clip_scores(torch.zeros(2, 3), torch.zeros(3, 3))


def test_open_clip_score_equals_100_cos_of_the_models_own_embeddings(tiny_open_clip: str) -> None:
    model = load_clip_model(f"open_clip:{tiny_open_clip}")
    images = prompt_images()
    scores = score_images(model, images, PROMPTS, batch_size=3)
    preprocess = open_clip.image_transform(32, is_train=False)  # 32 px images: no resampling, exact preprocessing
    with torch.no_grad():
        image_embeds = model.model.encode_image(torch.stack([preprocess(i) for i in images]))
        text_embeds = model.model.encode_text(open_clip.get_tokenizer(tiny_open_clip)(PROMPTS))
    expected = [100 * max(_cosine_by_hand(a, b), 0) for a, b in zip(image_embeds.tolist(), text_embeds.tolist())]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_transformers_clip_score_matches_the_clip_model_forward(tiny_clip_dir: Path) -> None:
    model = load_clip_model(f"clip:{tiny_clip_dir}")
    images = prompt_images(size=(40, 48))
    scores = score_images(model, images, PROMPTS, batch_size=4)
    # transformers' own forward: logits_per_image = exp(logit_scale) * cos(image_i, text_j).
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(images=images, return_tensors="pt").pixel_values
    input_ids = build_clip_tokenizer()(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        output = clip(input_ids=input_ids, pixel_values=pixel_values)
    cosine = output.logits_per_image.diagonal() / clip.logit_scale.exp()
    torch.testing.assert_close(scores, 100 * cosine.double().clamp(min=0), rtol=1e-4, atol=1e-4)


def test_vision_only_folders_give_features_but_no_scores(tiny_clip_dir: Path, tmp_path: Path) -> None:
    vision = CLIPVisionModelWithProjection(CLIPConfig.from_pretrained(tiny_clip_dir).vision_config)
    vision.save_pretrained(tmp_path)
    features = load_feature_extractor(f"clip:{tmp_path}")(prompt_images(2))
    assert features.shape == (2, 16)
    with pytest.raises(ValueError, match="image tower only; pass a CLIPModel folder"):
        load_clip_model(str(tmp_path))  # a bare folder is read as clip:FOLDER
    with pytest.raises(ValueError, match="Inception has no text tower"):
        load_clip_model("inception:/w.pth")


# ---------------------------------------------------------------------------------------------------- command line


def test_clip_score_command_line(tiny_clip_dir: Path, tmp_path: Path, capsys) -> None:
    folder = txt2img_folder(tmp_path / "gen")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "clip_score.json"
    assert (
        main(["--images", str(folder), "--model", f"clip:{tiny_clip_dir}", "--batch-size", "3", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    expected = score_images(load_clip_model(str(tiny_clip_dir)), prompt_images(), PROMPTS).tolist()
    assert [s["score"] for s in result["scores"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert [s["prompt"] for s in result["scores"]] == PROMPTS
    assert result["count"] == 4 and result["unreadable"] == 1 and result["model"] == f"clip:{tiny_clip_dir.name}"
    assert result["clip_score"] == pytest.approx(sum(expected) / 4)
    printed = capsys.readouterr().out
    assert f"CLIP score {result['clip_score']:.4f}" in printed and printed.strip().endswith(str(out))


def test_clip_score_command_line_errors_are_one_line(tmp_path: Path, capsys) -> None:
    folder = txt2img_folder(tmp_path / "gen", n=1)
    assert main(["--images", str(folder), "--model", "inception:/w.pth", "--out", str(tmp_path / "x.json")]) == 2
    assert (
        capsys.readouterr().err
        == "error: Inception has no text tower; pass --model open_clip:NAME:FILE or clip:FOLDER\n"
    )
    assert main(["--images", str(tmp_path / "nowhere"), "--model", "clip:/x", "--out", str(tmp_path / "x.json")]) == 2
    assert "no such folder" in capsys.readouterr().err
