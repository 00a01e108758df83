"""The generation commands on an SDXL folder, with no extra flag: the family comes from the folder, and the images
are stock ``StableDiffusionXLPipeline``'s / ``StableDiffusionXLImg2ImgPipeline``'s."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

from pipelines import img2img, inpaint, txt2img

from .test_generate import assert_same_image, fast, pixels, random_image, run

SEED = 3  # fast() seeds the first image with it


def stock_image(cls, model: str, prompt: str, **kwargs) -> np.ndarray:
    pipe = cls.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    image = pipe(prompt, num_inference_steps=2, generator=generator, output_type="pil", **kwargs).images[0]
    return np.asarray(image).astype(int)


def test_txt2img_on_an_sdxl_folder_gives_stocks_image(capsys, tiny_sdxl_dir, tmp_path) -> None:
    prompt = "a red circle on the left"
    code, paths, err = run(capsys, txt2img.main, *fast(tiny_sdxl_dir, tmp_path, "--prompt", prompt))
    assert code == 0, err
    assert_same_image(pixels(paths[0]), stock_image(StableDiffusionXLPipeline, tiny_sdxl_dir, prompt))
    assert "Sampler: Euler" in PIL.Image.open(paths[0]).text["parameters"]  # SDXL's own scheduler


def test_img2img_on_an_sdxl_folder_gives_stocks_image(capsys, tiny_sdxl_dir, tmp_path) -> None:
    random_image().save(tmp_path / "in.png")
    prompt = "a blue square"
    argv = fast(tiny_sdxl_dir, tmp_path / "out", "--prompt", prompt, "--image", str(tmp_path / "in.png"))
    code, paths, err = run(capsys, img2img.main, *argv, "--strength", "0.6")
    assert code == 0, err
    image = PIL.Image.open(tmp_path / "in.png")
    reference = stock_image(StableDiffusionXLImg2ImgPipeline, tiny_sdxl_dir, prompt, image=image, strength=0.6)
    assert_same_image(pixels(paths[0]), reference)


def test_inpaint_on_an_sdxl_folder_gives_stocks_image(capsys, tiny_sdxl_dir, tmp_path) -> None:
    random_image().save(tmp_path / "in.png")
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    prompt = "a blue triangle on the left"
    argv = ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", prompt]
    argv += ["--strength", "0.7", "--no-keep-unmasked-pixels"]  # stock's image: the decoded latents everywhere
    argv += ["--guidance-scale", "6"]  # the model's default is its text-to-image one (5); stock inpainting's is 7.5
    code, paths, err = run(capsys, inpaint.main, *fast(tiny_sdxl_dir, tmp_path / "out", *argv))
    assert code == 0, err
    image = PIL.Image.open(tmp_path / "in.png")
    settings = {"image": image, "mask_image": mask, "strength": 0.7, "guidance_scale": 6, "height": 64, "width": 64}
    reference = stock_image(StableDiffusionXLInpaintPipeline, tiny_sdxl_dir, prompt, **settings)
    assert_same_image(pixels(paths[0]), reference)


def test_shared_flags_keep_their_meaning_on_sdxl(capsys, tiny_sdxl_dir, tmp_path) -> None:
    prompt = "a (green:1.4) triangle, at night"
    extra = ["--prompt", prompt, "--no-prompt-weighting", "--guidance-rescale", "0.5", "--clip-skip", "1"]
    extra += ["--negative-prompt", "blurry"]
    code, paths, err = run(capsys, txt2img.main, *fast(tiny_sdxl_dir, tmp_path, *extra))
    assert code == 0, err
    settings = {"guidance_rescale": 0.5, "clip_skip": 1, "negative_prompt": "blurry"}
    reference = stock_image(StableDiffusionXLPipeline, tiny_sdxl_dir, prompt, **settings)
    assert_same_image(pixels(paths[0]), reference)
