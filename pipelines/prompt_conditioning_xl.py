"""SDXL's prompt conditioning (Podell et al. 2023, sec. 2.1-2.2): what differs from
:mod:`pipelines.prompt_conditioning` when the text goes through two encoders.

Each prompt is read by CLIP ViT-L and OpenCLIP bigG (``prompt_2`` for the second, the prompt where None); their
penultimate hidden states are concatenated along the features (the U-Net's ``encoder_hidden_states``), and the second
encoder's pooled, projected embedding and six size/crop numbers (``add_time_ids``: original size, crop offset, target
size) are the U-Net's added conditions. Long prompts are encoded in chunks for both encoders and pooled from the
first chunk as A1111 and ComfyUI do; chunk counts, the padding mask, the negative-prompt length check, the LoRA scale
and the IP-Adapter conditions are the shared ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import PipelineImageInput
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.errors import UserError
from ldm.micro_conditioning import size_crop_time_ids
from ldm.text import encode_prompts_with_encoders
from pipelines.prompt_conditioning import (
    FamilyInputs,
    PromptConditioningMixin,
    TextConditioning,
    check_negative_fits,
    chunk_counts,
    padding_mask,
    per_image,
)

Size = tuple[int, int]


@dataclass
class XLInputs(FamilyInputs):
    """SDXL's own call arguments (stock's names): the second encoder's prompts, precomputed pooled embeddings and the
    micro-conditioning sizes (``original_size`` and ``target_size`` are filled in from the image size)."""

    prompt_2: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size = (0, 0)
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0  # a refiner's (requires_aesthetics_score) in place of the target size
    negative_aesthetic_score: float = 2.5


class XLPromptConditioningMixin(PromptConditioningMixin):
    """SDXL's ``encode_prompt`` (stock's signature and results) and :meth:`encode_conditioning`, on top of the
    shared :class:`~pipelines.prompt_conditioning.PromptConditioningMixin`. Reads the pipeline's ``tokenizer`` /
    ``text_encoder`` (None in a refiner), ``tokenizer_2`` / ``text_encoder_2``, ``unet`` and the
    ``force_zeros_for_empty_prompt`` config."""

    def _text_encoder_pairs(self) -> list[tuple[CLIPTokenizer, CLIPTextModel | CLIPTextModelWithProjection]]:
        """(tokenizer, text encoder) of each encoder the pipeline has, in stock's order (a refiner has the second)."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]

    def _text_dtype(self) -> torch.dtype:
        """The dtype the prompt embeddings are handed on in: the second text encoder's (the U-Net's without one)."""
        return self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

    def _texts_per_encoder(
        self, first: str | list[str] | None, second: str | list[str] | None, batch_size: int
    ) -> list[list[str]]:
        """The texts each encoder reads (``second`` for the second encoder, ``first`` where it is None, as stock),
        as lists of ``batch_size`` with textual-inversion tokens expanded for that encoder's tokenizer."""
        second = second or first
        texts = [first, second][: len(self._text_encoder_pairs())]
        out = []
        for text, (tokenizer, _) in zip(texts, self._text_encoder_pairs(), strict=False):
            text = [text] * batch_size if isinstance(text, str) else text
            out.append(self.maybe_convert_prompt(text, tokenizer))
        return out

    def _xl_texts(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_2: str | list[str] | None,
        batch_size: int,
        encode_prompts: bool,
        encode_negatives: bool,
    ) -> tuple[list[list[str]] | None, list[list[str]] | None]:
        """The prompts and negative prompts still to encode, per encoder (None where there is nothing to encode)."""
        prompts = self._texts_per_encoder(prompt, prompt_2, batch_size) if encode_prompts else None
        negatives = None
        if encode_negatives:
            negatives = self._texts_per_encoder(negative_prompt or "", negative_prompt_2, batch_size)
        return prompts, negatives

    def _xl_chunk_counts(
        self, prompts: list[list[str]], negatives: list[list[str]] | None, weighting: bool, truncate: bool
    ) -> list[int]:
        """Per prompt, the chunks it and its negative need in either encoder (at least 1); ``prompts[k]`` and
        ``negatives[k]`` are what encoder ``k`` reads."""
        texts = prompts + (negatives or [])
        tokenizers = [tokenizer for tokenizer, _ in self._text_encoder_pairs()]
        return chunk_counts(tokenizers * (len(texts) // len(tokenizers)), texts, weighting, truncate)

    def _encode_texts(
        self, texts: list[list[str]], num_chunks: int, clip_skip: int | None, device: torch.device, **encode: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both encoders' penultimate hidden states (``clip_skip`` layers further back) concatenated along the
        features, and the pooled embedding (:func:`ldm.text.encode_prompts_with_encoders`)."""
        encoding = encode_prompts_with_encoders(
            self._text_encoder_pairs(), texts, num_chunks=num_chunks, clip_skip=clip_skip, device=device, **encode
        )
        return encoding.hidden_states, encoding.pooled

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        *,
        prompt_weighting: bool = False,
        long_prompts: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Stock's ``encode_prompt``: ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds)``, ``(B * n, 77 * chunks, D1 + D2)`` and ``(B * n, P)``.

        Each encoder reads its prompt (``prompt_2`` for the second, ``prompt`` where None); the penultimate hidden
        states (``clip_skip`` layers further back) are concatenated, and the second encoder's projected pooled
        output is the pooled embedding. With guidance and no ``negative_prompt``, ``force_zeros_for_empty_prompt``
        gives all-zero negative embeddings, as stock. A prompt of up to 75 tokens gives stock's embeddings exactly;
        longer ones are encoded in 75-token chunks for both encoders (a batch padded to its longest prompt), pooled
        from the first chunk (``long_prompts=False`` truncates as stock); ``prompt_weighting`` reads ``(word:1.3)``.

        Raises:
            UserError: a negative prompt longer than the ``prompt_embeds`` given.
        """
        device = device or self._execution_device
        encoders = [encoder for _, encoder in self._text_encoder_pairs()]
        batch_size = self._batch_size(prompt, prompt_embeds)
        zero_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        encode_negatives = do_classifier_free_guidance and negative_prompt_embeds is None and not zero_negative
        prompts, negatives = self._xl_texts(
            prompt, prompt_2, negative_prompt, negative_prompt_2, batch_size, prompt_embeds is None, encode_negatives
        )
        truncate = not long_prompts
        encode = {"weighting": prompt_weighting, "truncate": truncate}
        with self.text_encoder_lora_scale(encoders, lora_scale):
            if prompts is not None:
                num_chunks = max(self._xl_chunk_counts(prompts, negatives, prompt_weighting, truncate))
                prompt_embeds, pooled = self._encode_texts(prompts, num_chunks, clip_skip, device, **encode)
                pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
            if do_classifier_free_guidance and negative_prompt_embeds is None and zero_negative:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            elif negatives is not None:
                needed = max(self._xl_chunk_counts(negatives, None, prompt_weighting, truncate))
                prompt_chunks = check_negative_fits(needed, prompt_embeds)
                # stock encodes the negative prompt from the penultimate layer whatever clip_skip says
                negative_prompt_embeds, pooled = self._encode_texts(negatives, prompt_chunks, None, device, **encode)
                if negative_pooled_prompt_embeds is None:
                    negative_pooled_prompt_embeds = pooled

        to = {"device": device, "dtype": self._text_dtype()}
        prompt_embeds = per_image(prompt_embeds, num_images_per_prompt, **to)
        pooled_prompt_embeds = per_image(pooled_prompt_embeds, num_images_per_prompt)
        if do_classifier_free_guidance:
            negative_prompt_embeds = per_image(negative_prompt_embeds, num_images_per_prompt, **to)
            negative_pooled_prompt_embeds = per_image(negative_pooled_prompt_embeds, num_images_per_prompt)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    def _get_add_time_ids(
        self,
        original_size: Size,
        crops_coords_top_left: Size,
        target_size: Size,
        dtype: torch.dtype,
        text_encoder_projection_dim: int | None = None,
    ) -> torch.Tensor:
        """Stock's ``add_time_ids`` ``(1, 6)`` (:func:`ldm.micro_conditioning.size_crop_time_ids`).

        Raises:
            UserError: the U-Net's added embedding does not take six ids and a pooled embedding of this size.
        """
        add_time_ids = size_crop_time_ids(original_size, crops_coords_top_left, target_size, dtype)
        self.check_time_ids(add_time_ids, text_encoder_projection_dim)
        return add_time_ids

    def check_time_ids(self, time_ids: torch.Tensor, projection_dim: int) -> None:
        """Raise a ``UserError`` unless the U-Net's added embedding takes ``time_ids`` ``(1, k)`` and a pooled
        embedding of ``projection_dim`` (a refiner takes 5 ids, with the aesthetic score; a base model 6)."""
        passed = self.unet.config.addition_time_embed_dim * time_ids.shape[1] + projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if expected != passed:
            raise UserError(
                f"the U-Net's added embedding takes {expected} features but {time_ids.shape[1]} size/crop ids and a "
                f"pooled text embedding of {projection_dim} give {passed}; a refiner U-Net (aesthetic score) needs "
                "the img2img pipeline with requires_aesthetics_score=True, a base U-Net requires_aesthetics_score="
                "False; else check unet.config.addition_time_embed_dim and text_encoder_2.config.projection_dim"
            )

    def micro_conditioning(
        self, inputs: XLInputs, dtype: torch.dtype, projection_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(add_time_ids, negative_add_time_ids)``, each ``(1, k)``: the negative sizes when both
        ``negative_original_size`` and ``negative_target_size`` are given, else the positive ones (stock's rule)."""
        time_ids = self._get_add_time_ids(
            inputs.original_size, inputs.crops_coords_top_left, inputs.target_size, dtype, projection_dim
        )
        if inputs.negative_original_size is None or inputs.negative_target_size is None:
            return time_ids, time_ids
        negative = self._get_add_time_ids(
            inputs.negative_original_size,
            inputs.negative_crops_coords_top_left,
            inputs.negative_target_size,
            dtype,
            projection_dim,
        )
        return time_ids, negative

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
        """SDXL's conditioning of this call: both encoders' hidden states (and their padding mask), and as added
        conditions the pooled embedding (``text_embeds``), the size/crop ids (``time_ids``) and any IP-Adapter
        image embeddings, for the prompts and (when guiding) the negative prompts."""
        inputs = family_inputs if isinstance(family_inputs, XLInputs) else XLInputs()
        do_cfg = self.do_classifier_free_guidance
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt,
            inputs.prompt_2,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            inputs.negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            inputs.pooled_prompt_embeds,
            inputs.negative_pooled_prompt_embeds,
            lora_scale=(self.cross_attention_kwargs or {}).get("scale"),
            clip_skip=self.clip_skip,
            prompt_weighting=prompt_weighting,
            long_prompts=long_prompts,
        )
        mask = None
        if prompt is not None:
            zero_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
            prompts, negatives = self._xl_texts(
                prompt,
                inputs.prompt_2,
                negative_prompt,
                inputs.negative_prompt_2,
                self._batch_size(prompt, prompt_embeds),
                True,
                do_cfg and negative_prompt_embeds is None and not zero_negative,
            )
            counts = self._xl_chunk_counts(prompts, negatives, prompt_weighting, not long_prompts)
            mask = padding_mask(counts, num_images_per_prompt, device)

        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled.shape[-1])
        )
        time_ids, negative_time_ids = self.micro_conditioning(inputs, embeds.dtype, projection_dim)
        num_images = embeds.shape[0]
        image, negative_image = self.ip_adapter_conditions(
            ip_adapter_image, ip_adapter_image_embeds, device, num_images
        )
        added = {
            "text_embeds": pooled.to(device),
            "time_ids": time_ids.to(device).repeat(num_images, 1),
            **(image or {}),
        }
        negative_added = None
        if do_cfg:
            negative_added = {
                "text_embeds": negative_pooled.to(device),
                "time_ids": negative_time_ids.to(device).repeat(num_images, 1),
                **(negative_image or {}),
            }
        return TextConditioning(embeds, negative_embeds if do_cfg else None, mask, added, negative_added)
