"""The web app's generation (``pipelines.studio``) without a browser: text-to-image gives ``txt2img``'s images and
metadata, img2img the ``img2img`` command's, a reported seed reproduces its images, inpainting and outpainting keep
the pixels they should, and a bad setting raises a ``ValueError`` that says what to change, before anything is
written. On an SDXL folder (no extra flag) text-to-image, img2img and inpainting draw stock
``StableDiffusionXL*Pipeline``'s images, and the page and ``python -m pipelines.app`` start on the SDXL pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ldm.errors import UserError
from pipelines.generation_defaults import GenerationDefaults
from pipelines.img2img import main as img2img_main
from pipelines.studio import MAX_IMAGES, Settings, Studio, fit_image
from pipelines.txt2img import main as txt2img_main

SIZE = 64


@pytest.fixture(scope="module")
def studio(tiny_sd_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    return Studio.load(tiny_sd_dir, tmp_path_factory.mktemp("app-out"), torch.device("cpu"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def metadata(path: Path) -> dict[str, str]:
    return dict(PIL.Image.open(path).text)


def random_image(width: int = 96, height: int = SIZE, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_text_to_image_gives_txt2img_images_and_metadata(studio, tiny_sd_dir, tmp_path, capsys) -> None:
    settings = Settings(prompt="a red circle", seed=7, steps=3, guidance_scale=4.0, num_images=2, scheduler="ddim")
    generation = studio.text_to_image(settings, width=SIZE, height=SIZE)
    assert generation.seed == 7

    argv = [
        "--model",
        tiny_sd_dir,
        "--prompt",
        "a red circle",
        "--seed",
        "7",
        "--steps",
        "3",
        "--guidance-scale",
        "4",
        "--num-images",
        "2",
        "--scheduler",
        "ddim",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert txt2img_main(argv) == 0
    cli_paths = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(cli_paths) == len(generation.paths) == 2
    for app_path, cli_path in zip(generation.paths, cli_paths, strict=True):
        assert metadata(app_path) == metadata(cli_path)
        assert np.array_equal(pixels(app_path), pixels(cli_path))
    assert [metadata(p)["seed"] for p in generation.paths] == ["7", "8"]
    assert [p.name.split("-")[1] for p in generation.paths] == ["7", "8"]


def test_the_hires_fix_gives_the_txt2img_commands_image(studio, tiny_sd_dir, tmp_path, capsys) -> None:
    settings = Settings(prompt="a red circle", seed=7, steps=4, guidance_scale=4.0, num_images=1, scheduler="ddim")
    (app_path,) = studio.text_to_image(settings, width=32, height=32, hires_scale=2.0, hires_strength=0.5).paths
    argv = ["--model", tiny_sd_dir, "--prompt", "a red circle", "--seed", "7", "--steps", "4"]
    argv += ["--guidance-scale", "4", "--scheduler", "ddim", "--device", "cpu", "--out", str(tmp_path)]
    assert (
        txt2img_main([*argv, "--width", "32", "--height", "32", "--hires-scale", "2", "--hires-strength", "0.5"]) == 0
    )
    (cli_path,) = [Path(line) for line in capsys.readouterr().out.split()]
    assert PIL.Image.open(app_path).size == (64, 64) and metadata(app_path)["hires_scale"] == "2"
    assert np.array_equal(pixels(app_path), pixels(cli_path)) and metadata(app_path) == metadata(cli_path)


def test_a_random_seed_is_reported_and_reproduces_each_image(studio) -> None:
    first = studio.text_to_image(Settings(prompt="a blue square", steps=2, num_images=2), SIZE, SIZE)
    assert [metadata(p)["seed"] for p in first.paths] == [str(first.seed), str(first.seed + 1)]
    again = studio.text_to_image(Settings(prompt="a blue square", steps=2, num_images=2, seed=first.seed), SIZE, SIZE)
    for a, b in zip(first.paths, again.paths, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    alone = studio.text_to_image(Settings(prompt="a blue square", steps=2, seed=first.seed + 1), SIZE, SIZE)
    assert alone.seed == first.seed + 1
    # Alone, the image is computed in a batch of one: kernels round differently per batch size, so a pixel may land
    # on the other side of a uint8 step.
    difference = pixels(alone.paths[0]).astype(int) - pixels(first.paths[1])
    assert np.abs(difference).max() <= 1


def test_unset_steps_and_guidance_are_the_models(tiny_sd_dir, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    GenerationDefaults(num_inference_steps=3, guidance_scale=2.5).save(model)
    studio = Studio.load(str(model), tmp_path / "out", torch.device("cpu"))
    path = studio.text_to_image(Settings(prompt="a circle", seed=0), width=32, height=48).paths[0]
    assert metadata(path).items() >= {"steps": "3", "guidance_scale": "2.5", "width": "32", "height": "48"}.items()
    assert PIL.Image.open(path).size == (32, 48)


def test_img2img_gives_the_img2img_commands_image(studio, tiny_sd_dir, tmp_path, capsys) -> None:
    image = random_image()
    image.save(tmp_path / "in.png")
    generation = studio.image_to_image(Settings(prompt="a red circle", seed=3, steps=4), image, strength=0.5)
    argv = [
        "--model",
        tiny_sd_dir,
        "--image",
        str(tmp_path / "in.png"),
        "--prompt",
        "a red circle",
        "--seed",
        "3",
        "--steps",
        "4",
        "--strength",
        "0.5",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "cli"),
    ]
    assert img2img_main(argv) == 0
    cli_path = Path(capsys.readouterr().out.strip())
    assert np.array_equal(pixels(generation.paths[0]), pixels(cli_path))
    expected = {"mode": "img2img", "strength": "0.5", "width": "96", "height": "64", "seed": "3"}
    assert metadata(generation.paths[0]).items() >= expected.items()


def test_inpainting_keeps_every_unmasked_pixel(studio) -> None:
    image = random_image()
    mask = np.zeros((SIZE, 96), np.uint8)
    mask[16:48, :40] = 255
    # a mask drawn at another size (the editor's canvas) is scaled to the image
    big_mask = PIL.Image.fromarray(mask, mode="L").resize((192, 128), PIL.Image.Resampling.NEAREST)
    generation = studio.inpaint(Settings(prompt="a circle", seed=1, steps=2), image, big_mask)
    result, original = pixels(generation.paths[0]), np.asarray(image)
    assert np.array_equal(result[mask == 0], original[mask == 0])
    assert (result[mask == 255] != original[mask == 255]).any()
    assert metadata(generation.paths[0])["mode"] == "inpaint"


def test_outpainting_extends_the_canvas_and_keeps_the_original(studio) -> None:
    image = random_image()
    sides = {"left": 16, "right": 0, "top": 0, "bottom": 5}
    settings = Settings(prompt="a circle", seed=1, steps=2, scheduler="ddim")
    generation = studio.outpaint(settings, image, sides, resamples=1)
    result = pixels(generation.paths[0])
    assert result.shape == (SIZE + 8, 96 + 16, 3)  # bottom 5 is rounded up to the VAE's multiple of 8
    assert np.array_equal(result[:SIZE, 16:], np.asarray(image))
    expected = {"mode": "outpaint", "outpaint": "left=16,bottom=5", "width": "112", "height": "72", "resamples": "1"}
    assert metadata(generation.paths[0]).items() >= expected.items()
    plain = pixels(studio.outpaint(settings, image, sides).paths[0])
    assert not np.array_equal(plain, result)  # the resamples reached the pipeline


def test_fit_image_scales_down_and_rounds_to_the_vae_multiple() -> None:
    assert fit_image(random_image(1000, 500), max_side=128, multiple=8).size == (128, 64)
    assert fit_image(random_image(100, 60), max_side=128, multiple=8).size == (96, 56)
    small = random_image(64, 32)
    assert np.array_equal(np.asarray(fit_image(small, max_side=128, multiple=8)), np.asarray(small))
    assert fit_image(PIL.Image.new("RGBA", (3, 900)), max_side=128, multiple=8).size == (8, 128)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"num_images": 0}, f"number of images must be 1 to {MAX_IMAGES}; got 0"),
        ({"num_images": MAX_IMAGES + 1}, f"number of images must be 1 to {MAX_IMAGES}"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"guidance_scale": -1.0}, "guidance scale must be >= 0"),
        ({"guidance_scale": float("nan")}, "guidance scale must be >= 0"),
        ({"guidance_scale": float("inf")}, "guidance scale must be >= 0 and finite"),  # an all-black image before
        ({"seed": -1}, "the seed must be a whole number from 0 to 2\\*\\*63 - 1"),
        ({"seed": 2**63}, "the seed must be a whole number"),
        ({"seed": 1.5}, "the seed must be a whole number"),
        ({"scheduler": "fast"}, "unknown scheduler 'fast'; choose one of model's, ddpm, ddim"),
    ],
)
def test_bad_settings_say_what_to_change_and_write_nothing(studio, settings, message) -> None:
    before = sorted(studio.out.iterdir())
    with pytest.raises(UserError, match=message):
        studio.text_to_image(Settings(**{"prompt": "a circle", **settings}), SIZE, SIZE)
    assert sorted(studio.out.iterdir()) == before


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            lambda s, settings: s.text_to_image(settings, 60, SIZE),
            "width must be a multiple of 8 from 8 to 128; got 60",
        ),
        (lambda s, settings: s.text_to_image(settings, SIZE, 256), "height must be a multiple of 8 from 8 to 128"),
        (lambda s, settings: s.image_to_image(settings, None, 0.5), "no image: upload the image to redraw"),
        (lambda s, settings: s.image_to_image(settings, random_image(), 0.0), "leaves no denoising step"),
        (lambda s, settings: s.inpaint(settings, random_image(), None), "paint the area to regenerate"),
        (lambda s, settings: s.outpaint(settings, None, {"left": 8}), "no image: upload the image to extend"),
        (lambda s, settings: s.outpaint(settings, random_image(), {"left": 0}), "outpaint needs at least one"),
    ],
)
def test_bad_mode_inputs_say_what_to_change(studio, mode, message) -> None:
    before = sorted(studio.out.iterdir())
    with pytest.raises(UserError, match=message):
        mode(studio, Settings(prompt="a circle", steps=2))
    assert sorted(studio.out.iterdir()) == before


# ------------------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def sdxl_studio(tiny_sdxl_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Studio:
    return Studio.load(tiny_sdxl_dir, tmp_path_factory.mktemp("app-out-xl"), torch.device("cpu"))


def float_images(monkeypatch: pytest.MonkeyPatch, pipe) -> list[np.ndarray]:
    """The images ``pipe`` draws, in floats, as they are before the 8-bit rounding: recorded from its postprocess
    (which still returns what the pipeline asked for)."""
    recorded: list[np.ndarray] = []
    postprocess = pipe.image_processor.postprocess

    def spy(image, output_type: str = "pil", **kwargs):
        recorded.append(postprocess(image, output_type="np", **kwargs))
        return postprocess(image, output_type=output_type, **kwargs)

    monkeypatch.setattr(pipe.image_processor, "postprocess", spy)
    return recorded


@pytest.fixture(scope="module")
def stock_sdxl(tiny_sdxl_dir: str):
    """Stock ``StableDiffusionXLPipeline`` loaded from the same folder (its img2img / inpaint pipelines share its
    components through ``from_pipe``)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


