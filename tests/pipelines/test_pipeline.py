"""LatentDiffusionPipeline against stock diffusers' StableDiffusionPipeline on the same tiny components."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import SDCFGCutoffCallback
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from ldm.presets import build_components
from pipelines import LatentDiffusionPipeline

PARITY_TOLERANCE = 1e-4


def stock_pipeline(components: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs = {"prompt": "a red circle on the left", "num_inference_steps": 3, "output_type": "np", **kwargs}
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def pipes(tiny_components) -> tuple[LatentDiffusionPipeline, StableDiffusionPipeline]:
    return LatentDiffusionPipeline(**tiny_components), stock_pipeline(tiny_components)


@pytest.mark.parametrize(
    "scheduler_cls, extra",
    [
        (PNDMScheduler, {}),
        (DDIMScheduler, {}),
        (DDIMScheduler, {"eta": 0.7}),
        (DDPMScheduler, {}),
        (EulerDiscreteScheduler, {}),
        (EulerAncestralDiscreteScheduler, {}),
        (DPMSolverMultistepScheduler, {}),
        (UniPCMultistepScheduler, {}),
    ],
)
def test_same_images_as_stock_for_every_scheduler(pipes, scheduler_cls, extra):
    ours, stock = pipes
    for pipe in pipes:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    a, b = generate(ours, **extra), generate(stock, **extra)
    assert a.shape == (1, 64, 64, 3)
    assert np.abs(a - b).max() < PARITY_TOLERANCE
    # the comparison is not vacuous: another seed changes the image
    assert np.abs(a - generate(ours, seed=1, **extra)).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": ["a red circle", "a blue square at the top"], "negative_prompt": ["green", "a triangle"]},
        {"prompt": ["a red circle", "a blue square"], "num_images_per_prompt": 2, "negative_prompt": ["yellow", "b"]},
        {"guidance_scale": 1.0},
        {"guidance_scale": 12.0, "guidance_rescale": 0.7},
        {"height": 32, "width": 96},
    ],
    ids=["prompt-lists", "images-per-prompt", "no-guidance", "guidance-rescale", "non-square"],
)
def test_same_images_as_stock_for_argument_combinations(pipes, kwargs):
    ours, stock = pipes
    a, b = generate(ours, **kwargs), generate(stock, **kwargs)
    assert np.abs(a - b).max() < PARITY_TOLERANCE


def test_clip_skip_matches_stock_fed_the_penultimate_layer_by_hand(pipes):
    # (stock's own clip_skip path fails with transformers 5, whose CLIPTextModel has no `.text_model`)
    ours, stock = pipes
    te, tok = ours.text_encoder, ours.tokenizer

    def penultimate(text: str) -> torch.Tensor:
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = te(ids, output_hidden_states=True).hidden_states[-2]
            return te.final_layer_norm(hidden)

    a = generate(ours, clip_skip=1)
    b = generate(
        stock,
        prompt=None,
        prompt_embeds=penultimate("a red circle on the left"),
        negative_prompt_embeds=penultimate(""),
    )
    assert np.abs(a - b).max() < PARITY_TOLERANCE
    assert np.abs(a - generate(ours)).max() > 1e-4


def test_one_negative_prompt_string_serves_every_prompt(pipes):
    ours, _ = pipes  # stock raises a TypeError here; a single string applies to all prompts
    one = generate(ours, prompt=["a red circle", "a blue square"], negative_prompt="yellow")
    each = generate(ours, prompt=["a red circle", "a blue square"], negative_prompt=["yellow", "yellow"])
    assert np.abs(one - each).max() == 0


def test_generator_list_and_output_types_match_stock(pipes):
    ours, stock = pipes
    outputs = {}
    for name, pipe in zip(("ours", "stock"), pipes):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        pt = pipe("a cat", num_images_per_prompt=2, generator=gens, num_inference_steps=2, output_type="pt").images
        latent = pipe("a cat", generator=torch.Generator().manual_seed(5), num_inference_steps=2, output_type="latent")
        outputs[name] = (pt, latent.images)
    assert outputs["ours"][0].shape == (2, 3, 64, 64)
    assert outputs["ours"][1].shape == (1, 4, 8, 8)
    for x, y in zip(outputs["ours"], outputs["stock"]):
        assert (x - y).abs().max() < PARITY_TOLERANCE
    pil = generate(ours, output_type="pil")
    assert pil[0].size == (64, 64)
    # each image of a generator list is reproducible alone with its own generator
    alone = ours("a cat", generator=torch.Generator().manual_seed(6), num_inference_steps=2, output_type="pt").images
    assert (alone[0] - outputs["ours"][0][1]).abs().max() < PARITY_TOLERANCE


def test_guidance_off_skips_the_unconditional_pass(pipes):
    ours, _ = pipes
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)  # one U-Net call per step
    batch_sizes = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    generate(ours, guidance_scale=1.0, num_inference_steps=2)
    generate(ours, guidance_scale=3.0, num_inference_steps=2)
    hook.remove()
    assert batch_sizes == [1, 1, 2, 2]


def test_guidance_formula_on_the_unet_outputs(pipes):
    """One DDIM step with g=3 equals the step taken with eps_u + 3 (eps_c - eps_u) from two separate passes."""
    ours, _ = pipes
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = ours("a cat", latents=latents, guidance_scale=3.0, num_inference_steps=1, output_type="latent").images

    cond, uncond = ours.encode_prompt("a cat", "cpu", 1, True)
    ours.scheduler.set_timesteps(1)
    t = ours.scheduler.timesteps[0]
    with torch.no_grad():
        eps_c = ours.unet(latents, t, encoder_hidden_states=cond).sample
        eps_u = ours.unet(latents, t, encoder_hidden_states=uncond).sample
    alpha_bar = ours.scheduler.alphas_cumprod[t]
    eps = eps_u + 3.0 * (eps_c - eps_u)
    x0 = (latents - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()  # DDIM eq. 12, eta = 0
    alpha_bar_prev = ours.scheduler.final_alpha_cumprod
    expected = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps
    assert (out - expected).abs().max() < 1e-4


def test_guidance_interval_guides_only_the_timesteps_inside_it(pipes):
    """With guidance_interval (0.5, 1) the steps at t >= 500 take eps_u + g (eps_c - eps_u) from a [neg; pos] batch,
    the others the conditional pass alone: the same latents as that loop written out with stock DDIM steps."""
    ours, _ = pipes
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    batch_sizes = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    out = ours(
        "a cat",
        latents=latents,
        guidance_scale=3.0,
        num_inference_steps=4,
        guidance_interval=(0.5, 1.0),
        output_type="latent",
    ).images
    hook.remove()

    cond, uncond = ours.encode_prompt("a cat", "cpu", 1, True)
    scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    scheduler.set_timesteps(4)
    assert [int(t) for t in scheduler.timesteps] == [999, 749, 499, 249]
    assert batch_sizes == [2, 2, 1, 1]
    expected = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = ours.unet(expected, t, encoder_hidden_states=cond).sample
            if t >= 500:
                eps_u = ours.unet(expected, t, encoder_hidden_states=uncond).sample
                eps = eps_u + 3.0 * (eps - eps_u)
            expected = scheduler.step(eps, t, expected).prev_sample
    assert (out - expected).abs().max() < 1e-4
    full = ours("a cat", latents=latents, guidance_scale=3.0, num_inference_steps=4, output_type="latent").images
    assert (full - out).abs().max() > 1e-3  # the default interval guides every step
    with pytest.raises(ValueError, match=r"guidance_interval must be \(lo, hi\) with 0 <= lo < hi <= 1"):
        ours("a cat", guidance_interval=(0.6, 0.5))


def test_legacy_scheduler_configs_are_fixed_as_stock_does(tiny_components):
    legacy = DDIMScheduler.from_config(tiny_components["scheduler"].config, steps_offset=0, clip_sample=True)
    ours = LatentDiffusionPipeline(**{**tiny_components, "scheduler": legacy})
    stock = stock_pipeline({**tiny_components, "scheduler": legacy})
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.clip_sample is False
    assert np.abs(generate(ours) - generate(stock)).max() < PARITY_TOLERANCE


def test_save_loads_in_stock_and_stock_folder_loads_in_ours(pipes, tiny_sd_dir, tmp_path):
    ours, _ = pipes
    ours.save_pretrained(tmp_path)
    files = {p.name for p in Path(tmp_path).rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in files and "model.safetensors" in files
    assert not any(name.endswith((".bin", ".ckpt", ".pt")) for name in files)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert set(index) >= {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}

    stock_loaded = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    ours_from_stock = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    reference = generate(ours)
    assert np.abs(generate(stock_loaded) - reference).max() < PARITY_TOLERANCE
    assert np.abs(generate(ours_from_stock) - reference).max() < PARITY_TOLERANCE


def test_long_prompts_are_not_truncated(pipes):
    ours, stock = pipes
    head = "a red circle on the left, " * 20  # 140 tokens: past stock's 77-token limit
    embeds, _ = ours.encode_prompt(head + "green", "cpu", 1, False)
    assert embeds.shape[1] == 2 * 77
    a = generate(ours, prompt=head + "green")
    b = generate(ours, prompt=head + "purple")
    assert np.abs(a - b).max() > 1e-4  # the words after token 77 reach the image
    # stock truncates: the tail is lost
    assert np.abs(generate(stock, prompt=head + "green") - generate(stock, prompt=head + "purple")).max() == 0


def test_long_prompts_off_truncates_exactly_as_stock_with_a_warning(pipes, caplog):
    ours, stock = pipes
    prompt = "a red circle on the left, " * 20 + "green"  # 141 tokens
    negative = "blurry, " * 60  # 121 tokens
    with caplog.at_level(logging.WARNING, logger="ldm.text"):
        embeds = ours.encode_prompt(prompt, "cpu", 1, True, negative, long_prompts=False)
    assert "truncated" in caplog.text and "green" in caplog.text  # says what was cut
    with torch.no_grad():
        expected = stock.encode_prompt(prompt, "cpu", 1, True, negative)
    assert all(torch.equal(a, b) for a, b in zip(embeds, expected, strict=True))
    batch = {"prompt": [prompt, "a cat"], "negative_prompt": [negative, ""]}
    truncated = generate(ours, long_prompts=False, **batch)
    assert np.abs(truncated - generate(stock, **batch)).max() < PARITY_TOLERANCE
    assert np.abs(truncated - generate(ours, **batch)).max() > 1e-4  # on (the default), the tail counts


def test_long_negative_prompt_pads_the_prompt_to_the_same_chunks(pipes):
    ours, _ = pipes
    embeds, negative = ours.encode_prompt("a cat", "cpu", 1, True, negative_prompt="blurry, " * 60)
    assert embeds.shape == negative.shape and embeds.shape[1] == 2 * 77
    assert generate(ours, negative_prompt="blurry, " * 60).shape == (1, 64, 64, 3)


def test_prompt_weights(pipes):
    ours, _ = pipes
    plain = generate(ours, prompt="a red circle")
    unit = generate(ours, prompt="a (red:1.0) circle", prompt_weighting=True)
    assert np.abs(unit - plain).max() < PARITY_TOLERANCE
    assert np.abs(generate(ours, prompt="a (red:1.5) circle", prompt_weighting=True) - plain).max() > 1e-4


def test_prompt_weighting_off_reads_brackets_as_text_like_stock(pipes):
    ours, stock = pipes
    prompt, negative = "a (red) car, (sky:1.5)", "[blurry]"
    with torch.no_grad():
        embeds = ours.encode_prompt(prompt, "cpu", 1, True, negative)
        expected = stock.encode_prompt(prompt, "cpu", 1, True, negative)
        weighted = ours.encode_prompt(prompt, "cpu", 1, True, negative, prompt_weighting=True)
    assert all(torch.equal(a, b) for a, b in zip(embeds, expected, strict=True))
    assert not torch.allclose(weighted[0], expected[0])
    literal = generate(ours, prompt=prompt, negative_prompt=negative)
    assert np.abs(literal - generate(stock, prompt=prompt, negative_prompt=negative)).max() < PARITY_TOLERANCE
    assert (
        np.abs(literal - generate(ours, prompt=prompt, negative_prompt=negative, prompt_weighting=True)).max() > 1e-4
    )


def test_latents_argument_reproduces_drawn_noise(pipes):
    ours, _ = pipes
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = ours("a cat", latents=latents, num_inference_steps=2, output_type="np").images
    b = generate(ours, prompt="a cat", num_inference_steps=2)
    assert np.abs(a - b).max() < PARITY_TOLERANCE


def test_callback_on_step_end_sees_and_replaces_latents(pipes):
    ours, _ = pipes
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)  # PNDM calls the U-Net steps + 1 times
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    out = ours("a cat", num_inference_steps=3, output_type="latent", callback_on_step_end=callback).images
    assert [s for s, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 4, 8, 8)
    assert torch.equal(out, torch.zeros(1, 4, 8, 8))


def test_attention_backend_and_vae_slicing_keep_images(pipes):
    ours, _ = pipes
    reference = generate(ours, prompt=["a", "b"])
    ours.set_attention_backend("sliced")
    ours.enable_vae_slicing()
    assert np.abs(generate(ours, prompt=["a", "b"]) - reference).max() < PARITY_TOLERANCE
    ours.set_attention_backend("sdpa")
    assert np.abs(generate(ours, prompt=["a", "b"]) - reference).max() < PARITY_TOLERANCE


def test_vae_tiling_decodes_large_images(pipes):
    ours, _ = pipes
    ours.enable_vae_tiling()
    image = generate(ours, height=160, width=160, num_inference_steps=1)
    assert image.shape == (1, 160, 160, 3) and np.isfinite(image).all()


def _overflowing_vae(components: dict) -> None:
    """Make the VAE decoder's first conv produce activations above float16's max (65504) but not its weights."""
    with torch.no_grad():
        components["vae"].decoder.conv_in.weight.mul_(3000.0)


def test_half_precision_vae_overflow_is_redone_in_float32(tiny_components, caplog):
    _overflowing_vae(tiny_components)
    pipe = LatentDiffusionPipeline(**tiny_components).to(torch.float16)
    latents = 20 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        naive = pipe.vae.decode(latents.half() / pipe.vae.config.scaling_factor).sample
        assert not torch.isfinite(naive).all()  # the bug being fixed
        reference = pipe.vae.float().decode(latents / pipe.vae.config.scaling_factor).sample
        pipe.vae.half()
        image = pipe.decode_latents(latents)
    assert torch.isfinite(image).all() and pipe.vae.dtype == torch.float16
    assert (image.float() - reference).abs().max() < 1e-5
    assert "overflowed" in caplog.text
    # a full half-precision generation gives a finite image
    out = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(out).all()


def test_ddim_eta_that_would_give_nan_images_is_refused_with_the_fix(tiny_components):
    ddim = DDIMScheduler.from_config(tiny_components["scheduler"].config)
    pipe = LatentDiffusionPipeline(**{**tiny_components, "scheduler": ddim})
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        pipe("a cat", num_inference_steps=2, eta=1.5)
    pipe.scheduler = DDIMScheduler.from_config(ddim.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.scheduler.set_timesteps(25)
    step = pipe.scheduler.step(torch.ones(1, 4, 8, 8), pipe.scheduler.timesteps[0], torch.ones(1, 4, 8, 8), eta=1.0)
    assert step.prev_sample.isnan().all()  # what the check prevents: stock DDIM's first step at zero terminal SNR
    with pytest.raises(ValueError, match="eta 1 on this zero-terminal-SNR schedule.*eta 0.99 or less"):
        pipe("a cat", num_inference_steps=25, eta=1.0)
    out = pipe("a cat", num_inference_steps=3, eta=0.99, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 65}, "multiple of 8"),
        ({"width": 100}, "multiple of 8"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"guidance_rescale": 1.5}, "guidance_rescale"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"eta": -0.1}, "eta"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
        ({"prompt_embeds": torch.zeros(1, 77, 32)}, "not both"),
        ({"prompt": None}, "pass a prompt"),
        ({"prompt": 3}, "string or a list of strings"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "one negative prompt per prompt"),
        ({"negative_prompt": "x", "negative_prompt_embeds": torch.zeros(1, 77, 32)}, "not both"),
        ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, "one generator per image"),
        ({"latents": torch.zeros(1, 4, 16, 16)}, "latents have shape"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "not available"),
    ],
)
def test_bad_inputs_raise_with_the_fix(pipes, kwargs, message):
    ours, _ = pipes
    kwargs = {"prompt": "a cat", "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours(**kwargs)


# ----------------------------------------------------------------------------------- callbacks and call state as stock


def run_both(pipes, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The same call (seed 0, 4 DDIM steps unless overridden) on ours and on stock."""
    kwargs = {"num_inference_steps": 4, **kwargs}
    for pipe in pipes:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return generate(pipes[0], **kwargs), generate(pipes[1], **kwargs)


