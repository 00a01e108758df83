"""The model that ships in ``models/shapes``: the default of the commands, loads in ours and in stock diffusers with
the same images, keeps the zero-terminal-SNR schedule it was trained with, its images at the defaults follow the
prompts (scored by ``eval.adherence``, which reads colour, shape and position from the pixels), and it edits images:
inpainting, outpainting and img2img."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from eval.adherence import adherence_prompts, score_images
from pipelines import DEFAULT_MODEL, LatentDiffusionPipeline
from pipelines.generation_defaults import GenerationDefaults
from pipelines.txt2img import main as txt2img
from shapes.pairs import canonical_pair
from shapes.world import canonical_scene

REPO = Path(__file__).resolve().parents[2]
MODEL = Path(DEFAULT_MODEL)
# On these 30 prompts and seeds the shipped model gets every part right every time (300 prompts in
# models/shapes/README.md: colour 0.983, shape 1.0, position 1.0); the floor leaves room for other CPUs' and torch
# releases' float differences.
ADHERENCE_FLOOR = 0.85
# The card's figure: where the first sampling step puts the object, right for 90 prompts (chance 0.2).
FIRST_STEP_FLOOR = 0.8
MAX_FOLDER_MB = 31


@pytest.fixture(scope="module")
def pipe() -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_pretrained(MODEL)


def test_default_model_is_the_shipped_folder() -> None:
    assert MODEL == REPO / "models" / "shapes"
    assert (MODEL / "model_index.json").is_file() and (MODEL / "README.md").is_file()


def test_folder_is_small_and_holds_only_safetensors_weights() -> None:
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) / 1e6 <= MAX_FOLDER_MB
    assert not [f for f in files if f.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    for component in ("unet", "vae", "text_encoder"):
        assert list((MODEL / component).glob("*.safetensors")), component


def test_defaults_are_the_models_own(pipe: LatentDiffusionPipeline) -> None:
    defaults = GenerationDefaults.load(MODEL)
    assert pipe.generation_defaults == defaults != GenerationDefaults()  # not Stable Diffusion's 50 steps at 7.5
    assert pipe.default_size == 64


def test_schedule_reaches_zero_terminal_snr(pipe: LatentDiffusionPipeline) -> None:
    # With Stable Diffusion's plain scaled_linear schedule x_T keeps sqrt(alpha_bar_T) ~ 6.8 % of the signal, and a
    # model trained on it read the object's position from that leftover signal instead of the prompt (position
    # right 19 % of the time). The shipped model is trained and sampled with zero terminal SNR and v-prediction.
    config = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert config.rescale_betas_zero_snr and config.prediction_type == "v_prediction"
    assert config.timestep_spacing == "trailing"  # the first sampling step is t = T, where the SNR is zero
    plain = DDIMScheduler.from_config({**config, "rescale_betas_zero_snr": False})
    assert plain.alphas_cumprod[-1].sqrt() == pytest.approx(0.068, abs=0.002)
    assert pipe.scheduler.alphas_cumprod[-1].sqrt() < 1e-3
    pipe.scheduler.set_timesteps(pipe.generation_defaults.num_inference_steps)
    assert int(pipe.scheduler.timesteps[0]) == config.num_train_timesteps - 1


def test_loads_in_stock_diffusers_with_the_same_images(pipe: LatentDiffusionPipeline) -> None:
    stock = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    defaults = pipe.generation_defaults
    kwargs = {
        "num_inference_steps": defaults.num_inference_steps,
        "guidance_scale": defaults.guidance_scale,
        "num_images_per_prompt": 2,
        "output_type": "np",
    }
    # stock guides every step; ours does too when asked, instead of only the noisier half the folder recommends
    assert defaults.guidance_interval == (0.5, 1.0)
    ours = pipe(
        "a blue square at the top", generator=torch.Generator().manual_seed(0), guidance_interval=(0, 1), **kwargs
    ).images
    theirs = stock("a blue square at the top", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert ours.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() < 1e-4


def score_at_defaults(pipe: LatentDiffusionPipeline, prompts: list[str], batch_size: int):
    """The model's images at its defaults for ``prompts`` (prompt i with seed i), scored by eval.adherence."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(start + k) for k in range(len(batch))]
        images += pipe(batch, generator=generators).images
    return score_images(images, prompts)


@pytest.fixture(scope="module")
def adherence(pipe: LatentDiffusionPipeline):
    """The shipped model's images at its defaults for 30 prompts, scored by eval.adherence."""
    prompts = adherence_prompts(30, seed=3)  # neither the sweep's prompts (seed 1) nor the card's (seed 2)
    return score_at_defaults(pipe, prompts, batch_size=10)


