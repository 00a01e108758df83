"""Model families: what is recognised as Stable Diffusion 1.x/2.x and as SDXL, and every command refusing any other
family up front with one line naming what is supported (before SDXL was a family, ``txt2img`` on an SDXL folder died
inside diffusers with ``TypeError: argument of type 'NoneType' is not iterable``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eval import benchmark, guidance_sweep, nll
from ldm.errors import UserError
from pipelines import (
    DEFAULT_MODEL,
    LatentDiffusionPipeline,
    LatentDiffusionXLImg2ImgPipeline,
    LatentDiffusionXLPipeline,
    app,
    convert,
    img2img,
    inpaint,
    publish,
    txt2img,
)
from pipelines.families import (
    FAMILIES,
    STABLE_DIFFUSION,
    STABLE_DIFFUSION_XL,
    pipelines_of,
    require_supported_model,
    single_file_family,
    text_to_image_pipeline,
)
from pipelines.single_file import export_single_file

SUPPORTED = "Stable Diffusion 1.x/2.x models (StableDiffusionPipeline, LatentDiffusionPipeline"
SUPPORTED_XL = "Stable Diffusion XL models (StableDiffusionXLPipeline, LatentDiffusionXLPipeline"

# model_index.json of stock StableDiffusionXLPipeline.save_pretrained (diffusers 0.42)
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sdxl")
    (folder / "model_index.json").write_text(json.dumps(SDXL_INDEX), encoding="utf-8")
    (folder / "unet").mkdir()
    unet_config = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config), encoding="utf-8")
    return str(folder)


def test_stable_diffusion_folders_are_recognised(tiny_sd_dir: str, tmp_path: Path, tiny_components) -> None:
    assert require_supported_model(tiny_sd_dir) is STABLE_DIFFUSION  # stock StableDiffusionPipeline's folder
    assert require_supported_model(DEFAULT_MODEL) is STABLE_DIFFUSION  # ours (LatentDiffusionPipeline)
    LatentDiffusionPipeline(**tiny_components).save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "model_index.json").read_text())["_class_name"] == "LatentDiffusionPipeline"
    assert require_supported_model(str(tmp_path / "ours")) is STABLE_DIFFUSION


def _folder(path: Path, index: dict, unet_config: dict | None = None) -> str:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    if unet_config is not None:
        (path / "unet").mkdir()
        (path / "unet" / "config.json").write_text(json.dumps(unet_config), encoding="utf-8")
    return str(path)


def test_sdxl_folders_are_recognised(sdxl_dir: str, tmp_path: Path, tiny_sdxl_components) -> None:
    assert require_supported_model(sdxl_dir) is STABLE_DIFFUSION_XL  # stock StableDiffusionXLPipeline's folder
    LatentDiffusionXLPipeline(**tiny_sdxl_components).save_pretrained(tmp_path / "ours")
    assert require_supported_model(str(tmp_path / "ours")) is STABLE_DIFFUSION_XL
    # a refiner-only folder (stock's img2img class, no first text encoder), with or without its U-Net config
    refiner = {**SDXL_INDEX, "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}
    text_time = {"addition_embed_type": "text_time"}
    assert require_supported_model(_folder(tmp_path / "refiner", refiner, text_time)) is STABLE_DIFFUSION_XL
    assert require_supported_model(_folder(tmp_path / "no-unet", refiner)) is STABLE_DIFFUSION_XL
    # an SDXL class around a U-Net without micro-conditioning is not SDXL
    with pytest.raises(UserError, match="StableDiffusionXLPipeline whose U-Net has addition_embed_type None"):
        require_supported_model(_folder(tmp_path / "odd", SDXL_INDEX, {"addition_embed_type": None}))
    # the loader's classes for each family
    assert pipelines_of(STABLE_DIFFUSION).text_to_image is text_to_image_pipeline(STABLE_DIFFUSION)
    assert text_to_image_pipeline(STABLE_DIFFUSION) is LatentDiffusionPipeline
    assert pipelines_of(STABLE_DIFFUSION_XL).text_to_image is LatentDiffusionXLPipeline
    assert pipelines_of(STABLE_DIFFUSION_XL).img2img is LatentDiffusionXLImg2ImgPipeline
    for family in FAMILIES:
        classes = pipelines_of(family)
        assert all(issubclass(cls, classes.text_to_image) for cls in (classes.img2img, classes.inpaint) if cls)
        assert all(cls.__name__ in family.pipeline_classes for cls in vars(classes).values() if cls)


def test_other_families_are_refused_naming_what_is_supported(tiny_sd_dir: str, tmp_path) -> None:
    for class_name in ("StableDiffusion3Pipeline", "FluxPipeline", "PixArtAlphaPipeline", "KandinskyV22Pipeline"):
        folder = _folder(tmp_path / class_name, {"_class_name": class_name})
        with pytest.raises(
            UserError, match=f"is a {class_name} model.*{re.escape(SUPPORTED)}.*{re.escape(SUPPORTED_XL)}"
        ):
            require_supported_model(folder)
    # a supported pipeline class around an SDXL U-Net (its micro-conditioning) is refused too
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}), "utf-8")
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}), "utf-8")
    with pytest.raises(UserError, match="whose U-Net has addition_embed_type 'text_time'"):
        require_supported_model(str(folder))


def test_missing_models_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model_index.json"):
        require_supported_model(str(tmp_path))
    with pytest.raises(UserError, match="--config /no/such: no such folder"):
        require_supported_model("/no/such", flag="--config")
    # offline (conftest sets HF_HUB_OFFLINE) a Hub id that is not cached cannot be read
    with pytest.raises(UserError, match="could not load --model nobody-here/no-such-model .no such folder"):
        require_supported_model("nobody-here/no-such-model")


def test_single_files_are_recognised_by_their_keys(tiny_sd_dir: str, tmp_path: Path) -> None:
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert single_file_family(export_single_file(pipe, tmp_path / "sd.safetensors")) is STABLE_DIFFUSION
    # an SDXL checkpoint holds its second text encoder under conditioner.embedders.1, the refiner's under .0
    unet_key = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    for name, embedder in (("xl", 1), ("refiner", 0)):
        key = f"conditioner.embedders.{embedder}.model.transformer.resblocks.9.mlp.c_proj.bias"
        save_file({key: torch.zeros(4), **unet_key}, tmp_path / f"{name}.safetensors")
        assert single_file_family(tmp_path / f"{name}.safetensors") is STABLE_DIFFUSION_XL
    # Playground v2.5 (SDXL's shape, EDM's schedule) is not run
    save_file({"edm_mean": torch.zeros(4), **unet_key}, tmp_path / "playground.safetensors")
    with pytest.raises(UserError, match="'playground-v2-5' checkpoint .by its keys., which this version does not run"):
        single_file_family(tmp_path / "playground.safetensors")


def _command_lines(sdxl: str, tmp: Path) -> dict[str, tuple[Callable[[list[str]], int], list[str]]]:
    image = tmp / "in.png"
    checkpoint = tmp / "some.safetensors"
    save_file({"x": torch.zeros(1)}, checkpoint)
    out = str(tmp / "out")
    return {
        "txt2img": (txt2img.main, ["--model", sdxl, "--prompt", "a fox", "--out", out]),
        "img2img": (img2img.main, ["--model", sdxl, "--image", str(image), "--prompt", "a fox", "--out", out]),
        "inpaint": (inpaint.main, ["--model", sdxl, "--image", str(image), "--outpaint", "left=8", "--prompt", "a"]),
        "app": (app.main, ["--model", sdxl, "--out", out]),
        "publish": (publish.main, ["--model", sdxl, "--repo-id", "me/x", "--dry-run", out]),
        "convert to": (convert.main, ["--model", sdxl, "--to-single-file", str(tmp / "o.safetensors")]),
        "convert from": (convert.main, ["--from-single-file", str(checkpoint), "--config", sdxl, "--out", out]),
        "eval.benchmark": (benchmark.main, ["--model", sdxl, "--out", str(tmp / "b.json"), "--repeats", "1"]),
        "eval.guidance_sweep": (guidance_sweep.main, ["--model", sdxl, "--out", out, "--scales", "1"]),
        "eval.nll": (nll.main, ["--model", sdxl, "--data", str(tmp), "--out", str(tmp / "n.json")]),
    }


@pytest.mark.parametrize(
    "command",
    [
        "txt2img",
        "img2img",
        "inpaint",
        "app",
        "publish",
        "convert to",
        "convert from",
        "eval.benchmark",
        "eval.guidance_sweep",
        "eval.nll",
    ],
)
def test_every_command_refuses_an_sd3_folder_in_one_line(capsys, tmp_path: Path, command) -> None:
    import PIL.Image

    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    sd3_dir = _folder(tmp_path / "sd3", {"_class_name": "StableDiffusion3Pipeline"})
    main, argv = _command_lines(sd3_dir, tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "StableDiffusion3Pipeline" in lines[0] and SUPPORTED in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
