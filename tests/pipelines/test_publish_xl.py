"""``python -m pipelines.publish`` with an SDXL folder: the staged repository loads in stock
``StableDiffusionXLPipeline`` with the same weights, and its card names the SDXL base model and carries the tags the
Hub lists SDXL models by."""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import PIL.Image
import torch
from diffusers import StableDiffusionXLPipeline

from pipelines.publish import main
from training.validation import write_model_card

from .test_publish import front_matter, weight_files

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TAGS = {"text-to-image", "diffusers", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"}


def test_dry_run_of_an_sdxl_folder_names_its_base_model(tiny_sdxl_dir: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "repo"
    argv = ["--model", str(tiny_sdxl_dir), "--repo-id", "me/tiny-xl", "--dry-run", str(out), "--sample-steps", "1"]
    assert main([*argv, "--base-model", SDXL_BASE]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    weights = weight_files(out)
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    staged, original = (StableDiffusionXLPipeline.from_pretrained(path) for path in (out, tiny_sdxl_dir))
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine, theirs = getattr(staged, name).state_dict(), getattr(original, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine)

    meta, body = front_matter(out / "README.md")
    assert meta["base_model"] == SDXL_BASE
    assert SDXL_TAGS <= set(meta["tags"])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    side = original.default_sample_size * original.vae_scale_factor  # 2 prompts x 2 seeds, drawn with SDXL
    assert PIL.Image.open(out / "samples.png").size == (2 * side, 2 * side)
    # the card's loading code runs: the class it imports loads the staged folder
    module, name = re.search(r"from (\w+) import (\w+)", body).groups()
    assert f'{name}.from_pretrained("me/tiny-xl")' in body
    assert getattr(importlib.import_module(module), name).from_pretrained(out).text_encoder_2 is not None


def test_the_cards_base_model_is_kept_and_a_missing_one_is_asked_for(
    tiny_sdxl_dir: str, tmp_path: Path, caplog
) -> None:
    argv = ["--repo-id", "me/tiny-xl", "--no-samples", "--dry-run"]
    assert main(["--model", str(tiny_sdxl_dir), *argv, str(tmp_path / "bare")]) == 0
    meta, _ = front_matter(tmp_path / "bare" / "README.md")
    assert "base_model" not in meta and SDXL_TAGS <= set(meta["tags"])
    assert "--base-model" in caplog.text and SDXL_BASE in caplog.text

    caplog.clear()
    carded = tmp_path / "carded"
    carded.mkdir()
    for item in Path(tiny_sdxl_dir).iterdir():
        (carded / item.name).symlink_to(item)
    write_model_card(
        carded,
        base_model=SDXL_BASE,
        data={},
        config={"preset": "tiny-sdxl"},
        steps=1,
        sample_grid_file=None,
        kind="pipeline",
    )
    with caplog.at_level(logging.WARNING):
        assert main(["--model", str(carded), *argv, str(tmp_path / "out")]) == 0
    meta, _ = front_matter(tmp_path / "out" / "README.md")
    assert meta["base_model"] == SDXL_BASE and "--base-model" not in caplog.text
    assert meta["tags"].count("diffusers") == 1 and SDXL_TAGS | {"latent-diffusion"} <= set(meta["tags"])