def stock_xl(stock, cls, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """Stock ``cls`` on ``stock``'s components: one image in floats, seeded ``seed``, 2 steps."""
    pipe = stock if cls is type(stock) else cls.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np", **kwargs).images[0]


def assert_stocks_image(path: Path, drawn: list[np.ndarray], reference: np.ndarray) -> None:
    """The app drew stock's image (< 1e-4 in floats) and saved it rounded to 8 bits."""
    assert len(drawn) == 1 and drawn[0].shape == (1, *reference.shape)
    assert np.abs(drawn[0][0] - reference).max() < 1e-4
    assert np.abs(pixels(path) / 255 - reference).max() <= 0.5 / 255 + 1e-4


def test_sdxl_text_to_image_at_the_apps_defaults_gives_stocks_image(sdxl_studio, stock_sdxl, monkeypatch) -> None:
    from diffusers import StableDiffusionXLPipeline

    assert type(sdxl_studio.pipe).__name__ == "LatentDiffusionXLPipeline"
    drawn = float_images(monkeypatch, sdxl_studio.pipe)
    size = sdxl_studio.default_size  # the page's width and height to start with
    generation = sdxl_studio.text_to_image(Settings(prompt="a red circle", seed=5, steps=2), size, size)
    # the model's scheduler and guidance (stock SDXL's 5), at the model's size: stock's own defaults
    reference = stock_xl(stock_sdxl, StableDiffusionXLPipeline, "a red circle", seed=5)
    assert_stocks_image(generation.paths[0], drawn, reference)
    expected = {"mode": "txt2img", "seed": "5", "guidance_scale": "5.0", "scheduler": "euler", "width": str(size)}
    assert metadata(generation.paths[0]).items() >= expected.items()


def test_sdxl_img2img_gives_stocks_image(sdxl_studio, stock_sdxl, monkeypatch) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from pipelines.pipeline_img2img import IMG2IMG_STRENGTH

    image = random_image(64, 64, seed=2)
    drawn = float_images(monkeypatch, sdxl_studio.model.pipeline("img2img"))
    settings = Settings(prompt="a blue square", negative_prompt="blurry", seed=3, steps=2)
    generation = sdxl_studio.image_to_image(settings, image, strength=IMG2IMG_STRENGTH)  # the page's strength
    reference = stock_xl(
        stock_sdxl,
        StableDiffusionXLImg2ImgPipeline,
        "a blue square",
        seed=3,
        image=image,
        strength=IMG2IMG_STRENGTH,
        negative_prompt="blurry",
    )
    assert_stocks_image(generation.paths[0], drawn, reference)
    assert metadata(generation.paths[0]).items() >= {"mode": "img2img", "strength": str(IMG2IMG_STRENGTH)}.items()


def test_sdxl_inpaint_gives_stocks_image_and_keeps_the_unmasked_pixels(sdxl_studio, stock_sdxl, monkeypatch) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    image = random_image(64, 64, seed=4)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    mask_image = PIL.Image.fromarray(mask, mode="L")
    drawn = float_images(monkeypatch, sdxl_studio.model.pipeline("inpaint"))
    settings = Settings(prompt="a green triangle", seed=6, steps=2)
    # "keep the unmasked pixels" off: the decoded image everywhere, as stock's
    generation = sdxl_studio.inpaint(settings, image, mask_image, keep_unmasked_pixels=False)
    # the page's strength (1) and the model's guidance (5); stock inpainting's own defaults are 0.9999 and 7.5
    reference = stock_xl(
        stock_sdxl,
        StableDiffusionXLInpaintPipeline,
        "a green triangle",
        seed=6,
        image=image,
        mask_image=mask_image,
        strength=1.0,
        guidance_scale=5.0,
        height=64,
        width=64,
    )
    assert_stocks_image(generation.paths[0], drawn, reference)
    assert metadata(generation.paths[0]).items() >= {"mode": "inpaint", "keep_unmasked_pixels": "false"}.items()

    kept = pixels(sdxl_studio.inpaint(settings, image, mask_image).paths[0])  # the page's default: on
    assert np.array_equal(kept[mask == 0], np.asarray(image)[mask == 0])
    assert (kept[mask == 255] != np.asarray(image)[mask == 255]).any()


def test_sdxl_outpaint_extends_the_canvas_and_keeps_the_original(sdxl_studio) -> None:
    image = random_image(48, 64, seed=5)
    generation = sdxl_studio.outpaint(Settings(prompt="a circle", seed=1, steps=2), image, {"right": 16})
    result = pixels(generation.paths[0])
    assert result.shape == (64, 64, 3)
    assert np.array_equal(result[:, :48], np.asarray(image))
    assert metadata(generation.paths[0]).items() >= {"mode": "outpaint", "outpaint": "right=16"}.items()


def test_the_page_of_an_sdxl_model_starts_at_stocks_defaults_and_draws_stocks_image(sdxl_studio, stock_sdxl) -> None:
    import inspect

    import gradio as gr
    from diffusers import StableDiffusionXLPipeline

    from pipelines.app import build_app

    demo = build_app(sdxl_studio)
    clicks = [fn for fn in demo.fns.values() if fn.name == "run"]
    assert len(clicks) == 4  # text to image, image to image, inpaint, outpaint
    txt2img = clicks[0]
    values = {component: component.value for component in txt2img.inputs}
    by_label = {component.label: component for component in txt2img.inputs}
    stock_defaults = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    assert values[by_label["Steps"]] == stock_defaults["num_inference_steps"].default
    assert values[by_label["Guidance scale"]] == stock_defaults["guidance_scale"].default
    native = stock_sdxl.default_sample_size * stock_sdxl.vae_scale_factor
    assert values[by_label["Width"]] == values[by_label["Height"]] == native
    assert isinstance(by_label["Random seed"], gr.Checkbox)

    values |= {by_label["Prompt"]: "a red circle", by_label["Steps"]: 2, by_label["Random seed"]: False}
    values[by_label["Seed"]] = 5
    ((path, caption),) = txt2img.fn(values)[0]
    assert caption == "seed 5"
    reference = stock_xl(stock_sdxl, StableDiffusionXLPipeline, "a red circle", seed=5)
    assert np.abs(pixels(Path(path)) / 255 - reference).max() <= 0.5 / 255 + 1e-4


def test_the_app_command_serves_an_sdxl_folder_with_no_extra_flag(tiny_sdxl_dir, tmp_path, monkeypatch) -> None:
    import gradio as gr

    import pipelines.app as app
    from pipelines.families import STABLE_DIFFUSION_XL

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    built, launched = [], []
    build_app = app.build_app
    monkeypatch.setattr(app, "build_app", lambda studio: built.append(studio) or build_app(studio))
    monkeypatch.setattr(gr.Blocks, "launch", lambda demo, **kwargs: launched.append(kwargs))
    argv = ["--model", tiny_sdxl_dir, "--device", "cpu", "--port", "7861", "--out", str(tmp_path / "out")]
    assert app.main(argv) == 0
    (studio,) = built
    assert type(studio.pipe).__name__ == "LatentDiffusionXLPipeline" and studio.model.family is STABLE_DIFFUSION_XL
    assert launched == [
        {"server_name": "127.0.0.1", "server_port": 7861, "allowed_paths": [str((tmp_path / "out").resolve())]}
    ]
