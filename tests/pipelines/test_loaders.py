"""diffusers' loader mixins on LatentDiffusionPipeline (LoRA, textual inversion) against stock on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ldm.presets import build_components
from pipelines import LatentDiffusionPipeline

from .test_pipeline import PARITY_TOLERANCE, generate, stock_pipeline


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> str:
    """A LoRA for the tiny U-Net saved in diffusers' format, with non-zero up-projections (peft starts them at 0)."""
    unet = build_components("tiny", seed=0)["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
    return str(path)


def test_lora_loads_as_in_stock_and_scales(lora_dir):
    ours = LatentDiffusionPipeline(**build_components("tiny", seed=0))
    stock = stock_pipeline(build_components("tiny", seed=0))
    base = generate(ours)
    ours.load_lora_weights(lora_dir)
    stock.load_lora_weights(lora_dir)
    with_lora = generate(ours)
    assert np.abs(with_lora - base).max() > 1e-3
    assert np.abs(with_lora - generate(stock)).max() < PARITY_TOLERANCE
    # LoRA scale 0 through cross_attention_kwargs switches the adapter off
    assert np.abs(generate(ours, cross_attention_kwargs={"scale": 0.0}) - base).max() < PARITY_TOLERANCE


def test_textual_inversion_multi_vector_token(tmp_path):
    components = build_components("tiny", seed=0)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, tmp_path / "shape.safetensors")
    ours = LatentDiffusionPipeline(**components)
    ours.load_textual_inversion(str(tmp_path / "shape.safetensors"), token="<shape>")

    # Reference: the two new rows of the embedding table are the vectors, and "<shape>" expands to both tokens.
    tok, te = ours.tokenizer, ours.text_encoder
    ids = tok.convert_tokens_to_ids(["<shape>", "<shape>_1"])
    torch.testing.assert_close(te.get_input_embeddings().weight[ids], vectors)
    embeds, _ = ours.encode_prompt("a <shape>", "cpu", 1, False)
    expected_ids = [tok.bos_token_id, tok.convert_tokens_to_ids("a</w>"), *ids, tok.eos_token_id]
    expected_ids += [tok.pad_token_id] * (77 - len(expected_ids))
    with torch.no_grad():
        expected = te(torch.tensor([expected_ids]))[0]
    torch.testing.assert_close(embeds, expected)
    # and the images equal stock's with the same (extended) tokenizer and text encoder
    stock = stock_pipeline(components)
    assert np.abs(generate(ours, prompt="a <shape>") - generate(stock, prompt="a <shape>")).max() < PARITY_TOLERANCE
