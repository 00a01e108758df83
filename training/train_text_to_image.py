"""Fine-tune (or train from scratch) a text-to-image latent diffusion U-Net on an image-caption dataset.

    python -m training.train_text_to_image --pretrained-model DIR --dataset DATA --output-dir runs/x
    torchrun --nproc_per_node 2 -m training.train_text_to_image --config run.yaml      # or `accelerate launch`

Reads top to bottom: set-up, models, data, optimizer, the loop (loss, update, EMA, logs, checkpoints, validation),
the final model. What is trained and how captions become conditioning (frozen, cached or trained text encoder; the
whole U-Net or LoRA layers; EMA) is settled once, by :func:`training.methods.build_method`; the rest asks that
:class:`~training.methods.Method` and checks no mode itself. Work is never lost: checkpoints are written atomically,
``--resume latest`` continues exactly where a run stopped (same weights, optimizer, EMA, RNG and next batch), Ctrl-C /
SIGTERM write a checkpoint before exiting, and a NaN loss skips the step instead of poisoning the weights.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor

from common.files import atomic_folder
from ldm.diffusion import diffusion_loss, loss_weights, q_sample, snr, training_target
from pipelines import LatentDiffusionPipeline
from pipelines.generation_defaults import GenerationDefaults
from pipelines.grid import sample_grid as prompt_grid
from pipelines.publish import PublishConfig, PublishError, check_repo_id, publish
from training import launch
from training.cache import records_hash
from training.command import (
    LoopConfig,
    evaluation_batches,
    evaluation_mode,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    run_command,
    split_validation,
    start_run,
    step_logs,
)
from training.conditioning import Batch, Conditioning
from training.config import ConfigError, help_field, to_dict
from training.data import ImageCaptionDataset
from training.dreambooth import PriorPreservation, balance_prior, ensure_class_images, prior_subset
from training.grounding import AttentionRecorder, Grounding, grounded_tokens, grounding_loss
from training.memory import memory_in_use, preflight, write_run_stats
from training.methods import Method, build_method
from training.models import TrainingModels, load_training_models
from training.objective import ObjectiveConfig, diffusion_training_loss, drop_captions
from training.record_formats import ImageCaptionRecords
from training.records import Subset, dataset_subsets, load_image_caption_records, load_subsets
from training.validation import write_model_card

logger = logging.getLogger("training")


@dataclass
class TrainConfig(LoopConfig):
    """Every setting of a run; each is a flag (``--learning-rate``) and a config-file key (``learning_rate``)."""

    RESUME_FIELDS: ClassVar[tuple[str, ...]] = (
        *LoopConfig.RESUME_FIELDS,
        "pretrained_model",
        "preset",
        "vae",
        "text_encoder",
        "text_encoder_init",
        "resolution",
        "prediction_type",
        "lora_rank",
        "lora_alpha",
        "lora_type",
        "lora_conv_rank",
        "lora_conv_alpha",
        "train_text_encoder",
        "trained_text_encoders",
        "placeholder_token",
        "num_vectors",
        "class_prompt",
    )

    # what to start from
    pretrained_model: str | None = help_field(None, "pipeline folder or Hub id to fine-tune")
    allow_pickle: bool = help_field(
        False, "load model folders whose weights are pickle files only (.bin, .ckpt; loading them can run code)"
    )
    preset: str | None = help_field(None, "ldm preset of a U-Net to train from scratch (needs --vae, --text-encoder)")
    vae: str | None = help_field(None, "folder or Hub id of the (frozen) VAE; default: the pretrained model's")
    text_encoder: str | None = help_field(
        None,
        "folder with text_encoder/ and tokenizer/ (SDXL: also text_encoder_2/, tokenizer_2/); default: the model's",
    )
    # data
    resolution: int = help_field(512, "training image side (or bucket area side with --bucketing)")
    crop: Literal["center", "random"] = help_field("center", "crop after resizing the shorter side")
    flip: bool = help_field(False, "random horizontal flips (off: they break captions such as 'on the left')")
    bucketing: bool = help_field(False, "aspect-ratio buckets for images of mixed sizes")
    cache: bool = help_field(False, "encode images and captions once with the frozen VAE and text encoder")
    cache_dir: str | None = help_field(None, "where the cache goes (default: OUTPUT_DIR/cache)")
    # data: kohya-ss options, defaults of every subset of a --dataset subsets file (training.records.read_subsets)
    caption_extension: str = help_field(".txt", "extension of side-car caption files (kohya-ss also uses .caption)")
    caption_prefix: str = help_field("", "text put before every caption, with a space")
    caption_suffix: str = help_field("", "text put after every caption, with a space")
    shuffle_caption: bool = help_field(False, "shuffle the comma-separated tags after the first --keep-tokens")
    keep_tokens: int = help_field(0, "leading tags of each caption that shuffling and tag dropout leave alone")
    caption_tag_dropout: float = help_field(0.0, "drop each tag after the kept ones with this probability")
    masked_loss: bool = help_field(False, "loss only where the mask is: the image's alpha, or --mask-dir's file")
    mask_dir: str | None = help_field(None, "with --masked-loss: grayscale PNG masks named like the images")
    # objective
    prediction_type: Literal["epsilon", "v_prediction"] | None = help_field(None, "default: the model's")
    snr_gamma: float | None = help_field(None, "min-SNR-gamma loss weighting (5 is usual); default: L_simple")
    noise_offset: float = help_field(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images)")
    caption_dropout: float = help_field(0.1, "probability of the empty caption, for classifier-free guidance")
    grounding_loss_weight: float = help_field(
        0.0,
        "weight of the token grounding loss: each phrase of a metadata row's regions attends inside its box "
        "(TokenCompose; training.grounding); 0: off",
    )
    zero_terminal_snr: bool = help_field(False, "rescale betas to zero terminal SNR (needs v_prediction)")
    # objective: kohya-ss sd-scripts' loss, weighting, noise and timestep options (training.objective)
    debiased_estimation_loss: bool = help_field(
        False, "weight each sample by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), kohya-ss' debiased estimation"
    )
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = help_field(
        "l2", "per-element loss: squared error, absolute error, or pseudo-Huber (robust to outliers in the data)"
    )
    huber_schedule: Literal["constant", "exponential", "snr"] = help_field(
        "snr", "with --loss-type huber/smooth_l1: c falls from 1 to --huber-c as noise grows (snr, exponential) or not"
    )
    huber_c: float = help_field(0.1, "with --loss-type huber/smooth_l1: the pseudo-Huber parameter c (at full noise)")
    adaptive_noise_scale: float | None = help_field(
        None, "with --noise-offset: add this times each latent channel's absolute mean to the offset"
    )
    multires_noise_iterations: int = help_field(
        0, "pyramid (multi-resolution) noise with this many levels (6-10 is usual; 0: off)"
    )
    multires_noise_discount: float = help_field(
        0.3, "with --multires-noise-iterations: the weight ratio of successive levels, in (0, 1]"
    )
    min_timestep: int = help_field(0, "train on timesteps from this one on")
    max_timestep: int | None = help_field(None, "train on timesteps below this one (None: up to num_train_timesteps)")
    # what is trained
    learning_rate: float = help_field(1e-5, "peak learning rate")
    ema_decay: float | None = help_field(
        None, "keep an EMA of the U-Net's trained weights (all, or its LoRA layers) with this decay (0.9999 is usual)"
    )
    lora_rank: int | None = help_field(None, "train LoRA layers of this rank instead of the whole U-Net")
    lora_alpha: float | None = help_field(None, "LoRA alpha: updates are scaled by alpha / rank (default: the rank)")
    lora_type: Literal["lora", "dora", "loha", "lokr"] = help_field(
        "lora",
        "plain LoRA; DoRA (a trained magnitude as well); LyCORIS's LoHa or LoKr (saved in LyCORIS's layout only: "
        "A1111 and ComfyUI load them, diffusers does not)",
    )
    lora_conv_rank: int | None = help_field(
        None, "also LoRA layers of this rank on the U-Net's ResNet convolutions (kohya's LoCon conv_dim)"
    )
    lora_conv_alpha: float | None = help_field(None, "alpha of the convolutions' LoRA (default: their rank)")
    train_text_encoder: bool = help_field(
        False,
        "train the text encoder(s) with the U-Net: all their weights, or with --lora-rank LoRA layers on them (with "
        "--cache, only the latents are read from the cache)",
    )
    trained_text_encoders: list[str] = help_field(
        [], "with --train-text-encoder, which to train (SDXL: text_encoder, text_encoder_2); default: all"
    )
    text_encoder_lr: float | None = help_field(
        None, "peak learning rate of the text encoder(s) or new token embeddings (default: the U-Net's)"
    )
    placeholder_token: str | None = help_field(
        None,
        "textual inversion: train the embedding of this new token (put it in the captions, e.g. 'a photo of <sks>'); "
        "the U-Net stays frozen unless --lora-rank is given too (pivotal tuning)",
    )
    initializer_token: str | None = help_field(None, "with --placeholder-token: the word its vectors start from")
    num_vectors: int = help_field(1, "with --placeholder-token: how many vectors (tokens) the new token gets")
    # DreamBooth (Ruiz et al. 2023): the instance images are --dataset; prior preservation with --class-prompt
    instance_prompt: str | None = help_field(
        None, "caption of the training images that have none (DreamBooth's 'a photo of sks dog')"
    )
    class_prompt: str | None = help_field(
        None, "prior preservation: train on class images of this prompt too (generated by the model if missing)"
    )
    class_data_dir: str | None = help_field(None, "where the class images are (default: OUTPUT_DIR/class_images)")
    num_class_images: int = help_field(100, "with --class-prompt: how many class images")
    prior_loss_weight: float = help_field(1.0, "with --class-prompt: the loss weight of the class images")
    text_encoder_init: Literal["pretrained", "random"] = help_field(
        "pretrained",
        "the given text encoder's weights, or a fresh seeded initialisation of its architecture (its tokenizer is "
        "kept), trained with --train-text-encoder or else frozen: a fixed random encoding that keeps every word apart",
    )
    output_dir: str = help_field("runs/text-to-image", "where checkpoints, samples, logs and the model go")
    skip_memory_check: bool = help_field(
        False, "start on CUDA even when the memory pre-flight (training.memory) estimates that the run will not fit"
    )
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
        if self.grounding_loss_weight < 0:
            raise ConfigError(f"grounding_loss_weight must be >= 0; got {self.grounding_loss_weight}")
        if self.loss_type in ("l2", "l1") and (self.huber_schedule != "snr" or self.huber_c != 0.1):
            raise ConfigError("huber_schedule and huber_c are settings of --loss-type huber or smooth_l1; add it")
        if not self.huber_c > 0 or (self.huber_schedule != "constant" and self.huber_c > 1):
            raise ConfigError(
                f"huber_c must be > 0, and <= 1 with the snr and exponential schedules (c falls from 1 to it); got "
                f"{self.huber_c}"
            )
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise ConfigError("adaptive_noise_scale adapts --noise-offset to each latent channel; add --noise-offset")
        if self.multires_noise_iterations < 0 or not 0 < self.multires_noise_discount <= 1:
            raise ConfigError(
                "multires_noise_iterations must be >= 0 and multires_noise_discount in (0, 1]; got "
                f"{self.multires_noise_iterations} and {self.multires_noise_discount}"
            )
        if self.multires_noise_discount != 0.3 and not self.multires_noise_iterations:
            raise ConfigError("multires_noise_discount is a setting of --multires-noise-iterations; add it")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise ConfigError(
                "min_timestep and max_timestep must satisfy 0 <= min_timestep < max_timestep (at most the scheduler's "
                f"num_train_timesteps); got {self.min_timestep} and {self.max_timestep}"
            )
        subset_defaults(self).validate()
        if self.mask_dir is not None and not (self.masked_loss and Path(self.mask_dir).is_dir()):
            raise ConfigError(f"mask_dir needs --masked-loss and an existing folder; got {self.mask_dir}")
        if self.cache and not self.train_text_encoder and (self.shuffle_caption or self.caption_tag_dropout):
            raise ConfigError("shuffle_caption and caption_tag_dropout make captions a --cache cannot hold: drop one")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1); got {self.ema_decay}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1; got {self.lora_rank}")
        lora_settings = {"lora_alpha": None, "lora_type": "lora", "lora_conv_rank": None, "lora_conv_alpha": None}
        changed = [name for name, default in lora_settings.items() if getattr(self, name) != default]
        if self.lora_rank is None and changed:
            raise ConfigError(f"{', '.join(changed)}: settings of LoRA training; add --lora-rank")
        if self.lora_conv_rank is not None and self.lora_conv_rank < 1:
            raise ConfigError(f"lora_conv_rank must be >= 1; got {self.lora_conv_rank}")
        if self.lora_conv_alpha is not None and self.lora_conv_rank is None:
            raise ConfigError("lora_conv_alpha is the alpha of --lora-conv-rank; add it")
        trains_text = self.train_text_encoder or self.placeholder_token is not None
        if self.text_encoder_lr is not None and not (trains_text and self.text_encoder_lr > 0):
            raise ConfigError(
                "text_encoder_lr must be > 0 and needs --train-text-encoder or --placeholder-token; got "
                f"{self.text_encoder_lr}"
            )
        if self.placeholder_token is not None:
            if not self.placeholder_token.strip() or not self.initializer_token:
                raise ConfigError("placeholder_token needs a non-empty token and --initializer-token WORD")
            if self.train_text_encoder or self.ema_decay is not None:
                raise ConfigError(
                    "placeholder_token trains new token embeddings only (with --lora-rank, also U-Net LoRA); drop "
                    "--train-text-encoder and --ema-decay"
                )
        elif self.initializer_token is not None or self.num_vectors != 1:
            raise ConfigError("initializer_token and num_vectors are settings of --placeholder-token; add it")
        if self.num_vectors < 1:
            raise ConfigError(f"num_vectors must be >= 1; got {self.num_vectors}")
        if self.class_prompt is None and (self.class_data_dir is not None or self.num_class_images != 100):
            raise ConfigError("class_data_dir and num_class_images are settings of --class-prompt; add it")
        if self.class_prompt is not None:
            if self.num_class_images < 1 or not self.prior_loss_weight > 0:
                raise ConfigError(
                    f"num_class_images must be >= 1 and prior_loss_weight > 0; got {self.num_class_images} and "
                    f"{self.prior_loss_weight}"
                )
            if self.validation_split:
                raise ConfigError("validation_split would hold out class images too; use --validation-dataset")
        if self.trained_text_encoders and not self.train_text_encoder:
            raise ConfigError("trained_text_encoders says which text encoders --train-text-encoder trains; add it")
        if self.cache and (self.crop != "center" or self.flip):
            raise ConfigError("cache needs the same pixels every epoch: use --crop center without --flip")
        if self.push_to_hub:
            if self.hub_model_id is None or self.lora_rank is not None or self.placeholder_token is not None:
                raise ConfigError(
                    "push_to_hub needs --hub-model-id and a full pipeline (not --lora-rank or --placeholder-token)"
                )
            try:
                check_repo_id(self.hub_model_id)
            except PublishError as err:
                raise ConfigError(f"hub_model_id: {err}") from None


def train(config: TrainConfig) -> Path:
    """Run (or resume) the training described by ``config``; returns the folder of the final model (or the
    checkpoints folder when a stop signal ended the run early)."""
    # ---------------------------------------------------------------------------------------------------- set-up
    run = start_run(config, "text-to-image")
    accelerator, generator = run.accelerator, run.generator
    # FSDP (recipes/accelerate/fsdp_sdxl.yaml) shards a full fine-tune of the U-Net; these would need it unsharded
    launch.check_sharded_run(
        accelerator,
        {
            "--ema-decay": config.ema_decay is not None,
            "--lora-rank": config.lora_rank is not None,
            "--train-text-encoder": config.train_text_encoder,
            "--placeholder-token": config.placeholder_token is not None,
            "--validation-prompts": bool(config.validation_prompts),
            "held-out evaluation": bool(config.validation_dataset or config.validation_split),
        },
    )

    # ---------------------------------------------------------------------------------------------------- models
    # The family (SD 1.x/2.x or SDXL) decides the text encoders loaded, the conditioning and the pipeline class; a
    # model of a family this version does not run is refused here, before the data is read.
    baseline_memory = memory_in_use(accelerator.device)
    models = load_training_models(
        pretrained_model=config.pretrained_model,
        preset=config.preset,
        vae=config.vae,
        text_encoder=config.text_encoder,
        prediction_type=config.prediction_type,
        zero_terminal_snr=config.zero_terminal_snr,
        fresh_text_encoder_seed=config.seed if config.text_encoder_init == "random" else None,
        seed=config.seed,
        allow_pickle=config.allow_pickle,
    )
    # The peak memory of a step, estimated before anything is on the device: logged, and on CUDA a run that will not
    # fit is refused with the settings that would (per process: FSDP shards the trained weights and their state).
    shards = accelerator.num_processes if launch.is_sharded_run(accelerator) else 1
    memory_estimate = preflight(config, models, accelerator.device, check=not config.skip_memory_check, shards=shards)
    # What is trained and how captions become conditioning, settled once; the rest of the run asks `method`.
    method = build_method(config, models, accelerator.device)
    objective = ObjectiveConfig(
        prediction_type=models.noise_scheduler.config.prediction_type,
        snr_gamma=config.snr_gamma,
        noise_offset=config.noise_offset,
        caption_dropout=config.caption_dropout,
        debiased_estimation=config.debiased_estimation_loss,
        loss_type=config.loss_type,
        huber_schedule=config.huber_schedule,
        huber_c=config.huber_c,
        multires_noise_iterations=config.multires_noise_iterations,
        multires_noise_discount=config.multires_noise_discount,
        adaptive_noise_scale=config.adaptive_noise_scale,
        min_timestep=config.min_timestep,
        max_timestep=config.max_timestep,
    )
    grounding = None
    if config.grounding_loss_weight > 0:
        grounding = Grounding(config.grounding_loss_weight, method.conditioning.pipeline_components()["tokenizer"])
    alphas_cumprod = models.noise_scheduler.alphas_cumprod
    objective.check(len(alphas_cumprod))
    _warn_if_min_snr_ignores_the_last_steps(objective, alphas_cumprod)

    # ------------------------------------------------------------------------------------------------------ data
    # The training images (every subset of --dataset, and DreamBooth's class images) and the held-out ones.
    dataset, held_out = load_training_data(config, method, models, accelerator)
    # The data as the loop reads it: images (encoded every step) or the cached encoder outputs.
    train_data, collate_fn = method.training_data(dataset, accelerator, batch_size=config.train_batch_size)
    dataloader, batch_sampler = make_train_dataloader(train_data, config, accelerator, collate_fn)

    # ------------------------------------------------------------------------------------------------- optimizer
    optimizer = make_optimizer(method.param_groups(), config)
    lr_scheduler = make_lr_scheduler(optimizer, config, accelerator)
    optimizer, dataloader, lr_scheduler = method.prepare(accelerator, optimizer, dataloader, lr_scheduler)
    stateful = method.stateful() | {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
    fingerprint = {"data": records_hash(dataset)}
    loop, metrics = run.start_loop(
        dataloader, stateful, epoch_setters=(batch_sampler, train_data), fingerprint=fingerprint
    )

    def validate() -> None:
        if not accelerator.is_main_process:
            return
        with method.evaluating():
            if held_out is not None:
                value = held_out_loss(
                    method.unet,
                    method.vae,
                    method.conditioning,
                    held_out,
                    alphas_cumprod,
                    objective,
                    batch_size=config.train_batch_size,
                    limit=config.max_validation_images,
                )
                metrics.add(loop.step, {"held_out_loss": value})
                accelerator.log({"held_out_loss": value}, step=loop.step)
            if config.validation_prompts:
                with method.ema_weights():
                    grid = sample_grid(accelerator, method.pipeline(models), config)
                save_validation_grid(accelerator, grid, run.output_dir, loop.step)

    # ------------------------------------------------------------------------------------------------- the loop
    logger.info("%s; %d batches an epoch, %d steps", dataset.summary(), len(dataloader), config.max_train_steps)
    with loop:
        for batch in loop.batches():
            with accelerator.accumulate(*method.runners):
                loss = batch_loss(batch, method, alphas_cumprod, objective, generator, grounding)
                grad_norm = loop.backward_and_step(loss, optimizer, lr_scheduler, method.params)
            if not accelerator.sync_gradients:
                continue
            extra = {} if grounding is None or grounding.last is None else {"grounding_loss": grounding.last}
            if loop.end_step(step_logs(lr_scheduler, grad_norm, **extra)):
                method.after_update()
            loop.checkpoint_if_due()
            if loop.due(config.validation_steps):
                validate()
    if accelerator.is_main_process:
        write_run_stats(run.output_dir, memory_estimate, baseline_memory, accelerator.device)
        metrics.update(
            **loop.summary(),
            cache=config.cache,
            processes=accelerator.num_processes,
            data=dataset.summary_dict(),  # counts the images that failed to decode during the run too
            config=to_dict(config),
        )
    if loop.stopped_early:
        accelerator.end_training()
        return run.checkpoints_dir

    # ------------------------------------------------------------------------------------------- the final model
    final_dir = run.output_dir / method.final_kind
    method.unet = launch.unsharded(method.unet, is_main_process=accelerator.is_main_process)  # FSDP: gathered
    if accelerator.is_main_process:
        # The settings the validation grids were sampled at become the model's defaults (a recipe that finds better
        # ones, say by a guidance sweep, overwrites generation_defaults.json).
        defaults = GenerationDefaults(config.validation_inference_steps, config.validation_guidance_scale)
        with atomic_folder(final_dir) as staging:  # a kill mid-save leaves no half-written final folder
            method.save_final(run.output_dir, models, defaults, folder=staging)
            grid_name = None
            if config.validation_prompts:
                grid_name = "samples.png"
                shutil.copyfile(run.output_dir / "samples" / f"step-{loop.step:06d}.png", staging / grid_name)
            loop.save_loss_curve(staging / "loss.png")
            write_model_card(
                staging,
                base_model=config.pretrained_model or "",
                data=dataset.summary_dict(),
                config=to_dict(config),
                steps=loop.step,
                sample_grid_file=grid_name,
                kind=method.final_kind,
                placeholder_token=config.placeholder_token,
                pipeline_class=method.pipeline_class.__name__,
            )
        if config.push_to_hub:
            _push_to_hub(final_dir, config)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def load_training_data(
    config: TrainConfig, method: Method, models: TrainingModels, accelerator: Accelerator
) -> tuple[ImageCaptionDataset, ImageCaptionDataset | None]:
    """The training dataset (the subsets of ``--dataset``; with ``--class-prompt``, the class images too,
    generated by the model being tuned where missing and balanced against the instance images) and the held-out
    one (its images once each, captions as written), checked against what the method trains."""
    subsets = dataset_subsets(config.dataset, subset_defaults(config))
    prior = prior_preservation(config)
    if prior is not None:
        with accelerator.main_process_first():  # the main process generates, the others then find the images
            ensure_class_images(prior, method.pipeline(models), is_main_process=accelerator.is_main_process)
        subsets.append(prior_subset(prior))
    records, held_out_records = load_training_records(config, subsets)
    if prior is not None:
        records = balance_prior(records, class_subset=len(subsets) - 1)
    dataset = ImageCaptionDataset(
        records,
        resolution=config.resolution,
        crop=config.crop,
        flip=config.flip,
        bucketing=config.bucketing,
        seed=config.seed,
        subsets=subsets,
        masked_loss=config.masked_loss,
        failure_log=Path(config.output_dir) / UNDECODABLE_LOG,
    )
    if config.cache and not config.train_text_encoder and dataset.makes_new_captions:
        raise ConfigError("a subset shuffles or drops tags: its captions cannot be cached; drop --cache")
    method.check_dataset(dataset)
    plain = [Subset()] * len(subsets)
    held_out = held_out_records and ImageCaptionDataset(
        held_out_records, resolution=config.resolution, subsets=plain, repeat=False
    )
    return dataset, held_out or None


UNDECODABLE_LOG = "undecodable_images.txt"
"""The run's list of images that passed the scan but failed to decode (each replaced by another of its bucket)."""