def test_call_state_properties_and_interrupt_as_stock(pipes):
    seen = {}

    def record_then_interrupt(pipe, step, timestep, tensors):
        names = ("guidance_scale", "guidance_rescale", "do_classifier_free_guidance", "num_timesteps", "clip_skip")
        seen.setdefault(type(pipe).__name__, []).append(
            {name: getattr(pipe, name) for name in names} | {"cross_attention_kwargs": pipe.cross_attention_kwargs}
        )
        pipe._interrupt = step == 1
        return {}

    kwargs = {"guidance_scale": 6.0, "guidance_rescale": 0.3, "cross_attention_kwargs": {"scale": 1.0}}
    ours, stock = run_both(pipes, callback_on_step_end=record_then_interrupt, **kwargs)
    assert seen["LatentDiffusionPipeline"] == seen["StableDiffusionPipeline"]
    assert len(seen["LatentDiffusionPipeline"]) == 2  # interrupted after step 1 of 4
    assert seen["LatentDiffusionPipeline"][0]["num_timesteps"] == 4
    assert np.abs(ours - stock).max() < PARITY_TOLERANCE
    assert np.abs(ours - run_both(pipes, **kwargs)[0]).max() > 1e-3  # the interrupt changed the image
    assert not pipes[0].interrupt  # a new call starts uninterrupted


