"""Tests for eval.clip_score: 100 * max(cos, 0) by hand, against each model's own embeddings (open_clip's encoders,
transformers' CLIPModel forward), prompts read from PNG metadata and metadata.jsonl, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from eval.clip_score import clip_scores, load_clip_model, load_prompted_images, main, png_prompt, score_images
from eval.features import load_feature_extractor
from ldm.tokenizer import build_clip_tokenizer
from pipelines.txt2img import save_png
from tests.eval.test_fid import tiny_open_clip  # noqa: F401  (a fixture)
from tests.training.conftest import draw_shapes_folder

PROMPTS = ["a red circle on the left", "a blue square on the right", "noise", "a green circle"]


def _clip_config() -> CLIPConfig:
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=16)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A CLIPModel folder laid out as training.train_text_encoder writes OUT/clip (model, processor, tokenizer)."""
    path = tmp_path_factory.mktemp("clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(_clip_config()).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(path)  # fmt: skip
    build_clip_tokenizer().save_pretrained(path)
    return path


def _images(n: int = 4, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    colours = [(220, 30, 30), (40, 60, 220), None, (30, 170, 60)]
    return [Image.new("RGB", size, colours[i % 4]) if colours[i % 4] else Image.effect_noise(size, 60).convert("RGB")
            for i in range(n)]  # fmt: skip


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


def test_open_clip_score_equals_100_cos_of_the_models_own_embeddings(tiny_open_clip: str) -> None:  # noqa: F811
    model = load_clip_model(f"open_clip:{tiny_open_clip}")
    images = _images()
    scores = score_images(model, images, PROMPTS, batch_size=3)
    preprocess = open_clip.image_transform(32, is_train=False)  # 32 px images: no resampling, exact preprocessing
    with torch.no_grad():
        image_embeds = model.model.encode_image(torch.stack([preprocess(i) for i in images]))
        text_embeds = model.model.encode_text(open_clip.get_tokenizer(tiny_open_clip)(PROMPTS))
    expected = [100 * max(_cosine_by_hand(a, b), 0) for a, b in zip(image_embeds.tolist(), text_embeds.tolist())]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_transformers_clip_score_matches_the_clip_model_forward(tiny_clip_dir: Path) -> None:
    model = load_clip_model(f"clip:{tiny_clip_dir}")
    images = _images(size=(40, 48))
    scores = score_images(model, images, PROMPTS, batch_size=4)
    # transformers' own forward: logits_per_image = exp(logit_scale) * cos(image_i, text_j).
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(images=images, return_tensors="pt").pixel_values
    input_ids = build_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        output = clip(input_ids=input_ids, pixel_values=pixel_values)
    cosine = output.logits_per_image.diagonal() / clip.logit_scale.exp()
    torch.testing.assert_close(scores, 100 * cosine.double().clamp(min=0), rtol=1e-4, atol=1e-4)


def test_vision_only_folders_give_features_but_no_scores(tiny_clip_dir: Path, tmp_path: Path) -> None:
    vision = CLIPVisionModelWithProjection(_clip_config().vision_config)
    vision.save_pretrained(tmp_path)
    features = load_feature_extractor(f"clip:{tmp_path}")(_images(2))
    assert features.shape == (2, 16)
    with pytest.raises(ValueError, match="image tower only; pass a CLIPModel folder"):
        load_clip_model(str(tmp_path))  # a bare folder is read as clip:FOLDER
    with pytest.raises(ValueError, match="Inception has no text tower"):
        load_clip_model("inception:/w.pth")


# ---------------------------------------------------------------------------------------------------------- prompts


def _txt2img_folder(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_images(n)):
        save_png(image, folder, i, 100 + i, {"prompt": PROMPTS[i % len(PROMPTS)], "seed": str(100 + i)})
    return folder


def test_prompts_come_from_png_metadata_then_captions(tmp_path: Path) -> None:
    folder = _txt2img_folder(tmp_path / "gen")
    Image.new("RGB", (32, 32)).save(folder / "no_prompt.png")
    data = load_prompted_images(folder)
    assert data.prompts == PROMPTS and data.skipped_no_prompt == 1
    assert png_prompt(data.files[0]) == PROMPTS[0] and png_prompt(folder / "no_prompt.png") is None
    shapes = draw_shapes_folder(tmp_path / "shapes", n=3, size=32)  # metadata.jsonl captions, no PNG prompts
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    data = load_prompted_images(shapes)
    assert data.prompts == [row["text"] for row in rows] and [p.name for p in data.files] == [
        row["file_name"] for row in rows
    ]
    assert load_prompted_images(shapes, max_images=2).prompts == data.prompts[:2]
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (8, 8)).save(plain / "a.png")
    with pytest.raises(ValueError, match="none of the 1 images .* has a prompt; expected PNGs written by"):
        load_prompted_images(plain)


# ---------------------------------------------------------------------------------------------------- command line


def test_clip_score_command_line(tiny_clip_dir: Path, tmp_path: Path, capsys) -> None:
    folder = _txt2img_folder(tmp_path / "gen")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "clip_score.json"
    assert main(["--images", str(folder), "--model", f"clip:{tiny_clip_dir}", "--batch-size", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    expected = score_images(load_clip_model(str(tiny_clip_dir)), _images(), PROMPTS).tolist()
    assert [s["score"] for s in result["scores"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert [s["prompt"] for s in result["scores"]] == PROMPTS
    assert result["count"] == 4 and result["unreadable"] == 1 and result["model"] == f"clip:{tiny_clip_dir.name}"
    assert result["clip_score"] == pytest.approx(sum(expected) / 4)
    printed = capsys.readouterr().out
    assert f"CLIP score {result['clip_score']:.4f}" in printed and printed.strip().endswith(str(out))


def test_clip_score_command_line_errors_are_one_line(tmp_path: Path, capsys) -> None:
    folder = _txt2img_folder(tmp_path / "gen", n=1)
    assert main(["--images", str(folder), "--model", "inception:/w.pth", "--out", str(tmp_path / "x.json")]) == 2
    assert (
        capsys.readouterr().err
        == "error: Inception has no text tower; pass --model open_clip:NAME:FILE or clip:FOLDER\n"
    )
    assert main(["--images", str(tmp_path / "nowhere"), "--model", "clip:/x", "--out", str(tmp_path / "x.json")]) == 2
    assert "no such folder" in capsys.readouterr().err
