"""Text-to-image training of SDXL on tiny components: the U-Net gets each sample's own size/crop time_ids, the cache
and resume are exact, and what a run saves (a pipeline folder, LoRA weights) loads in stock diffusers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import training.train_text_to_image as text_to_image
from pipelines.pipeline_latent_diffusion_xl import LatentDiffusionXLPipeline
from tests.training.test_train_text_to_image import assert_same_weights, unet_weights
from training.cache import weights_hash
from training.methods import text_conditioning
from training.models import load_training_models
from training.train_text_to_image import TrainConfig, main, train

SIZES = [(64, 64), (96, 64), (64, 128), (80, 80)]
"""PIL (width, height) of the four training images."""

EXPECTED_TIME_IDS = [
    (64, 64, 0, 0, 64, 64),
    (64, 96, 0, 16, 64, 64),  # 96 wide: the centre crop of 64 starts 16 px in
    (128, 64, 32, 0, 64, 64),  # 128 high: 32 px down
    (80, 80, 0, 0, 64, 64),  # resized to 64 x 64 first: no crop
]
"""Each image's (orig_h, orig_w, crop_top, crop_left, target_h, target_w) at resolution 64, centre crop, worked out
by hand (SDXL paper sec. 2.2; stock ``_get_add_time_ids`` order)."""

PROMPT = "a red square"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sizes_dir(tmp_path_factory) -> str:
    """Four captioned images of different sizes (so that their crops and original sizes differ)."""
    folder = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(0)
    lines = []
    for i, (width, height) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i} of {width} by {height}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def config(model: str, data: str, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        pretrained_model=model,
        dataset=data,
        output_dir=str(out),
        resolution=64,
        train_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=1,
        learning_rate=1e-3,
        lr_warmup_steps=1,
        caption_dropout=0.25,
        report_to="none",
        log_steps=1,
    )
    settings.update(overrides)
    result = TrainConfig(**settings)
    result.validate()
    return result


@pytest.fixture(scope="module")
def uncached_run(tiny_sdxl_dir, sizes_dir, tmp_path_factory) -> dict:
    """Two steps of full fine-tuning without the cache, with a validation grid at the end; records what the U-Net
    was called with (``time_ids``) and which samples each batch held."""
    out = tmp_path_factory.mktemp("uncached")
    calls: list[dict[str, torch.Tensor]] = []
    batches: list[torch.Tensor] = []
    build_method, batch_loss = text_to_image.build_method, text_to_image.batch_loss

    def hooked_build_method(*args, **kwargs):
        method = build_method(*args, **kwargs)

        def record(module, args, kwargs):
            if module.training:  # the training forward passes, not validation sampling
                calls.append({name: value.clone() for name, value in kwargs["added_cond_kwargs"].items()})

        method.unet.register_forward_pre_hook(record, with_kwargs=True)
        return method

    def recording_batch_loss(batch, *args, **kwargs):
        batches.append(batch["indices"].clone())
        return batch_loss(batch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text_to_image, "build_method", hooked_build_method)
        patch.setattr(text_to_image, "batch_loss", recording_batch_loss)
        final = train(
            config(
                tiny_sdxl_dir,
                sizes_dir,
                out,
                validation_prompts=[PROMPT],
                validation_steps=2,
                validation_inference_steps=2,
            )
        )
    return {"out": out, "final": final, "calls": calls, "batches": batches}


def test_the_unet_gets_each_samples_own_size_and_crop_time_ids(uncached_run):
    calls, batches = uncached_run["calls"], uncached_run["batches"]
    assert len(calls) == len(batches) == 2
    for added, indices in zip(calls, batches):
        expected = torch.tensor([EXPECTED_TIME_IDS[i] for i in indices.tolist()], dtype=torch.float32)
        assert added["time_ids"].dtype == torch.float32  # pixel sizes are not rounded to a half-precision type
        assert torch.equal(added["time_ids"], expected)
        assert added["text_embeds"].shape == (len(indices), 32)  # the second encoder's pooled projection
    # the samples really had different crops (a constant row would pass the check above for square images only)
    assert len({tuple(row) for call in calls for row in call["time_ids"].tolist()}) > 1


def test_full_fine_tune_saves_an_sdxl_folder_that_stock_loads(uncached_run, tiny_sdxl_dir):
    final, out = uncached_run["final"], uncached_run["out"]
    assert final.name == "pipeline"
    base = load_file(Path(tiny_sdxl_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(base["conv_in.weight"], unet_weights(final)["conv_in.weight"])  # trained
    # both frozen encoders saved as they were
    for name, file in (("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors")):
        assert_same_weights(load_file(Path(tiny_sdxl_dir) / name / file), load_file(final / name / file))
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "LatentDiffusionXLPipeline"

    stock = StableDiffusionXLPipeline.from_pretrained(final)
    ours = LatentDiffusionXLPipeline.from_pretrained(final)
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "guidance_scale": 7.5, "output_type": "np"}
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and np.abs(a - b).max() < 1e-4
    assert (out / "samples" / "step-000002.png").is_file() and (final / "samples.png").is_file()
    assert "LatentDiffusionXLPipeline.from_pretrained" in (final / "README.md").read_text()


def test_cached_run_equals_the_uncached_one_and_resumes_exactly(uncached_run, tiny_sdxl_dir, sizes_dir, tmp_path):
    cached = train(config(tiny_sdxl_dir, sizes_dir, tmp_path / "cached", cache=True))
    manifest = json.loads((tmp_path / "cached" / "cache" / "manifest.json").read_text())
    assert manifest["text_outputs"] == ["prompt_embeds", "pooled_prompt_embeds"]
    # the fingerprint holds both encoders' weights, so a change of either rebuilds the cache
    folder = Path(tiny_sdxl_dir)
    encoders = (
        CLIPTextModel.from_pretrained(folder / "text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
    )
    assert manifest["fingerprint"]["text"] == {
        "text_encoder": weights_hash(encoders[0]),
        "text_encoder_2": weights_hash(encoders[1]),
    }
    # Not bitwise: the pooled projection (B, D) @ (D, P) of a batch of captions and of one caption at a time (the
    # cache) differ in the last bits on CPU. A cache that lost the crops would move add_embedding by ~lr = 1e-3.
    uncached = unet_weights(uncached_run["final"])
    for name, value in unet_weights(cached).items():
        torch.testing.assert_close(value, uncached[name], atol=1e-5, rtol=0, msg=name)

    # the cached run in two parts: 1 step, then --resume latest to 2
    train(config(tiny_sdxl_dir, sizes_dir, tmp_path / "parts", cache=True, max_train_steps=1))
    resumed = train(config(tiny_sdxl_dir, sizes_dir, tmp_path / "parts", cache=True, resume="latest"))
    assert_same_weights(unet_weights(cached), unet_weights(resumed))


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_unet_and_text_encoder_lora_load_in_stock_sdxl_in_both_formats_and_resume_exactly(
    tiny_sdxl_dir, sizes_dir, tmp_path
):
    """LoRA on the U-Net and both text encoders: diffusers' file and the kohya file, each loaded by stock
    ``load_lora_weights``, give the same image (two independent writers of one set of weights), which the LoRA
    changes; the text encoders' LoRA is in both files; a run stopped after one step resumes to the same weights."""
    lora = dict(lora_rank=4, lora_alpha=8, learning_rate=1e-2, train_text_encoder=True)
    final = train(config(tiny_sdxl_dir, sizes_dir, tmp_path / "whole", **lora))
    assert final.name == "lora"
    tensors = lora_tensors(final)
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(key.startswith(prefix) for key in tensors), prefix
    kohya = load_file(final / "kohya_lora.safetensors")
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(key.startswith(prefix) for key in kohya), prefix

    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "np"}
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    plain = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    base_embeds = stock.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    stock.load_lora_weights(final)
    with_lora = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(with_lora - plain).max() > 1e-4
    assert (stock.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0] - base_embeds).abs().max() > 1e-4
    from_kohya = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    from_kohya.load_lora_weights(final, weight_name="kohya_lora.safetensors")
    assert np.abs(from_kohya(generator=torch.Generator().manual_seed(0), **kwargs).images - with_lora).max() < 1e-4
    ours = LatentDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ours.load_lora_weights(final)
    assert np.abs(ours(generator=torch.Generator().manual_seed(0), **kwargs).images - with_lora).max() < 1e-4

    train(config(tiny_sdxl_dir, sizes_dir, tmp_path / "parts", max_train_steps=1, **lora))
    resumed = train(config(tiny_sdxl_dir, sizes_dir, tmp_path / "parts", resume="latest", **lora))
    assert_same_weights(tensors, lora_tensors(resumed))