def test_images_at_the_defaults_follow_the_prompts(adherence) -> None:
    parts = adherence.part_accuracy()
    assert parts["colour"] >= ADHERENCE_FLOOR and parts["shape"] >= ADHERENCE_FLOOR, adherence.summary()


def test_images_at_the_defaults_put_the_object_where_the_prompt_says(adherence) -> None:
    assert adherence.part_accuracy()["position"] >= ADHERENCE_FLOOR, adherence.summary()
    assert adherence.all_correct_rate() >= ADHERENCE_FLOOR, adherence.summary()


# Two-object prompts (the card's 240 + 120 prompts: 92.9 % fully right for pairings seen in training, 92.5 % for
# held-out ones; issue 21 asks 90 and 80 %). On these 16 + 8 other prompts the shipped model gets 15 and 7 fully right;
# the floors (13 and 5) leave room for float differences.
PAIR_FLOORS = {"two_object_seen": 0.8, "two_object_held_out": 0.6}


@pytest.fixture(scope="module")
def pair_adherence(pipe: LatentDiffusionPipeline):
    prompts = adherence_prompts(16, seed=5, objects=2, pairings="seen")
    prompts += adherence_prompts(8, seed=5, objects=2, pairings="held_out")
    return score_at_defaults(pipe, prompts, batch_size=len(prompts))


def test_two_object_prompts_get_both_objects_and_their_relation_right(pair_adherence) -> None:
    summary = pair_adherence.summary()
    for group, floor in PAIR_FLOORS.items():
        assert summary[group]["all_correct_rate"] >= floor, (group, summary[group])


def test_the_first_step_places_the_object_by_the_prompt_and_only_by_its_position_words(tmp_path: Path) -> None:
    """At t = T (zero SNR) the U-Net's x_0 prediction is its mean image for the prompt: the object already sits where
    the prompt says. With the position phrases' words given one embedding, the same U-Net can only guess (chance 0.2).
    """
    from recipes.shapes_measures import first_step_positions
    from tests.recipes.test_recipe import save_encoder_blind_to_position

    assert first_step_positions(MODEL) >= FIRST_STEP_FLOOR
    shutil.copytree(MODEL, tmp_path / "model")
    save_encoder_blind_to_position(tmp_path / "model")
    assert first_step_positions(tmp_path / "model") <= 0.4


def test_txt2img_uses_it_when_no_model_is_given(capsys, tmp_path: Path, pipe: LatentDiffusionPipeline) -> None:
    assert (
        txt2img(["--prompt", "a red circle on the left", "--seed", "0", "--num-images", "2", "--out", str(tmp_path)])
        == 0
    )
    paths = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert len(paths) == 2
    defaults = pipe.generation_defaults
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)
        assert image.text["model"] == DEFAULT_MODEL
        assert image.text["steps"] == str(defaults.num_inference_steps)
        assert image.text["guidance_scale"] == str(defaults.guidance_scale)
        assert image.text["guidance_interval"] == "0.5,1"
        assert image.text["scheduler"] == "ddim"
        generated = np.asarray(image.convert("RGB"))
    direct = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0)).images[0]
    # the command ran both images in one batch, this one alone: float sums in another order may round a pixel apart
    assert np.abs(generated.astype(int) - np.asarray(direct).astype(int)).max() <= 1


# ------------------------------------------------------------------------------------- editing with the same model


def parts_right(image: Image.Image | np.ndarray, prompt: str) -> dict[str, bool]:
    """Which attributes the prompt names are right in the image, as eval.adherence reads them."""
    from eval.adherence import score_prompt
    from shapes.analysis import analyze_image

    return score_prompt(analyze_image(image), prompt).matched


@pytest.fixture(scope="module")
def edit_pipe(pipe: LatentDiffusionPipeline):
    from pipelines import LatentDiffusionInpaintPipeline

    edit = LatentDiffusionInpaintPipeline.from_pipe(pipe)
    edit.set_progress_bar_config(disable=True)
    return edit


@pytest.fixture(scope="module")
def img2img_pipe(pipe: LatentDiffusionPipeline):
    from pipelines import LatentDiffusionImg2ImgPipeline

    edit = LatentDiffusionImg2ImgPipeline.from_pipe(pipe)
    edit.set_progress_bar_config(disable=True)
    return edit


