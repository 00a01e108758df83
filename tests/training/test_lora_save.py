"""``training.models.save_lora``: the saved LoRA loads back in stock diffusers at the strength it was trained with."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from ldm.presets import build_components
from training.models import LoraSpec, add_lora, save_lora


def test_lora_with_alpha_other_than_rank_loads_back_at_its_strength(tmp_path) -> None:
    components = build_components("tiny", seed=0)
    unet = components["unet"]
    add_lora(unet, LoraSpec(rank=4, alpha=16))  # scale alpha / rank = 4, not the 1 that alpha = rank would give
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero (the LoRA a no-op); give it weights to carry
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        trained = unet(sample, 500, context).sample
    save_lora(unet, tmp_path)

    pipe = StableDiffusionPipeline(
        **build_components("tiny", seed=0), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with torch.no_grad():
        plain = pipe.unet(sample, 500, context).sample
        pipe.load_lora_weights(tmp_path)
        loaded = pipe.unet(sample, 500, context).sample
    assert (trained - plain).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