def test_training_one_sdxl_text_encoder_changes_it_alone(tiny_sdxl_dir, sizes_dir, tmp_path):
    """``--train-text-encoder --trained-text-encoders text_encoder_2``: the saved second encoder is trained, the
    first is bit-identical to the model's, and stock loads the folder."""
    final = train(
        config(
            tiny_sdxl_dir,
            sizes_dir,
            tmp_path,
            train_text_encoder=True,
            trained_text_encoders=["text_encoder_2"],
            mixed_precision="bf16",
        )
    )
    stock = StableDiffusionXLPipeline.from_pretrained(final)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert_same_weights(base.text_encoder.state_dict(), stock.text_encoder.state_dict())
    assert stock.text_encoder_2.dtype == torch.float32
    changed = [
        name
        for name, value in stock.text_encoder_2.state_dict().items()
        if not torch.equal(value, base.text_encoder_2.state_dict()[name])
    ]
    assert any("self_attn" in name for name in changed)


def test_an_unknown_trained_text_encoder_is_refused_with_the_choices(tiny_sdxl_dir, sizes_dir, tmp_path, capsys):
    args = ["--pretrained-model", tiny_sdxl_dir, "--dataset", sizes_dir, "--output-dir", str(tmp_path)]
    flags = ["--train-text-encoder", "--trained-text-encoders", "text_encoder_3", "--report-to", "none"]
    code = main([*args, "--resolution", "64", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "error: --trained-text-encoders: ['text_encoder_3'] are not text encoders of this model; choose from "
        "['text_encoder', 'text_encoder_2']"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_train_from_the_tiny_sdxl_preset(tiny_sdxl_dir, sizes_dir, tmp_path):
    """From scratch: a tiny-sdxl U-Net, with the VAE and both text encoders from an SDXL folder (kept frozen)."""
    settings = dict(pretrained_model=None, preset="tiny-sdxl", vae=tiny_sdxl_dir, text_encoder=tiny_sdxl_dir)
    final = train(config(None, sizes_dir, tmp_path, max_train_steps=1, **settings))
    stock = StableDiffusionXLPipeline.from_pretrained(final)
    assert stock.text_encoder_2.config.hidden_size == 48 and stock.unet.config.addition_embed_type == "text_time"
    image = stock(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all()


def test_conditioning_is_stock_sdxls_prompt_encoding_and_time_ids(tiny_sdxl_dir):
    """The trainer's SDXL conditioning of a batch against stock ``encode_prompt`` and ``_get_add_time_ids``."""
    models = load_training_models(
        pretrained_model=tiny_sdxl_dir,
    )
    conditioning = text_conditioning(models, learning_rate=1e-3, device="cpu", dtype=torch.float32)
    sizes = {
        "original_size": torch.tensor([[128, 64], [1024, 768]]),
        "crop_top_left": torch.tensor([[32, 0], [0, 301]]),
        "target_size": torch.tensor([[64, 64], [1024, 1024]]),
    }
    captions = ["a red square on the left", ""]
    ours = conditioning(sizes, captions)

    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    embeds, _, pooled, _ = stock.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.encoder_hidden_states, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.added_cond_kwargs["text_embeds"], pooled, atol=1e-6, rtol=0)
    rows = [
        stock._get_add_time_ids(
            *(tuple(sizes[key][i].tolist()) for key in ("original_size", "crop_top_left", "target_size")),
            dtype=torch.float32,
            text_encoder_projection_dim=pooled.shape[-1],
        )
        for i in range(2)
    ]
    assert torch.equal(ours.added_cond_kwargs["time_ids"], torch.cat(rows))
    # mixed precision casts the embeddings, never the pixel sizes (bfloat16 rounds 301 to 300)
    half = ours.to("cpu", torch.bfloat16)
    assert half.encoder_hidden_states.dtype == half.added_cond_kwargs["text_embeds"].dtype == torch.bfloat16
    assert torch.equal(half.added_cond_kwargs["time_ids"], torch.cat(rows))


@pytest.mark.slow
def test_two_process_cached_run_and_its_exact_resume(tiny_sdxl_dir, sizes_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) with the cache (built once by the main process): a resumed run ends
    with the same weights as an uninterrupted one."""
    settings = "--resolution 64 --train-batch-size 1 --max-train-steps 4 --checkpointing-steps 2 --report-to none"
    args = ["--pretrained-model", tiny_sdxl_dir, "--dataset", sizes_dir, "--cache", *settings.split(), "--output-dir"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def launch(out: Path, *extra: str) -> None:
        command = [*launcher, "-m", "training.train_text_to_image", *args, str(out), *extra]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(tmp_path / "straight")
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000002", resumed / "step-000002")
    launch(tmp_path / "resumed", "--resume", "latest")
    assert_same_weights(
        unet_weights(tmp_path / "straight" / "pipeline"), unet_weights(tmp_path / "resumed" / "pipeline")
    )