def increase_guidance(pipe, step, timestep, tensors):
    pipe._guidance_scale += 1.0  # diffusers' callback_cfg test
    return tensors


@pytest.mark.parametrize(
    "callback",
    [
        increase_guidance,
        SDCFGCutoffCallback(cutoff_step_ratio=0.5),
        SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0),
    ],
    ids=["increase-guidance", "cutoff-half-way", "cutoff-after-first"],
)
def test_callback_changing_the_guidance_scale_matches_stock(pipes, callback):
    ours, stock = run_both(pipes, callback_on_step_end=callback)
    assert np.abs(ours - stock).max() < PARITY_TOLERANCE
    assert pipes[0].guidance_scale == pipes[1].guidance_scale
    assert np.abs(ours - run_both(pipes)[0]).max() > 1e-3  # the callback changed the image


def test_callback_tensor_inputs_as_stock(pipes):
    assert LatentDiffusionPipeline._callback_tensor_inputs == StableDiffusionPipeline._callback_tensor_inputs
    received = {}

    def record(pipe, step, timestep, tensors):
        received[type(pipe).__name__] = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        return {}

    run_both(pipes, callback_on_step_end=record)
    assert received["LatentDiffusionPipeline"] == received["StableDiffusionPipeline"] == {"latents": (1, 4, 8, 8)}
    names = StableDiffusionPipeline._callback_tensor_inputs
    run_both(pipes, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    assert received["LatentDiffusionPipeline"] == received["StableDiffusionPipeline"]
    assert received["LatentDiffusionPipeline"]["prompt_embeds"] == (2, 77, 32)  # [negative; positive]

    def replace_embeds(pipe, step, timestep, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"].flip(0)} if step == 1 else {}

    ours, stock = run_both(pipes, callback_on_step_end=replace_embeds, callback_on_step_end_tensor_inputs=names)
    assert np.abs(ours - stock).max() < PARITY_TOLERANCE
    assert np.abs(ours - run_both(pipes)[0]).max() > 1e-3


def test_deprecated_callback_arguments_warn_and_run_as_stock(pipes):
    results = []
    for pipe in pipes:
        steps = []

        def callback(i, t, latents, steps=steps):
            steps.append((i, int(t)))

        with pytest.warns(FutureWarning) as warned:
            image = generate(pipe, callback=callback, callback_steps=2)
        results.append((image, steps, sorted(str(w.message) for w in warned if w.category is FutureWarning)))
    (ours, our_steps, our_warnings), (stock, stock_steps, stock_warnings) = results
    assert our_steps == stock_steps and our_steps
    assert our_warnings == stock_warnings and any("callback_steps" in w for w in our_warnings)
    assert np.abs(ours - stock).max() < PARITY_TOLERANCE
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        generate(pipes[0], callbak=print)


# --------------------------------------------------------------------------------------------- LCM and LCM-LoRA


def lcm_unet(components: dict) -> UNet2DConditionModel:
    """The tiny U-Net with LCM's guidance-embedding input (``time_cond_proj_dim``), seeded."""
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(components["unet"].config, time_cond_proj_dim=32)


def test_lcm_unet_takes_the_guidance_embedding_and_no_cfg_like_stock(tiny_components):
    components = {**tiny_components, "unet": lcm_unet(tiny_components)}
    components["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
    ours, stock = LatentDiffusionPipeline(**components), stock_pipeline(components)
    batch_sizes = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    a = generate(ours, guidance_scale=7.5, num_inference_steps=2)
    hook.remove()
    assert batch_sizes == [1, 1]  # no unconditional pass
    assert np.abs(a - generate(stock, guidance_scale=7.5, num_inference_steps=2)).max() < PARITY_TOLERANCE
    assert np.abs(a - generate(ours, guidance_scale=2.0, num_inference_steps=2)).max() > 1e-3  # g reaches the U-Net


def test_lcm_lora_on_a_plain_unet_matches_stock(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_components("tiny", seed=0)["unet"]
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(lora)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))

    outputs = []
    for build in (LatentDiffusionPipeline, stock_pipeline):
        components = build_components("tiny", seed=0)
        components["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
        pipe = build(**components) if build is LatentDiffusionPipeline else build(components)
        without = generate(pipe, guidance_scale=1.0, num_inference_steps=2)
        pipe.load_lora_weights(tmp_path)
        outputs.append(generate(pipe, guidance_scale=1.0, num_inference_steps=2))
    assert np.abs(outputs[0] - outputs[1]).max() < PARITY_TOLERANCE
    assert np.abs(outputs[0] - without).max() > 1e-3  # the LoRA is applied


# ------------------------------------------------------------------------------------ batch independence of prompts

LONG_PROMPT = " ".join(f"a red circle number {i}," for i in range(20))  # 100 words, 121 tokens: 2 chunks


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("negatives", [None, ["blurry", LONG_PROMPT + " blurry"]], ids=["no-negative", "negatives"])
def test_a_batch_gives_each_prompt_its_single_run_image(pipes, guidance_scale, negatives):
    ours, _ = pipes
    prompts = ["a red circle", LONG_PROMPT]
    kwargs = {"prompt": prompts, "negative_prompt": negatives, "guidance_scale": guidance_scale}
    gens = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    batch = ours(generator=gens, num_inference_steps=3, output_type="np", **kwargs).images
    for i, prompt in enumerate(prompts):
        negative = None if negatives is None else negatives[i]
        single = generate(ours, seed=i, prompt=prompt, negative_prompt=negative, guidance_scale=guidance_scale)
        assert np.abs(batch[i] - single[0]).max() < PARITY_TOLERANCE
    # not vacuous: the short prompt is padded to the long one's chunks, and unmasked that padding changes its image
    assert ours.encode_prompt(prompts, "cpu", 1, False)[0].shape[1] == 2 * 77
    ours.prompt_padding_mask = lambda *args: None
    gens = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    unmasked = ours(generator=gens, num_inference_steps=3, output_type="np", **kwargs).images
    assert np.abs(unmasked[0] - generate(ours, prompt=prompts[0], guidance_scale=guidance_scale)).max() > 1e-3


def test_padding_mask_is_honoured_by_every_attention_backend(pipes):
    ours, _ = pipes
    reference = generate(ours, prompt=["a red circle", LONG_PROMPT])
    for backend in ("sliced", "sdpa"):
        ours.set_attention_backend(backend)
        assert np.abs(generate(ours, prompt=["a red circle", LONG_PROMPT]) - reference).max() < PARITY_TOLERANCE
    from diffusers.models.attention_processor import AttnProcessor

    ours.unet.set_attn_processor(AttnProcessor())  # the explicit-softmax reference
    assert np.abs(generate(ours, prompt=["a red circle", LONG_PROMPT]) - reference).max() < PARITY_TOLERANCE


def test_encode_prompt_with_both_embeds_needs_no_tokenizer_or_text_encoder(pipes):
    ours, stock = pipes
    embeds, negative = ours.encode_prompt("a red circle", "cpu", 1, True, "blurry")
    ours.tokenizer, ours.text_encoder = None, None
    again = ours.encode_prompt(None, "cpu", 2, True, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert torch.equal(again[0], embeds.repeat(2, 1, 1)) and torch.equal(again[1], negative.repeat(2, 1, 1))
    a = generate(ours, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert np.abs(a - generate(stock, prompt="a red circle", negative_prompt="blurry")).max() < PARITY_TOLERANCE


# ------------------------------------------------------------------------------- optional components and IP-Adapter


def test_stock_components_and_from_pipe_both_ways(tiny_components):
    stock = stock_pipeline(tiny_components)
    assert set(LatentDiffusionPipeline._optional_components) == set(StableDiffusionPipeline._optional_components)
    ours = LatentDiffusionPipeline(**stock.components)
    assert set(ours.components) == set(stock.components)
    reference = generate(stock)
    for pipe in (ours, LatentDiffusionPipeline.from_pipe(stock), StableDiffusionPipeline.from_pipe(ours)):
        assert np.abs(generate(pipe) - reference).max() < PARITY_TOLERANCE
    assert type(StableDiffusionPipeline.from_pipe(ours)) is StableDiffusionPipeline
    assert LatentDiffusionPipeline.from_pipe(stock).unet is stock.unet  # shared, not copied


def tiny_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=4,
    )
    return CLIPVisionModelWithProjection(config).eval(), CLIPImageProcessor(crop_size=32, size=32)


def ip_adapter_state_dict(unet: UNet2DConditionModel, image_embed_dim: int) -> dict:
    """A random IP-Adapter (4 image tokens) in the layout of the published files: ``image_proj`` maps the image
    embedding to 4 cross-attention tokens; ``ip_adapter`` has ``to_k_ip``/``to_v_ip`` for each cross-attention layer,
    numbered 1, 3, 5, ... in the U-Net's attention-processor order."""
    generator = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": 0.1 * torch.randn(4 * dim, image_embed_dim, generator=generator),
        "proj.bias": 0.1 * torch.randn(4 * dim, generator=generator),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    layers = {}
    cross_attention = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for k, name in enumerate(cross_attention):
        shape = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape
        for projection in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * k + 1}.{projection}.weight"] = 0.3 * torch.randn(shape, generator=generator)
    return {"image_proj": image_proj, "ip_adapter": layers}


def test_ip_adapter_image_and_embeds_match_stock():
    image_encoder, feature_extractor = tiny_image_encoder()
    image = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    results = []
    for build in (LatentDiffusionPipeline, stock_pipeline):
        components = build_components("tiny", seed=0) | {"image_encoder": image_encoder}
        pipe = build(**components) if build is LatentDiffusionPipeline else build(components)
        pipe.feature_extractor = None
        pipe.register_modules(feature_extractor=feature_extractor)
        without = generate(pipe)
        pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, 32), subfolder="", weight_name="")
        from_image = generate(pipe, ip_adapter_image=image)
        embeds = pipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
        from_embeds = generate(pipe, ip_adapter_image_embeds=embeds)
        results.append((from_image, from_embeds))
    (ours, ours_embeds), (stock, stock_embeds) = results
    assert np.abs(ours - stock).max() < PARITY_TOLERANCE
    assert np.abs(ours_embeds - stock_embeds).max() < PARITY_TOLERANCE
    assert np.abs(ours - ours_embeds).max() < PARITY_TOLERANCE
    assert np.abs(ours - without).max() > 1e-3  # the image prompt reaches the U-Net


def test_tiny_autoencoder_taesd_generates_as_stock(tiny_components):
    from tests.pipelines.editing import tiny_autoencoder_tiny

    components = {**tiny_components, "vae": tiny_autoencoder_tiny(factor_levels=4)}
    ours, stock = LatentDiffusionPipeline(**components), stock_pipeline(components)
    assert ours.vae_scale_factor == stock.vae_scale_factor == 8
    expected = generate(stock, num_images_per_prompt=2)
    actual = generate(ours, num_images_per_prompt=2)
    assert actual.shape == (2, 64, 64, 3) and np.abs(actual - expected).max() < PARITY_TOLERANCE
