"""End-to-end text-to-image training on tiny models: learning, exact resume, crash safety, LoRA, EMA, stock loading."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from pipelines import LatentDiffusionPipeline
from pipelines.generation_defaults import GenerationDefaults
from training.checkpoint_folders import latest_checkpoint, read_manifest
from training.config import ConfigError
from training.train_text_to_image import TrainConfig, main, train

REPO = Path(__file__).resolve().parents[2]


def config(tiny_sd_dir: str, shapes_dir: str, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        pretrained_model=tiny_sd_dir,
        dataset=shapes_dir,
        output_dir=str(out),
        resolution=64,
        train_batch_size=4,
        max_train_steps=6,
        checkpointing_steps=3,
        learning_rate=1e-3,
        lr_warmup_steps=2,
        caption_dropout=0.25,
        report_to="none",
        log_steps=1,
    )
    settings.update(overrides)
    result = TrainConfig(**settings)
    result.validate()
    return result


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def fixed_loss(unet: UNet2DConditionModel, pipe: LatentDiffusionPipeline, shapes_dir: str) -> float:
    """The eps-prediction loss on all 8 training images at fixed timesteps and noise (an evaluation, not training)."""
    from training.data import ImageCaptionDataset, collate
    from training.records import load_image_caption_records

    dataset = ImageCaptionDataset(load_image_caption_records(shapes_dir), resolution=64)
    batch = collate([dataset[i] for i in range(len(dataset))])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _ = pipe.encode_prompt(batch["captions"], "cpu", 1, False)
        losses = []
        for t in (100, 400, 700):
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.full((latents.shape[0],), t)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


@pytest.mark.slow
def test_loss_falls_when_overfitting_eight_images(tiny_sd_dir, shapes_dir, tmp_path):
    final = train(
        config(
            tiny_sd_dir,
            shapes_dir,
            tmp_path,
            max_train_steps=80,
            checkpointing_steps=80,
            train_batch_size=8,
            caption_dropout=0.0,
            lr_warmup_steps=5,
        )
    )
    base = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    trained = LatentDiffusionPipeline.from_pretrained(final)
    before, after = fixed_loss(base.unet, base, shapes_dir), fixed_loss(trained.unet, base, shapes_dir)
    assert after < 0.5 * before, (before, after)
    assert (final / "loss.png").is_file() and (final / "README.md").is_file()


def test_resume_continues_exactly(tiny_sd_dir, shapes_dir, tmp_path):
    straight = train(config(tiny_sd_dir, shapes_dir, tmp_path / "straight"))
    # the same run in two parts: 3 steps, then --resume latest to 6
    train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", max_train_steps=3))
    resumed = train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", resume="latest"))
    assert_same_weights(unet_weights(straight), unet_weights(resumed))
    # the loss history (and so loss.png) covers the whole run, not only the part after the resume
    losses = [
        load_checkpoint_meta(run / "checkpoints" / "step-000006")["losses"]
        for run in (straight.parent, resumed.parent)
    ]
    assert [step for step, _ in losses[1]] == [1, 2, 3, 4, 5, 6] and losses[0] == losses[1]
    # the comparison is not vacuous: training changed the weights
    base = load_file(Path(tiny_sd_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(base["conv_in.weight"], unet_weights(straight)["conv_in.weight"])


def load_checkpoint_meta(folder: Path) -> dict:
    return read_manifest(folder)["meta"]


def text_encoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "text_encoder" / "model.safetensors")


def test_text_encoder_trained_with_the_unet_is_saved_and_resumes_exactly(tiny_sd_dir, shapes_dir, tmp_path):
    settings = dict(train_text_encoder=True, text_encoder_lr=5e-4, cache=True)
    straight = train(config(tiny_sd_dir, shapes_dir, tmp_path / "straight", **settings))
    train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", max_train_steps=3, **settings))
    checkpoint = latest_checkpoint(tmp_path / "parts" / "checkpoints")
    assert "text_encoder.safetensors" in {p.name for p in checkpoint.iterdir()}
    resumed = train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", resume="latest", **settings))
    assert_same_weights(text_encoder_weights(straight), text_encoder_weights(resumed))
    assert_same_weights(unet_weights(straight), unet_weights(resumed))
    # the saved text encoder is the trained one, not the one the run started from (whose cached embeddings the
    # loop must not have used)
    base = load_file(Path(tiny_sd_dir) / "text_encoder" / "model.safetensors")
    trained = text_encoder_weights(straight)
    assert base.keys() == trained.keys()
    assert [k for k in base if not torch.equal(base[k], trained[k])]
    frozen = train(config(tiny_sd_dir, shapes_dir, tmp_path / "frozen", cache=True))
    assert_same_weights(base, text_encoder_weights(frozen))


def test_text_encoder_from_a_fresh_initialisation(tiny_sd_dir, shapes_dir, tmp_path):
    from transformers import CLIPTextModel

    settings = dict(train_text_encoder=True, text_encoder_init="random", max_train_steps=2, learning_rate=1e-6)
    first = text_encoder_weights(train(config(tiny_sd_dir, shapes_dir, tmp_path / "a", **settings)))
    again = text_encoder_weights(train(config(tiny_sd_dir, shapes_dir, tmp_path / "b", **settings)))
    assert_same_weights(first, again)  # the fresh weights come from the run's seed
    # two steps at a tiny learning rate stay next to the fresh initialisation, far from the pretrained weights
    pretrained = load_file(Path(tiny_sd_dir) / "text_encoder" / "model.safetensors")
    fresh = CLIPTextModel(CLIPTextModel.config_class.from_pretrained(Path(tiny_sd_dir) / "text_encoder"))
    key = next(k for k in first if k.endswith("token_embedding.weight"))
    trained_table = first[key]
    fresh_std = dict(fresh.named_parameters())[key].std()
    assert torch.allclose(trained_table.std(), fresh_std, rtol=0.1)
    assert (trained_table - pretrained[key]).norm() > 0.5 * pretrained[key].norm()


def test_a_fresh_frozen_text_encoder_is_the_one_cached_and_saved(tiny_sd_dir, shapes_dir, tmp_path):
    """--text-encoder-init random without --train-text-encoder: a fixed random encoder, seeded, used for the cached
    caption embeddings and saved with the pipeline unchanged (also from a mixed-precision run, which cannot reload
    it from anywhere)."""
    from transformers import CLIPTextModel

    from training.cache import CachedLatentDataset
    from training.data import ImageCaptionDataset
    from training.records import load_image_caption_records

    out = train(
        config(
            tiny_sd_dir,
            shapes_dir,
            tmp_path / "run",
            text_encoder_init="random",
            cache=True,
            mixed_precision="bf16",
            max_train_steps=2,
        )
    )
    saved = text_encoder_weights(out)
    torch.manual_seed(0)  # the run's seed
    fresh = CLIPTextModel(CLIPTextModel.config_class.from_pretrained(Path(tiny_sd_dir) / "text_encoder"))
    assert_same_weights({k: v.float() for k, v in fresh.state_dict().items() if k in saved}, saved)
    assert all(v.dtype == torch.float32 for v in saved.values())
    pretrained = load_file(Path(tiny_sd_dir) / "text_encoder" / "model.safetensors")
    key = next(k for k in saved if k.endswith("token_embedding.weight"))
    assert not torch.allclose(saved[key], pretrained[key])
    # the cached embeddings are the fresh encoder's, as the saved pipeline computes them
    pipe = LatentDiffusionPipeline.from_pretrained(out)
    images = ImageCaptionDataset(load_image_caption_records(shapes_dir), resolution=64)
    cache = CachedLatentDataset(images, tmp_path / "run" / "cache")
    captions = [c for c in cache.captions if c][:2]
    expected, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    torch.testing.assert_close(cache.embeddings(captions), expected, atol=1e-5, rtol=1e-5)


def test_resume_latest_skips_a_checkpoint_broken_mid_write(tiny_sd_dir, shapes_dir, tmp_path):
    straight = train(config(tiny_sd_dir, shapes_dir, tmp_path / "straight", max_train_steps=9))
    run = tmp_path / "crashed"
    train(config(tiny_sd_dir, shapes_dir, run, max_train_steps=6))
    # a crash while writing step 6: a file cut short, and a temporary folder left behind
    weights = run / "checkpoints" / "step-000006" / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (run / "checkpoints" / ".tmp-step-000009-dead").mkdir()
    assert latest_checkpoint(run / "checkpoints").name == "step-000003"
    resumed = train(config(tiny_sd_dir, shapes_dir, run, max_train_steps=9, resume="latest"))
    assert_same_weights(unet_weights(straight), unet_weights(resumed))


def test_a_crash_during_the_final_save_leaves_no_final_folder_and_resume_finishes(
    tiny_sd_dir, shapes_dir, tmp_path, monkeypatch
):
    import training.train_text_to_image as trainer

    run = tmp_path / "run"

    def crash(folder, **kwargs):  # the weights are written, then the process dies
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "write_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_sd_dir, shapes_dir, run, max_train_steps=3))
    assert not (run / "pipeline").exists() and not (run / ".pipeline.partial").exists()
    monkeypatch.undo()
    final = train(config(tiny_sd_dir, shapes_dir, run, max_train_steps=3, resume="latest"))
    assert final == run / "pipeline" and (final / "README.md").is_file()
    assert (final / "loss.png").is_file()  # resumed at its final step: the history came from the checkpoint
    assert LatentDiffusionPipeline.from_pretrained(final).unet is not None


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(tiny_sd_dir, shapes_dir, tmp_path):
    settings = (
        "--resolution 64 --train-batch-size 4 --max-train-steps 400 --checkpointing-steps 1000 --learning-rate 1e-3"
    )
    args = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, *settings.split(), "--report-to", "none"]
    args.append("--output-dir")
    command = [sys.executable, "-m", "training.train_text_to_image", *args]
    run = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([*command, str(run)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    log = []
    for line in process.stderr:  # wait until training is under way, then interrupt
        log.append(line)
        if "steps:" in line and "/400" in line and " 0/400" not in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 0, "".join(log) + rest
    stopped = latest_checkpoint(run / "checkpoints")
    assert stopped is not None and 0 < int(stopped.name.split("-")[1]) < 400
    assert not (run / "pipeline").exists()

    # Resume to a step past the interruption and compare with a run that was never interrupted.
    target = int(stopped.name.split("-")[1]) + 3
    resumed = train(
        config(
            tiny_sd_dir,
            shapes_dir,
            run,
            max_train_steps=target,
            resume="latest",
            checkpointing_steps=1000,
            lr_warmup_steps=100,
            caption_dropout=0.1,
        )
    )
    straight = train(
        config(
            tiny_sd_dir,
            shapes_dir,
            tmp_path / "straight",
            max_train_steps=target,
            checkpointing_steps=1000,
            lr_warmup_steps=100,
            caption_dropout=0.1,
        )
    )
    assert_same_weights(unet_weights(straight), unet_weights(resumed))


def test_output_folder_loads_in_stock_diffusers_and_ours(tiny_sd_dir, shapes_dir, tmp_path):
    final = train(
        config(
            tiny_sd_dir,
            shapes_dir,
            tmp_path,
            max_train_steps=3,
            validation_prompts=["a red circle on the left"],
            validation_steps=3,
            validation_inference_steps=2,
        )
    )
    ours = LatentDiffusionPipeline.from_pretrained(final)
    stock = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    kwargs = {"prompt": "a red circle", "num_inference_steps": 3, "output_type": "np"}
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(a - b).max() < 1e-4
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and f"base_model: {tiny_sd_dir}" in card and "samples.png" in card
    assert (final / "samples.png").is_file() and (tmp_path / "samples" / "step-000003.png").is_file()
    # the settings the validation grids used are the model's defaults
    assert ours.generation_defaults == GenerationDefaults(num_inference_steps=2, guidance_scale=7.5)
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["validation_inference_steps"] == 2


def test_held_out_loss_is_the_fixed_noise_loss_of_the_held_out_images(tiny_sd_dir, shapes_dir, tmp_path):
    """The logged held-out loss, recomputed with stock diffusers on the saved pipeline: posterior-mean latents, the
    stock prompt encoding, noise from seed 0 added by DDPMScheduler at 10 %, 40 %, 70 % of T, the eps MSE."""
    from diffusers import DDPMScheduler

    from training.command import split_validation
    from training.data import ImageCaptionDataset, collate
    from training.records import load_image_caption_records

    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=2, validation_split=0.25))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [2]

    _, held_out = split_validation(load_image_caption_records(shapes_dir), 0.25, seed=0)
    images = ImageCaptionDataset(held_out, resolution=64)
    batch = collate([images[i] for i in range(len(images))])
    stock = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    noise_scheduler = DDPMScheduler.from_pretrained(final, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        latents = stock.vae.encode(batch["pixel_values"]).latent_dist.mean * stock.vae.config.scaling_factor
        embeds, _ = stock.encode_prompt(batch["captions"], "cpu", 1, False)
        for t in (100, 400, 700):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((latents.shape[0],), t)
            pred = stock.unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, embeds).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    assert history[0]["held_out_loss"] == pytest.approx(np.mean(losses), rel=1e-4)


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet-and-text-encoder"])
def test_lora_weights_load_in_stock_diffusers(tiny_sd_dir, shapes_dir, tmp_path, train_text_encoder):
    """diffusers' file and the kohya file, each loaded by stock ``load_lora_weights``, give the same image, which
    the LoRA changes; with ``--train-text-encoder`` the text encoder's LoRA is in both and changes the prompt's
    encoding."""
    settings = dict(max_train_steps=4, lora_rank=4, lora_alpha=2, learning_rate=1e-2)
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, train_text_encoder=train_text_encoder, **settings))
    assert final.name == "lora" and (final / "pytorch_lora_weights.safetensors").is_file()
    base_weights = load_file(Path(tiny_sd_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    checkpoint = load_file(latest_checkpoint(tmp_path / "checkpoints") / "unet.safetensors")
    assert all("lora" in k for k in checkpoint) and len(checkpoint) < len(base_weights)  # only the adapter

    kwargs = {"prompt": "a red circle", "num_inference_steps": 3, "output_type": "np"}
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    plain = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    stock.load_lora_weights(final)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    ours.load_lora_weights(final)
    with_lora = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(with_lora - plain).max() > 1e-4
    assert np.abs(ours(generator=torch.Generator().manual_seed(0), **kwargs).images - with_lora).max() < 1e-4
    from_kohya = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    from_kohya.load_lora_weights(final, weight_name="kohya_lora.safetensors")
    assert np.abs(from_kohya(generator=torch.Generator().manual_seed(0), **kwargs).images - with_lora).max() < 1e-4

    card = (final / "README.md").read_text()
    assert f'from_pretrained("{tiny_sd_dir}")' in card and 'load_lora_weights("path/to/this/folder")' in card
    kohya = load_file(final / "kohya_lora.safetensors")
    assert any(k.startswith("lora_te_") for k in kohya) == train_text_encoder
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    encoded = [p.encode_prompt("a red circle", "cpu", 1, False)[0] for p in (base, stock)]
    assert ((encoded[1] - encoded[0]).abs().max() > 1e-4) == train_text_encoder


def test_ema_weights_are_the_pipelines_unet(tiny_sd_dir, shapes_dir, tmp_path):
    final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=4, ema_decay=0.5))
    ema_unet = UNet2DConditionModel.from_pretrained(final / "unet")
    raw_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet-raw")
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    w_ema, w_raw, w_base = (m.conv_in.weight.detach() for m in (ema_unet, raw_unet, base))
    assert not torch.equal(w_ema, w_raw) and not torch.equal(w_ema, w_base)
    # an average of the trajectory lies between the start and the end, here for the first parameter
    assert (w_ema - w_base).norm() < (w_raw - w_base).norm()
    assert "ema.safetensors" in {p.name for p in latest_checkpoint(tmp_path / "checkpoints").iterdir()}


def test_train_from_a_preset_with_frozen_parts(frozen_parts_dir, shapes_dir, tmp_path):
    final = train(
        TrainConfig(
            preset="tiny",
            vae=frozen_parts_dir,
            text_encoder=frozen_parts_dir,
            dataset=shapes_dir,
            output_dir=str(tmp_path),
            resolution=64,
            train_batch_size=4,
            max_train_steps=2,
            report_to="none",
            prediction_type="v_prediction",
            zero_terminal_snr=True,
            snr_gamma=5.0,
            noise_offset=0.05,
        )
    )
    pipe = LatentDiffusionPipeline.from_pretrained(final)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR: x_T is pure noise
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_two_runs_from_a_preset_with_one_seed_are_bit_identical(frozen_parts_dir, shapes_dir, tmp_path):
    from training.models import load_training_models

    def run(name: str, seed: int) -> Path:
        settings = dict(preset="tiny", vae=frozen_parts_dir, text_encoder=frozen_parts_dir, dataset=shapes_dir)
        return train(
            TrainConfig(
                **settings,
                output_dir=str(tmp_path / name),
                resolution=64,
                max_train_steps=1,
                seed=seed,
                report_to="none",
                validation_prompts=[],
            )
        )

    first, second = run("a", seed=3), run("b", seed=3)
    assert_same_weights(unet_weights(first), unet_weights(second))
    # the new U-Net itself is drawn from the seed (so a restart before the first checkpoint starts alike), and
    # the caller's RNG is left alone
    state = torch.random.get_rng_state()
    build = dict(pretrained_model=None, preset="tiny", vae=frozen_parts_dir, text_encoder=frozen_parts_dir)
    built = [load_training_models(**build, prediction_type=None, zero_terminal_snr=False, seed=s) for s in (3, 4)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(built[0].unet.conv_in.weight, built[1].unet.conv_in.weight)


def test_min_snr_with_zero_terminal_snr_warns_that_the_last_steps_get_no_weight(
    tiny_sd_dir, shapes_dir, tmp_path, caplog
):
    settings = dict(max_train_steps=1, prediction_type="v_prediction", zero_terminal_snr=True)
    with caplog.at_level("WARNING", logger="training"):
        train(config(tiny_sd_dir, shapes_dir, tmp_path / "plain", **settings))
    assert "snr_gamma" not in caplog.text
    with caplog.at_level("WARNING", logger="training"):
        train(config(tiny_sd_dir, shapes_dir, tmp_path / "min-snr", snr_gamma=5.0, **settings))
    weight = re.search(r"gives the last timestep a loss weight of (\S+):", caplog.text)
    assert weight and float(weight.group(1)) < 1e-3


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_sd_dir, shapes_dir, tmp_path, monkeypatch, caplog):
    import training.train_text_to_image as script

    real_loss, calls = script.diffusion_training_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 or len(calls) >= 5 else loss

    monkeypatch.setattr(script, "diffusion_training_loss", sometimes_nan)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 7"):
        train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=20, checkpointing_steps=3, max_nan_steps=3))
    assert "step 2: non-finite loss; update skipped" in caplog.text
    # skipped steps leave the weights alone, so every checkpoint written is finite and the last one is kept
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000006"
    weights = load_file(latest_checkpoint(tmp_path / "checkpoints") / "unet.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": ""}, "dataset is required"),
        ({"preset": "tiny"}, "exactly one of"),
        ({"resolution": 60}, "multiple of 8"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"lora_conv_rank": 2}, "lora_conv_rank: settings of LoRA training; add --lora-rank"),
        ({"trained_text_encoders": ["text_encoder"]}, "trained_text_encoders says which text encoders"),
        ({"text_encoder_lr": 1e-4}, "needs --train-text-encoder"),
        ({"train_text_encoder": True, "text_encoder_lr": 0.0}, "text_encoder_lr must be > 0"),
    ],
)
def test_bad_configs_name_the_field(tiny_sd_dir, shapes_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tiny_sd_dir, shapes_dir, tmp_path, **overrides)


def cli_args(model: str, dataset: str, out: Path, *extra: str) -> list[str]:
    """The command line of a run of ``model`` on ``dataset`` into ``out``, without a tracker."""
    return ["--pretrained-model", model, "--dataset", dataset, "--output-dir", str(out), "--report-to", "none", *extra]


def reported_error(err: str) -> str:
    """The one ``error: ...`` line a command wrote to stderr, its last line (after the models' loading bars)."""
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def test_command_line_errors_are_one_line(tiny_sd_dir, shapes_dir, tmp_path, capsys):
    code = main(cli_args(tiny_sd_dir, str(tmp_path / "nothing-here"), tmp_path))
    assert code == 2 and "nothing-here is not an existing file or folder" in reported_error(capsys.readouterr().err)
    code = main(cli_args(tiny_sd_dir, shapes_dir, tmp_path, "--zero-terminal-snr"))
    assert code == 2 and "use --prediction-type v_prediction" in reported_error(capsys.readouterr().err)


def test_a_bad_config_field_is_one_line_with_status_2(tiny_sd_dir, shapes_dir, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("caption_dropout: 1.5\n")
    code = main(cli_args(tiny_sd_dir, shapes_dir, tmp_path, "--config", str(tmp_path / "run.yaml")))
    assert code == 2 and capsys.readouterr().err == "error: caption_dropout must be in [0, 1); got 1.5\n"
    code = main(cli_args(tiny_sd_dir, shapes_dir, tmp_path, "--lora-rank", "four"))
    assert code == 2 and capsys.readouterr().err == "error: lora_rank must be an int or null; got 'four'\n"


def test_a_library_error_inside_training_keeps_its_traceback(tiny_sd_dir, shapes_dir, tmp_path, monkeypatch):
    """Only user errors become one line: a ValueError from inside a library (a bug) propagates to the traceback."""
    import training.train_text_to_image as script

    def library_bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(script, "diffusion_training_loss", library_bug)
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        main(cli_args(tiny_sd_dir, shapes_dir, tmp_path, "--resolution", "64", "--max-train-steps", "1"))


def test_a_model_of_another_family_is_refused_up_front(shapes_dir, tmp_path, capsys):
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "x"]}
    (sdxl / "model_index.json").write_text(json.dumps(index))
    code = main(cli_args(str(sdxl), shapes_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --pretrained-model ") and err.count("\n") == 1
    assert "StableDiffusion3Pipeline" in err and "Stable Diffusion 1.x/2.x" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["frozen-text-encoder", "trained-text-encoder"])
def test_two_process_run_and_its_exact_resume(tiny_sd_dir, shapes_dir, tmp_path, train_text_encoder):
    """torchrun --nproc_per_node 2 (gloo on CPU): each process keeps its own RNG stream, and a resumed 2-process run
    ends with the same weights as an uninterrupted one; also with the text encoder trained (wrapped for DDP too)."""
    settings = "--resolution 64 --train-batch-size 2 --max-train-steps 4 --checkpointing-steps 2 --report-to none"
    args = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, *settings.split()]
    args += [*(["--train-text-encoder"] if train_text_encoder else []), "--output-dir"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, "-m", "training.train_text_to_image", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*command, str(out), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    straight = launch(tmp_path / "straight")
    assert straight.stdout.strip().splitlines() == [str(tmp_path / "straight" / "pipeline")]  # printed once
    rng = sorted(p.name for p in (tmp_path / "straight" / "checkpoints" / "step-000004" / "rng").iterdir())
    assert rng == ["rank-0.json", "rank-0.safetensors", "rank-1.json", "rank-1.safetensors"]

    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000002", resumed / "step-000002")
    launch(tmp_path / "resumed", "--resume", "latest")
    assert_same_weights(
        unet_weights(tmp_path / "straight" / "pipeline"), unet_weights(tmp_path / "resumed" / "pipeline")
    )
    if train_text_encoder:
        assert_same_weights(
            text_encoder_weights(tmp_path / "straight" / "pipeline"),
            text_encoder_weights(tmp_path / "resumed" / "pipeline"),
        )


def test_gradient_checkpointing_changes_memory_not_results(tiny_sd_dir, shapes_dir, tmp_path):
    plain = train(config(tiny_sd_dir, shapes_dir, tmp_path / "plain", max_train_steps=2))
    recomputed = train(
        config(tiny_sd_dir, shapes_dir, tmp_path / "gc", max_train_steps=2, gradient_checkpointing=True)
    )
    a, b = unet_weights(plain), unet_weights(recomputed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_resumes_exactly(tiny_sd_dir, shapes_dir, tmp_path):
    # 8 images in batches of 3 make 3 batches an epoch: steps do not divide epochs evenly
    settings = {"train_batch_size": 3, "gradient_accumulation_steps": 2, "checkpointing_steps": 2}
    straight = train(config(tiny_sd_dir, shapes_dir, tmp_path / "straight", max_train_steps=5, **settings))
    train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", max_train_steps=3, **settings))
    resumed = train(
        config(tiny_sd_dir, shapes_dir, tmp_path / "parts", max_train_steps=5, resume="latest", **settings)
    )
    assert_same_weights(unet_weights(straight), unet_weights(resumed))


def test_bf16_mixed_precision_saves_a_full_precision_model(tiny_sd_dir, shapes_dir, tmp_path):
    final = train(
        config(
            tiny_sd_dir,
            shapes_dir,
            tmp_path,
            max_train_steps=2,
            mixed_precision="bf16",
            validation_prompts=["a red circle"],
            validation_steps=2,
            validation_inference_steps=2,
        )
    )
    for part in ("unet", "vae"):
        weights = load_file(final / part / "diffusion_pytorch_model.safetensors")
        assert {w.dtype for w in weights.values()} == {torch.float32}
    # the frozen VAE is saved as it was loaded, not as its bf16 training copy
    original = load_file(Path(tiny_sd_dir) / "vae" / "diffusion_pytorch_model.safetensors")
    assert_same_weights(original, load_file(final / "vae" / "diffusion_pytorch_model.safetensors"))


def test_8bit_adam_runs_or_names_the_missing_package(tiny_sd_dir, shapes_dir, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install bitsandbytes"):
            train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=1, use_8bit_adam=True))
    else:
        final = train(config(tiny_sd_dir, shapes_dir, tmp_path, max_train_steps=2, use_8bit_adam=True))
        assert (final / "unet").is_dir()
