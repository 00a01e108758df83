"""Model presets: the sd15 preset is exactly Stable Diffusion 1.5's architecture; presets build deterministically."""

from __future__ import annotations

import pytest
import torch

from ldm.presets import PRESETS, build_components, build_text_encoder, build_unet, build_vae, get_preset


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_sd15_preset_has_the_published_parameter_counts():
    # Stable Diffusion 1.5: U-Net 859,520,964; VAE 83,653,863; CLIP ViT-L/14 text encoder 123,060,480 parameters.
    preset = get_preset("sd15")
    with torch.device("meta"):
        assert n_params(build_unet(preset)) == 859_520_964
        assert n_params(build_vae(preset)) == 83_653_863
        assert n_params(build_text_encoder(preset)) == 123_060_480
    assert preset.image_size == 512 and preset.vae_scale_factor == 8


def test_tiny_components_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_components("tiny", seed=0), build_components("tiny", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("unet", "vae", "text_encoder"):
        for p, q in zip(a[name].parameters(), b[name].parameters()):
            assert torch.equal(p, q)
    c = build_components("tiny", seed=1)
    assert not torch.equal(next(a["unet"].parameters()), next(c["unet"].parameters()))


def test_tiny_preset_is_small_and_consistent():
    preset = PRESETS["tiny"]
    components = build_components(preset)
    assert components["unet"].config.cross_attention_dim == components["text_encoder"].config.hidden_size
    assert sum(n_params(components[k]) for k in ("unet", "vae")) < 2_000_000
    assert preset.image_size == 64


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*'sd15'.*'tiny'"):
        get_preset("huge")


def test_small_preset_keeps_16x16_latents_of_64px_images():
    preset = get_preset("small")
    components = build_components(preset)
    assert preset.vae_scale_factor == 4 and preset.image_size == 64
    assert components["unet"].config.cross_attention_dim == components["text_encoder"].config.hidden_size
    with torch.no_grad():
        latents = components["vae"].encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)
