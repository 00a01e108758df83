"""The trainer's modes, settled once (``training.methods.build_method``): what is trained at which learning rate,
what a checkpoint holds, what the final save writes, and how captions become conditioning (against stock diffusers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from training.conditioning import CachedTextEncoder, UNetConditioning
from training.data import ImageCaptionDataset
from training.methods import Method, build_method
from training.models import LoraState, TrainingModels, load_training_models
from training.records import load_image_caption_records

from .test_train_text_to_image import config

CAPTIONS = ["a red circle on the left", "", "a blue square"]


def load(tiny_sd_dir: str, fresh_text_encoder_seed: int | None = None) -> TrainingModels:
    return load_training_models(
        pretrained_model=tiny_sd_dir,
        fresh_text_encoder_seed=fresh_text_encoder_seed,
    )


def method_for(tiny_sd_dir: str, shapes_dir: str, tmp_path: Path, **overrides) -> tuple[Method, TrainingModels]:
    models = load(tiny_sd_dir)
    return build_method(config(tiny_sd_dir, shapes_dir, tmp_path, **overrides), models, "cpu"), models


@pytest.fixture(scope="module")
def stock_embeddings(tiny_sd_dir) -> torch.Tensor:
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    with torch.no_grad():
        return stock.encode_prompt(CAPTIONS, "cpu", 1, False)[0]


def test_full_fine_tuning_with_a_frozen_text_encoder(tiny_sd_dir, shapes_dir, tmp_path, stock_embeddings):
    method, models = method_for(tiny_sd_dir, shapes_dir, tmp_path)
    assert [part.name for part in method.trained] == ["unet"]
    (group,) = method.param_groups()
    assert group["lr"] == 1e-3 and len(group["params"]) == len(list(models.unet.parameters()))
    assert method.stateful() == {"unet": models.unet}
    assert method.final_kind == "pipeline" and method.cache_dir is None
    assert not any(p.requires_grad for p in models.text_encoder.parameters()) and not models.text_encoder.training
    assert not any(p.requires_grad for p in models.vae.parameters())
    conditioning = method.conditioning({"captions": CAPTIONS}, CAPTIONS)
    assert isinstance(conditioning, UNetConditioning) and conditioning.added_cond_kwargs is None
    assert conditioning.encoder_hidden_states.grad_fn is None  # nothing to train through
    torch.testing.assert_close(conditioning.encoder_hidden_states, stock_embeddings, atol=1e-5, rtol=1e-5)


def test_a_trained_text_encoder_is_a_second_parameter_group(tiny_sd_dir, shapes_dir, tmp_path, stock_embeddings):
    method, models = method_for(tiny_sd_dir, shapes_dir, tmp_path, train_text_encoder=True, text_encoder_lr=5e-4)
    assert [(part.name, part.learning_rate) for part in method.trained] == [("unet", 1e-3), ("text_encoder", 5e-4)]
    assert [group["lr"] for group in method.param_groups()] == [1e-3, 5e-4]
    assert len(method.params) == len(list(models.unet.parameters())) + len(list(models.text_encoder.parameters()))
    assert set(method.stateful()) == {"unet", "text_encoder"} and models.text_encoder.training
    conditioning = method.conditioning({}, CAPTIONS).encoder_hidden_states
    assert conditioning.requires_grad  # the loss reaches the text encoder
    torch.testing.assert_close(conditioning.detach(), stock_embeddings, atol=1e-5, rtol=1e-5)
    with method.evaluating():
        assert not models.text_encoder.training and not models.unet.training
        assert method.conditioning.evaluate({}, CAPTIONS).encoder_hidden_states.grad_fn is None
    assert models.text_encoder.training and models.unet.training


def test_lora_trains_and_checkpoints_only_the_adapter(tiny_sd_dir, shapes_dir, tmp_path):
    method, models = method_for(tiny_sd_dir, shapes_dir, tmp_path, lora_rank=4)
    names = {id(p): name for name, p in models.unet.named_parameters()}
    assert method.params and all("lora" in names[id(p)] for p in method.params)
    state = method.stateful()["unet"]
    assert isinstance(state, LoraState) and all("lora" in key for key in state.state_dict())
    assert method.final_kind == "lora"


def test_ema_is_checkpointed_and_swapped_in_for_evaluation(tiny_sd_dir, shapes_dir, tmp_path):
    method, models = method_for(tiny_sd_dir, shapes_dir, tmp_path, ema_decay=0.5)
    assert set(method.stateful()) == {"unet", "ema"}
    weight = models.unet.conv_in.weight
    start = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # an update the EMA has not seen: inside the block the U-Net holds the average so far
    with method.ema_weights():
        torch.testing.assert_close(weight.detach(), start)
    torch.testing.assert_close(weight.detach(), start + 1.0)
    # diffusers' EMA decay warms up: 0 at its first step, then min((1 + k) / (10 + k), decay) at its step k + 1
    method.after_update()
    with torch.no_grad():
        weight.add_(1.0)
    method.after_update()
    with method.ema_weights():
        torch.testing.assert_close(weight.detach(), start + 1.0 + (1 - 2 / 11))
    torch.testing.assert_close(weight.detach(), start + 2.0)


def test_the_cache_replaces_a_frozen_encoder_not_a_trained_one(tiny_sd_dir, shapes_dir, tmp_path):
    dataset = ImageCaptionDataset(load_image_caption_records(shapes_dir), resolution=64)
    method, _ = method_for(tiny_sd_dir, shapes_dir, tmp_path / "frozen", cache=True)
    accelerator = _accelerator()
    encoder = method.conditioning
    cached, _ = method.training_data(dataset, accelerator, batch_size=4)
    assert isinstance(method.conditioning, CachedTextEncoder) and (tmp_path / "frozen" / "cache").is_dir()
    captions = [cached[0]["caption"], "", cached[5]["caption"]]
    torch.testing.assert_close(
        method.conditioning({}, captions).encoder_hidden_states,
        encoder({}, captions).encoder_hidden_states,
        atol=1e-5,
        rtol=1e-5,
    )
    trained, _ = method_for(tiny_sd_dir, shapes_dir, tmp_path / "trained", cache=True, train_text_encoder=True)
    encoder = trained.conditioning
    trained.training_data(dataset, accelerator, batch_size=4)
    assert trained.conditioning is encoder  # its outputs change every step: only the latents come from the cache


def test_mixed_precision_casts_reloadable_frozen_parts_and_saves_the_originals(tiny_sd_dir, shapes_dir, tmp_path):
    method, models = method_for(tiny_sd_dir, shapes_dir, tmp_path, mixed_precision="bf16")
    assert models.vae.dtype == torch.bfloat16 and models.text_encoder.dtype == torch.bfloat16
    saved = method.conditioning.saved_components()["text_encoder"].state_dict()
    original = load_file(Path(tiny_sd_dir) / "text_encoder" / "model.safetensors")
    shared = [key for key in original if key in saved]
    assert shared and all(torch.equal(saved[key], original[key]) for key in shared)
    # a text encoder initialised by the run cannot be reloaded: it stays in full precision and is saved as it is
    fresh = load(tiny_sd_dir, fresh_text_encoder_seed=0)
    method = build_method(config(tiny_sd_dir, shapes_dir, tmp_path, mixed_precision="bf16"), fresh, "cpu")
    assert fresh.text_encoder.dtype == torch.float32 and fresh.text_encoder_source is None
    assert method.conditioning.saved_components()["text_encoder"] is fresh.text_encoder


def _accelerator():
    from training.launch import make_accelerator

    return make_accelerator()
