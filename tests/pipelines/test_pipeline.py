"""LatentDiffusionPipeline against stock diffusers' StableDiffusionPipeline on the same tiny components."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

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
    b = generate(stock, prompt=None, prompt_embeds=penultimate("a red circle on the left"),
                 negative_prompt_embeds=penultimate(""))  # fmt: skip
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
    out = ours("a cat", latents=latents, guidance_scale=3.0, num_inference_steps=4, guidance_interval=(0.5, 1.0),
               output_type="latent").images  # fmt: skip
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


def test_long_negative_prompt_pads_the_prompt_to_the_same_chunks(pipes):
    ours, _ = pipes
    embeds, negative = ours.encode_prompt("a cat", "cpu", 1, True, negative_prompt="blurry, " * 60)
    assert embeds.shape == negative.shape and embeds.shape[1] == 2 * 77
    assert generate(ours, negative_prompt="blurry, " * 60).shape == (1, 64, 64, 3)


def test_prompt_weights(pipes):
    ours, _ = pipes
    plain = generate(ours, prompt="a red circle")
    assert np.abs(generate(ours, prompt="a (red:1.0) circle") - plain).max() < PARITY_TOLERANCE
    assert np.abs(generate(ours, prompt="a (red:1.5) circle") - plain).max() > 1e-4


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
