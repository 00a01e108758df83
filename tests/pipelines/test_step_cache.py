"""Step caching (DeepCache) and token merging (ToMe): our pipelines against the authors' ``DeepCacheSDHelper`` on stock
diffusers, the cached step against the whole U-Net on the same inputs, the full steps a guidance interval and RePaint
resampling get, and tomesd's token merging (none at ratio 0, fewer self-attention tokens above)."""

from __future__ import annotations

import sys

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldm.errors import UserError
from ldm.presets import build_components
from pipelines import DEFAULT_MODEL, LatentDiffusionInpaintPipeline, LatentDiffusionPipeline, LatentDiffusionXLPipeline
from pipelines.step_cache import DeepCacheRunner, count_skips
from tests.pipelines.editing import box_mask, ours, random_image, stock, unet_variant

STEPS = 7


@pytest.fixture
def ddim_components(tiny_components) -> dict:
    # DDIM: one U-Net call per distinct timestep. DeepCacheSDHelper numbers steps by the timestep's first position in
    # the schedule, which PNDM's repeated second timestep would shift.
    tiny_components["scheduler"] = DDIMScheduler.from_config(tiny_components["scheduler"].config)
    return tiny_components


def latents_of(pipe, **kwargs) -> torch.Tensor:
    kwargs = {"prompt": "a red circle", "num_inference_steps": STEPS, "guidance_scale": 5.0, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


def count_calls(module: torch.nn.Module) -> list[int]:
    """A list that gets one entry per call of ``module`` (its batch size)."""
    calls: list[int] = []
    module.register_forward_hook(lambda _module, args, _output: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize(("interval", "branch"), [(2, 0), (3, 1), (4, 0)])
def test_same_latents_as_deepcache_helper_on_stock(ddim_components, interval, branch) -> None:
    reference = stock(StableDiffusionPipeline, ddim_components)
    uncached = latents_of(reference)
    helper = DeepCacheSDHelper(pipe=reference)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    expected = latents_of(reference)
    helper.disable()

    pipe = ours(LatentDiffusionPipeline, ddim_components)
    pipe.enable_step_caching(interval=interval, branch=branch)
    actual = latents_of(pipe)
    assert (actual - expected).abs().max() < 1e-5
    assert (actual - uncached).abs().max() > 1e-2  # the cache was used


def test_interval_one_and_disabled_are_bit_identical_to_no_caching(ddim_components) -> None:
    pipe = ours(LatentDiffusionPipeline, ddim_components)
    plain = latents_of(pipe)
    pipe.enable_step_caching(interval=1, branch=0)
    assert pipe.step_caching_interval == 1
    assert torch.equal(latents_of(pipe), plain)
    pipe.enable_step_caching(interval=3)
    assert not torch.equal(latents_of(pipe), plain)
    pipe.disable_step_caching()
    assert pipe.step_caching_interval is None
    assert torch.equal(latents_of(pipe), plain)


def unet_cases() -> dict[str, tuple]:
    """name -> (U-Net, its inputs) for the U-Nets and inputs our pipelines use."""
    sd = build_components("tiny", seed=0)["unet"]
    xl = build_components("tiny-sdxl", seed=0)["unet"]
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    mask = torch.ones(2, 77)
    mask[0, 40:] = 0
    lcm = unet_variant(sd, time_cond_proj_dim=16)
    return {
        "sd": (sd, randn(2, 4, 8, 8), {"encoder_hidden_states": randn(2, 77, 32)}),
        # inpainting's 9 channels, padded prompts masked, a latent size that is no multiple of the upsampling
        "inpaint-masked-odd-size": (
            unet_variant(sd, in_channels=9),
            randn(2, 9, 7, 9),
            {"encoder_hidden_states": randn(2, 77, 32), "encoder_attention_mask": mask},
        ),
        "lcm": (lcm, randn(1, 4, 8, 8), {"encoder_hidden_states": randn(1, 77, 32), "timestep_cond": randn(1, 16)}),
        "sdxl": (
            xl,
            randn(2, 4, 8, 8),
            {
                "encoder_hidden_states": randn(2, 77, 80),
                "added_cond_kwargs": {"text_embeds": randn(2, 32), "time_ids": randn(2, 6)},
                "cross_attention_kwargs": {},
            },
        ),
    }


@pytest.mark.parametrize("case", list(unet_cases()))
def test_cached_step_on_the_full_steps_inputs_equals_the_whole_unet(case) -> None:
    unet, sample, kwargs = unet_cases()[case]
    timestep = torch.tensor(501)
    with torch.no_grad():
        expected = unet(sample, timestep, **kwargs).sample
        mid_calls = count_calls(unet.mid_block)
        for branch in range(count_skips(unet)):
            runner = DeepCacheRunner(unet, interval=2, branch=branch)
            full = runner(0, sample, timestep, **kwargs)
            cached = runner(1, sample, timestep, **kwargs)
            assert torch.equal(full, expected)
            assert torch.equal(cached, expected), f"branch {branch}"
    assert len(mid_calls) == count_skips(unet)  # the deep part ran at the full steps only


def test_guidance_interval_switch_forces_a_full_step_and_callbacks_see_every_step(tiny_sdxl_dir) -> None:
    pipe = LatentDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_step_caching(interval=3)
    mid_calls, steps = count_calls(pipe.unet.mid_block), []

    def callback(pipe, i, t, tensors):
        steps.append((i, int(t), len(mid_calls)))
        return tensors

    latents_of(pipe, num_inference_steps=10, guidance_interval=(0.5, 1.0), callback_on_step_end=callback)
    assert [i for i, _, _ in steps] == list(range(10))
    switch = next(i for i, t, _ in steps if t < 0.5 * pipe.scheduler.config.num_train_timesteps)
    expected_full = [*range(0, switch, 3), *range(switch, 10, 3)]
    full = [i for i, _, calls in steps if calls > (steps[i - 1][2] if i else 0)]
    assert 0 < switch < 10
    assert full == expected_full
    # the guided steps ran the doubled batch, the others the single one
    assert mid_calls == [2 if i < switch else 1 for i in expected_full]


def test_repaint_resamples_of_a_step_run_as_that_step(ddim_components) -> None:
    pipe = ours(LatentDiffusionInpaintPipeline, ddim_components)
    pipe.enable_step_caching(interval=2, branch=1)
    mid_calls, unet_calls = count_calls(pipe.unet.mid_block), count_calls(pipe.unet.conv_in)
    kwargs = {"image": random_image(), "mask_image": box_mask(), "guidance_scale": 1.0, "resamples": 2}
    cached = latents_of(pipe, **kwargs)
    assert len(unet_calls) == 3 * STEPS
    assert len(mid_calls) == 3 * len(range(0, STEPS, 2))
    pipe.disable_step_caching()
    assert (cached - latents_of(pipe, **kwargs)).abs().max() > 1e-2


def test_bad_settings_are_refused(ddim_components) -> None:
    pipe = ours(LatentDiffusionPipeline, ddim_components)
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        pipe.enable_step_caching(interval=0)
    with pytest.raises(ValueError, match=r"branch must be in 0\.\.3"):
        pipe.enable_step_caching(branch=4)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(UserError, match="disable_freeu"):
        pipe.enable_step_caching()
    assert pipe.step_caching_interval is None


@pytest.fixture(scope="module")
def shipped() -> LatentDiffusionPipeline:
    # the shipped model attends at full latent resolution, where tomesd merges (the tiny U-Nets do not)
    pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_token_merging_shrinks_self_attention_and_ratio_zero_changes_nothing(shipped) -> None:
    pytest.importorskip("tomesd")
    attn1 = next(module for name, module in shipped.unet.down_blocks[0].named_modules() if name.endswith("attn1"))
    tokens = count_calls_tokens(attn1)
    plain = latents_of(shipped, num_inference_steps=2)
    assert set(tokens) == {16 * 16}
    shipped.enable_token_merging(ratio=0.0)
    assert torch.equal(latents_of(shipped, num_inference_steps=2), plain)
    tokens.clear()
    shipped.enable_token_merging(ratio=0.5)
    assert shipped.token_merging_ratio == 0.5
    merged = latents_of(shipped, num_inference_steps=2)
    assert set(tokens) == {16 * 16 // 2}
    assert not torch.equal(merged, plain)
    tokens.clear()
    shipped.disable_token_merging()
    assert torch.equal(latents_of(shipped, num_inference_steps=2), plain)
    assert set(tokens) == {16 * 16}


def count_calls_tokens(attention: torch.nn.Module) -> list[int]:
    """A list that gets the token count of each call of the self-attention ``attention``."""
    tokens: list[int] = []
    attention.register_forward_pre_hook(lambda _module, args: tokens.append(args[0].shape[1]))
    return tokens


def test_token_merging_without_tomesd_names_the_install(monkeypatch, ddim_components) -> None:
    monkeypatch.setitem(sys.modules, "tomesd", None)
    pipe = ours(LatentDiffusionPipeline, ddim_components)
    with pytest.raises(UserError, match="pip install tomesd"):
        pipe.enable_token_merging()
    assert pipe.token_merging_ratio is None
