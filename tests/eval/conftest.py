"""Shared fixtures of the eval tests: a tiny open_clip architecture, a tiny transformers CLIPModel folder, and
folders of images with prompts as pipelines.txt2img writes them (all built offline)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from ldm.tokenizer import build_clip_tokenizer
from pipelines.generate import save_png

TINY_OPEN_CLIP = "test-tiny-open-clip"
PROMPTS = ["a red circle on the left", "a blue square on the right", "noise", "a green circle"]


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> str:
    """The name of a tiny open_clip architecture (16-d embeddings, 32 px), registered from a config file."""
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    config = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    path = tmp_path_factory.mktemp("open_clip") / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def _clip_config() -> CLIPConfig:
    text = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=16
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A CLIPModel folder laid out as training.train_text_encoder writes OUT/clip (model, processor, tokenizer)."""
    path = tmp_path_factory.mktemp("clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(_clip_config()).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(path)
    build_clip_tokenizer().save_pretrained(path)
    return path


def prompt_images(n: int = 4, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    """``n`` images to go with :data:`PROMPTS`: red, blue, noise, green, then again."""
    colours = [(220, 30, 30), (40, 60, 220), None, (30, 170, 60)]
    return [
        Image.new("RGB", size, colours[i % 4]) if colours[i % 4] else Image.effect_noise(size, 60).convert("RGB")
        for i in range(n)
    ]


def txt2img_folder(folder: Path, n: int = 4) -> Path:
    """A folder as pipelines.txt2img writes it: :func:`prompt_images` saved with their :data:`PROMPTS` and seeds."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(prompt_images(n)):
        save_png(image, folder, i, 100 + i, {"prompt": PROMPTS[i % len(PROMPTS)], "seed": str(100 + i)})
    return folder
