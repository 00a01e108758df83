"""Classifier-free guidance and guidance rescale against hand-computed values and diffusers' rescale_noise_cfg."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm.guidance import classifier_free_guidance, guide, rescale_guidance, uses_classifier_free_guidance


def test_guidance_is_the_linear_extrapolation():
    uncond = torch.tensor([[1.0, -2.0]])
    cond = torch.tensor([[3.0, 0.0]])
    # g = 7.5: 1 + 7.5 * 2 = 16; -2 + 7.5 * 2 = 13
    assert torch.equal(classifier_free_guidance(uncond, cond, 7.5), torch.tensor([[16.0, 13.0]]))
    assert torch.equal(classifier_free_guidance(uncond, cond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(uncond, cond, 0.0), uncond)


@pytest.mark.parametrize("scale, expected", [(0.0, False), (1.0, False), (1.01, True), (7.5, True)])
def test_unconditional_pass_needed_only_above_one(scale, expected):
    assert uses_classifier_free_guidance(scale) is expected


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(phi):
    g = torch.Generator().manual_seed(0)
    cond, guided = torch.randn(2, 4, 8, 8, generator=g), 5 * torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, phi))


def test_full_rescale_restores_the_conditional_std_per_sample():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    guided = 4 * torch.randn(3, 4, 8, 8, generator=g)
    out = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(out.flatten(1).std(1), cond.flatten(1).std(1))
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)


def test_guide_splits_uncond_then_cond():
    uncond, cond = torch.zeros(1, 2), torch.ones(1, 2)
    assert torch.equal(guide(torch.cat([uncond, cond]), 3.0), torch.full((1, 2), 3.0))