def prior_preservation(config: TrainConfig) -> PriorPreservation | None:
    """DreamBooth's class images of the run (``--class-prompt``), or None."""
    if config.class_prompt is None:
        return None
    folder = Path(config.class_data_dir or Path(config.output_dir) / "class_images")
    return PriorPreservation(
        config.class_prompt,
        folder,
        config.num_class_images,
        loss_weight=config.prior_loss_weight,
        resolution=config.resolution,
        seed=config.seed,
        batch_size=config.train_batch_size,
    )


def subset_defaults(config: TrainConfig) -> Subset:
    """The kohya-ss data settings of the flags: the one subset of a plain ``--dataset``, or the defaults of the
    subsets of a dataset file."""
    return Subset(
        path=config.dataset,
        caption_extension=config.caption_extension,
        caption_prefix=config.caption_prefix,
        caption_suffix=config.caption_suffix,
        shuffle_caption=config.shuffle_caption,
        keep_tokens=config.keep_tokens,
        caption_tag_dropout=config.caption_tag_dropout,
        mask_dir=config.mask_dir,
        default_caption=config.instance_prompt,
    )


def load_training_records(
    config: TrainConfig, subsets: list[Subset]
) -> tuple[ImageCaptionRecords, ImageCaptionRecords | None]:
    """``(train, held_out)`` records as :func:`training.command.load_records` reads them, the training ones from
    ``subsets`` (:func:`training.records.load_subsets`: their repeats, subset and caption affixes)."""
    columns = {"image_column": config.image_column, "caption_column": config.caption_column}
    records = load_subsets(subsets, source=config.dataset, **columns)
    if config.validation_split:
        return split_validation(records, config.validation_split, config.seed)
    held_out = config.validation_dataset and load_image_caption_records(config.validation_dataset, **columns)
    return records, held_out or None


