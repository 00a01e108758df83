"""Train a small CLIP contrastively on image-caption data and export its text tower as a diffusion text encoder.

    python -m training.train_text_encoder --dataset DATA --preset tiny --resolution 64 --output-dir runs/clip
    python -m training.train_text_to_image --preset tiny --text-encoder runs/clip --vae runs/vae --dataset DATA ...

The model is transformers' ``CLIPModel``: its text tower has exactly the preset's text-encoder size (the
``CLIPTextConfig`` that :func:`ldm.presets.build_text_encoder` builds: CLIP's 49,408-token vocabulary, or with
``--vocabulary captions`` only the tokens the captions use, 77 positions),
its vision tower is a small ViT for the training resolution (by default an 8x8 grid of patches and the text tower's
width, depth and heads), and tokens come from :func:`ldm.tokenizer.build_clip_tokenizer`. The loss is CLIP's
symmetric InfoNCE with the learnable temperature (clamped at ``--max-logit-scale``, as in CLIP), with one change:
captions that tokenize identically are all positives of each other's images (:func:`contrastive_loss`), so a batch
that holds one caption twice does not push an image away from its own caption. Negatives come from the batch of
each process (no gather across processes).

The run writes ``OUT/text_encoder/`` (a ``CLIPTextModel`` with the trained text tower's weights) and
``OUT/tokenizer/``, the two components a Stable Diffusion pipeline and ``train_text_to_image --text-encoder OUT`` load,
and ``OUT/clip/`` (the whole ``CLIPModel`` with a ``CLIPProcessor``'s image processor and tokenizer, for scoring).
Held-out images (``--validation-dataset`` or ``--validation-split``) are scored by zero-shot caption retrieval:
each image ranks the distinct held-out captions by cosine similarity; top-1 and top-5 accuracy and their chance
levels go to the log and ``OUT/metrics.json``. Checkpoints, exact resume, stop signals and non-finite losses are
handled as in every trainer (:mod:`training.loop`).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from common.files import atomic_folder
from ldm.presets import PRESETS, build_text_encoder, get_preset
from ldm.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer
from training.command import (
    LR_SCHEDULES,
    LoopConfig,
    evaluation_batches,
    evaluation_mode,
    load_records,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    run_command,
    start_run,
    step_logs,
)
from training.config import ConfigError, help_field, to_dict
from training.data import ImageCaptionDataset
from training.record_formats import ImageCaptionRecords

logger = logging.getLogger("training")

PATCH_GRID = 8  # default vision patches per side


@dataclass
class TextEncoderTrainConfig(LoopConfig):
    """Every setting of a run; each is a flag (``--vision-width``) and a config-file key (``vision_width``)."""

    # the model
    preset: str = help_field("tiny", f"ldm preset whose text-encoder size to train: {', '.join(PRESETS)}")
    vision_patch_size: int | None = help_field(None, f"ViT patch side (default: resolution / {PATCH_GRID})")
    vision_width: int | None = help_field(None, "ViT width (default: the text tower's)")
    vision_layers: int | None = help_field(None, "ViT layers (default: the text tower's)")
    vision_heads: int | None = help_field(None, "ViT attention heads (default: the text tower's)")
    projection_dim: int | None = help_field(None, "shared embedding size (default: the preset's projection_dim)")
    vocabulary: Literal["clip", "captions"] = help_field(
        "clip",
        "token vocabulary: CLIP's full 49,408 tokens, or only those the training and held-out captions use "
        "(CLIP's byte symbols and the merges those captions need: a far smaller embedding table)",
    )
    logit_scale_init: float = help_field(math.log(1 / 0.07), "initial log of the inverse temperature (CLIP's)")
    max_logit_scale: float = help_field(100.0, "the inverse temperature is clamped at this value (CLIP's)")
    # data
    resolution: int = help_field(224, "image side of the vision tower")
    crop: Literal["center", "random"] = help_field("center", "crop after resizing the shorter side")
    flip: bool = help_field(False, "random horizontal flips (off: they break captions such as 'on the left')")
    # defaults of this command (CLIP's optimiser settings)
    learning_rate: float = help_field(5e-4, "peak learning rate")
    lr_scheduler: LR_SCHEDULES = help_field("cosine", "learning-rate schedule")
    adam_beta2: float = help_field(0.98, "AdamW beta2")
    adam_epsilon: float = help_field(1e-6, "AdamW epsilon")
    adam_weight_decay: float = help_field(0.2, "AdamW weight decay (not on gains, biases and the temperature)")
    train_batch_size: int = help_field(64, "image-caption pairs per process per step (the negatives)")
    output_dir: str = help_field("runs/text-encoder", "where checkpoints, metrics and the models go")

    @property
    def patch_size(self) -> int:
        """The ViT patch side: ``vision_patch_size`` or an 8x8 grid of patches."""
        return self.vision_patch_size or self.resolution // PATCH_GRID

    def validate(self) -> None:
        """Cross-field checks, each naming the fix."""
        super().validate()
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        for name in ("vision_patch_size", "vision_width", "vision_layers", "vision_heads", "projection_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.vision_patch_size is None and (self.resolution < PATCH_GRID or self.resolution % PATCH_GRID):
            raise ConfigError(
                f"resolution must be a positive multiple of {PATCH_GRID} (the default ViT patch grid is "
                f"{PATCH_GRID}x{PATCH_GRID}), or pass --vision-patch-size dividing it; got {self.resolution}"
            )
        if self.resolution < 1 or self.resolution % self.patch_size:
            raise ConfigError(
                f"vision_patch_size must divide resolution ({self.resolution}); got {self.vision_patch_size}"
            )
        text = get_preset(self.preset).text_encoder
        width, heads = self.vision_width or text.hidden_size, self.vision_heads or text.num_attention_heads
        if width % heads:
            raise ConfigError(f"vision_width ({width}) must be a multiple of vision_heads ({heads})")
        if not 1.0 < self.max_logit_scale < math.inf:
            raise ConfigError(f"max_logit_scale must be a finite number > 1; got {self.max_logit_scale}")
        if not 0.0 <= self.logit_scale_init <= math.log(self.max_logit_scale):
            raise ConfigError(
                f"logit_scale_init must be in [0, log(max_logit_scale)] = [0, {math.log(self.max_logit_scale):.3f}]; "
                f"got {self.logit_scale_init}"
            )


# --------------------------------------------------------------------------------------------------------------------
# The model and its loss


def build_tokenizer(config: TextEncoderTrainConfig, records: list[ImageCaptionRecords]) -> CLIPTokenizer:
    """CLIP's tokenizer, or with ``vocabulary: captions`` one reduced to the tokens of every caption in ``records``."""
    if config.vocabulary == "clip":
        return build_clip_tokenizer()
    captions = sorted({caption for rs in records for record in rs.records for caption in record.captions})
    tokenizer = build_clip_tokenizer(texts=captions)
    logger.info(
        "vocabulary of the %d distinct captions: %d tokens (CLIP's has %d)",
        len(captions),
        len(tokenizer),
        CLIP_VOCAB_SIZE,
    )
    return tokenizer


