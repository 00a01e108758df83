"""Generic pipeline checks of the kind diffusers' ``PipelineTesterMixin`` runs, written for our pipelines.

Each check runs for every :class:`PipelineCase` in ``CASES``: one of our pipeline classes, the stock diffusers class it
stands in for, and builders of the tiny components and of the call's inputs. A new pipeline (img2img, inpaint, ...)
gets every check by adding one case. The checks compare against stock on the same components and seeds where stock
defines the behaviour, and against the pipeline's own plain call otherwise (a batch against its single runs, a saved
and loaded copy against the original, ...).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from ldm.presets import build_components
from pipelines import (
    LatentDiffusionImg2ImgPipeline,
    LatentDiffusionInpaintPipeline,
    LatentDiffusionPipeline,
    LatentDiffusionXLImg2ImgPipeline,
    LatentDiffusionXLPipeline,
)
from tests.pipelines.editing import edit_components, img2img_inputs, inpaint_inputs, inpainting_unet_edit_components

PARITY_TOLERANCE = 1e-4
NUM_STEPS = 3


@dataclass(frozen=True)
class PipelineCase:
    """A pipeline of ours, the stock class it replaces, and how to build and call both.

    ``components()`` returns fresh tiny components in stock's ``components`` layout (optional ones included, as
    None); ``inputs(batch_size)`` returns the call's keyword arguments for that many prompts, without ``generator``
    (the checks add it) and without ``output_type`` / ``num_inference_steps``. ``init_kwargs`` are the non-component
    arguments both constructors take; ``none_components`` the optional components the case leaves out.
    """

    name: str
    ours: type[DiffusionPipeline]
    stock: type[DiffusionPipeline]
    components: Callable[[], dict[str, Any]]
    inputs: Callable[[int], dict[str, Any]]
    init_kwargs: tuple[tuple[str, Any], ...] = (("requires_safety_checker", False),)
    none_components: tuple[str, ...] = ("safety_checker", "feature_extractor", "image_encoder")

    def build(self, cls: type[DiffusionPipeline], components: dict[str, Any] | None = None) -> DiffusionPipeline:
        """``cls`` on fresh (or the given) components, with DDIM (one U-Net call per step) and no progress bar."""
        components = self.components() if components is None else components
        components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
        pipe = cls(**components, **dict(self.init_kwargs))
        pipe.set_progress_bar_config(disable=True)
        return pipe


def sd_components() -> dict[str, Any]:
    """The tiny SD components, with stock's optional components (safety checker, feature extractor, image encoder)."""
    return build_components("tiny", seed=0) | {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def sdxl_components() -> dict[str, Any]:
    """The tiny SDXL components, with stock's optional components (feature extractor, image encoder)."""
    return build_components("tiny-sdxl", seed=0) | {"feature_extractor": None, "image_encoder": None}


def txt2img_inputs(batch_size: int) -> dict[str, Any]:
    prompts = ["a red circle on the left", "a blue square at the top", "a green triangle"][:batch_size]
    return {"prompt": prompts[0] if batch_size == 1 else prompts, "guidance_scale": 6.0}


CASES = [
    PipelineCase("txt2img", LatentDiffusionPipeline, StableDiffusionPipeline, sd_components, txt2img_inputs),
    PipelineCase(
        "img2img", LatentDiffusionImg2ImgPipeline, StableDiffusionImg2ImgPipeline, edit_components, img2img_inputs
    ),
    PipelineCase(
        "inpaint", LatentDiffusionInpaintPipeline, StableDiffusionInpaintPipeline, edit_components, inpaint_inputs
    ),
    PipelineCase(
        "inpaint-9ch",
        LatentDiffusionInpaintPipeline,
        StableDiffusionInpaintPipeline,
        inpainting_unet_edit_components,
        inpaint_inputs,
    ),
    PipelineCase(
        "sdxl-txt2img",
        LatentDiffusionXLPipeline,
        StableDiffusionXLPipeline,
        sdxl_components,
        txt2img_inputs,
        init_kwargs=(("force_zeros_for_empty_prompt", True), ("add_watermarker", False)),
        none_components=("feature_extractor", "image_encoder"),
    ),
    PipelineCase(
        "sdxl-img2img",
        LatentDiffusionXLImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        sdxl_components,
        img2img_inputs,
        init_kwargs=(
            ("requires_aesthetics_score", False),
            ("force_zeros_for_empty_prompt", True),
            ("add_watermarker", False),
        ),
        none_components=("feature_extractor", "image_encoder"),
    ),
]


def run(pipe: DiffusionPipeline, case: PipelineCase, batch_size: int = 1, seeds: tuple[int, ...] = (0,), **kwargs):
    """The pipeline's output for ``case.inputs(batch_size)`` (``output_type="np"`` unless given), one generator per
    seed (a single generator for one seed)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    arguments = {"num_inference_steps": NUM_STEPS, "output_type": "np", **case.inputs(batch_size), **kwargs}
    return pipe(generator=generators[0] if len(seeds) == 1 else generators, **arguments)


def max_diff(a: Any, b: Any) -> float:
    a = a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
    b = b.float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float32)
    return float(np.abs(a - b).max())


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> PipelineCase:
    return request.param


def test_same_images_as_stock(case):
    ours, stock = run(case.build(case.ours), case).images, run(case.build(case.stock), case).images
    assert ours.shape == stock.shape and max_diff(ours, stock) < PARITY_TOLERANCE


def test_batch_equals_single_runs(case):
    pipe = case.build(case.ours)
    batch = run(pipe, case, batch_size=2, seeds=(0, 1)).images
    assert len(batch) == 2
    for i in range(2):
        single = run(pipe, case, seeds=(i,), **{k: v[i] for k, v in case.inputs(2).items() if isinstance(v, list)})
        assert max_diff(batch[i], single.images[0]) < PARITY_TOLERANCE
    assert max_diff(batch[0], batch[1]) > 1e-3  # the two prompts and seeds give two images


@pytest.mark.parametrize("batch_size, per_prompt", [(1, 2), (2, 3)])
def test_num_images_per_prompt_as_stock(case, batch_size, per_prompt):
    ours = run(case.build(case.ours), case, batch_size, num_images_per_prompt=per_prompt).images
    stock = run(case.build(case.stock), case, batch_size, num_images_per_prompt=per_prompt).images
    assert len(ours) == batch_size * per_prompt
    assert max_diff(ours, stock) < PARITY_TOLERANCE


def test_dict_and_tuple_outputs_agree(case):
    pipe = case.build(case.ours)
    as_dict = run(pipe, case).images
    as_tuple = run(pipe, case, return_dict=False)
    assert isinstance(as_tuple, tuple) and max_diff(as_tuple[0], as_dict) == 0


def test_save_load_round_trip_keeps_images(case, tmp_path):
    pipe = case.build(case.ours)
    pipe.save_pretrained(tmp_path)
    loaded = case.ours.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is case.ours
    assert max_diff(run(loaded, case).images, run(pipe, case).images) < PARITY_TOLERANCE
    # and stock loads our folder
    stock = case.stock.from_pretrained(tmp_path, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    assert max_diff(run(stock, case).images, run(pipe, case).images) < PARITY_TOLERANCE


def test_optional_components_none_survive_save_and_load(case, tmp_path):
    pipe = case.build(case.ours)
    optional = case.none_components
    assert set(pipe._optional_components) >= set(optional)
    assert all(getattr(pipe, name) is None for name in optional)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert all(index[name] == [None, None] for name in optional)
    loaded = case.ours.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert all(getattr(loaded, name) is None for name in optional)
    assert max_diff(run(loaded, case).images, run(pipe, case).images) < PARITY_TOLERANCE


def test_components_property_and_stock_components(case):
    components = case.components()
    pipe = case.build(case.ours, dict(components))
    init_parameters = set(inspect.signature(case.ours.__init__).parameters) - {"self"}
    assert set(pipe.components) == init_parameters - {name for name, _ in case.init_kwargs}
    assert set(pipe.components) == set(case.build(case.stock).components)
    # the components dict rebuilds the pipeline, and from_pipe converts between ours and stock
    rebuilt = case.ours(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    reference = run(pipe, case).images
    assert max_diff(run(rebuilt, case).images, reference) < PARITY_TOLERANCE
    stock = case.stock.from_pipe(pipe)
    stock.set_progress_bar_config(disable=True)
    assert type(stock) is case.stock and max_diff(run(stock, case).images, reference) < PARITY_TOLERANCE
    back = case.ours.from_pipe(stock)
    back.set_progress_bar_config(disable=True)
    assert type(back) is case.ours and max_diff(run(back, case).images, reference) < PARITY_TOLERANCE


def test_callback_gets_the_tensors_it_names_and_may_replace_them(case):
    pipe = case.build(case.ours)
    assert inspect.signature(pipe.__call__).parameters["callback_on_step_end_tensor_inputs"]
    names = list(pipe._callback_tensor_inputs)
    assert names == case.stock._callback_tensor_inputs
    received: list[set[str]] = []

    def record(pipe, step, timestep, tensors):
        received.append(set(tensors))
        return tensors

    run(pipe, case, callback_on_step_end=record)
    assert received == [{"latents"}] * NUM_STEPS  # stock's default: only the latents
    received.clear()
    run(pipe, case, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    assert received == [set(names)] * NUM_STEPS

    def zero_last_latents(pipe, step, timestep, tensors):
        if step == pipe.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    latents = run(pipe, case, output_type="latent", callback_on_step_end=zero_last_latents).images
    assert torch.count_nonzero(latents) == 0


def test_callback_changing_the_guidance_scale_as_stock(case):
    def increase_guidance(pipe, step, timestep, tensors):
        pipe._guidance_scale += 1.0
        return tensors

    guidance_scale = case.inputs(1)["guidance_scale"]
    outputs = []
    for cls in (case.ours, case.stock):
        pipe = case.build(cls)
        outputs.append(run(pipe, case, callback_on_step_end=increase_guidance).images)
        assert pipe.guidance_scale == guidance_scale + NUM_STEPS
    assert max_diff(*outputs) < PARITY_TOLERANCE


def test_attention_slicing_keeps_images(case):
    pipe = case.build(case.ours)
    reference = run(pipe, case).images
    pipe.enable_attention_slicing(slice_size=1)
    assert max_diff(run(pipe, case).images, reference) < PARITY_TOLERANCE
    pipe.disable_attention_slicing()
    assert max_diff(run(pipe, case).images, reference) < PARITY_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_components_and_outputs(case, dtype):
    pipe = case.build(case.ours).to(dtype)
    models = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert models and all(model.dtype == dtype for model in models.values())
    assert run(pipe, case, output_type="latent").images.dtype == dtype
    stock = case.build(case.stock).to(dtype)
    ours_image, stock_image = run(pipe, case).images, run(stock, case).images
    assert np.isfinite(ours_image).all() and max_diff(ours_image, stock_image) < PARITY_TOLERANCE
    full = run(case.build(case.ours), case).images
    assert max_diff(ours_image, full) < 0.1  # half precision, not another image


def test_to_device_and_device_property(case):
    pipe = case.build(case.ours)
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    assert all(model.device.type == "cpu" for model in pipe.components.values() if isinstance(model, torch.nn.Module))
    assert pipe._execution_device == torch.device("cpu")


def test_progress_bar_config(case, capsys):
    pipe = case.build(case.ours)
    pipe.set_progress_bar_config(disable=False)
    run(pipe, case)
    assert f"{NUM_STEPS}/{NUM_STEPS}" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    run(pipe, case)
    assert capsys.readouterr().err == ""