@torch.no_grad()
def held_out_loss(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    conditioning: Conditioning,
    dataset: ImageCaptionDataset,
    alphas_cumprod: Tensor,
    objective: ObjectiveConfig,
    *,
    batch_size: int,
    limit: int,
) -> float:
    """The denoising loss on held-out images at fixed timesteps (10 %, 40 %, 70 % of T) and fixed noise: a
    comparable number across steps and runs (training losses are noisy because t is random). The latents are the
    posterior means; the captions are encoded by ``conditioning.evaluate``."""
    generator = torch.Generator().manual_seed(0)
    device, dtype = vae.device, vae.dtype
    num_timesteps = alphas_cumprod.shape[0]
    alphas_cumprod = alphas_cumprod.to(device)
    losses = []
    with evaluation_mode(unet):
        for batch in evaluation_batches(dataset, batch_size, limit):
            latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.mean.float()
            latents = latents * vae.config.scaling_factor
            cond = conditioning.evaluate(batch, batch["captions"]).to(device, latents.dtype)
            for fraction in (0.1, 0.4, 0.7):
                t = torch.full((latents.shape[0],), int(fraction * num_timesteps), device=device)
                noise = torch.randn(latents.shape, generator=generator).to(device)
                noisy = q_sample(latents, t, noise, alphas_cumprod)
                pred = unet(
                    noisy,
                    t,
                    encoder_hidden_states=cond.encoder_hidden_states,
                    added_cond_kwargs=cond.added_cond_kwargs,
                ).sample
                target = training_target(latents, noise, t, alphas_cumprod, objective.prediction_type)
                losses.append(diffusion_loss(pred, target).mean().item())
    return float(sum(losses) / max(len(losses), 1))


