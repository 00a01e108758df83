"""Textual inversion: only the new token's vectors train, every other weight stays bit-identical, the token learns
the concept, and both files it writes load in stock ``load_textual_inversion`` (SD and SDXL)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from eval.adherence import score_images
from ldm.errors import UserError
from pipelines import DEFAULT_MODEL, LatentDiffusionPipeline
from pipelines.loading import Embedding, apply_embeddings
from pipelines.pipeline_latent_diffusion_xl import LatentDiffusionXLPipeline
from shapes.world import canonical_scene
from tests.training.conftest import draw_shapes_folder
from tests.training.test_train_text_to_image import assert_same_weights, config
from training.checkpoint_folders import latest_checkpoint
from training.textual_inversion import NewTokens
from training.train_text_to_image import main, train

MODEL = Path(DEFAULT_MODEL)
TOKEN = "<sks>"
TI = dict(placeholder_token=TOKEN, initializer_token="shape", learning_rate=5e-2, caption_dropout=0.0)
GENERATE = {"num_inference_steps": 2, "output_type": "np"}


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory) -> str:
    """The shapes images, every caption rewritten to 'a photo of <sks>'."""
    folder = draw_shapes_folder(tmp_path_factory.mktemp("concept"))
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps(line | {"text": f"a photo of {TOKEN}"}) + "\n" for line in lines)
    )
    return str(folder)


def image(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **GENERATE).images


def test_new_tokens_expand_as_the_pipelines_do():
    tokens = NewTokens("<cat-toy>", "toy", num_vectors=3)
    assert tokens.tokens == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    assert (
        tokens.expand("a <cat-toy> on a <cat-toy>")
        == "a <cat-toy> <cat-toy>_1 <cat-toy>_2 on a <cat-toy> <cat-toy>_1 <cat-toy>_2"
    )


@pytest.fixture(scope="module")
def sd_run(tiny_sd_dir, concept_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ti")
    final = train(config(tiny_sd_dir, concept_dir, out / "whole", num_vectors=2, max_train_steps=8, **TI))
    return {"final": final, "out": out}


def test_only_the_new_rows_train_and_both_files_load_in_stock(sd_run, tiny_sd_dir):
    """The checkpoint holds the new rows alone; stock loads diffusers' file and the AUTOMATIC1111 file to the same
    vectors and the same image; a prompt without the token gives the bit-identical image before and after loading;
    the vectors moved away from the initializer word's."""
    final = sd_run["final"]
    assert final.name == "embedding"
    checkpoint = load_file(
        latest_checkpoint(sd_run["out"] / "whole" / "checkpoints") / "text_encoder_embeddings.safetensors"
    )
    assert list(checkpoint) == ["new"] and checkpoint["new"].shape[0] == 2

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    before = image(stock, "a red circle on the left")
    stock.load_textual_inversion(final)  # learned_embeds.safetensors
    assert np.array_equal(image(stock, "a red circle on the left"), before)
    a1111 = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    a1111.load_textual_inversion(final / "sks.safetensors", token=TOKEN)
    ids = stock.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    trained = stock.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(a1111.text_encoder.get_input_embeddings().weight[ids], trained, rtol=0, atol=0)
    assert np.array_equal(image(a1111, f"a photo of {TOKEN}"), image(stock, f"a photo of {TOKEN}"))

    init_id = stock.tokenizer.encode("shape", add_special_tokens=False)[0]
    start = stock.text_encoder.get_input_embeddings().weight[init_id]
    assert (trained - start).abs().max() > 1e-3
    original = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None).text_encoder.state_dict()
    (table,) = [name for name in original if name.endswith("token_embedding.weight")]
    rows = original[table].shape[0]
    for name, value in stock.text_encoder.state_dict().items():
        torch.testing.assert_close(
            value[:rows] if "token_embedding" in name else value, original[name], rtol=0, atol=0
        )


