"""Hires fix: a base pass, a latent or pixel upscale, then img2img, equal to the same steps composed by hand from
stock diffusers' pipelines; the ``txt2img`` flags and the PNG metadata."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from pipelines import LatentDiffusionPipeline, LatentDiffusionXLPipeline
from pipelines.hires import HiresFix, hires_fix
from pipelines.txt2img import main as txt2img

ARGS = {"prompt": ["a red circle", "a blue square"], "num_inference_steps": 4, "guidance_scale": 6.0}


def stock_hires(base_cls, img2img_cls, model: str, upscale: str, **pipe_kwargs) -> np.ndarray:
    """The hires fix composed from stock pipelines: latents at the model's size, resized (or decoded, resized with
    Lanczos), img2img at strength 0.6 with the generators carrying on."""
    base = base_cls.from_pretrained(model, **pipe_kwargs)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    latents = base(**ARGS, generator=generators, output_type="latent").images
    h, w = latents.shape[-2:]
    if upscale == "latent":
        image = F.interpolate(latents, size=(2 * h, 2 * w), mode="bilinear")
    else:
        with torch.no_grad():
            decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
        pils = base.image_processor.postprocess(decoded, output_type="pil")
        size = (2 * base.vae_scale_factor * w, 2 * base.vae_scale_factor * h)
        image = [p.resize(size, PIL.Image.LANCZOS) for p in pils]
    second = img2img_cls.from_pipe(base)
    return second(**ARGS, image=image, strength=0.6, generator=generators, output_type="np").images


def ours_hires(cls, model: str, upscale: str) -> np.ndarray:
    pipe = cls.from_pretrained(model)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    hires = HiresFix(scale=2.0, strength=0.6, upscale=upscale)
    return hires_fix(pipe, hires, **ARGS, generator=generators, output_type="np").images


@pytest.mark.parametrize("upscale", ["latent", "pixel"])
def test_hires_fix_is_stocks_pipelines_composed(tiny_sd_dir, upscale):
    expected = stock_hires(
        StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, tiny_sd_dir, upscale, safety_checker=None
    )
    ours = ours_hires(LatentDiffusionPipeline, tiny_sd_dir, upscale)
    assert ours.shape == expected.shape == (2, 128, 128, 3)  # twice the tiny model's 64 px
    assert np.abs(ours - expected).max() < 1e-4


def test_sdxl_hires_fix_is_stocks_pipelines_composed(tiny_sdxl_dir):
    expected = stock_hires(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, tiny_sdxl_dir, "latent")
    ours = ours_hires(LatentDiffusionXLPipeline, tiny_sdxl_dir, "latent")
    assert np.abs(ours - expected).max() < 1e-4


def test_txt2img_hires_flags_write_the_larger_image_with_its_settings(tiny_sd_dir, tmp_path, capsys):
    argv = ["--model", tiny_sd_dir, "--prompt", "a red circle", "--steps", "4", "--seed", "3", "--out", str(tmp_path)]
    assert txt2img([*argv, "--height", "32", "--width", "48", "--hires-scale", "1.5", "--hires-strength", "0.4"]) == 0
    (path,) = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    png = PIL.Image.open(path)
    assert png.size == (72, 48)
    assert png.text["hires_scale"] == "1.5" and png.text["hires_strength"] == "0.4"
    assert "Hires upscale: 1.5" in png.text["parameters"]


def test_a_hires_setting_without_the_scale_is_refused(tiny_sd_dir, tmp_path, capsys):
    argv = ["--model", tiny_sd_dir, "--prompt", "a red circle", "--out", str(tmp_path), "--hires-strength", "0.3"]
    assert txt2img(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --hires-strength is a setting of the hires fix; add --hires-scale X"
    )
    with pytest.raises(Exception, match=r"--hires-scale must be > 1"):
        HiresFix(scale=1.0).check()
