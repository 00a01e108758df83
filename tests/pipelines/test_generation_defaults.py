"""A model folder's ``generation_defaults.json``: read and written by the pipeline, used for every setting a call or
a command leaves out, ignored by stock diffusers, and bad files refused with a message naming them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from pipelines import LatentDiffusionPipeline
from pipelines.generation_defaults import FILENAME, GenerationDefaults
from pipelines.pipeline_latent_diffusion import _load_generation_defaults
from pipelines.txt2img import main as txt2img

DEFAULTS = GenerationDefaults(num_inference_steps=3, guidance_scale=2.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny pipeline folder that recommends 3 steps at guidance 2."""
    from ldm.presets import build_components

    pipe = LatentDiffusionPipeline(**build_components("tiny", seed=0))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # one U-Net call a step (PNDM's first is two)
    pipe.generation_defaults = DEFAULTS
    path = tmp_path_factory.mktemp("with-defaults")
    pipe.save_pretrained(path)
    return path


def steps_taken(pipe: LatentDiffusionPipeline, **kwargs) -> tuple[int, np.ndarray]:
    """How many denoising steps a call ran (counted by the step callback), and its image."""
    count = []

    def callback(pipe, step, timestep, tensors):
        count.append(step)
        return tensors

    image = pipe(
        "a red circle",
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback_on_step_end=callback,
        **kwargs,
    ).images
    return len(count), image


def test_stock_defaults_when_the_folder_names_none(tmp_path, tiny_sd_dir) -> None:
    assert GenerationDefaults.load(tmp_path) == GenerationDefaults(50, 7.5)
    assert LatentDiffusionPipeline.from_pretrained(tiny_sd_dir).generation_defaults == GenerationDefaults()


def test_round_trip_through_save_and_from_pretrained(model_dir) -> None:
    assert json.loads((model_dir / FILENAME).read_text()) == {"num_inference_steps": 3, "guidance_scale": 2.0}
    assert LatentDiffusionPipeline.from_pretrained(model_dir).generation_defaults == DEFAULTS


def test_a_guidance_interval_round_trips_and_the_full_one_is_not_written(tmp_path) -> None:
    interval = GenerationDefaults(num_inference_steps=3, guidance_scale=2.0, guidance_interval=(0.5, 1.0))
    interval.save(tmp_path)
    assert json.loads((tmp_path / FILENAME).read_text())["guidance_interval"] == [0.5, 1.0]
    assert GenerationDefaults.load(tmp_path) == interval
    DEFAULTS.save(tmp_path)  # (0, 1), every step: files from before the setting existed read the same
    assert "guidance_interval" not in json.loads((tmp_path / FILENAME).read_text())


def test_stock_defaults_are_not_written(tmp_path, tiny_components) -> None:
    LatentDiffusionPipeline(**tiny_components).save_pretrained(tmp_path)
    assert not (tmp_path / FILENAME).exists()


def test_a_call_uses_the_models_defaults_for_what_it_leaves_out(model_dir) -> None:
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    steps, image = steps_taken(pipe)
    explicit_steps, explicit = steps_taken(pipe, num_inference_steps=3, guidance_scale=2.0)
    assert steps == explicit_steps == 3
    np.testing.assert_array_equal(image, explicit)
    # an explicit argument wins over the default
    assert steps_taken(pipe, num_inference_steps=5)[0] == 5
    _, unguided = steps_taken(pipe, guidance_scale=1.0)
    assert not np.allclose(unguided, image)


def test_stock_pipeline_loads_the_folder_and_ignores_the_file(model_dir) -> None:
    stock = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    ours = LatentDiffusionPipeline.from_pretrained(model_dir)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np"}
    a = stock("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_txt2img_uses_and_records_the_models_defaults(capsys, model_dir, tmp_path) -> None:
    assert txt2img(["--model", str(model_dir), "--prompt", "a red circle", "--seed", "0", "--out", str(tmp_path)]) == 0
    (path,) = [Path(line) for line in capsys.readouterr().out.splitlines()]
    with Image.open(path) as image:
        assert (image.text["steps"], image.text["guidance_scale"]) == ("3", "2.0")
        assert image.text["guidance_interval"] == "0,1"
        generated = np.asarray(image.convert("RGB"))
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    direct = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(generated, np.asarray(direct))


def test_an_unreachable_hub_repository_gives_stock_defaults() -> None:
    # tests run with HF_HUB_OFFLINE=1: the download fails, and the pipeline keeps stock's settings
    assert _load_generation_defaults("nobody/no-such-model", {}) == GenerationDefaults()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"steps": 20}', r"unknown settings \['steps'\]"),
        ("[20, 3]", "unknown settings"),
        ('{"num_inference_steps": 0}', "num_inference_steps must be an integer >= 1; got 0"),
        ('{"num_inference_steps": 2.5}', "num_inference_steps must be an integer"),
        ('{"guidance_scale": -1}', "guidance_scale must be a finite number >= 0; got -1"),
        ('{"guidance_scale": "high"}', "guidance_scale must be a number"),
        ('{"guidance_interval": [0.6, 0.5]}', r"guidance_interval must be \(lo, hi\) with 0 <= lo < hi <= 1"),
        ('{"guidance_interval": 0.5}', "guidance_interval must be"),
    ],
)
def test_bad_files_are_refused_naming_the_file(tmp_path, content: str, message: str) -> None:
    (tmp_path / FILENAME).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        GenerationDefaults.load(tmp_path)
    assert str(tmp_path / FILENAME) in str(err.value)
