"""Prompt conditioning: what turns a call's prompts, negative prompts and image prompts into what the U-Net is
conditioned on (:class:`TextConditioning`), for Stable Diffusion 1.x / 2.x.

:class:`PromptConditioningMixin` gives :class:`~pipelines.LatentDiffusionPipeline` stock's ``encode_prompt`` (same
signature and, for prompts of up to 75 tokens, the same embeddings) with our extras: prompts longer than 75 tokens in
chunks (:func:`ldm.text.encode_prompts`) with a padding mask so a prompt's image does not depend on its batch, A1111
prompt weights, textual-inversion tokens expanded, ``clip_skip`` and the text encoder's LoRA scale; and the
IP-Adapter image embeddings as added conditions. SDXL's two encoders, pooled embedding and size/crop ids are in
:mod:`pipelines.prompt_conditioning_xl`, on top of the pieces here that do not differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from torch import nn
from transformers import PreTrainedTokenizerBase

from ldm.errors import UserError
from ldm.text import encode_prompts, prompt_chunk_count
from ldm.tokenizer import CLIP_MAX_LENGTH


@dataclass
class TextConditioning:
    """What the U-Net is conditioned on for one call: the prompt embeddings ``(B * n, L, D)``, the negative ones (None
    when the call does not guide), the padding mask of the embeddings (None: attend to all) and the U-Net's added
    conditions of the prompts (``added_cond_kwargs``: IP-Adapter image embeddings, SDXL's pooled text embedding and
    size/crop ids; None without) and of the negative prompts (``negative_added_cond_kwargs``, the same keys; None
    when the call does not guide). A guided step gives the U-Net each added condition as ``[negative; positive]``,
    an unguided one the positive alone."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    added_cond_kwargs: dict[str, Any] | None
    negative_added_cond_kwargs: dict[str, Any] | None = None


@dataclass
class FamilyInputs:
    """The call arguments that only some model families take (SDXL's second prompts, pooled embeddings and sizes),
    handed from ``__call__`` through :meth:`LatentDiffusionPipeline.start_call` to ``encode_conditioning``. Stable
    Diffusion 1.x/2.x has none."""


def concat_added_conditions(negative: dict[str, Any] | None, positive: dict[str, Any] | None) -> dict[str, Any] | None:
    """The U-Net's added conditions of a guided step: each one ``[negative; positive]`` along the batch (a list of
    tensors, as IP-Adapter image embeddings come, element by element)."""
    if positive is None:
        return None
    if negative is None:
        raise ValueError("a guided step needs the negative added conditions too (TextConditioning.negative_*)")

    def cat(neg: Any, pos: Any) -> Any:
        if isinstance(pos, (list, tuple)):
            return [torch.cat([n, q]) for n, q in zip(neg, pos, strict=True)]
        return torch.cat([neg, pos])

    return {key: cat(negative[key], value) for key, value in positive.items()}


