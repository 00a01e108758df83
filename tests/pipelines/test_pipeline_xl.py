"""LatentDiffusionXLPipeline against stock StableDiffusionXLPipeline on the tiny SDXL components and the same seeds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils import is_invisible_watermark_available
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ldm.errors import UserError
from ldm.presets import build_components, build_text_encoder, build_unet, build_vae, get_preset
from ldm.text import CHUNK_TOKENS
from pipelines import LatentDiffusionXLImg2ImgPipeline, LatentDiffusionXLPipeline
from pipelines.generation_defaults import GenerationDefaults

TOLERANCE = 1e-4
STEPS = 3
PROMPT = "a red circle on the left"
# 100 words of one token each: two chunks of 75 tokens.
LONG_PROMPT = " ".join(["red circle blue square"] * 25)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_diff(a, b) -> float:
    a = a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
    b = b.float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float32)
    return float(np.abs(a - b).max())


def pair(
    components: dict, scheduler: type | None = None
) -> tuple[LatentDiffusionXLPipeline, StableDiffusionXLPipeline]:
    """Ours and stock on the same components (and the same scheduler class, from the shipped config)."""
    if scheduler is not None:
        components = {**components, "scheduler": scheduler.from_config(components["scheduler"].config)}
    pipes = LatentDiffusionXLPipeline(**components), StableDiffusionXLPipeline(**components)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def generate(pipe, prompt=PROMPT, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def components() -> dict:
    """Shared tiny SDXL components, for tests that do not change them."""
    return build_components("tiny-sdxl", seed=0)


# ------------------------------------------------------------------------------------------------------ the presets


def test_tiny_sdxl_preset_has_stock_sdxl_layout(tiny_sdxl_components):
    c = tiny_sdxl_components
    assert isinstance(c["text_encoder"], CLIPTextModel) and isinstance(
        c["text_encoder_2"], CLIPTextModelWithProjection
    )
    assert isinstance(c["scheduler"], EulerDiscreteScheduler) and c["scheduler"].config.timestep_spacing == "leading"
    unet = c["unet"].config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == c["text_encoder"].config.hidden_size + c["text_encoder_2"].config.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + (
        c["text_encoder_2"].config.projection_dim
    )
    assert c["tokenizer"].pad_token == "<|endoftext|>" and c["tokenizer_2"].pad_token == "!"
    assert c["vae"].config.scaling_factor == 0.13025 and c["vae"].config.force_upcast
    assert sum(n_params(c[k]) for k in ("unet", "vae")) < 2_000_000


def test_sdxl_preset_has_the_published_parameter_counts():
    # SDXL 1.0 base: U-Net 2,567,463,684; VAE 83,653,863; CLIP ViT-L 123,060,480; OpenCLIP bigG + projection
    # 694,659,840 parameters (built on the meta device: nothing is allocated).
    preset = get_preset("sdxl")
    with torch.device("meta"):
        assert n_params(build_unet(preset)) == 2_567_463_684
        assert n_params(build_vae(preset)) == 83_653_863
        assert n_params(build_text_encoder(preset)) == 123_060_480
        assert n_params(build_text_encoder(preset, name="text_encoder_2")) == 694_659_840
    assert preset.image_size == 1024
    with pytest.raises(ValueError, match="has no text_encoder_2"):
        build_text_encoder(get_preset("tiny"), name="text_encoder_2")


# ------------------------------------------------------------------------------------------------- parity with stock


SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


@pytest.mark.parametrize("denoising_end", [None, 0.6], ids=["full", "base-of-refiner-split"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS), ids=list(SCHEDULERS))
def test_same_images_as_stock(components, scheduler, denoising_end):
    ours, stock = pair(components, SCHEDULERS[scheduler])
    kwargs = {"num_inference_steps": 4, "denoising_end": denoising_end}
    if denoising_end is not None:
        kwargs["output_type"] = "latent"  # the noisy latents the refiner continues from
    ours_out, stock_out = generate(ours, **kwargs), generate(stock, **kwargs)
    assert ours_out.shape == stock_out.shape and max_diff(ours_out, stock_out) < TOLERANCE
    if denoising_end is not None:
        assert ours.num_timesteps == stock.num_timesteps < 4


def test_micro_conditioning_second_prompts_and_rescale_as_stock(components):
    ours, stock = pair(components)
    kwargs = {
        "prompt_2": "a blue square",
        "negative_prompt": "blurry",
        "negative_prompt_2": "green",
        "original_size": (128, 96),
        "crops_coords_top_left": (8, 4),
        "target_size": (64, 48),
        "negative_original_size": (32, 32),
        "negative_crops_coords_top_left": (2, 0),
        "negative_target_size": (64, 64),
        "guidance_scale": 7.0,
        "guidance_rescale": 0.7,
        "height": 48,
        "width": 64,
    }
    reference = generate(stock, **kwargs)
    assert max_diff(generate(ours, **kwargs), reference) < TOLERANCE
    # and the micro-conditioning matters: other sizes give another image
    assert max_diff(generate(ours, **{**kwargs, "original_size": (256, 256)}), reference) > 1e-3


@pytest.mark.parametrize("force_zeros", [True, False])
def test_empty_negative_prompt_as_stock(tiny_sdxl_components, force_zeros):
    components = tiny_sdxl_components
    ours = LatentDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=force_zeros)
    stock = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=force_zeros)
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    assert max_diff(generate(ours), generate(stock)) < TOLERANCE
    assert max_diff(generate(ours, guidance_scale=1.0), generate(stock, guidance_scale=1.0)) < TOLERANCE


def test_encode_prompt_is_stock_bit_for_bit(components):
    ours, stock = pair(components)
    arguments = {
        "prompt": ["a red circle", "a blue square"],
        "prompt_2": ["red", "blue"],
        "device": torch.device("cpu"),
        "num_images_per_prompt": 2,
        "negative_prompt": ["dark", "light"],
    }
    expected = stock.encode_prompt(**arguments)
    for switches in ({}, {"prompt_weighting": True}, {"long_prompts": False}):
        got = ours.encode_prompt(**arguments, **switches)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), switches
    # clip_skip: the prompt's hidden states one layer further back, the negative's still the penultimate, as stock
    for negative in (None, "blurry, low quality"):
        arguments = {"device": torch.device("cpu"), "negative_prompt": negative, "clip_skip": 1}
        expected = stock.encode_prompt(PROMPT, **arguments)
        got = ours.encode_prompt(PROMPT, **arguments)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), negative


def test_long_prompt_is_encoded_in_chunks_for_both_encoders_and_pooled_from_the_first(components):
    ours, stock = pair(components)
    ids = components["tokenizer"](LONG_PROMPT, add_special_tokens=False).input_ids
    assert CHUNK_TOKENS < len(ids) <= 2 * CHUNK_TOKENS
    cpu = torch.device("cpu")
    embeds, _, pooled, _ = ours.encode_prompt(LONG_PROMPT, device=cpu, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 2 * 77, 32 + 48)
    # chunk 1 is the prompt cut at 75 tokens (stock's truncation), pooled included; chunk 2 is the rest on its own
    first_embeds, _, first_pooled, _ = stock.encode_prompt(LONG_PROMPT, device=cpu, do_classifier_free_guidance=False)
    assert torch.equal(embeds[:, :77], first_embeds)
    assert torch.allclose(pooled, first_pooled, atol=1e-6)  # projected in a batch of 2 chunks: last-bit rounding
    rest = components["tokenizer"].decode(ids[CHUNK_TOKENS:])
    assert components["tokenizer"](rest, add_special_tokens=False).input_ids == ids[CHUNK_TOKENS:]
    rest_embeds, *_ = stock.encode_prompt(rest, device=cpu, do_classifier_free_guidance=False)
    assert torch.allclose(embeds[:, 77:], rest_embeds, atol=1e-6)
    # long_prompts=False is stock, truncation warning and all
    truncated, *_ = ours.encode_prompt(LONG_PROMPT, device=cpu, do_classifier_free_guidance=False, long_prompts=False)
    assert torch.equal(truncated, first_embeds)
    assert max_diff(generate(ours, LONG_PROMPT, long_prompts=False), generate(stock, LONG_PROMPT)) < TOLERANCE


def test_batch_of_long_and_short_prompts_equals_single_runs(components):
    ours, _ = pair(components)
    prompts = [LONG_PROMPT, "a green triangle"]
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    batch = ours(prompts, negative_prompt="blurry", generator=generators, num_inference_steps=STEPS, output_type="np")
    for i, prompt in enumerate(prompts):
        single = generate(ours, prompt, seed=i, negative_prompt="blurry")
        assert max_diff(batch.images[i], single[0]) < TOLERANCE
    assert max_diff(batch.images[0], batch.images[1]) > 1e-3


def test_prompt_weighting_is_off_by_default_and_weights_both_encoders(components):
    ours, stock = pair(components)
    cpu = torch.device("cpu")
    weighted = "a (red:1.5) circle"
    plain = ours.encode_prompt(weighted, device=cpu, do_classifier_free_guidance=False)
    assert all(torch.equal(a, b) for a, b in zip(plain[::2], stock.encode_prompt(weighted, device=cpu)[::2]))
    on = ours.encode_prompt(weighted, device=cpu, do_classifier_free_guidance=False, prompt_weighting=True)
    reference = stock.encode_prompt("a red circle", device=cpu, do_classifier_free_guidance=False)
    assert torch.equal(on[2], reference[2])  # the pooled embedding is not weighted
    changed = (on[0] - reference[0]).abs().amax(dim=1)[0]  # per feature: both encoders' halves change
    assert changed[:32].max() > 1e-3 and changed[32:].max() > 1e-3


def test_guidance_interval_outside_all_steps_is_the_unguided_image(components):
    ours, stock = pair(components)
    # Euler's 3 leading timesteps are 667, 334 and 1: an interval of [0.9 T, T] guides none of them.
    unguided = generate(stock, guidance_scale=1.0, negative_prompt="blurry")
    assert max_diff(generate(ours, guidance_interval=(0.9, 1.0), negative_prompt="blurry"), unguided) < TOLERANCE
    full = generate(ours, guidance_interval=(0.0, 1.0), negative_prompt="blurry")
    assert max_diff(full, generate(stock, negative_prompt="blurry")) < TOLERANCE
    partial = generate(ours, guidance_interval=(0.5, 1.0), negative_prompt="blurry")
    assert max_diff(partial, full) > 1e-3 and max_diff(partial, unguided) > 1e-3


# ------------------------------------------------------------------------------------------------------ callbacks


def test_callbacks_get_stock_tensors_and_may_replace_the_time_ids(components):
    ours, stock = pair(components)
    assert ours._callback_tensor_inputs == StableDiffusionXLPipeline._callback_tensor_inputs
    names = ours._callback_tensor_inputs
    seen: dict[str, list] = {"ours": [], "stock": []}

    def recorder(key):
        def record(pipe, step, timestep, tensors):
            seen[key].append({name: tensor.clone() for name, tensor in tensors.items()})
            if step == 0:  # a callback may change the conditioning of the remaining steps
                tensors["add_time_ids"] = tensors["add_time_ids"] * 2
            return tensors

        return record

    kwargs = {"negative_prompt": "blurry", "callback_on_step_end_tensor_inputs": names}
    ours_image = generate(ours, callback_on_step_end=recorder("ours"), **kwargs)
    stock_image = generate(stock, callback_on_step_end=recorder("stock"), **kwargs)
    assert max_diff(ours_image, stock_image) < TOLERANCE
    assert max_diff(ours_image, generate(ours, negative_prompt="blurry")) > 1e-3
    assert len(seen["ours"]) == len(seen["stock"]) == STEPS
    for got, expected in zip(seen["ours"], seen["stock"], strict=True):
        assert set(got) == set(names)
        for name in names:
            assert got[name].shape == expected[name].shape and max_diff(got[name], expected[name]) < TOLERANCE
    assert seen["ours"][0]["add_text_embeds"].shape == (2, 32)  # [negative; positive]


# --------------------------------------------------------------------------------------- loading, saving, from_pipe


def test_save_load_round_trip_and_stock_loads_our_folder(components, tmp_path):
    ours, stock = pair(components)
    reference = generate(stock)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert not (tmp_path / "generation_defaults.json").exists()  # stock's defaults are not written
    loaded = LatentDiffusionXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_defaults == GenerationDefaults(guidance_scale=5.0)  # stock SDXL's 50 steps at 5.0
    assert max_diff(generate(loaded), reference) < TOLERANCE
    from_stock = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    from_stock.set_progress_bar_config(disable=True)
    assert max_diff(generate(from_stock), reference) < TOLERANCE


def test_generation_defaults_fill_what_the_call_leaves_out(components, tmp_path):
    ours, stock = pair(components)
    ours.generation_defaults = GenerationDefaults(num_inference_steps=2, guidance_scale=3.0)
    ours.save_pretrained(tmp_path)
    loaded = LatentDiffusionXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_defaults == ours.generation_defaults
    image = loaded(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np").images
    expected = generate(stock, num_inference_steps=2, guidance_scale=3.0)
    assert max_diff(image, expected) < TOLERANCE


def test_components_and_from_pipe_both_ways(components):
    ours, stock = pair(components)
    reference = generate(stock)
    rebuilt = LatentDiffusionXLPipeline(**stock.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert set(rebuilt.components) == set(stock.components)
    assert max_diff(generate(rebuilt), reference) < TOLERANCE
    converted = LatentDiffusionXLPipeline.from_pipe(stock)
    converted.set_progress_bar_config(disable=True)
    assert type(converted) is LatentDiffusionXLPipeline and converted.unet is stock.unet
    assert max_diff(generate(converted), reference) < TOLERANCE
    back = StableDiffusionXLPipeline.from_pipe(ours)
    back.set_progress_bar_config(disable=True)
    assert type(back) is StableDiffusionXLPipeline and max_diff(generate(back), reference) < TOLERANCE


def test_sdxl_lora_made_with_peft_loads_to_stock_image(tiny_sdxl_components, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = build_components("tiny-sdxl", seed=0)["unet"]
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    trained.add_adapter(lora)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trained))

    ours, stock = pair(tiny_sdxl_components)
    without = generate(ours)
    ours.load_lora_weights(tmp_path)
    stock_components = build_components("tiny-sdxl", seed=0)
    stock = StableDiffusionXLPipeline(**stock_components)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(tmp_path)
    with_lora = generate(ours)
    assert max_diff(with_lora, generate(stock)) < TOLERANCE
    assert max_diff(with_lora, without) > 1e-3
    half = {"cross_attention_kwargs": {"scale": 0.5}}
    assert max_diff(generate(ours, **half), generate(stock, **half)) < TOLERANCE


def test_ip_adapter_image_as_stock_and_with_a_guidance_interval():
    from tests.pipelines.test_pipeline import ip_adapter_state_dict, tiny_image_encoder

    image_encoder, feature_extractor = tiny_image_encoder()
    image = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    components = build_components("tiny-sdxl", seed=0)
    extra = {"image_encoder": image_encoder, "feature_extractor": feature_extractor}
    ours, stock = pair({**components, **extra})
    without = generate(ours)
    for pipe in (ours, stock):
        pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, 32), subfolder="", weight_name="")
    with_image = generate(ours, ip_adapter_image=image)
    assert max_diff(with_image, generate(stock, ip_adapter_image=image)) < TOLERANCE
    assert max_diff(with_image, without) > 1e-3  # the image prompt reaches the U-Net
    # steps outside the guidance interval take the positive image embeddings alone: none guided = stock unguided
    unguided = generate(stock, ip_adapter_image=image, guidance_scale=1.0)
    assert max_diff(generate(ours, ip_adapter_image=image, guidance_interval=(0.9, 1.0)), unguided) < TOLERANCE
    partial = generate(ours, ip_adapter_image=image, guidance_interval=(0.5, 1.0))
    assert max_diff(partial, with_image) > 1e-3 and max_diff(partial, unguided) > 1e-3


# --------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_fix(components):
    ours, _ = pair(components)
    embeds, _, pooled, _ = ours.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)
    with pytest.raises(UserError, match="prompt_embeds need pooled_prompt_embeds"):
        ours(prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(UserError, match="prompt_2 or prompt_embeds"):
        ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_2="x", num_inference_steps=1)
    with pytest.raises(UserError, match="denoising_end must be in"):
        ours(PROMPT, denoising_end=1.5, num_inference_steps=1)
    if not is_invisible_watermark_available():
        with pytest.raises(UserError, match="add_watermarker=True needs the invisible-watermark package"):
            LatentDiffusionXLPipeline(**components, add_watermarker=True)
    # precomputed embeddings give the prompt's image
    image = generate(ours, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0)
    assert max_diff(image, generate(ours, guidance_scale=1.0)) < TOLERANCE


# ------------------------------------------------------------------------------------------ img2img and the refiner


def refiner_components() -> dict:
    """A tiny SDXL refiner: the second text encoder only, a U-Net whose time ids carry the aesthetic score (5 ids)."""
    components = build_components("tiny-sdxl", seed=0)
    preset = get_preset("tiny-sdxl")
    # cross-attention on the second encoder's hidden states alone (48 wide), the aesthetic score's 5 time ids
    unet_config = dataclasses.replace(
        preset.unet, cross_attention_dim=48, projection_class_embeddings_input_dim=5 * 8 + 32
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = build_unet(dataclasses.replace(preset, unet=unet_config)).eval()
    return {**components, "unet": unet, "text_encoder": None, "tokenizer": None}


def test_img2img_as_stock(components):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    image = PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    for scheduler in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        components_ = {**components, "scheduler": scheduler.from_config(components["scheduler"].config)}
        ours, stock = LatentDiffusionXLImg2ImgPipeline(**components_), StableDiffusionXLImg2ImgPipeline(**components_)
        for pipe in (ours, stock):
            pipe.set_progress_bar_config(disable=True)
        kwargs = {"image": image, "strength": 0.6, "num_inference_steps": 5, "negative_prompt": "blurry"}
        assert max_diff(generate(ours, **kwargs), generate(stock, **kwargs)) < TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_base_and_refiner_split_as_stock(components, scheduler):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner_parts = refiner_components()
    images = []
    for base_class, refiner_class in (
        (LatentDiffusionXLPipeline, LatentDiffusionXLImg2ImgPipeline),
        (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline),
    ):
        base = base_class(
            **{**components, "scheduler": SCHEDULERS[scheduler].from_config(components["scheduler"].config)}
        )
        refiner = refiner_class(
            **{**refiner_parts, "scheduler": SCHEDULERS[scheduler].from_config(components["scheduler"].config)},
            requires_aesthetics_score=True,
        )
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)
        latents = generate(base, num_inference_steps=6, denoising_end=0.7, output_type="latent")
        refined = generate(refiner, image=latents, num_inference_steps=6, denoising_start=0.7, aesthetic_score=7.0)
        images.append(refined)
        assert refiner.num_timesteps + base.num_timesteps == 6
    assert max_diff(*images) < TOLERANCE


def test_textual_inversion_in_both_encoders_as_stock(tiny_sdxl_components):
    generator = torch.Generator().manual_seed(0)
    vectors = {
        "text_encoder": torch.randn(1, 32, generator=generator),
        "text_encoder_2": torch.randn(1, 48, generator=generator),
    }
    components = build_components("tiny-sdxl", seed=0)
    images = []
    for pipe in (LatentDiffusionXLPipeline(**tiny_sdxl_components), StableDiffusionXLPipeline(**components)):
        pipe.set_progress_bar_config(disable=True)
        for name, suffix in (("text_encoder", ""), ("text_encoder_2", "_2")):
            pipe.load_textual_inversion(
                vectors[name],
                token="<shape>",
                text_encoder=getattr(pipe, name),
                tokenizer=getattr(pipe, f"tokenizer{suffix}"),
            )
        images.append(generate(pipe, "a <shape> on the left", negative_prompt="a <shape>"))
    assert max_diff(*images) < TOLERANCE
    assert max_diff(images[0], generate(pipe, "a circle on the left", negative_prompt="a circle")) > 1e-3


def test_attention_backends_keep_the_image(tiny_sdxl_components):
    ours, _ = pair(tiny_sdxl_components)
    reference = generate(ours)
    ours.set_attention_backend("sliced", slice_size=1)
    assert max_diff(generate(ours), reference) < TOLERANCE
    ours.set_attention_backend("sdpa")
    assert max_diff(generate(ours), reference) < TOLERANCE
