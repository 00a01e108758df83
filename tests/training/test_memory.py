"""The memory pre-flight (training.memory): closed-form terms, real optimizer states, what lowers which term, the
refusal message and run_stats.json (the estimate against measured peaks: python -m eval.memory_check)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

from ldm.errors import UserError
from training.memory import (
    BNB_BLOCK,
    BNB_MIN_8BIT_SIZE,
    RUN_STATS_FILE,
    check_fits,
    estimate_memory,
    optimizer_state_bytes,
    preflight,
)
from training.models import LoraSpec, add_lora, load_training_models
from training.train_text_to_image import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


def config(model_dir: str, **overrides) -> TrainConfig:
    settings = dict(
        pretrained_model=model_dir,
        dataset="unused",
        resolution=64,
        train_batch_size=4,
        report_to="none",
    )
    settings.update(overrides)
    result = TrainConfig(**settings)
    result.validate()
    return result


@pytest.fixture(scope="module")
def models(tiny_sd_dir):
    return load_training_models(
        pretrained_model=tiny_sd_dir,
    )


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_gradient_optimizer_terms_are_closed_form(tiny_sd_dir, models):
    unet, vae, text = numel(models.unet), numel(models.vae), numel(models.text_encoder)
    buffers = sum(b.numel() * b.element_size() for m in (models.vae, models.text_encoder) for b in m.buffers())
    assert all(not b.is_floating_point() for m in (models.vae, models.text_encoder) for b in m.buffers())
    full = estimate_memory(config(tiny_sd_dir), models, "cpu")
    assert full.parameters_trained == full.gradients == 4 * unet
    assert full.optimizer_state == 2 * 4 * unet  # AdamW: two float32 moments
    assert full.parameters_frozen == 4 * (vae + text) + buffers
    assert full.ema == 0
    # bf16 mixed precision: the frozen VAE and text encoder are half-size copies, the trained U-Net stays float32
    half = estimate_memory(config(tiny_sd_dir, mixed_precision="bf16", ema_decay=0.99), models, "cpu")
    assert half.parameters_frozen == 2 * (vae + text) + buffers  # the buffers are integer ids, not cast
    assert half.parameters_trained == half.ema == 4 * unet
    lion = estimate_memory(config(tiny_sd_dir, optimizer="lion"), models, "cpu")
    assert lion.optimizer_state == 4 * unet
    text_too = estimate_memory(config(tiny_sd_dir, train_text_encoder=True), models, "cpu")
    assert text_too.parameters_trained == 4 * (unet + text)
    # the real models are left as they were
    assert not hasattr(models.unet, "peft_config") and all(p.device.type == "cpu" for p in models.unet.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("adamw", {}),
        ("adafactor", {"scale_parameter": False, "relative_step": False, "warmup_init": False, "lr": 1e-3}),
        ("adafactor", {"beta1": 0.9, "scale_parameter": False, "relative_step": False, "lr": 1e-3}),
        ("prodigy", {}),
        ("lion", {}),
    ],
)
def test_optimizer_state_matches_the_optimizers_own(name, kwargs):
    """Against the state the real optimizer holds after one step (tensors; scalar step counts left out)."""
    from training.command import optimizer_class

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    optimizer = optimizer_class(name)(model.parameters(), **({"lr": 1e-3} | kwargs))
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    held = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    args = {"beta1": kwargs["beta1"]} if "beta1" in kwargs else {}
    assert optimizer_state_bytes(name, model.parameters(), args) == held


def test_8bit_adam_state_is_a_quarter_of_adamw_for_large_tensors():
    big, small = torch.zeros(64, 1024), torch.zeros(BNB_MIN_8BIT_SIZE - 1)
    assert optimizer_state_bytes("adamw8bit", [big]) == 2 * (big.numel() + 4 * math.ceil(big.numel() / BNB_BLOCK))
    assert optimizer_state_bytes("adamw8bit", [small]) == optimizer_state_bytes("adamw", [small])


def test_checkpointing_lowers_activations(tiny_sd_dir, models):
    plain = estimate_memory(config(tiny_sd_dir), models, "cpu")
    checkpointed = estimate_memory(config(tiny_sd_dir, gradient_checkpointing=True), models, "cpu")
    assert plain.recompute == 0 and checkpointed.recompute > 0
    assert checkpointed.activations + checkpointed.recompute < 0.6 * plain.activations
    # the activations grow with the batch (the VAE's forward too): about linearly
    double = estimate_memory(config(tiny_sd_dir, train_batch_size=8), models, "cpu")
    assert 1.8 < double.activations / plain.activations < 2.2
    assert 1.8 < double.encoders / plain.encoders < 2.2
    cached = estimate_memory(config(tiny_sd_dir, cache=True), models, "cpu")
    assert cached.encoders == 0 and cached.activations == plain.activations


def test_lora_lowers_gradients_and_optimizer_state(tiny_sd_dir, models):
    full = estimate_memory(config(tiny_sd_dir), models, "cpu")
    lora = estimate_memory(config(tiny_sd_dir, lora_rank=4), models, "cpu")
    unet = copy.deepcopy(models.unet)
    add_lora(unet, LoraSpec(4))
    lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert lora.parameters_trained == lora.gradients == 4 * lora_params
    assert lora.optimizer_state == 8 * lora_params
    assert lora.gradients < full.gradients / 10 and lora.optimizer_state < full.optimizer_state / 10
    # the frozen base U-Net stays float32
    assert lora.parameters_frozen == full.parameters_frozen + 4 * numel(models.unet)
    # LoHa draws its module dropout from a tensor in training mode, which fake tensors cannot branch on: the
    # estimate traces it in evaluation mode instead
    loha = estimate_memory(config(tiny_sd_dir, lora_rank=4, lora_type="loha"), models, "cpu")
    assert 0.5 * lora.activations < loha.activations < 2 * lora.activations


def test_sdxl_terms_and_trained_text_encoders(tiny_sdxl_dir):
    sdxl = load_training_models(
        pretrained_model=tiny_sdxl_dir,
    )
    run = config(tiny_sdxl_dir, train_text_encoder=True, trained_text_encoders=["text_encoder_2"])
    estimate = estimate_memory(run, sdxl, "cpu")
    assert estimate.parameters_trained == 4 * (numel(sdxl.unet) + numel(sdxl.text_encoder_2))
    frozen_only = estimate_memory(config(tiny_sdxl_dir), sdxl, "cpu")
    # the trained encoder's forward is recorded for backward
    assert estimate.activations > frozen_only.activations


def test_refusal_names_settings_that_fit(tiny_sd_dir, models):
    run = config(tiny_sd_dir, train_batch_size=8)
    estimate = estimate_memory(run, models, "cpu")
    lora = estimate_memory(config(tiny_sd_dir, train_batch_size=8, lora_rank=16), models, "cpu")
    capacity = (estimate.total + lora.total) // 2
    assert lora.total < capacity < estimate.total
    with pytest.raises(UserError) as caught:
        preflight(run, models, "cpu", capacity=capacity)
    message = str(caught.value)
    assert "\n" not in message and "--skip-memory-check" in message
    assert "--lora-rank 16" in message
    # every named setting's own estimate is within the capacity
    options = message.split("settings that fit: ")[1].split("; or pass")[0].split("; ")
    for option in options:
        flags, size = re.fullmatch(r"(--.+) \((\d+) MiB\)", option).groups()
        assert int(size) * 2**20 <= capacity + 2**19, option
    preflight(run, models, "cpu", capacity=capacity, check=False)  # --skip-memory-check
    check_fits(run, models, estimate, capacity=estimate.total)  # fits exactly


def test_refusal_offers_a_smaller_batch_with_accumulation(tiny_sd_dir, models):
    run = config(tiny_sd_dir, train_batch_size=8, lora_rank=4, gradient_checkpointing=True, optimizer="lion")
    estimate = estimate_memory(run, models, "cpu")
    settings = {"lora_rank": 4, "gradient_checkpointing": True, "optimizer": "lion"}
    half = estimate_memory(config(tiny_sd_dir, train_batch_size=4, **settings), models, "cpu")
    with pytest.raises(UserError, match="--train-batch-size 4 --gradient-accumulation-steps 2"):
        check_fits(run, models, estimate, capacity=half.total)


def test_run_stats_are_written(tiny_sd_dir, shapes_dir, tmp_path):
    out = tmp_path / "run"
    run = config(
        tiny_sd_dir,
        dataset=shapes_dir,
        output_dir=str(out),
        max_train_steps=2,
        checkpointing_steps=10,
        lr_warmup_steps=0,
    )
    train(run)
    stats = json.loads((out / RUN_STATS_FILE).read_text())
    terms = stats["memory_estimate"]
    assert terms["device"] == "cpu" and terms["total"] > terms["parameters_trained"] > 0
    assert stats["measured_kind"] == "cpu_peak_rss" and stats["measured_peak"] > stats["measured_baseline"] > 0
    assert (out / "metrics.json").is_file()