SECOND_OBJECT_PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def inpainted(edit_pipe) -> tuple[Image.Image, list[Image.Image]]:
    """A red circle on the left, where a two-object scene puts it, with the right half regenerated for "a red circle
    to the left of a blue square": a second object painted in beside the kept one, four seeds."""
    original = canonical_pair(("red", "circle"), "left_of", ("blue", "square"), first_only=True)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # regenerate the right half
    seeds = range(4)
    return original, edit_pipe(
        [SECOND_OBJECT_PROMPT] * len(seeds),
        image=original,
        mask_image=mask,
        keep_unmasked_pixels=True,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images


def test_inpainting_keeps_the_unmasked_pixels_and_the_original_object(inpainted) -> None:
    original, results = inpainted
    kept = np.asarray(original)[:, :32].astype(int)
    for result in results:
        pixels = np.asarray(result)
        assert np.abs(pixels[:, :32].astype(int) - kept).max() <= 1  # unmasked pixels: the original's
        assert all(parts_right(pixels[:, :32], "a red circle").values())
        assert not np.array_equal(pixels[:, 32:], np.asarray(original)[:, 32:])  # the masked half was redrawn


def test_inpainting_paints_a_second_object_beside_the_kept_one(inpainted) -> None:
    _, results = inpainted
    report = score_images(results, [SECOND_OBJECT_PROMPT] * len(results))
    found = [record.all_correct for record in report.records]  # exactly two objects, right colours, shapes, relation
    assert sum(found) >= 3, [record.to_dict()["matched"] for record in report.records]


def seam_step(image: Image.Image) -> float:
    """Mean colour step between pixel columns 31 and 32 in the rows clear of the object: background meets background
    there, so a harmonised inpainting has almost none."""
    pixels = np.asarray(image).astype(float)
    rows = np.r_[0:12, 52:64]
    return float(np.abs(pixels[rows, 31] - pixels[rows, 32]).mean())


@pytest.fixture(scope="module")
def replaced(edit_pipe) -> dict[int, list[Image.Image]]:
    """A red square on the left with the left half regenerated for "a blue triangle on the left", eight seeds, with
    plain replacement (0) and with RePaint's resampling (2)."""
    original = canonical_scene("red", "square", "left")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return {
        resamples: edit_pipe(
            ["a blue triangle on the left"] * 8,
            image=original,
            mask_image=mask,
            resamples=resamples,
            keep_unmasked_pixels=True,
            generator=[torch.Generator().manual_seed(s) for s in range(8)],
        ).images
        for resamples in (0, 2)
    }


def test_inpainting_replaces_the_object_with_the_prompts(replaced) -> None:
    original = np.asarray(canonical_scene("red", "square", "left"))
    for result in replaced[2]:
        np.testing.assert_array_equal(np.asarray(result)[:, 32:], original[:, 32:])  # the kept half is untouched
    found = [all(parts_right(result, "a blue triangle on the left").values()) for result in replaced[2]]
    assert sum(found) >= 6, found  # the red square is gone; a blue triangle is where the prompt puts it


def test_resampling_makes_the_new_half_meet_the_kept_one(replaced) -> None:
    plain, resampled = (np.mean([seam_step(im) for im in replaced[r]]) for r in (0, 2))
    assert resampled < plain / 1.5, (plain, resampled)


def test_outpainting_keeps_the_original_and_completes_the_scene(edit_pipe) -> None:
    from pipelines import outpaint_canvas

    original = canonical_scene("green", "triangle", "left").crop(
        (0, 0, 32, 64)
    )  # the left half: the triangle is in it
    canvas, mask = outpaint_canvas(original, right=32)
    assert canvas.size == (64, 64)
    seeds = range(4)
    results = edit_pipe(
        ["a green triangle on the left"] * len(seeds),
        image=canvas,
        mask_image=mask,
        keep_unmasked_pixels=True,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    complete = []
    for result in results:
        pixels = np.asarray(result)
        assert np.abs(pixels[:, :32].astype(int) - np.asarray(original).astype(int)).max() <= 1
        # the new half is background, not a second object: the whole image reads as the one prompt
        complete.append(all(parts_right(pixels, "a green triangle on the left").values()))
    assert sum(complete) >= 3, complete


def test_img2img_follows_a_new_prompt_at_high_strength_and_keeps_the_image_at_low(img2img_pipe) -> None:
    original = canonical_scene("red", "circle", "left")
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    changed = img2img_pipe(["a blue circle on the left"] * 4, image=original, strength=0.8, generator=generators)
    changed = changed.images
    assert sum(all(parts_right(im, "a blue circle").values()) for im in changed) >= 3  # the colour follows the prompt
    kept = img2img_pipe(
        "a blue circle on the left", image=original, strength=0.2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert all(parts_right(kept, "a red circle on the left").values())  # too little noise to change the colour
