"""Fine-tune (or train from scratch) a text-to-image latent diffusion U-Net on an image-caption dataset.

    python -m training.train_text_to_image --pretrained-model DIR --dataset DATA --output-dir runs/x
    torchrun --nproc_per_node 2 -m training.train_text_to_image --config run.yaml      # or `accelerate launch`

Reads top to bottom: set-up, data, models, optimizer, the loop (loss, update, EMA, logs, checkpoints, validation),
the final model. Work is never lost: checkpoints are written atomically, ``--resume latest`` continues exactly where
a run stopped (same weights, optimizer, EMA, RNG and next batch), Ctrl-C / SIGTERM write a checkpoint before
exiting, and a NaN loss skips the step instead of poisoning the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from ldm.diffusion import diffusion_loss, loss_weights, q_sample, snr, training_target
from ldm.text import encode_prompts
from pipelines import LatentDiffusionPipeline
from pipelines.generation_defaults import GenerationDefaults
from pipelines.grid import sample_grid
from pipelines.publish import PublishConfig, PublishError, check_repo_id, publish
from training.cache import CachedLatentDataset, build_cache, cache_fingerprint, cache_is_current, collate_cached
from training.checkpoint import resolve_resume
from training.command import (
    LoopConfig,
    MetricsFile,
    evaluation_batches,
    load_records,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    run_command,
)
from training.config import ConfigError, help_field, to_dict
from training.data import ImageCaptionDataset, collate
from training.loop import TrainLoop
from training.models import LoraState, add_lora, load_training_models, reload_frozen, save_lora
from training.objective import ObjectiveConfig, diffusion_training_loss, drop_captions
from training.validation import write_model_card

logger = logging.getLogger("training")


@dataclass
class TrainConfig(LoopConfig):
    """Every setting of a run; each is a flag (``--learning-rate``) and a config-file key (``learning_rate``)."""

    # what to start from
    pretrained_model: str | None = help_field(None, "pipeline folder or Hub id to fine-tune")
    preset: str | None = help_field(None, "ldm preset of a U-Net to train from scratch (needs --vae, --text-encoder)")
    vae: str | None = help_field(None, "folder or Hub id of the (frozen) VAE; default: the pretrained model's")
    text_encoder: str | None = help_field(None, "folder with text_encoder/ and tokenizer/; default: the model's")
    # data
    resolution: int = help_field(512, "training image side (or bucket area side with --bucketing)")
    crop: Literal["center", "random"] = help_field("center", "crop after resizing the shorter side")
    flip: bool = help_field(False, "random horizontal flips (off: they break captions such as 'on the left')")
    bucketing: bool = help_field(False, "aspect-ratio buckets for images of mixed sizes")
    cache: bool = help_field(False, "encode images and captions once with the frozen VAE and text encoder")
    cache_dir: str | None = help_field(None, "where the cache goes (default: OUTPUT_DIR/cache)")
    # objective
    prediction_type: Literal["epsilon", "v_prediction"] | None = help_field(None, "default: the model's")
    snr_gamma: float | None = help_field(None, "min-SNR-gamma loss weighting (5 is usual); default: L_simple")
    noise_offset: float = help_field(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images)")
    caption_dropout: float = help_field(0.1, "probability of the empty caption, for classifier-free guidance")
    zero_terminal_snr: bool = help_field(False, "rescale betas to zero terminal SNR (needs v_prediction)")
    # what is trained
    learning_rate: float = help_field(1e-5, "peak learning rate")
    ema_decay: float | None = help_field(None, "keep an EMA of the U-Net with this decay (0.9999 is usual)")
    lora_rank: int | None = help_field(None, "train LoRA layers of this rank instead of the whole U-Net")
    lora_alpha: float | None = help_field(None, "LoRA alpha (default: the rank)")
    train_text_encoder: bool = help_field(
        False, "train the whole text encoder with the U-Net (with --cache, only the latents are read from the cache)"
    )
    text_encoder_lr: float | None = help_field(None, "peak learning rate of the text encoder (default: the U-Net's)")
    text_encoder_init: Literal["pretrained", "random"] = help_field(
        "pretrained",
        "the given text encoder's weights, or a fresh seeded initialisation of its architecture (its tokenizer is "
        "kept), trained with --train-text-encoder or else frozen: a fixed random encoding that keeps every word apart",
    )
    output_dir: str = help_field("runs/text-to-image", "where checkpoints, samples, logs and the model go")
    # validation: a sample grid, and the denoising loss on held-out images when there are any
    validation_prompts: list[str] = help_field([], "prompts of the sample grid")
    validation_seed: int = help_field(0, "seed of the validation images")
    validation_inference_steps: int = help_field(25, "sampling steps of validation images")
    validation_guidance_scale: float = help_field(7.5, "guidance scale of validation images")
    # publishing the final model (python -m pipelines.publish); the token comes from HF_TOKEN or `hf auth login`
    push_to_hub: bool = help_field(False, "upload the final pipeline to the Hub at the end of training")
    hub_model_id: str | None = help_field(None, "Hub repository of --push-to-hub, e.g. user/my-model")
    hub_private: bool = help_field(False, "create the --hub-model-id repository private")

    def validate(self) -> None:
        """Cross-field checks, each naming the fix."""
        super().validate()
        if (self.pretrained_model is None) == (self.preset is None):
            raise ConfigError("pass exactly one of --pretrained-model (fine-tune) and --preset (from scratch)")
        if self.preset is not None and (self.vae is None or self.text_encoder is None):
            raise ConfigError("--preset needs --vae and --text-encoder (training from scratch keeps them frozen)")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE downsamples by 8); got {self.resolution}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1); got {self.caption_dropout}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1); got {self.ema_decay}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1; got {self.lora_rank}")
        if self.lora_rank is not None and self.ema_decay is not None:
            raise ConfigError("ema_decay is for full fine-tuning; drop it with --lora-rank")
        if self.text_encoder_lr is not None and not (self.train_text_encoder and self.text_encoder_lr > 0):
            raise ConfigError(
                f"text_encoder_lr must be > 0 and needs --train-text-encoder; got {self.text_encoder_lr}"
            )
        if self.train_text_encoder and self.lora_rank is not None:
            raise ConfigError("train_text_encoder trains the full text encoder; drop it with --lora-rank")
        if self.cache and (self.crop != "center" or self.flip):
            raise ConfigError("cache needs the same pixels every epoch: use --crop center without --flip")
        if self.push_to_hub:
            if self.hub_model_id is None or self.lora_rank is not None:
                raise ConfigError("push_to_hub needs --hub-model-id and a full pipeline (not --lora-rank)")
            try:
                check_repo_id(self.hub_model_id)
            except PublishError as err:
                raise ConfigError(f"hub_model_id: {err}") from None


def train(config: TrainConfig) -> Path:
    """Run (or resume) the training described by ``config``; returns the folder of the final model (or the
    checkpoints folder when a stop signal ended the run early)."""
    # ---------------------------------------------------------------------------------------------------- set-up
    config.validate()
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config, "text-to-image")
    # One generator per process for every random draw of the loop; its state is part of each checkpoint.
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = resolve_resume(checkpoints_dir, config.resume)

    # ------------------------------------------------------------------------------------------------------ data
    records, held_out_records = load_records(config)
    dataset = ImageCaptionDataset(records, resolution=config.resolution, crop=config.crop, flip=config.flip,
                                  bucketing=config.bucketing, seed=config.seed)  # fmt: skip
    held_out = held_out_records and ImageCaptionDataset(held_out_records, resolution=config.resolution)

    # ---------------------------------------------------------------------------------------------------- models
    models = load_training_models(
        pretrained_model=config.pretrained_model, preset=config.preset, vae=config.vae,
        text_encoder=config.text_encoder, prediction_type=config.prediction_type,
        zero_terminal_snr=config.zero_terminal_snr,
    )  # fmt: skip
    if config.text_encoder_init == "random":
        with torch.random.fork_rng(devices=[]):  # the same fresh weights on every process, for a given seed
            torch.manual_seed(config.seed)
            models = dataclasses.replace(models, text_encoder=type(models.text_encoder)(models.text_encoder.config))
    vae, text_encoder, tokenizer, unet = models.vae, models.text_encoder, models.tokenizer, models.unet
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    # A text encoder made here (not loaded) stays in full precision: the saved pipeline cannot reload it.
    reloadable = config.text_encoder_init == "pretrained" and not config.train_text_encoder
    for frozen in (vae, text_encoder) if reloadable else (vae,):
        frozen.requires_grad_(False).eval().to(accelerator.device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    if config.train_text_encoder:  # full precision weights, like the U-Net's; autocast runs them in mixed precision
        text_encoder.requires_grad_(True).train()
    elif not reloadable:  # a fresh frozen encoder: a fixed random encoding of the captions
        text_encoder.requires_grad_(False).eval().to(accelerator.device)
    if config.lora_rank is not None:
        add_lora(unet, config.lora_rank, config.lora_alpha)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    objective = ObjectiveConfig(prediction_type=models.noise_scheduler.config.prediction_type,
                                snr_gamma=config.snr_gamma, noise_offset=config.noise_offset,
                                caption_dropout=config.caption_dropout)  # fmt: skip
    alphas_cumprod = models.noise_scheduler.alphas_cumprod
    _warn_if_min_snr_ignores_the_last_steps(objective, alphas_cumprod)

    # The data as the loop reads it: images (encoded every step) or the encoders' cached outputs.
    if config.cache:
        # The main process encodes the dataset once; the others wait, then read the same cache.
        cache_dir = Path(config.cache_dir) if config.cache_dir else output_dir / "cache"
        with accelerator.main_process_first():
            if not cache_is_current(cache_dir, cache_fingerprint(dataset, vae, text_encoder)):
                build_cache(dataset, vae, text_encoder, tokenizer, cache_dir, batch_size=config.train_batch_size)
        dataset = CachedLatentDataset(dataset, cache_dir)
    dataloader, batch_sampler = make_train_dataloader(dataset, config, accelerator,
                                                      collate_cached if config.cache else collate)  # fmt: skip

    # ------------------------------------------------------------------------------------------------- optimizer
    ema = None
    if config.ema_decay is not None:
        ema = EMAModel(unet.parameters(), decay=config.ema_decay, model_cls=type(unet), model_config=unet.config)
    trained = [unet, text_encoder] if config.train_text_encoder else [unet]  # the models the optimizer updates
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad]}]
    if config.train_text_encoder:
        param_groups.append({"params": list(text_encoder.parameters()),
                             "lr": config.text_encoder_lr or config.learning_rate})  # fmt: skip
    params = [p for group in param_groups for p in group["params"]]
    optimizer = make_optimizer(param_groups, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, accelerator)
    *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    # text_runner is what encodes the captions: the prepared (maybe DDP-wrapped) encoder when it is trained
    unet, text_runner = trained if config.train_text_encoder else (trained[0], text_encoder)
    base_unet = accelerator.unwrap_model(unet)
    if config.train_text_encoder:
        text_encoder = accelerator.unwrap_model(text_runner)
        models = dataclasses.replace(models, text_encoder=text_encoder)  # the grids and the saved pipeline use it
    if config.cache and not config.train_text_encoder:
        embed = dataset.embeddings
    else:
        embed = partial(encode_prompts, text_runner, tokenizer, device=accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
    # Everything a checkpoint holds. A LoRA run saves only the adapter weights.
    stateful = {"unet": LoraState(base_unet) if config.lora_rank else base_unet, "optimizer": optimizer,
                "lr_scheduler": lr_scheduler} | ({"ema": ema} if ema is not None else {})  # fmt: skip
    if config.train_text_encoder:
        stateful["text_encoder"] = text_encoder
    loop = TrainLoop(accelerator, dataloader, config, checkpoints_dir=checkpoints_dir, stateful=stateful,
                     generators={"train": generator}, epoch_setters=(batch_sampler, dataset))  # fmt: skip
    resumed = loop.resume(resume_from) is not None
    if ema is not None:
        ema.to(accelerator.device)
    metrics = MetricsFile(output_dir / "metrics.json", resumed_step=loop.step if resumed else None)

    def validate() -> None:
        if not accelerator.is_main_process:
            return
        text_encoder.eval()
        try:
            if held_out is not None:
                value = held_out_loss(base_unet, vae, text_encoder, tokenizer, held_out, alphas_cumprod,
                                      objective, batch_size=config.train_batch_size,
                                      limit=config.max_validation_images)  # fmt: skip
                metrics.add(loop.step, {"held_out_loss": value})
                accelerator.log({"held_out_loss": value}, step=loop.step)
            if config.validation_prompts:
                _sample_grid(accelerator, base_unet, ema, models, config, loop.step, output_dir)
        finally:
            text_encoder.train(config.train_text_encoder)

    # ------------------------------------------------------------------------------------------------- the loop
    logger.info("%s; %d batches an epoch, %d steps", dataset.summary(), len(dataloader), config.max_train_steps)
    with loop:
        for batch in loop.batches():
            with accelerator.accumulate(*trained):
                loss = _batch_loss(batch, unet, vae, embed, alphas_cumprod, objective, generator, weight_dtype)
                grad_norm = loop.backward_and_step(loss, optimizer, lr_scheduler, params)
            if not accelerator.sync_gradients:
                continue
            logs = {"lr": lr_scheduler.get_last_lr()[0]} | ({} if grad_norm is None else {"grad_norm": grad_norm})
            if loop.end_step(logs) and ema is not None:
                ema.step(base_unet.parameters())
            loop.checkpoint_if_due()
            if loop.due(config.validation_steps):
                validate()
    if accelerator.is_main_process:
        metrics.update(**loop.summary(), cache=config.cache, processes=accelerator.num_processes,
                       config=to_dict(config))  # fmt: skip
    if loop.stopped_early:
        accelerator.end_training()
        return checkpoints_dir

    # ------------------------------------------------------------------------------------------- the final model
    final_dir = output_dir / ("lora" if config.lora_rank else "pipeline")
    if accelerator.is_main_process:
        final_dir.mkdir(parents=True, exist_ok=True)
        if config.lora_rank:
            save_lora(base_unet, final_dir)
        else:
            if ema is not None:
                base_unet.save_pretrained(output_dir / "unet-raw")  # the non-EMA weights, for further training
                ema.copy_to(base_unet.parameters())
            if weight_dtype != torch.float32:  # save the frozen parts as they were, not their half-precision copies
                models = reload_frozen(models, text_encoder=reloadable)
            pipe = _pipeline(base_unet, models)
            # The settings its validation grids were sampled at become the model's defaults (a recipe that finds
            # better ones, say by a guidance sweep, overwrites generation_defaults.json).
            pipe.generation_defaults = GenerationDefaults(config.validation_inference_steps,
                                                          config.validation_guidance_scale)  # fmt: skip
            pipe.save_pretrained(final_dir)
        grid_name = None
        if config.validation_prompts:
            grid_name = "samples.png"
            shutil.copyfile(output_dir / "samples" / f"step-{loop.step:06d}.png", final_dir / grid_name)
        loop.save_loss_curve(final_dir / "loss.png")
        write_model_card(final_dir, base_model=config.pretrained_model or "", data=dataset.summary_dict(),
                         config=to_dict(config), steps=loop.step, sample_grid_file=grid_name,
                         lora=config.lora_rank is not None)  # fmt: skip
        if config.push_to_hub:
            _push_to_hub(final_dir, config)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


@torch.no_grad()
def held_out_loss(unet, vae, text_encoder, tokenizer, dataset, alphas_cumprod, objective, *, batch_size: int,
                  limit: int) -> float:  # fmt: skip
    """The denoising loss on held-out images at fixed timesteps (10 %, 40 %, 70 % of T) and fixed noise: a
    comparable number across steps and runs (training losses are noisy because t is random)."""
    generator = torch.Generator().manual_seed(0)
    device, dtype = vae.device, vae.dtype
    num_timesteps = alphas_cumprod.shape[0]
    was_training = unet.training
    unet.eval()
    losses = []
    for batch in evaluation_batches(dataset, batch_size, limit):
        latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.mean.float()
        latents = latents * vae.config.scaling_factor
        embeds = encode_prompts(text_encoder, tokenizer, batch["captions"], device=device).to(latents.dtype)
        for fraction in (0.1, 0.4, 0.7):
            t = torch.full((latents.shape[0],), int(fraction * num_timesteps), device=device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            noisy = q_sample(latents, t, noise, alphas_cumprod.to(device))
            pred = unet(noisy, t, encoder_hidden_states=embeds).sample
            target = training_target(latents, noise, t, alphas_cumprod.to(device), objective.prediction_type)
            losses.append(diffusion_loss(pred, target).mean().item())
    unet.train(was_training)
    return float(sum(losses) / max(len(losses), 1))


def _warn_if_min_snr_ignores_the_last_steps(objective: ObjectiveConfig, alphas_cumprod: torch.Tensor) -> None:
    """min-SNR-gamma on v-prediction weighs a timestep by min(SNR, gamma) / (SNR + 1): about SNR near the end of the
    chain. Those steps are where only the prompt can say where things go; a model trained from scratch with zero
    terminal SNR then hardly learns them. Logged, not refused (fine-tuning a model that knows layouts is fine)."""
    if objective.snr_gamma is None or objective.prediction_type != "v_prediction":
        return
    last = float(loss_weights(snr(alphas_cumprod, len(alphas_cumprod) - 1).reshape(1), "v_prediction",
                              objective.snr_gamma)[0])  # fmt: skip
    if last < 0.01:
        logger.warning(
            "snr_gamma %g with v-prediction gives the last timestep a loss weight of %.2g: the noisiest steps, where "
            "the layout comes from the prompt alone, are hardly trained; drop --snr-gamma when training from scratch",
            objective.snr_gamma, last,
        )  # fmt: skip


def _batch_loss(batch, unet, vae, embed, alphas_cumprod, objective, generator, weight_dtype) -> torch.Tensor:
    """Latents from the frozen VAE (or the cache), text embeddings (with gradients when the text encoder is
    trained), then the diffusion loss of the U-Net."""
    with torch.no_grad():
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            pixels = batch["pixel_values"].to(vae.device, dtype=weight_dtype)
            posterior = vae.encode(pixels).latent_dist
            mean, std = posterior.mean, posterior.std
        noise = torch.randn(mean.shape, generator=generator)
        latents = (mean.float() + std.float() * noise.to(mean.device)) * vae.config.scaling_factor
    embeds = embed(drop_captions(batch["captions"], objective.caption_dropout, generator))
    embeds = embeds.to(latents.device, weight_dtype)
    return diffusion_training_loss(unet, latents, embeds, alphas_cumprod, objective, generator)


def _pipeline(unet, models) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=unet, scheduler=models.sampler)  # fmt: skip


def _push_to_hub(final_dir: Path, config: TrainConfig) -> None:
    """Publish the final pipeline; a failed upload is logged with the command to retry it (the model is saved)."""
    publish_config = PublishConfig(model=str(final_dir), repo_id=config.hub_model_id, private=config.hub_private,
                                   sample_steps=config.validation_inference_steps)  # fmt: skip
    try:
        logger.info("pushed to the Hub: %s", publish(publish_config))
    except PublishError as err:
        logger.error("%s; the model is saved: retry with python -m pipelines.publish --model %s --repo-id %s",
                     err, final_dir, config.hub_model_id)  # fmt: skip


def _sample_grid(accelerator, unet, ema, models, config, step, output_dir) -> None:
    """Sample the validation grid (with the EMA weights when there are any) and save it as a PNG."""
    if not accelerator.is_main_process:
        return
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    unet.eval()
    try:
        pipe = _pipeline(unet, models)
        with accelerator.autocast():
            grid = sample_grid(pipe, config.validation_prompts, seed=config.validation_seed,
                               num_inference_steps=config.validation_inference_steps,
                               guidance_scale=config.validation_guidance_scale)  # fmt: skip
    finally:
        unet.train()
        if ema is not None:
            ema.restore(unet.parameters())
    path = output_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.array(grid), step, dataformats="HWC")
    logger.info("validation samples: %s", path)


def main(argv: list[str] | None = None) -> int:
    """The command line: train as the flags (and/or ``--config FILE``) say; print the final model's folder."""
    return run_command(TrainConfig, train, argv, prog="python -m training.train_text_to_image",
                       description=__doc__.split("\n\n")[0])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