def build_clip(config: TextEncoderTrainConfig, vocab_size: int = CLIP_VOCAB_SIZE) -> CLIPModel:
    """A ``CLIPModel`` whose text tower is the preset's text encoder (with a vocabulary of ``vocab_size`` tokens),
    initialised from ``seed`` alone."""
    with torch.device("meta"):  # the preset's exact CLIPTextConfig, from ldm.presets, without allocating weights
        text_config = build_text_encoder(get_preset(config.preset), vocab_size).config
    width = config.vision_width or text_config.hidden_size
    vision_config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=config.vision_layers or text_config.num_hidden_layers,
        num_attention_heads=config.vision_heads or text_config.num_attention_heads,
        image_size=config.resolution,
        patch_size=config.patch_size,
        hidden_act=text_config.hidden_act,
    )
    clip_config = CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=config.projection_dim or text_config.projection_dim,
        logit_scale_init_value=config.logit_scale_init,
    )
    with torch.random.fork_rng(devices=[]):  # initialise from the seed, leaving the caller's RNG untouched
        torch.manual_seed(config.seed)
        return CLIPModel(clip_config)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> Tensor:
    """Token ids (B, 77) as Stable Diffusion encodes a prompt: BOS, tokens, EOS, padded, truncated at 77."""
    return tokenizer(
        captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def contrastive_loss(logits_per_text: Tensor, input_ids: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE loss where identical captions are positives of each other's images.

    ``logits_per_text``: (B, B), ``scale * cos(text_i, image_j)``; ``input_ids``: (B, L), the captions' tokens. The
    target of text i is the uniform distribution over the images whose captions have the same tokens as caption i
    (itself included), and by symmetry the same for images; the loss is the mean of the text-to-image and
    image-to-text cross-entropies. With distinct captions the targets are the identity: exactly CLIP's loss
    (Radford et al. 2021, Fig. 3). Identical captions tokenize identically, so the text tower cannot tell them
    apart; CLIP's one-hot targets would push each image away from a caption that is as much its own.
    """
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric: row i and column i both count caption i's copies
    logits = logits_per_text.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def export_text_encoder(clip: CLIPModel) -> CLIPTextModel:
    """A stand-alone ``CLIPTextModel`` with the weights of ``clip``'s text tower (its projection is not part of it)."""
    encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel into CLIPModel.text_model; 4.x nests a transformer in both as .text_model
    getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


# --------------------------------------------------------------------------------------------------------------------
# Measurements


def _embed_texts(clip: CLIPModel, input_ids: Tensor) -> Tensor:
    return F.normalize(clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output).float(), dim=-1)


def _embed_images(clip: CLIPModel, pixel_values: Tensor) -> Tensor:
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(clip.visual_projection(pooled).float(), dim=-1)


def retrieval_chance(num_candidates: int, num_correct: int, k: int) -> float:
    """The probability that a uniformly random ranking of ``num_candidates`` puts one of ``num_correct`` in the
    top ``k``: ``1 - C(n - m, k) / C(n, k)``."""
    return 1.0 - math.comb(num_candidates - num_correct, k) / math.comb(num_candidates, k)


@torch.no_grad()
def evaluate_retrieval(
    clip: CLIPModel,
    tokenizer: CLIPTokenizer,
    dataset: ImageCaptionDataset,
    records: ImageCaptionRecords,
    *,
    batch_size: int,
    limit: int,
    device: torch.device,
) -> dict[str, float]:
    """Zero-shot caption retrieval on the first ``limit`` images of ``dataset``.

    The candidates are the distinct captions (by tokens) of those images. Each image ranks all candidates by the
    cosine similarity of the embeddings; it counts as right at k if one of its own captions is among the k best.
    Returns ``top1``, ``top5``, their chance levels (``chance_top1``, ``chance_top5``, averaged over images by
    :func:`retrieval_chance`), and the numbers of ``images`` and ``captions``.
    """
    with evaluation_mode(clip):
        image_embeds, own_captions = [], []
        for batch in evaluation_batches(dataset, batch_size, limit):
            image_embeds.append(_embed_images(clip, batch["pixel_values"].to(device)).cpu())
            own_captions += [records.records[i].captions for i in batch["indices"].tolist()]
        candidates: dict[tuple[int, ...], int] = {}  # token ids -> candidate index
        own = []
        for captions in own_captions:
            ids = [tuple(row) for row in tokenize(tokenizer, list(captions)).tolist()]
            own.append([candidates.setdefault(row, len(candidates)) for row in ids])
        ids = torch.tensor(list(candidates), dtype=torch.long)
        text_embeds = torch.cat([_embed_texts(clip, chunk.to(device)).cpu() for chunk in ids.split(batch_size)])
    similarity = torch.cat(image_embeds) @ text_embeds.t()  # (images, candidates)
    hits = {1: [], 5: []}
    chance = {1: [], 5: []}
    for row, correct in zip(similarity, own):
        best = row[correct].max()
        rank = int((row > best).sum())  # candidates strictly better than the image's best own caption
        for k in hits:
            hits[k].append(float(rank < k))
            chance[k].append(retrieval_chance(len(candidates), len(set(correct)), min(k, len(candidates))))
    result = {f"top{k}": sum(v) / len(v) for k, v in hits.items()}
    result |= {f"chance_top{k}": sum(v) / len(v) for k, v in chance.items()}
    return result | {"images": len(own), "captions": len(candidates)}


# --------------------------------------------------------------------------------------------------------------------
# Training


def train(config: TextEncoderTrainConfig) -> Path:
    """Run (or resume) the training described by ``config``; returns the output folder (with ``text_encoder/`` and
    ``tokenizer/`` inside), or the checkpoints folder when a stop signal ended the run early."""
    # ---------------------------------------------------------------------------------------------------- set-up
    run = start_run(config, "text-encoder")
    accelerator, output_dir = run.accelerator, run.output_dir

    # ------------------------------------------------------------------------------------------------------ data
    records, held_out_records = load_records(config)
    dataset = ImageCaptionDataset(
        records, resolution=config.resolution, crop=config.crop, flip=config.flip, seed=config.seed
    )
    dataloader, batch_sampler = make_train_dataloader(dataset, config, accelerator)
    held_out = None
    if held_out_records is not None:
        held_out = ImageCaptionDataset(held_out_records, resolution=config.resolution)

    # ---------------------------------------------------------------------------------------------------- models
    tokenizer = build_tokenizer(config, [r for r in (records, held_out_records) if r is not None])
    clip = build_clip(config, len(tokenizer))
    if config.gradient_checkpointing:
        clip.gradient_checkpointing_enable()
    clip.train()
    logger.info(
        "CLIP with %.2fM parameters (text tower %.2fM)",
        sum(p.numel() for p in clip.parameters()) / 1e6,
        sum(p.numel() for p in clip.text_model.parameters()) / 1e6,
    )

    # ------------------------------------------------------------------------------------------------- optimizer
    params = [p for p in clip.parameters() if p.requires_grad]
    # As CLIP: no weight decay on gains, biases and the temperature (decay would pull the temperature to 1).
    groups: Any = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = make_optimizer(groups, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, accelerator)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(clip, optimizer, dataloader, lr_scheduler)
    stateful = {"clip": clip, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    loop, metrics = run.start_loop(dataloader, stateful, epoch_setters=(batch_sampler, dataset))

    def validate() -> None:
        if held_out is None or held_out_records is None or not accelerator.is_main_process:
            return
        scores = evaluate_retrieval(
            clip,
            tokenizer,
            held_out,
            held_out_records,
            batch_size=config.train_batch_size,
            limit=config.max_validation_images,
            device=accelerator.device,
        )
        metrics.add(loop.step, {"top1": scores["top1"], "top5": scores["top5"]})
        metrics.update(**{k: scores[k] for k in ("chance_top1", "chance_top5", "images", "captions")})
        accelerator.log({"val_top1": scores["top1"], "val_top5": scores["top5"]}, step=loop.step)
        logger.info(
            "step %d: held-out caption retrieval top-1 %.3f, top-5 %.3f (chance %.3f, %.3f; %d images, %d captions)",
            loop.step,
            scores["top1"],
            scores["top5"],
            scores["chance_top1"],
            scores["chance_top5"],
            scores["images"],
            scores["captions"],
        )

    # ------------------------------------------------------------------------------------------------- the loop
    logger.info("%s; %d batches an epoch, %d steps", dataset.summary(), len(dataloader), config.max_train_steps)
    max_logit_scale = math.log(config.max_logit_scale)
    if loop.resumed_step is None:
        validate()  # the baseline, before any update
    with loop:
        for batch in loop.batches():
            with accelerator.accumulate(model):
                input_ids = tokenize(tokenizer, batch["captions"]).to(accelerator.device)
                output = model(input_ids=input_ids, pixel_values=batch["pixel_values"].to(accelerator.device))
                loss = contrastive_loss(output.logits_per_text, input_ids)
                grad_norm = loop.backward_and_step(loss, optimizer, lr_scheduler, params)
                with torch.no_grad():
                    clip.logit_scale.clamp_(0, max_logit_scale)
            if not accelerator.sync_gradients:
                continue
            loop.end_step(step_logs(lr_scheduler, grad_norm, logit_scale=clip.logit_scale.exp().item()))
            loop.checkpoint_if_due()
            if loop.due(config.validation_steps):
                validate()
    if loop.stopped_early:
        accelerator.end_training()
        return run.checkpoints_dir

    # ------------------------------------------------------------------------------------------- the final model
    if accelerator.is_main_process:
        # each folder whole or not at all; text_encoder/ last, the one a recipe checks
        with atomic_folder(output_dir / "tokenizer") as folder:
            tokenizer.save_pretrained(folder)
        with atomic_folder(output_dir / "clip") as folder:
            clip.save_pretrained(folder, safe_serialization=True)
            size = {"height": config.resolution, "width": config.resolution}
            # Training saw pixels in [-1, 1]: a processor rescaling to [0, 1] then normalising by 0.5 gives the same.
            CLIPImageProcessor(
                size={"shortest_edge": config.resolution}, crop_size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        with atomic_folder(output_dir / "text_encoder") as folder:
            export_text_encoder(clip).save_pretrained(folder, safe_serialization=True)
        summary = loop.summary() | {"data": dataset.summary_dict(), "config": to_dict(config)}
        if metrics.data["history"]:
            summary |= {f"final_{k}": metrics.data["history"][-1][k] for k in ("top1", "top5")}
        metrics.update(**summary)
        loop.save_loss_curve(output_dir / "loss.png")
        logger.info(
            "text encoder and tokenizer saved to %s (text_encoder/, tokenizer/), the CLIP to %s",
            output_dir,
            output_dir / "clip",
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """The command line: train as the flags (and/or ``--config FILE``) say; print the output folder."""
    return run_command(TextEncoderTrainConfig, train, argv, "training.train_text_encoder", __doc__)


if __name__ == "__main__":
    sys.exit(main())
