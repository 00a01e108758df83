"""LoRA variants: LoCon (convolutions), DoRA, network alpha baked into the saved weights, EMA of LoRA weights. Each
trained adapter loads back through stock diffusers; the kohya export loads through diffusers' kohya converter to the
same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.presets import build_components
from pipelines.kohya_lora import export_kohya_lora
from tests.training.test_train_text_to_image import config
from training.models import LoraSpec, add_lora, save_lora
from training.train_text_to_image import train

PROMPT = "a red circle on the left"


def stock(model: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images


def randomise_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the LoRA layers (B starts at zero) and DoRA magnitudes random weights to carry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_conv_lora_loads_in_stock_from_both_files_to_the_same_image(tiny_sd_dir, shapes_dir, tmp_path):
    settings = dict(lora_rank=4, lora_alpha=8, lora_conv_rank=2, lora_conv_alpha=1, learning_rate=1e-2)
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=4, **settings))
    diffusers_keys = load_file(final / "pytorch_lora_weights.safetensors")
    assert any("resnets" in key and "conv1" in key for key in diffusers_keys)
    kohya = load_file(final / "kohya_lora.safetensors")
    conv_downs = [key for key in kohya if "resnets" in key and key.endswith("conv1.lora_down.weight")]
    assert conv_downs and kohya[conv_downs[0]].ndim == 4 and kohya[conv_downs[0]].shape[0] == 2
    assert float(kohya[conv_downs[0].replace("lora_down.weight", "alpha")]) == 1.0

    plain = image(stock(tiny_sd_dir))
    from_diffusers, from_kohya = stock(tiny_sd_dir), stock(tiny_sd_dir)
    from_diffusers.load_lora_weights(final)
    from_kohya.load_lora_weights(final, weight_name="kohya_lora.safetensors")
    with_lora = image(from_diffusers)
    assert np.abs(with_lora - plain).max() > 1e-4
    assert np.abs(image(from_kohya) - with_lora).max() < 1e-4


def test_dora_and_alpha_are_saved_at_the_trained_strength(tmp_path):
    """A DoRA adapter with alpha 16 at rank 4 (scale 4) and LoCon layers: stock loads the file to the U-Net's trained
    outputs; the up weights carry the scale and the file has no metadata, so any loader applies the same."""
    unet = build_components("tiny", seed=0)["unet"]
    add_lora(unet, LoraSpec(rank=4, alpha=16, dora=True, conv_rank=2, conv_alpha=4))
    randomise_lora(unet)
    generator = torch.Generator().manual_seed(2)
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        trained = unet(sample, 500, context).sample
    path = save_lora(unet, tmp_path)

    pipe = StableDiffusionPipeline(
        **build_components("tiny", seed=0), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(sample, 500, context).sample, trained, rtol=1e-4, atol=1e-5)

    with safe_open(str(path), "pt") as file:
        assert "lora_adapter_metadata" not in (file.metadata() or {})  # nothing for a loader to miss
    tensors = load_file(path)
    layer = next(m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and n.endswith("attn1.to_q"))
    name = next(n for n, m in unet.named_modules() if m is layer)
    up = tensors[f"unet.{name}.lora_B.weight"]
    expected = layer.lora_B["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(up, expected.detach(), rtol=0, atol=0)


def test_dora_training_writes_diffusers_file_only(tiny_sd_dir, shapes_dir, tmp_path, caplog):
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=2, lora_rank=2, lora_type="dora"))
    assert (final / "pytorch_lora_weights.safetensors").is_file() and not (final / "kohya_lora.safetensors").exists()
    assert "DoRA has no kohya LoRA layout" in caplog.text
    pipe = stock(tiny_sd_dir)
    pipe.load_lora_weights(final)
    assert np.isfinite(image(pipe)).all()


def test_ema_of_lora_weights_is_what_the_run_saves(tiny_sd_dir, shapes_dir, tmp_path):
    """With --ema-decay a LoRA run saves the EMA of its LoRA weights; its own last weights go to unet-raw/."""
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, lora_rank=4, learning_rate=1e-2, ema_decay=0.5))
    ema, raw = (
        load_file(final / "pytorch_lora_weights.safetensors"),
        load_file(tmp_path / "unet-raw" / "pytorch_lora_weights.safetensors"),
    )
    assert ema.keys() == raw.keys()
    assert max((ema[k] - raw[k]).abs().max().item() for k in ema) > 1e-6  # the average lags the last weights
    pipe = stock(tiny_sd_dir)
    pipe.load_lora_weights(final)
    assert np.isfinite(image(pipe)).all()


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_files_hold_the_trained_update(tmp_path, algo):
    """LoHa / LoKr (with LoCon layers) in LyCORIS's layout: LyCORIS's own formula on the file's tensors (LoHa:
    (w1a @ w1b) * (w2a @ w2b); LoKr: kron(w1, w2); each times alpha / rank, reshaped to the weight) gives peft's
    update of every layer, and the metadata names the network."""
    unet = build_components("tiny", seed=0)["unet"]
    add_lora(unet, LoraSpec(rank=4, alpha=8, algo=algo, conv_rank=2))
    randomise_lora(unet)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "hada_" in name or "lokr_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    path = export_kohya_lora(unet, tmp_path / "lycoris.safetensors")
    tensors = load_file(path)
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"]) == {
        "algo": algo
    }
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LycorisLayer)}
    assert any(isinstance(m.get_base_layer(), torch.nn.Conv2d) for m in layers.values())
    keys = sorted({key.rsplit(".", 1)[0] for key in tensors})
    assert len(keys) == len(layers)
    for key in keys:
        t = {name.rsplit(".", 1)[1]: value for name, value in tensors.items() if name.startswith(key + ".")}
        scale = t["alpha"].item() / (t["hada_w1_b"].shape[0] if algo == "loha" else _lokr_rank(t))
        if algo == "loha":
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            delta = torch.kron(w1, w2.flatten(1) if w1.ndim == 2 and w2.ndim == 4 else w2) * scale
        (layer,) = [m for n, m in layers.items() if key.endswith("_" + n.replace(".", "_"))]
        expected = layer.get_delta_weight("default")
        torch.testing.assert_close(delta.reshape(expected.shape), expected, rtol=1e-4, atol=1e-6)


def _lokr_rank(t: dict[str, torch.Tensor]) -> float:
    """LyCORIS's LoKr scale divides alpha by the rank of the decomposed factor; with full factors alpha is the rank
    this file writes, so the scale is 1."""
    return t["lokr_w2_a"].shape[1] if "lokr_w2_a" in t else t["alpha"].item()


def test_a_loha_run_writes_the_lycoris_file(tiny_sd_dir, shapes_dir, tmp_path, caplog):
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=2, lora_rank=2, lora_type="loha"))
    assert [p.name for p in final.glob("*.safetensors")] == ["kohya_lora.safetensors"]
    assert any(key.endswith(".hada_w1_a") for key in load_file(final / "kohya_lora.safetensors"))
    assert "LoHa / LoKr" in caplog.text
    assert "diffusers loads no LoHa / LoKr" in (final / "README.md").read_text()