def split_added_conditions(both: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``[negative; positive]`` added conditions (as stock's ``prepare_ip_adapter_image_embeds`` returns them when
    guiding) split into the negative and the positive halves."""

    def half(value: Any, index: int) -> Any:
        if isinstance(value, (list, tuple)):
            return [v.chunk(2)[index] for v in value]
        return value.chunk(2)[index]

    return {k: half(v, 0) for k, v in both.items()}, {k: half(v, 1) for k, v in both.items()}


def padding_mask(counts: list[int], num_images_per_prompt: int, device: torch.device) -> torch.Tensor | None:
    """``(B * n, 77 * max(counts))``: 1 on the first ``counts[b]`` chunks of prompt ``b``, 0 on the chunks its batch
    adds beyond them; None when every prompt has the same count (no mask: the call is stock's)."""
    if min(counts) == max(counts):
        return None
    positions = torch.arange(max(counts) * CLIP_MAX_LENGTH, device=device)
    lengths = torch.tensor(counts, device=device)[:, None] * CLIP_MAX_LENGTH
    return (positions[None, :] < lengths).long().repeat_interleave(num_images_per_prompt, dim=0)


def chunk_counts(
    tokenizers: Sequence[PreTrainedTokenizerBase], texts: Sequence[list[str]], weighting: bool, truncate: bool
) -> list[int]:
    """Per row, the 75-token chunks its texts need (at least 1): ``texts[k]`` is the batch that ``tokenizers[k]``
    reads (one entry per encoder; the prompts and the negative prompts of a row are encoded to the same length)."""
    counts = [1] * len(texts[0])
    for tokenizer, batch in zip(tokenizers, texts, strict=True):
        needed = [prompt_chunk_count(tokenizer, text, weighting, truncate) for text in batch]
        counts = [max(c, n) for c, n in zip(counts, needed, strict=True)]
    return counts


def check_negative_fits(needed: int, prompt_embeds: torch.Tensor) -> int:
    """The chunk count of ``prompt_embeds`` ``(B, 77 * chunks, D)``, which the negative prompts are encoded to.

    Raises:
        UserError: the negative prompts need ``needed`` chunks, more than the given ``prompt_embeds`` have.
    """
    prompt_chunks = prompt_embeds.shape[1] // CLIP_MAX_LENGTH
    if needed > prompt_chunks:
        raise UserError(
            f"negative_prompt needs {needed} chunks of {CLIP_MAX_LENGTH} tokens but prompt_embeds has "
            f"{prompt_chunks}; shorten the negative prompt or pass negative_prompt_embeds"
        )
    return prompt_chunks


def per_image(embeds: torch.Tensor, num_images_per_prompt: int, **to: Any) -> torch.Tensor:
    """``embeds`` ``(B, ...)`` moved (``to``: device and dtype) and repeated to ``(B * n, ...)``, each prompt's rows
    together, as stock orders the images of a call."""
    return embeds.to(**to).repeat_interleave(num_images_per_prompt, dim=0)


class PromptConditioningMixin:
    """The conditioning steps of :class:`~pipelines.LatentDiffusionPipeline` (step 2 of a call): stock's
    ``encode_prompt`` and our :meth:`encode_conditioning`. Reads the pipeline's ``tokenizer``, ``text_encoder``,
    ``unet``, ``image_encoder`` / ``feature_extractor`` and its call state (``do_classifier_free_guidance``,
    ``clip_skip``, ``cross_attention_kwargs``); ``maybe_convert_prompt`` comes from diffusers'
    ``TextualInversionLoaderMixin``."""

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        prompt_weighting: bool = False,
        long_prompts: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts (and negative prompts, when guiding) to CLIP hidden states ``(B * n, 77 * chunks, D)``.

        A prompt of up to 75 tokens gives exactly stock diffusers' embeddings (with ``prompt_weighting`` on, only
        when it has no weight syntax). Longer prompts are encoded in 75-token chunks that are concatenated (see
        :func:`ldm.text.encode_prompts`); a batch is padded to its longest prompt's chunk count with chunks of the
        empty prompt (:meth:`prompt_padding_mask` says which positions are such padding). ``prompt_weighting``
        reads A1111's ``(word:1.3)`` / ``[word]`` weights; off (the default, as stock), brackets are text.
        ``long_prompts=False`` cuts every prompt to its first 75 tokens instead, as stock does (with its warning).
        With both ``prompt_embeds`` and ``negative_prompt_embeds`` given, no tokenizer or text encoder is needed.

        Raises:
            UserError: a negative prompt longer than the ``prompt_embeds`` given.
        """
        text_encoder = self.text_encoder
        prompts, negatives = self._prompt_texts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_classifier_free_guidance
        )
        truncate = not long_prompts
        encode = {
            "clip_skip": clip_skip,
            "device": device,
            "dtype": self._text_dtype(),
            "weighting": prompt_weighting,
            "truncate": truncate,
        }
        encoders = [text_encoder] if text_encoder is not None else []
        with self.text_encoder_lora_scale(encoders, lora_scale if encoders else None):
            if prompt_embeds is None:
                num_chunks = max(self._chunk_counts(prompts, negatives, prompt_weighting, truncate))
                prompt_embeds = encode_prompts(text_encoder, self.tokenizer, prompts, num_chunks=num_chunks, **encode)
            if negatives is not None:
                needed = max(chunk_counts([self.tokenizer], [negatives], prompt_weighting, truncate))
                prompt_chunks = check_negative_fits(needed, prompt_embeds)
                negative_prompt_embeds = encode_prompts(
                    text_encoder, self.tokenizer, negatives, num_chunks=prompt_chunks, **encode
                )

        to = {"device": device, "dtype": self._text_dtype()}
        prompt_embeds = per_image(prompt_embeds, num_images_per_prompt, **to)
        if do_classifier_free_guidance:
            negative_prompt_embeds = per_image(negative_prompt_embeds, num_images_per_prompt, **to)
        return prompt_embeds, negative_prompt_embeds

    def encode_conditioning(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_images_per_prompt: int,
        device: torch.device,
        prompt_weighting: bool,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        long_prompts: bool = True,
        family_inputs: FamilyInputs | None = None,
    ) -> TextConditioning:
        """The prompt (and, when guiding, negative prompt) embeddings, their padding mask and the IP-Adapter image
        embeddings of this call (call :meth:`_start_call` first: guidance, ``clip_skip`` and the LoRA scale are read
        from the call state). ``family_inputs``: none for this family."""
        do_cfg = self.do_classifier_free_guidance
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
            prompt_weighting=prompt_weighting,
            long_prompts=long_prompts,
        )
        attention_mask = self.prompt_padding_mask(
            prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_weighting, device, long_prompts
        )
        added, negative_added = self.ip_adapter_conditions(
            ip_adapter_image, ip_adapter_image_embeds, device, prompt_embeds.shape[0]
        )
        return TextConditioning(
            prompt_embeds, negative_prompt_embeds if do_cfg else None, attention_mask, added, negative_added
        )

    def ip_adapter_conditions(
        self,
        ip_adapter_image: PipelineImageInput | None,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        device: torch.device,
        num_images: int,
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The IP-Adapter image embeddings as added conditions of the prompts and (when guiding) of the negative
        prompts, as stock computes them; None without an image prompt (and for the negative when not guiding)."""
        do_cfg = self.do_classifier_free_guidance
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return None, None
        image_embeds = self.prepare_ip_adapter_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, num_images, do_cfg
        )
        if not do_cfg:
            return {"image_embeds": image_embeds}, None
        negative, positive = split_added_conditions({"image_embeds": image_embeds})
        return positive, negative

    def prompt_padding_mask(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        prompt_weighting: bool,
        device: torch.device,
        long_prompts: bool = True,
    ) -> torch.Tensor | None:
        """Which positions of :meth:`encode_prompt`'s embeddings the U-Net attends to, ``(B * n, 77 * chunks)``.

        Each prompt (with its negative, padded to the pair's chunk count as A1111 does) has its own chunk count; the
        chunks a batch adds beyond it to reach its longest prompt are masked, so a prompt's image does not depend on
        the other prompts of its batch. None when no row is padded (or for precomputed embeddings): then the U-Net
        gets no mask and the call is stock's.
        """
        if prompt is None:
            return None
        prompts, negatives = self._prompt_texts(prompt, negative_prompt, None, None, do_classifier_free_guidance)
        counts = self._chunk_counts(prompts, negatives, prompt_weighting, not long_prompts)
        return padding_mask(counts, num_images_per_prompt, device)

    def _prompt_texts(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        do_classifier_free_guidance: bool,
    ) -> tuple[list[str] | None, list[str] | None]:
        """The prompts and negative prompts still to encode, as lists (textual-inversion tokens expanded)."""
        batch_size = self._batch_size(prompt, prompt_embeds)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        negatives: list[str] | None = None
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            negatives = self.maybe_convert_prompt(negatives, self.tokenizer)
        if prompts is not None and prompt_embeds is None:
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        return prompts, negatives

    def _chunk_counts(
        self, prompts: list[str], negatives: list[str] | None, weighting: bool, truncate: bool = False
    ) -> list[int]:
        """Per prompt, the chunks it and its negative need (at least 1; exactly 1 with ``truncate``)."""
        texts = [prompts] if negatives is None else [prompts, negatives]
        return chunk_counts([self.tokenizer] * len(texts), texts, weighting, truncate)

    def _text_dtype(self) -> torch.dtype:
        """The dtype the prompt embeddings are handed on in: the text encoder's (the U-Net's without one)."""
        if self.text_encoder is not None:
            return self.text_encoder.dtype
        return self.unet.dtype

    # IP-Adapter image embeddings exactly as stock computes them (from self.image_encoder / feature_extractor).
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds

    @staticmethod
    def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        """The number of prompts of a call (given as text or as ``prompt_embeds``)."""
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

    @contextmanager
    def text_encoder_lora_scale(self, encoders: Sequence[nn.Module], lora_scale: float | None) -> Iterator[None]:
        """Scale the LoRA layers of ``encoders`` by ``lora_scale`` (``cross_attention_kwargs["scale"]``) while the
        block encodes (with the PEFT backend, as stock); None leaves them as they are. As in stock, an error in the
        block leaves them scaled."""
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            self._lora_scale = lora_scale
            for encoder in encoders:
                scale_lora_layers(encoder, lora_scale)
        yield
        if scaled:
            for encoder in encoders:
                unscale_lora_layers(encoder, lora_scale)
