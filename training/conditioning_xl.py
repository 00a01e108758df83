"""SDXL's text conditioning in training: the :class:`~training.conditioning.Conditioning` of its two text encoders.

The penultimate hidden states of two frozen text encoders concatenated (:func:`ldm.text.encode_prompts_with_encoders`,
as ``StableDiffusionXLPipeline.encode_prompt``), and ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}``
from the second encoder's pooled output and each sample's own original size, crop corner and target size
(:func:`training.micro_conditioning.add_time_ids`), as the SDXL paper trains. With ``--cache`` both outputs are read
from the cache (:class:`SDXLCaptionEncoder` writes them and fingerprints both encoders). Caption dropout encodes the
empty caption, as for SD (and as diffusers' SDXL training script does), not the all-zero embeddings that
``force_zeros_for_empty_prompt`` gives the unconditional pass at sampling time. Training SDXL's text encoders is not
supported yet (:func:`sdxl_conditioning` refuses it with a :class:`~ldm.errors.UserError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.errors import UserError
from ldm.text import encode_prompts_with_encoders
from training.cache import CachedLatentDataset, weights_hash
from training.conditioning import Batch, CachedTextEncoder, Conditioning, UNetConditioning, build_cache_with
from training.data import ImageCaptionDataset
from training.micro_conditioning import add_time_ids
from training.models import TrainedModule, TrainingModels, freeze, load_component


class FrozenSDXLTextEncoders:
    """SDXL's two frozen text encoders: their penultimate hidden states concatenated
    (:func:`ldm.text.encode_prompts_with_encoders`, as ``StableDiffusionXLPipeline.encode_prompt``), the second's
    pooled output as ``text_embeds``, and each sample's size and crop ``time_ids`` (float32).

    ``source`` as for :class:`~training.conditioning.FrozenTextEncoder`: with it, a mixed-precision run casts the
    frozen copies and saves the ones reloaded from there."""

    trained: tuple[TrainedModule, ...] = ()

    def __init__(self, models: TrainingModels, *, device: torch.device | str, dtype: torch.dtype) -> None:
        if models.text_encoder_2 is None or models.tokenizer_2 is None:
            raise ValueError("SDXL conditioning needs text_encoder_2 and tokenizer_2")
        self.text_encoder, self.tokenizer = models.text_encoder, models.tokenizer
        self.text_encoder_2, self.tokenizer_2 = models.text_encoder_2, models.tokenizer_2
        self.source, self.device = models.text_encoder_source, device
        self.cast = self.source is not None and dtype != torch.float32
        for encoder in (self.text_encoder, self.text_encoder_2):
            freeze(encoder, device, dtype if self.cast else torch.float32)

    def _encoders(self) -> list[tuple[CLIPTokenizer, torch.nn.Module]]:
        return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    def caption_encoder(self) -> SDXLCaptionEncoder:
        """What the cache stores of a caption: ``prompt_embeds`` and ``pooled_prompt_embeds``."""
        return SDXLCaptionEncoder(
            self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2, self.device
        )

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning:
        """The conditioning from the captions' encoder outputs and the batch's micro-conditioning."""
        time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        hidden = outputs["prompt_embeds"]
        return UNetConditioning(
            hidden,
            {"text_embeds": outputs["pooled_prompt_embeds"], "time_ids": time_ids.to(hidden.device)},
        )

    def _encode(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        encoding = encode_prompts_with_encoders(self._encoders(), [captions, captions], device=self.device)
        outputs = {"prompt_embeds": encoding.hidden_states, "pooled_prompt_embeds": encoding.pooled}
        return self.from_outputs(batch, outputs)

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self._encode(batch, captions)  # no parameter requires gradients, so no graph is recorded

    @torch.no_grad()
    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self._encode(batch, captions)

    def set_training(self, mode: bool) -> None:
        pass  # frozen: always in evaluation mode

    def build_cache(self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int) -> Path:
        return build_cache_with(self.caption_encoder(), dataset, vae, folder, batch_size=batch_size)

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        return CachedTextEncoder(self, cache)

    def pipeline_components(self) -> dict[str, Any]:
        return {
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
        }

    def saved_components(self) -> dict[str, Any]:
        if self.source is None or not self.cast:
            return self.pipeline_components()
        return self.pipeline_components() | {
            "text_encoder": load_component(CLIPTextModel, self.source, "text_encoder"),
            "text_encoder_2": load_component(CLIPTextModelWithProjection, self.source, "text_encoder_2"),
        }


@dataclass
class SDXLCaptionEncoder:
    """SDXL's two text encoders as the cache's :class:`~training.cache.CaptionEncoder`: ``prompt_embeds``
    ``(77 * n, D1 + D2)`` and ``pooled_prompt_embeds`` ``(D2,)`` of a caption, exactly as
    :func:`ldm.text.encode_prompts_with_encoders` computes them; the fingerprint hashes both encoders' weights."""

    text_encoder: torch.nn.Module
    tokenizer: Any
    text_encoder_2: torch.nn.Module
    tokenizer_2: Any
    device: torch.device | str | None = None

    outputs: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")

    def fingerprint(self) -> dict[str, str]:
        """The hashes of both encoders' weights."""
        return {"text_encoder": weights_hash(self.text_encoder), "text_encoder_2": weights_hash(self.text_encoder_2)}

    @torch.no_grad()
    def encode(self, caption: str) -> dict[str, Tensor]:
        """Both outputs of ``caption``, float32 on the CPU."""
        encoding = encode_prompts_with_encoders(
            [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)],
            [[caption], [caption]],
            device=self.device,
        )
        return {
            "prompt_embeds": encoding.hidden_states[0].float().cpu(),
            "pooled_prompt_embeds": encoding.pooled[0].float().cpu(),
        }


def sdxl_conditioning(
    models: TrainingModels, *, train: bool, learning_rate: float, device: torch.device | str, dtype: torch.dtype
) -> Conditioning:
    """SDXL: both text encoders frozen (cast to the mixed-precision ``dtype`` when they can be reloaded).

    Raises:
        UserError: ``train`` (SDXL's text encoders are not trained yet).
    """
    if train:
        raise UserError(
            "--train-text-encoder is not supported for SDXL yet; drop it to train the U-Net (or its LoRA layers) "
            "with both text encoders frozen"
        )
    return FrozenSDXLTextEncoders(models, device=device, dtype=dtype)
