"""Fine-tune (or train from scratch) a text-to-image latent diffusion U-Net on an image-caption dataset.

    python -m training.train_text_to_image --pretrained-model DIR --dataset DATA --output-dir runs/x
    torchrun --nproc_per_node 2 -m training.train_text_to_image --config run.yaml      # or `accelerate launch`

Reads top to bottom: set-up, data, models, optimizer, the loop (loss, update, EMA, logs, checkpoints, validation),
the final model. Work is never lost: checkpoints are written atomically, ``--resume latest`` continues exactly where
a run stopped (same weights, optimizer, EMA, RNG and next batch), Ctrl-C / SIGTERM write a checkpoint before
exiting, and a NaN loss skips the step instead of poisoning the weights.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.text import encode_prompts
from pipelines import LatentDiffusionPipeline
from training.cache import CachedLatentDataset, build_cache, cache_fingerprint, cache_is_current, collate_cached
from training.checkpoint import StopSignal, load_checkpoint, resolve_resume, save_checkpoint
from training.config import ConfigError, help_field, parse_config, to_dict
from training.data import BucketBatchSampler, ImageCaptionDataset, collate, load_image_caption_records
from training.launch import make_accelerator
from training.models import LoraState, add_lora, load_training_models, reload_frozen, save_lora
from training.objective import ObjectiveConfig, diffusion_training_loss, drop_captions
from training.validation import loss_curve_png, sample_grid, write_model_card

logger = logging.getLogger("training")

LR_SCHEDULES = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class TrainConfig:
    """Every setting of a run; each is a flag (``--learning-rate``) and a config-file key (``learning_rate``)."""

    # what to start from
    pretrained_model: str | None = help_field(None, "pipeline folder or Hub id to fine-tune")
    preset: str | None = help_field(None, "ldm preset of a U-Net to train from scratch (needs --vae, --text-encoder)")
    vae: str | None = help_field(None, "folder or Hub id of the (frozen) VAE; default: the pretrained model's")
    text_encoder: str | None = help_field(None, "folder with text_encoder/ and tokenizer/; default: the model's")
    # data
    dataset: str = help_field(
        "", "image folder (metadata.jsonl or .txt captions), save_to_disk folder, parquet or Hub id"
    )
    image_column: str | None = help_field(None, "dataset column with the images (default: guessed)")
    caption_column: str | None = help_field(None, "dataset column with the captions (default: guessed)")
    resolution: int = help_field(512, "training image side (or bucket area side with --bucketing)")
    crop: Literal["center", "random"] = help_field("center", "crop after resizing the shorter side")
    flip: bool = help_field(False, "random horizontal flips (off: they break captions such as 'on the left')")
    bucketing: bool = help_field(False, "aspect-ratio buckets for images of mixed sizes")
    dataloader_workers: int = help_field(0, "data loading processes")
    cache: bool = help_field(False, "encode images and captions once with the frozen VAE and text encoder")
    cache_dir: str | None = help_field(None, "where the cache goes (default: OUTPUT_DIR/cache)")
    # objective
    prediction_type: Literal["epsilon", "v_prediction"] | None = help_field(None, "default: the model's")
    snr_gamma: float | None = help_field(None, "min-SNR-gamma loss weighting (5 is usual); default: L_simple")
    noise_offset: float = help_field(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images)")
    caption_dropout: float = help_field(0.1, "probability of the empty caption, for classifier-free guidance")
    zero_terminal_snr: bool = help_field(False, "rescale betas to zero terminal SNR (needs v_prediction)")
    # optimisation
    learning_rate: float = help_field(1e-5, "peak learning rate")
    lr_scheduler: LR_SCHEDULES = help_field("constant_with_warmup", "learning-rate schedule")
    lr_warmup_steps: int = help_field(100, "linear warm-up steps")
    adam_beta1: float = help_field(0.9, "AdamW beta1")
    adam_beta2: float = help_field(0.999, "AdamW beta2")
    adam_weight_decay: float = help_field(1e-2, "AdamW weight decay")
    adam_epsilon: float = help_field(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = help_field(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes)")
    max_grad_norm: float = help_field(1.0, "gradient clipping norm")
    train_batch_size: int = help_field(16, "images per process per step")
    gradient_accumulation_steps: int = help_field(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = help_field(False, "recompute activations in the backward pass (less memory)")
    mixed_precision: Literal["no", "fp16", "bf16"] = help_field("no", "autocast precision (fp16 needs CUDA)")
    max_train_steps: int = help_field(1000, "optimizer steps in all")
    seed: int = help_field(0, "seed of the data order, noise and initialisation")
    ema_decay: float | None = help_field(None, "keep an EMA of the U-Net with this decay (0.9999 is usual)")
    lora_rank: int | None = help_field(None, "train LoRA layers of this rank instead of the whole U-Net")
    lora_alpha: float | None = help_field(None, "LoRA alpha (default: the rank)")
    # checkpoints
    output_dir: str = help_field("runs/text-to-image", "where checkpoints, samples, logs and the model go")
    checkpointing_steps: int = help_field(500, "write a checkpoint every N steps")
    checkpoints_total_limit: int | None = help_field(None, "keep only the newest N checkpoints")
    resume: str | None = help_field(None, "'latest' or a checkpoint folder to continue from")
    max_nan_steps: int = help_field(5, "stop after this many non-finite losses in a row")
    # validation and logs
    validation_prompts: list[str] = help_field([], "prompts of the sample grid")
    validation_steps: int = help_field(500, "sample the validation prompts every N steps")
    validation_seed: int = help_field(0, "seed of the validation images")
    validation_inference_steps: int = help_field(25, "sampling steps of validation images")
    validation_guidance_scale: float = help_field(7.5, "guidance scale of validation images")
    log_steps: int = help_field(10, "log loss, lr, grad norm and step rate every N steps")
    report_to: Literal["tensorboard", "none"] = help_field("tensorboard", "experiment tracker")

    def validate(self) -> None:
        """Cross-field checks, each naming the fix."""
        if not self.dataset:
            raise ConfigError("dataset is required: an image folder, save_to_disk folder, parquet file or Hub id")
        if (self.pretrained_model is None) == (self.preset is None):
            raise ConfigError("pass exactly one of --pretrained-model (fine-tune) and --preset (from scratch)")
        if self.preset is not None and (self.vae is None or self.text_encoder is None):
            raise ConfigError("--preset needs --vae and --text-encoder (training from scratch keeps them frozen)")
        positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                    "checkpointing_steps", "validation_steps", "log_steps", "max_nan_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE downsamples by 8); got {self.resolution}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1); got {self.caption_dropout}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1); got {self.ema_decay}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1; got {self.lora_rank}")
        if self.lora_rank is not None and self.ema_decay is not None:
            raise ConfigError("ema_decay is for full fine-tuning; drop it with --lora-rank")
        if self.cache and (self.crop != "center" or self.flip):
            raise ConfigError("cache needs the same pixels every epoch: use --crop center without --flip")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit must be >= 1; got {self.checkpoints_total_limit}")


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked (an error names the fix when it is not installed)."""
    optimizer_cls = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes, or drop the flag") from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def train(config: TrainConfig) -> Path:
    """Run (or resume) the training described by ``config``; returns the folder of the final model."""
    # ---------------------------------------------------------------------------------------------------- set-up
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # One generator per process for every random draw of the loop; its state is part of each checkpoint.
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = resolve_resume(checkpoints_dir, config.resume)

    # ------------------------------------------------------------------------------------------------------ data
    records = load_image_caption_records(
        config.dataset, image_column=config.image_column, caption_column=config.caption_column
    )
    dataset = ImageCaptionDataset(records, resolution=config.resolution, crop=config.crop, flip=config.flip,
                                  bucketing=config.bucketing, seed=config.seed)  # fmt: skip

    # ---------------------------------------------------------------------------------------------------- models
    models = load_training_models(
        pretrained_model=config.pretrained_model, preset=config.preset, vae=config.vae,
        text_encoder=config.text_encoder, prediction_type=config.prediction_type,
        zero_terminal_snr=config.zero_terminal_snr,
    )  # fmt: skip
    vae, text_encoder, tokenizer, unet = models.vae, models.text_encoder, models.tokenizer, models.unet
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval().to(accelerator.device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    if config.lora_rank is not None:
        add_lora(unet, config.lora_rank, config.lora_alpha)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if config.cache:
        # The main process encodes the dataset once; the others wait, then read the same cache.
        cache_dir = Path(config.cache_dir) if config.cache_dir else output_dir / "cache"
        with accelerator.main_process_first():
            if not cache_is_current(cache_dir, cache_fingerprint(dataset, vae, text_encoder)):
                build_cache(dataset, vae, text_encoder, tokenizer, cache_dir, batch_size=config.train_batch_size)
        dataset = CachedLatentDataset(dataset, cache_dir)
        embed = dataset.embeddings
    else:
        embed = partial(encode_prompts, text_encoder, tokenizer, device=accelerator.device)
    # With several processes accelerate drops a group of batches whose last one is short: keep batches full.
    batch_sampler = BucketBatchSampler(dataset.bucket_of_index, config.train_batch_size, seed=config.seed,
                                       drop_last=accelerator.num_processes > 1)  # fmt: skip
    dataloader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=config.dataloader_workers,
                            collate_fn=collate_cached if config.cache else collate)  # fmt: skip

    ema = None
    if config.ema_decay is not None:
        ema = EMAModel(unet.parameters(), decay=config.ema_decay, model_cls=type(unet), model_config=unet.config)
    alphas_cumprod = models.noise_scheduler.alphas_cumprod
    objective = ObjectiveConfig(prediction_type=models.noise_scheduler.config.prediction_type,
                                snr_gamma=config.snr_gamma, noise_offset=config.noise_offset,
                                caption_dropout=config.caption_dropout)  # fmt: skip

    # ------------------------------------------------------------------------------------------------- optimizer
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    # Everything a checkpoint holds. A LoRA run saves only the adapter weights.
    base_unet = accelerator.unwrap_model(unet)
    stateful = {"unet": LoraState(base_unet) if config.lora_rank else base_unet, "optimizer": optimizer,
                "lr_scheduler": lr_scheduler} | ({"ema": ema} if ema is not None else {})  # fmt: skip
    generators = {"train": generator}
    global_step = 0
    if resume_from is not None:
        meta = load_checkpoint(resume_from, stateful, generators=generators, accelerator=accelerator)
        if ema is not None:
            ema.to(accelerator.device)
        global_step = int(meta["step"])
        logger.info("resumed from %s at step %d", resume_from, global_step)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("text-to-image", config={k: str(v) for k, v in to_dict(config).items()})

    # ------------------------------------------------------------------------------------------------- the loop
    batches_per_epoch = len(dataloader)
    micro_steps_done = global_step * config.gradient_accumulation_steps
    epoch, skip = divmod(micro_steps_done, batches_per_epoch)
    num_epochs = math.ceil(config.max_train_steps * config.gradient_accumulation_steps / batches_per_epoch)
    logger.info("%s; %d batches an epoch, %d epochs, %d steps", dataset.summary(), batches_per_epoch, num_epochs,
                config.max_train_steps)  # fmt: skip

    first_step, loop_started = global_step, time.perf_counter()
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_main_process)  # fmt: skip
    losses: list[tuple[int, float]] = []
    nan_streak, skip_update = 0, False
    step_started, window_loss = time.perf_counter(), 0.0
    stopping = False  # a SIGINT/SIGTERM seen by any process, agreed on by all at the same step
    with StopSignal() as stop:
        while global_step < config.max_train_steps and not stopping:
            # accelerate's loader re-sets its sampler's epoch from its own counter when iterated: set all three.
            dataloader.set_epoch(epoch)
            batch_sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            skip = 0
            for batch in loader:
                with accelerator.accumulate(unet):
                    loss = _batch_loss(batch, unet, vae, embed, alphas_cumprod, objective, generator, weight_dtype)
                    finite = bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
                    if finite:
                        accelerator.backward(loss)
                        window_loss += loss.detach().item() / config.gradient_accumulation_steps
                    else:
                        skip_update = True
                    grad_norm = None
                    if accelerator.sync_gradients and not skip_update:
                        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    if not skip_update:
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue

                # ---------------------------------------------------------------- one optimizer step is done
                global_step += 1
                progress.update(1)
                if skip_update:
                    nan_streak += 1
                    logger.warning("step %d: non-finite loss; update skipped (%d in a row)", global_step, nan_streak)
                    if nan_streak >= config.max_nan_steps:
                        raise RuntimeError(
                            f"{nan_streak} non-finite losses in a row at step {global_step}; stopping. The last good "
                            f"checkpoint is in {checkpoints_dir}: resume from it with a lower --learning-rate, or "
                            "check the data"
                        )
                else:
                    nan_streak = 0
                    if ema is not None:
                        ema.step(base_unet.parameters())
                    losses.append((global_step, window_loss))
                skip_update, logged_loss, window_loss = False, window_loss, 0.0
                if global_step % config.log_steps == 0:
                    rate = config.log_steps / (time.perf_counter() - step_started)
                    step_started = time.perf_counter()
                    logs = {"loss": logged_loss, "lr": lr_scheduler.get_last_lr()[0], "steps_per_s": rate}
                    if grad_norm is not None:
                        logs["grad_norm"] = float(grad_norm)
                    accelerator.log(logs, step=global_step)
                    progress.set_postfix(loss=f"{logged_loss:.4f}", lr=f"{logs['lr']:.2e}")

                done = global_step >= config.max_train_steps
                stopping = stop.any_requested(accelerator)
                if global_step % config.checkpointing_steps == 0 or done or stopping:
                    meta = {"step": global_step, "config": to_dict(config)}
                    path = save_checkpoint(
                        checkpoints_dir, global_step, stateful, generators=generators, meta=meta,
                        accelerator=accelerator, total_limit=config.checkpoints_total_limit,
                    )  # fmt: skip
                    logger.info("checkpoint written: %s", path)
                if config.validation_prompts and (global_step % config.validation_steps == 0 or done):
                    _validate(accelerator, base_unet, ema, models, config, global_step, output_dir)
                if done or stopping:
                    break
            epoch += 1
    progress.close()
    _write_run_stats(output_dir, accelerator, first_step, global_step, time.perf_counter() - loop_started, config)
    if stopping and global_step < config.max_train_steps:
        logger.info("stopped by signal at step %d; resume with --resume latest", global_step)
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
                models = reload_frozen(models)
            _pipeline(base_unet, models).save_pretrained(final_dir)
        grid_name = None
        if config.validation_prompts:
            grid_name = "samples.png"
            shutil.copyfile(output_dir / "samples" / f"step-{global_step:06d}.png", final_dir / grid_name)
        if losses:
            loss_curve_png(*zip(*losses), final_dir / "loss.png")
        write_model_card(final_dir, base_model=config.pretrained_model or "", data=dataset.summary_dict(),
                         config=to_dict(config), steps=global_step, sample_grid_file=grid_name,
                         lora=config.lora_rank is not None)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def _batch_loss(batch, unet, vae, embed, alphas_cumprod, objective, generator, weight_dtype) -> torch.Tensor:
    """Latents from the frozen VAE (or the cache), text embeddings, then the diffusion loss of the U-Net."""
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


def _write_run_stats(output_dir, accelerator, first_step, last_step, seconds, config) -> None:
    """``run_stats.json``: the steps this invocation trained and its step rate (data + model, no set-up)."""
    if not accelerator.is_main_process:
        return
    steps = last_step - first_step
    images = steps * config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    stats = {
        "first_step": first_step,
        "last_step": last_step,
        "loop_seconds": round(seconds, 3),
        "steps_per_second": round(steps / seconds, 3) if steps else None,
        "images_per_second": round(images / seconds, 2) if steps else None,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "cache": config.cache,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "run_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _pipeline(unet, models) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=unet, scheduler=models.sampler)  # fmt: skip


def _validate(accelerator, unet, ema, models, config, step, output_dir) -> None:
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
    """Parse the config (flags and/or ``--config FILE``), train, and turn bad input into a one-line error."""
    config = parse_config(TrainConfig, argv, prog="python -m training.train_text_to_image",
                          description=__doc__.split("\n\n")[0])  # fmt: skip
    try:
        final = train(config)
        if PartialState().is_main_process:
            print(final)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
