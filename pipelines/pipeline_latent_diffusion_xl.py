"""`LatentDiffusionXLPipeline`: text-to-image with Stable Diffusion XL (Podell et al. 2023), a drop-in for diffusers'
``StableDiffusionXLPipeline``.

SDXL is the same system as :class:`~pipelines.LatentDiffusionPipeline` (frozen VAE, conditional U-Net, CLIP text
conditioning, classifier-free guidance); what differs is the conditioning, and only that lives here. The prompt goes
through two text encoders (CLIP ViT-L and OpenCLIP bigG) whose penultimate hidden states are concatenated along the
features (the U-Net's ``encoder_hidden_states``); the second encoder's pooled, projected embedding and six size/crop
numbers (``add_time_ids``: original size, crop offset, target size, sec. 2.2) are the U-Net's added conditions. They
ride in :class:`~pipelines.pipeline_latent_diffusion.TextConditioning`, so the loop, guidance (with its interval and
rescale), callbacks and decoding are the base pipeline's.

With the same components, scheduler, seed and arguments it returns stock's images. The extras carry over as switches:
prompts longer than 75 tokens in chunks for both encoders, pooled from the first chunk as A1111 and ComfyUI do
(``long_prompts=False``: stock's truncation), ``prompt_weighting`` (off: stock), ``guidance_interval``,
``generation_defaults.json``, attention backends and the half-precision decode retry (a VAE with ``force_upcast``,
SDXL's, decodes in float32 as stock does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, is_invisible_watermark_available, scale_lora_layers, unscale_lora_layers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ldm.errors import UserError
from ldm.micro_conditioning import size_crop_time_ids
from ldm.text import encode_prompts_with_encoders, prompt_chunk_count
from ldm.tokenizer import CLIP_MAX_LENGTH
from pipelines.generation_defaults import GenerationDefaults
from pipelines.pipeline_latent_diffusion import (
    FamilyInputs,
    LatentDiffusionPipeline,
    LatentDiffusionPipelineOutput,
    TextConditioning,
    padding_mask,
)

logger = logging.getLogger(__name__)

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


def timesteps_until(
    timesteps: torch.Tensor, denoising_end: float | None, num_train_timesteps: int
) -> tuple[torch.Tensor, int]:
    """The timesteps of a base model that hands over to a refiner after the ``denoising_end`` fraction of the
    denoising (stock's rule: the timesteps t >= round(T * (1 - denoising_end))); all of them for None, 0 or 1."""
    if denoising_end is None or not 0 < denoising_end < 1:
        return timesteps, len(timesteps)
    cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
    count = int((timesteps >= cutoff).sum())
    return timesteps[:count], count


class LatentDiffusionXLPipeline(StableDiffusionXLLoraLoaderMixin, LatentDiffusionPipeline):
    """Text-to-image generation with Stable Diffusion XL, a drop-in for ``StableDiffusionXLPipeline``.

    Args:
        vae: the frozen autoencoder (SDXL's has ``force_upcast``: it decodes in float32 in a float16 pipeline).
        text_encoder: CLIP ViT-L's text tower (``CLIPTextModel``); None in a refiner.
        text_encoder_2: OpenCLIP bigG's text tower with its projection (``CLIPTextModelWithProjection``).
        tokenizer, tokenizer_2: their tokenizers (the second pads with ``!``).
        unet: the U-Net with ``addition_embed_type="text_time"`` (pooled embedding + size/crop ids).
        scheduler: any diffusers scheduler (SDXL ships Euler).
        image_encoder, feature_extractor: for IP-Adapters (``load_ip_adapter`` loads them).
        force_zeros_for_empty_prompt: with no negative prompt, guide from all-zero embeddings (SDXL base's config)
            instead of the empty prompt's.
        add_watermarker: apply stock's invisible watermark to decoded images (default: when the
            ``invisible-watermark`` package is installed, as stock).

    ``from_pretrained`` / ``save_pretrained`` / ``from_pipe`` / ``(**stock_pipe.components)`` work as with stock;
    LoRAs load through diffusers' SDXL loader (U-Net and both text encoders), textual inversions for either encoder
    (``load_textual_inversion(..., tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)``), IP-Adapters.

    Where it differs from stock: as :class:`LatentDiffusionPipeline` (long prompts in chunks, ``prompt_weighting``,
    ``guidance_interval``, ``generation_defaults.json``, the float16 decode retry, unknown keyword arguments refused);
    with more than one image in a call and a ``negative_original_size``, each image's unconditional pass gets the
    negative size ids (stock's repeat gives half of them the positive ones). ``clip_skip`` leaves the negative prompt
    on the penultimate layer, as stock does.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = [
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
    ]
    _exclude_from_cpu_offload = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    _callback_added_conditions = {
        "add_text_embeds": ("text_embeds", "both"),
        "add_time_ids": ("time_ids", "both"),
        "negative_pooled_prompt_embeds": ("text_embeds", "negative"),
        "negative_add_time_ids": ("time_ids", "negative"),
    }
    stock_generation_defaults = GenerationDefaults(num_inference_steps=50, guidance_scale=5.0)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer | None,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        # DiffusionPipeline's own __init__: SDXL registers other modules than the base family's __init__ does.
        super(LatentDiffusionPipeline, self).__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._init_state()
        self.default_sample_size = getattr(unet.config, "sample_size", 128) if unet is not None else 128
        self.watermark = self._watermarker(add_watermarker)

    @staticmethod
    def _watermarker(add_watermarker: bool | None) -> Any:
        """Stock's ``StableDiffusionXLWatermarker`` when asked for (by default: when its package is installed).

        Raises:
            UserError: asked for without the ``invisible-watermark`` package.
        """
        available = is_invisible_watermark_available()
        if not (available if add_watermarker is None else add_watermarker):
            return None
        if not available:
            raise UserError(
                "add_watermarker=True needs the invisible-watermark package: pip install invisible-watermark"
            )
        from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

        return StableDiffusionXLWatermarker()

    @property
    def denoising_end(self) -> float | None:
        """The running call's ``denoising_end`` (the fraction of the denoising a base model does before a refiner)."""
        return self._denoising_end

    # ---------------------------------------------------------------------------------------------------- 1. inputs

    def check_xl_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        inputs: XLInputs,
    ) -> None:
        """Raise a ``UserError`` naming the fix for SDXL arguments the pipeline cannot use (stock's checks)."""
        if inputs.prompt_2 is not None and prompt_embeds is not None:
            raise UserError("pass either prompt_2 or prompt_embeds, not both")
        for name in ("prompt_2", "negative_prompt_2"):
            value = getattr(inputs, name)
            if value is not None and not (
                isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, str) for p in value))
            ):
                raise UserError(f"{name} must be a string or a list of strings; got {type(value).__name__}")
        if inputs.negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise UserError("pass either negative_prompt_2 or negative_prompt_embeds, not both")
        if prompt_embeds is not None and inputs.pooled_prompt_embeds is None:
            raise UserError(
                "prompt_embeds need pooled_prompt_embeds too (the second text encoder's pooled output, as "
                "encode_prompt returns it)"
            )
        if negative_prompt_embeds is not None and inputs.negative_pooled_prompt_embeds is None:
            raise UserError("negative_prompt_embeds need negative_pooled_prompt_embeds too (as encode_prompt returns)")
        for name in ("prompt_2", "negative_prompt_2"):
            value = getattr(inputs, name)
            if isinstance(value, list) and isinstance(prompt, list) and len(value) != len(prompt):
                raise UserError(f"{name} has {len(value)} entries but there are {len(prompt)} prompts; pass one each")

    # ---------------------------------------------------------------------------------------------------- 2. prompt

    def _text_encoder_pairs(self) -> list[tuple[CLIPTokenizer, CLIPTextModel | CLIPTextModelWithProjection]]:
        """(tokenizer, text encoder) of each encoder the pipeline has, in stock's order (a refiner has the second)."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]

    def _text_dtype(self) -> torch.dtype:
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

    def _chunk_counts_per_row(self, texts: list[list[str]], weighting: bool, truncate: bool) -> list[int]:
        """Per row, the chunks its texts need in any encoder (``texts[k]`` is what encoder ``k`` reads)."""
        counts = [1] * len(texts[0])
        for encoder_texts, (tokenizer, _) in zip(texts, self._text_encoder_pairs(), strict=True):
            needed = [prompt_chunk_count(tokenizer, text, weighting, truncate) for text in encoder_texts]
            counts = [max(c, n) for c, n in zip(counts, needed, strict=True)]
        return counts

    def _xl_chunk_counts(
        self, prompts: list[list[str]], negatives: list[list[str]] | None, weighting: bool, truncate: bool
    ) -> list[int]:
        """Per prompt, the chunks it and its negative need in either encoder (at least 1)."""
        counts = self._chunk_counts_per_row(prompts, weighting, truncate)
        if negatives is None:
            return counts
        negative_counts = self._chunk_counts_per_row(negatives, weighting, truncate)
        return [max(c, n) for c, n in zip(counts, negative_counts, strict=True)]

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
        if lora_scale is not None and USE_PEFT_BACKEND:
            self._lora_scale = lora_scale
            for encoder in encoders:
                scale_lora_layers(encoder, lora_scale)

        batch_size = self._batch_size(prompt, prompt_embeds)
        zero_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        encode_negatives = do_classifier_free_guidance and negative_prompt_embeds is None and not zero_negative
        prompts, negatives = self._xl_texts(
            prompt, prompt_2, negative_prompt, negative_prompt_2, batch_size, prompt_embeds is None, encode_negatives
        )
        truncate = not long_prompts
        encode = {"weighting": prompt_weighting, "truncate": truncate}
        if prompts is not None:
            num_chunks = max(self._xl_chunk_counts(prompts, negatives, prompt_weighting, truncate))
            prompt_embeds, pooled = self._encode_texts(prompts, num_chunks, clip_skip, device, **encode)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        if do_classifier_free_guidance and negative_prompt_embeds is None and zero_negative:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        elif negatives is not None:
            prompt_chunks = prompt_embeds.shape[1] // CLIP_MAX_LENGTH
            needed = max(self._chunk_counts_per_row(negatives, prompt_weighting, truncate))
            if needed > prompt_chunks:
                raise UserError(
                    f"negative_prompt needs {needed} chunks of {CLIP_MAX_LENGTH} tokens but prompt_embeds has "
                    f"{prompt_chunks}; shorten the negative prompt or pass negative_prompt_embeds"
                )
            # stock encodes the negative prompt from the penultimate layer whatever clip_skip says
            negative_prompt_embeds, pooled = self._encode_texts(negatives, prompt_chunks, None, device, **encode)
            if negative_pooled_prompt_embeds is None:
                negative_pooled_prompt_embeds = pooled

        if lora_scale is not None and USE_PEFT_BACKEND:
            for encoder in encoders:
                unscale_lora_layers(encoder, lora_scale)

        dtype = self._text_dtype()
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
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

    # ---------------------------------------------------------------------------------------------------- 5. decode

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> the VAE's: ``latents * std / scaling_factor + mean`` for a VAE with
        ``latents_mean`` / ``latents_std`` in its config, else divided by ``scaling_factor`` (as stock)."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return latents / config.scaling_factor
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean

    def decode_in_float32(self) -> bool:
        """A float16 VAE with ``force_upcast`` (SDXL's: it overflows in float16) decodes in float32, as stock; any
        half-precision VAE does once a decode has overflowed."""
        return super().decode_in_float32() or (self.vae.dtype == torch.float16 and self.vae.config.force_upcast)

    def decode_latents(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None):
        """The base pipeline's decode, then stock's invisible watermark when the pipeline has one."""
        image = super().decode_latents(latents, generator)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return image

    # ------------------------------------------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        prompt_weighting: bool = False,
        long_prompts: bool = True,
        **kwargs: Any,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Generate images from text with SDXL.

        Args:
            prompt, prompt_2: the text(s) to draw, for the first and second text encoder (``prompt_2`` None: the
                same). Longer than 77 tokens is fine; with ``prompt_weighting``, ``(word:1.3)`` weights a part.
            height, width: image size in pixels (default: the model's native size, 1024 for SDXL).
            num_inference_steps, guidance_scale: default: the model's ``generation_defaults`` (stock's 50 and 5.0
                for an SDXL folder without one).
            denoising_end: in (0, 1): stop after this fraction of the denoising and return the noisy latents for a
                refiner (``output_type="latent"``), as stock's base + refiner split.
            negative_prompt, negative_prompt_2: what to guide away from; with neither (and
                ``force_zeros_for_empty_prompt``, SDXL base's setting) the unconditional pass gets all-zero embeddings.
            pooled_prompt_embeds, negative_pooled_prompt_embeds: precomputed pooled embeddings (with
                ``prompt_embeds`` / ``negative_prompt_embeds``, as :meth:`encode_prompt` returns them).
            original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning (default: the image size,
                no crop); ``negative_original_size``, ``negative_crops_coords_top_left``, ``negative_target_size``:
                the unconditional pass's (used when both sizes are given).
            Everything else as :meth:`LatentDiffusionPipeline.__call__` (``callback_on_step_end_tensor_inputs``
            may also name ``add_text_embeds`` and ``add_time_ids``, ``[negative; positive]`` at guided steps).
        """
        height = height or self.default_size
        width = width or self.default_size
        inputs = XLInputs(
            prompt_2=prompt_2,
            negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            original_size=original_size or (height, width),
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size or (height, width),
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )
        self.check_xl_inputs(prompt, prompt_embeds, negative_prompt_embeds, inputs)
        if denoising_end is not None and not 0 <= denoising_end <= 1:
            raise UserError(f"denoising_end must be in (0, 1) (the fraction before the refiner); got {denoising_end}")
        self._denoising_end = denoising_end
        # 1.-2. Check the inputs; encode the prompts with both encoders, the pooled embedding and size/crop ids.
        setup = self.start_call(
            prompt,
            height,
            width,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
            eta=eta,
            generator=generator,
            latents=latents,
            output_type=output_type,
            cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            prompt_weighting=prompt_weighting,
            long_prompts=long_prompts,
            deprecated=kwargs,
            family_inputs=inputs,
        )

        # 3. Sampling timesteps (up to denoising_end) and the initial noise x_T.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, setup.num_inference_steps, setup.device, timesteps, sigmas
        )
        timesteps, num_inference_steps = timesteps_until(
            timesteps, denoising_end, self.scheduler.config.num_train_timesteps
        )
        dtype = setup.conditioning.prompt_embeds.dtype
        latents = self.prepare_latents(setup.num_images, height, width, dtype, setup.device, generator, latents)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 4. The denoising loop: x_t -> x_{t-1} with the guided prediction.
        latents = self.run_denoise(latents, timesteps, num_inference_steps, setup)

        # 5. Decode the latents and convert to the requested output type.
        return self.finish_call(latents, setup, output_type, return_dict)