def _warn_if_min_snr_ignores_the_last_steps(objective: ObjectiveConfig, alphas_cumprod: Tensor) -> None:
    """min-SNR-gamma on v-prediction weighs a timestep by min(SNR, gamma) / (SNR + 1): about SNR near the end of the
    chain. Those steps are where only the prompt can say where things go; a model trained from scratch with zero
    terminal SNR then hardly learns them. Logged, not refused (fine-tuning a model that knows layouts is fine)."""
    if objective.snr_gamma is None or objective.prediction_type != "v_prediction":
        return
    last_snr = snr(alphas_cumprod, len(alphas_cumprod) - 1).reshape(1)
    last = float(loss_weights(last_snr, "v_prediction", objective.snr_gamma)[0])
    if last < 0.01:
        logger.warning(
            "snr_gamma %g with v-prediction gives the last timestep a loss weight of %.2g: the noisiest steps, where "
            "the layout comes from the prompt alone, are hardly trained; drop --snr-gamma when training from scratch",
            objective.snr_gamma,
            last,
        )


@torch.no_grad()
def batch_latents(batch: Batch, vae: AutoencoderKL, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """z = (mean + std * eps) * scaling_factor, a sample of the VAE posterior q(z | x) of each image of the batch:
    from the cached posterior (``latent_mean``, ``latent_std``) or by encoding ``pixel_values`` with the frozen VAE
    (in ``dtype``). Returns float32 latents ``(B, C, h, w)`` on the VAE's device."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        posterior = vae.encode(batch["pixel_values"].to(vae.device, dtype=dtype)).latent_dist
        mean, std = posterior.mean, posterior.std
    noise = torch.randn(mean.shape, generator=generator)
    return (mean.float() + std.float() * noise.to(mean.device)) * vae.config.scaling_factor


def batch_loss(
    batch: Batch,
    method: Method,
    alphas_cumprod: Tensor,
    objective: ObjectiveConfig,
    generator: torch.Generator,
    grounding: Grounding | None = None,
) -> Tensor:
    """The diffusion loss of one batch: its latents (:func:`batch_latents`), its captions with caption dropout
    through the method's conditioning (with gradients when a text encoder is trained), then the U-Net's loss, plus
    the weighted grounding loss of the U-Net's cross-attention when the run has one and the batch has regions."""
    latents = batch_latents(batch, method.vae, generator, method.weight_dtype)
    captions = drop_captions(batch["captions"], objective.caption_dropout, generator)
    cond = method.conditioning(batch, captions).to(latents.device, method.weight_dtype)
    regions = batch.get("regions") if grounding is not None else None
    with AttentionRecorder(method.unet) if regions else contextlib.nullcontext() as recorder:
        loss = diffusion_training_loss(
            method.unet_runner,
            latents,
            cond.encoder_hidden_states,
            alphas_cumprod,
            objective,
            generator,
            added_cond_kwargs=cond.added_cond_kwargs,
            loss_weight=batch.get("loss_weight"),
            loss_mask=batch.get("loss_mask"),
        )
    if regions:
        tokens = grounded_tokens(grounding.tokenizer, captions, regions)
        term = grounding_loss(recorder.maps, tokens, tuple(latents.shape[-2:]))
        grounding.last = float(term.detach())
        loss = loss + grounding.weight * term
    return loss


def _push_to_hub(final_dir: Path, config: TrainConfig) -> None:
    """Publish the final pipeline; a failed upload is logged with the command to retry it (the model is saved)."""
    publish_config = PublishConfig(
        model=str(final_dir),
        repo_id=config.hub_model_id,
        private=config.hub_private,
        sample_steps=config.validation_inference_steps,
    )
    try:
        logger.info("pushed to the Hub: %s", publish(publish_config))
    except PublishError as err:
        logger.error(
            "%s; the model is saved: retry with python -m pipelines.publish --model %s --repo-id %s",
            err,
            final_dir,
            config.hub_model_id,
        )


def sample_grid(accelerator: Accelerator, pipe: LatentDiffusionPipeline, config: TrainConfig) -> PIL.Image.Image:
    """The validation grid: one image per validation prompt, sampled with the validation seed, steps and guidance
    scale (under the run's autocast), by the family's pipeline (:meth:`Method.pipeline`)."""
    with accelerator.autocast():
        return prompt_grid(
            pipe,
            config.validation_prompts,
            seed=config.validation_seed,
            num_inference_steps=config.validation_inference_steps,
            guidance_scale=config.validation_guidance_scale,
        )


def save_validation_grid(accelerator: Accelerator, grid: PIL.Image.Image, output_dir: Path, step: int) -> Path:
    """Save the grid as ``output_dir/samples/step-NNNNNN.png`` (and to TensorBoard when it logs); returns the path."""
    path = output_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.array(grid), step, dataformats="HWC")
    logger.info("validation samples: %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line: train as the flags (and/or ``--config FILE``) say; print the final model's folder."""
    return run_command(TrainConfig, train, argv, "training.train_text_to_image", __doc__)


if __name__ == "__main__":
    sys.exit(main())
