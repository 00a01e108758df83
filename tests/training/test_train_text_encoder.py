"""Contrastive text-encoder training on a tiny CLIP: the loss, retrieval above chance when overfitting, the exported
text encoder in stock transformers and in text-to-image training, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from ldm.tokenizer import build_clip_tokenizer
from training.config import ConfigError
from training.train_text_encoder import (
    TextEncoderTrainConfig,
    build_clip,
    contrastive_loss,
    retrieval_chance,
    tokenize,
    train,
)
from training.train_text_to_image import TrainConfig
from training.train_text_to_image import train as train_text_to_image


def config(shapes_dir: str, out: Path, **overrides) -> TextEncoderTrainConfig:
    settings = dict(
        preset="tiny",
        dataset=shapes_dir,
        output_dir=str(out),
        resolution=64,
        train_batch_size=3,
        max_train_steps=6,
        checkpointing_steps=3,
        learning_rate=2e-3,
        lr_warmup_steps=2,
        report_to="none",
        log_steps=1,
        validation_split=0.25,
    )
    settings.update(overrides)
    return TextEncoderTrainConfig(**settings)


def shapes(shapes_dir: str) -> tuple[torch.Tensor, list[str]]:
    """The 8 training images in [-1, 1] (read with PIL alone) and their captions."""
    rows = [json.loads(line) for line in (Path(shapes_dir) / "metadata.jsonl").read_text().splitlines()]
    arrays = [np.asarray(Image.open(Path(shapes_dir) / r["file_name"]).convert("RGB"), np.float32) for r in rows]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1).permute(0, 3, 1, 2), [r["text"] for r in rows]


@torch.no_grad()
def top1_retrieval(clip: CLIPModel, pixels: torch.Tensor, captions: list[str]) -> float:
    """The fraction of images whose own caption is the most similar of the 8 (captions are distinct)."""
    ids = tokenize(build_clip_tokenizer(), captions)
    image = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    text = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)
    similarity = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    return float((similarity.argmax(dim=1) == torch.arange(len(captions))).float().mean())


def test_loss_is_clips_for_distinct_captions_and_shares_identical_ones():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 5
    distinct = torch.arange(4)[:, None].expand(4, 77)
    assert torch.allclose(contrastive_loss(logits, distinct), image_text_contrastive_loss(logits), atol=1e-6)
    # captions 0 and 1 identical: their targets are [1/2, 1/2] over both images (rows and columns)
    ids = torch.tensor([0, 0, 1, 2])[:, None].expand(4, 77)
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    by_hand = (
        -(targets * logits.log_softmax(1)).sum(1).mean() / 2 - (targets * logits.t().log_softmax(1)).sum(1).mean() / 2
    )
    assert torch.allclose(contrastive_loss(logits, ids), by_hand, atol=1e-6)


def test_retrieval_chance():
    assert retrieval_chance(8, 1, 1) == pytest.approx(1 / 8)
    assert retrieval_chance(8, 1, 5) == pytest.approx(5 / 8)
    assert retrieval_chance(4, 2, 1) == pytest.approx(1 / 2)
    assert retrieval_chance(4, 2, 2) == pytest.approx(1 - 1 / 6)  # both wrong ones on top: 1 of C(4, 2) orders


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"preset": "huge"}, "preset"),
        ({"resolution": 60}, "resolution"),
        ({"vision_patch_size": 7}, "vision_patch_size"),
        ({"vision_width": 30}, "vision_width"),
        ({"max_logit_scale": 1.0}, "max_logit_scale"),
        ({"logit_scale_init": 5.0}, "logit_scale_init"),
        ({"dataset": ""}, "dataset"),
        ({"train_batch_size": 0}, "train_batch_size"),
    ],
)
def test_bad_configs_name_the_field(shapes_dir, tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        config(shapes_dir, tmp_path, **overrides).validate()


def test_text_tower_is_the_presets_text_encoder(shapes_dir, tmp_path):
    from ldm.presets import build_text_encoder, get_preset

    clip = build_clip(config(shapes_dir, tmp_path))
    reference = build_text_encoder(get_preset("tiny")).config
    for name in (
        "vocab_size",
        "max_position_embeddings",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(clip.config.text_config, name) == getattr(reference, name), name
    assert clip.config.vision_config.patch_size == 8 and clip.config.vision_config.image_size == 64


@pytest.fixture(scope="module")
def overfit(shapes_dir, tmp_path_factory) -> tuple[TextEncoderTrainConfig, Path]:
    """A tiny CLIP trained on the 8 shape images, evaluated on the same 8."""
    settings = config(
        shapes_dir,
        tmp_path_factory.mktemp("clip"),
        train_batch_size=8,
        max_train_steps=40,
        checkpointing_steps=40,
        validation_steps=20,
        validation_split=0.0,
        validation_dataset=shapes_dir,
        log_steps=10,
    )
    return settings, train(settings)


def test_contrastive_training_raises_retrieval_above_chance(overfit, shapes_dir):
    settings, out = overfit
    pixels, captions = shapes(shapes_dir)
    before = top1_retrieval(build_clip(settings).eval(), pixels, captions)  # the same seed: the initial weights
    after = top1_retrieval(CLIPModel.from_pretrained(out / "clip").eval(), pixels, captions)
    assert after >= 0.75 and after > before, (before, after)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["history"]] == [0, 20, 40]
    assert metrics["history"][0]["top1"] == pytest.approx(before)
    assert metrics["final_top1"] == pytest.approx(after)
    assert metrics["chance_top1"] == pytest.approx(1 / 8) and metrics["chance_top5"] == pytest.approx(5 / 8)
    assert metrics["images"] == 8 and metrics["captions"] == 8


def test_exported_text_encoder_is_the_trained_text_tower(overfit, shapes_dir):
    _, out = overfit
    encoder, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    _, captions = shapes(shapes_dir)
    ids = tokenize(tokenizer, captions)
    assert torch.equal(ids, tokenize(build_clip_tokenizer(), captions))
    clip = CLIPModel.from_pretrained(out / "clip").eval()
    with torch.no_grad():
        exported, trained = encoder.eval()(ids), clip.text_model(input_ids=ids)
    assert torch.equal(exported.last_hidden_state, trained.last_hidden_state)
    assert torch.equal(exported.pooler_output, trained.pooler_output)
    # and training changed it: the initial tower gives other hidden states
    assert not torch.allclose(exported.last_hidden_state, build_clip(overfit[0]).text_model(input_ids=ids)[0])


def test_exported_text_encoder_is_the_text_encoder_of_text_to_image_training(
    overfit, shapes_dir, frozen_parts_dir, tmp_path
):
    _, out = overfit
    final = train_text_to_image(
        TrainConfig(
            preset="tiny",
            vae=frozen_parts_dir,
            text_encoder=str(out),
            dataset=shapes_dir,
            output_dir=str(tmp_path),
            resolution=64,
            train_batch_size=4,
            max_train_steps=1,
            checkpointing_steps=1,
            lr_warmup_steps=0,
            report_to="none",
        )
    )
    ours = load_file(out / "text_encoder" / "model.safetensors")
    saved = load_file(final / "text_encoder" / "model.safetensors")
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours)


def clip_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "clip" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_resume_continues_exactly(shapes_dir, tmp_path):
    # 6 steps straight == 3 steps, then --resume latest to 6 (a schedule that does not depend on the run's length)
    constant = {"lr_scheduler": "constant_with_warmup"}
    straight = train(config(shapes_dir, tmp_path / "straight", **constant))
    train(config(shapes_dir, tmp_path / "parts", max_train_steps=3, **constant))
    resumed = train(config(shapes_dir, tmp_path / "parts", resume="latest", **constant))
    assert_same_weights(clip_weights(straight), clip_weights(resumed))
    initial = build_clip(config(shapes_dir, tmp_path)).state_dict()
    assert not torch.equal(clip_weights(straight)["text_projection.weight"], initial["text_projection.weight"])
    assert clip_weights(straight)["logit_scale"].item() != initial["logit_scale"].item()  # the temperature is learnt

    # the default cosine schedule, resumed from the step-3 checkpoint of a 6-step run
    cosine = train(config(shapes_dir, tmp_path / "cosine"))
    checkpoint = tmp_path / "cosine" / "checkpoints" / "step-000003"
    resumed = train(config(shapes_dir, tmp_path / "cosine-resumed", resume=str(checkpoint)))
    assert_same_weights(clip_weights(cosine), clip_weights(resumed))


def test_caption_vocabulary_exports_a_small_embedding_table(shapes_dir, tmp_path):
    out = train(config(shapes_dir, tmp_path, vocabulary="captions", max_train_steps=2, checkpointing_steps=2))
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(out / "text_encoder")
    _, captions = shapes(shapes_dir)
    assert encoder.config.vocab_size == len(tokenizer) < 600  # CLIP's byte symbols + the captions' merges + 2
    assert encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)
    specials = (encoder.config.bos_token_id, encoder.config.eos_token_id)
    assert specials == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    full = build_clip_tokenizer()
    assert [tokenizer.tokenize(c) for c in captions] == [full.tokenize(c) for c in captions]
    # the pooled output reads the EOS position, which the reduced ids still mark
    with torch.no_grad():
        pooled = encoder(tokenize(tokenizer, captions)).pooler_output
    assert pooled.shape == (len(captions), encoder.config.hidden_size) and torch.isfinite(pooled).all()


def test_unknown_vocabulary_names_the_field_and_the_choices(shapes_dir):
    from training.config import from_dict

    with pytest.raises(ConfigError, match="vocabulary must be one of 'clip', 'captions'; got 'bpe'"):
        from_dict(TextEncoderTrainConfig, {"dataset": shapes_dir, "vocabulary": "bpe"})