def test_the_token_learns_the_concept_on_the_shipped_model(tmp_path):
    """Four images of a green square on the right captioned 'a <sks>': after 16 steps the shipped model draws green
    for the token in nearly every image (16 of 16 measured; 3 of 16 with the initial vectors, those of 'shape'), as
    read from the pixels by ``eval.adherence``."""
    data = tmp_path / "concept"
    data.mkdir()
    for i in range(4):
        canonical_scene("green", "square", "right").save(data / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"a {TOKEN}"}) for i in range(4)]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    settings = dict(TI, learning_rate=0.1, lr_warmup_steps=0, max_train_steps=16, checkpointing_steps=100)
    final = train(config(str(MODEL), str(data), tmp_path / "out", **settings))

    def green(pipe) -> int:
        images = pipe([f"a {TOKEN}"] * 16, generator=[torch.Generator().manual_seed(i) for i in range(16)]).images
        report = score_images(images, ["a green square on the right"] * 16)
        return sum(record.matched["colour"] for record in report.records)

    start = LatentDiffusionPipeline.from_pretrained(MODEL)
    init_id = start.tokenizer.encode("shape", add_special_tokens=False)[0]
    start.load_textual_inversion(start.text_encoder.get_input_embeddings().weight[[init_id]].detach(), token=TOKEN)
    trained = LatentDiffusionPipeline.from_pretrained(MODEL)
    trained.load_textual_inversion(final)
    assert green(start) <= 8 and green(trained) >= 14


def test_a_stopped_run_resumes_to_the_same_vectors(sd_run, tiny_sd_dir, concept_dir):
    out = sd_run["out"] / "parts"
    train(config(tiny_sd_dir, concept_dir, out, num_vectors=2, max_train_steps=3, **TI))
    resumed = train(config(tiny_sd_dir, concept_dir, out, num_vectors=2, max_train_steps=8, resume="latest", **TI))
    assert_same_weights(
        load_file(sd_run["final"] / "learned_embeds.safetensors"), load_file(resumed / "learned_embeds.safetensors")
    )


def test_pivotal_tuning_writes_the_lora_and_the_embedding_side_by_side(tiny_sd_dir, concept_dir, tmp_path):
    final = train(config(tiny_sd_dir, concept_dir, tmp_path, lora_rank=2, max_train_steps=2, **TI))
    assert final.name == "lora"
    assert {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "learned_embeds.safetensors"} <= {
        p.name for p in final.iterdir()
    }
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    stock.load_lora_weights(final)
    stock.load_textual_inversion(final)
    assert np.isfinite(image(stock, f"a photo of {TOKEN}")).all()


def test_sdxl_embeddings_load_in_stock_per_encoder_and_through_our_embedding_flag(
    tiny_sdxl_dir, concept_dir, tmp_path
):
    final = train(config(tiny_sdxl_dir, concept_dir, tmp_path, max_train_steps=2, train_batch_size=2, **TI))
    state = load_file(final / "learned_embeds.safetensors")
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 48)
    assert load_file(final / "sks.safetensors").keys() == state.keys()

    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    stock.load_textual_inversion(
        state["clip_l"], token=TOKEN, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
    )
    stock.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2
    )
    ours = LatentDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    apply_embeddings(ours, (Embedding(final / "sks.safetensors", None),))  # the token is read from the file
    assert np.abs(image(ours, f"a photo of {TOKEN}") - image(stock, f"a photo of {TOKEN}")).max() < 1e-4


def test_a_token_the_tokenizer_has_is_refused_with_the_fix(tiny_sd_dir, concept_dir, tmp_path):
    with pytest.raises(UserError, match=r"\['red'\] are already tokens of this model's tokenizer; pick a token"):
        train(config(tiny_sd_dir, concept_dir, tmp_path, **(TI | {"placeholder_token": "red"})))
    assert not (tmp_path / "checkpoints").exists()


def test_captions_without_the_token_are_refused_before_training(tiny_sd_dir, shapes_dir, tmp_path, capsys):
    args = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, "--output-dir", str(tmp_path)]
    code = main(
        [
            *args,
            "--resolution",
            "64",
            "--placeholder-token",
            TOKEN,
            "--initializer-token",
            "shape",
            "--report-to",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"no caption of the training data contains --placeholder-token '{TOKEN}'" in err.splitlines()[-1]
    assert not (tmp_path / "checkpoints").exists()


def test_ti_settings_without_a_token_name_the_flag(tiny_sd_dir, concept_dir, tmp_path):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="settings of --placeholder-token"):
        config(tiny_sd_dir, concept_dir, tmp_path, initializer_token="dog")
    with pytest.raises(ConfigError, match="drop --train-text-encoder"):
        config(tiny_sd_dir, concept_dir, tmp_path, train_text_encoder=True, **TI)
