"""`LatentDiffusionXLPipeline`: text-to-image with Stable Diffusion XL (Podell et al. 2023), a drop-in for diffusers'
``StableDiffusionXLPipeline``.

SDXL is the same system as :class:`~pipelines.LatentDiffusionPipeline` (frozen VAE, conditional U-Net, CLIP text
conditioning, classifier-free guidance); what differs is the conditioning. The prompt goes through two text encoders
(CLIP ViT-L and OpenCLIP bigG) whose penultimate hidden states are concatenated along the features (the U-Net's
``encoder_hidden_states``); the second encoder's pooled, projected embedding and six size/crop numbers
(``add_time_ids``: original size, crop offset, target size, sec. 2.2) are the U-Net's added conditions. That lives in
:mod:`pipelines.prompt_conditioning_xl`; it rides in :class:`~pipelines.prompt_conditioning.TextConditioning`, so
the loop, guidance (with its interval and rescale), callbacks and decoding are the base pipeline's. This module has
SDXL's checks, the refiner hand-over (``denoising_end``), its latent scaling, the watermark and ``__call__``.

With the same components, scheduler, seed and arguments it returns stock's images. The extras carry over as switches:
prompts longer than 75 tokens in chunks for both encoders, pooled from the first chunk as A1111 and ComfyUI do
(``long_prompts=False``: stock's truncation), ``prompt_weighting`` (off: stock), ``guidance_interval``,
``generation_defaults.json``, attention backends and the half-precision decode retry (a VAE with ``force_upcast``,
SDXL's, decodes in float32 as stock does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import is_invisible_watermark_available
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ldm.errors import UserError
from pipelines.generation_defaults import GenerationDefaults
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline, LatentDiffusionPipelineOutput
from pipelines.prompt_conditioning_xl import Size, XLInputs, XLPromptConditioningMixin

logger = logging.getLogger(__name__)


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


class LatentDiffusionXLPipeline(XLPromptConditioningMixin, StableDiffusionXLLoraLoaderMixin, LatentDiffusionPipeline):
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
