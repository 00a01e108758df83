"""eval.flops counts FLOPs as closed-form formulas give them, and splits a pipeline call into steps and the rest."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from eval.flops import count_flops, generation_flops, matmul_flops_per_s
from ldm.presets import build_components


def test_linear_and_cpu_attention_flops_are_the_closed_form_counts():
    linear = torch.nn.Linear(32, 16, bias=False)
    assert count_flops(lambda: linear(torch.randn(5, 32))) == 2 * 5 * 32 * 16
    q = torch.randn(2, 4, 10, 8)  # batch, heads, tokens, head width
    k = torch.randn(2, 4, 7, 8)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert flops == 2 * (2 * 2 * 4 * 10 * 7 * 8)  # Q K^T and P V, each 2 * b * h * n * m * d


def test_generation_flops_per_step_is_one_guided_unet_call():
    components = build_components("tiny")
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "a red circle", "guidance_scale": 7.5, "height": 64, "width": 64, "output_type": "np"}
    flops = generation_flops(pipe, kwargs)
    unet = components["unet"]
    latents = torch.randn(2, unet.config.in_channels, 8, 8)  # the guidance batch [uncond; cond]
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    assert flops.per_step == count_flops(lambda: unet(latents, 10, encoder_hidden_states=text))
    assert flops.fixed > 0 and flops.total(3) == flops.fixed + 3 * flops.per_step


def test_matmul_rate_is_a_positive_rate():
    assert matmul_flops_per_s("cpu", size=64, repeats=2) > 0
