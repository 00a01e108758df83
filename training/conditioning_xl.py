"""SDXL's text conditioning in training: the :class:`~training.conditioning.TextEncoding` of its two text encoders.

The penultimate hidden states of two text encoders concatenated (:func:`ldm.text.encode_prompts_with_encoders`, as
``StableDiffusionXLPipeline.encode_prompt``), and ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}`` from
the second encoder's pooled output and each sample's own original size, crop corner and target size
(:func:`training.micro_conditioning.add_time_ids`), as the SDXL paper trains. Either encoder may be trained (all its
weights, or LoRA layers) or frozen (:class:`~training.conditioning.TextEncoders`); with ``--cache`` and both frozen,
both outputs are read from the cache (:class:`SDXLCaptionEncoder` writes them and fingerprints both encoders).
Caption dropout encodes the empty caption, as for SD (and as diffusers' SDXL training script does), not the all-zero
embeddings that ``force_zeros_for_empty_prompt`` gives the unconditional pass at sampling time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ldm.text import encode_prompts_with_encoders
from training.cache import weights_hash
from training.conditioning import Batch, Device, UNetConditioning
from training.micro_conditioning import add_time_ids


class SDXLTextEncoding:
    """SDXL's :class:`~training.conditioning.TextEncoding`: the penultimate hidden states of its two encoders
    concatenated (:func:`ldm.text.encode_prompts_with_encoders`, as ``StableDiffusionXLPipeline.encode_prompt``), the
    second's pooled output as ``text_embeds``, and each sample's size and crop ``time_ids`` (float32)."""

    def encode(
        self, encoders: Sequence[tuple[Any, torch.nn.Module]], batch: Batch, captions: list[str], device: Device
    ) -> UNetConditioning:
        encoding = encode_prompts_with_encoders(list(encoders), [captions] * len(encoders), device=device)
        outputs = {"prompt_embeds": encoding.hidden_states, "pooled_prompt_embeds": encoding.pooled}
        return self.from_outputs(batch, outputs)

    def caption_encoder(self, encoders: Sequence[tuple[Any, torch.nn.Module]], device: Device) -> SDXLCaptionEncoder:
        (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = encoders
        return SDXLCaptionEncoder(text_encoder, tokenizer, text_encoder_2, tokenizer_2, device)

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning:
        time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        hidden = outputs["prompt_embeds"]
        return UNetConditioning(
            hidden,
            {"text_embeds": outputs["pooled_prompt_embeds"], "time_ids": time_ids.to(hidden.device)},
        )


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
