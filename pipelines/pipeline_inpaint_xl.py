"""`LatentDiffusionXLInpaintPipeline`: SDXL inpainting, a drop-in for diffusers' ``StableDiffusionXLInpaintPipeline``.

Composed, not copied: the inpainting of :class:`~pipelines.LatentDiffusionInpaintPipeline` (its step hooks for both
U-Net kinds, the mask code, ``padding_mask_crop`` and the extras ``keep_unmasked_pixels`` / ``mask_blur`` /
``resamples``) with SDXL's conditioning and refiner split from :class:`~pipelines.LatentDiffusionXLImg2ImgPipeline`
(two text encoders, pooled embedding, size/crop or aesthetic-score time ids, ``denoising_start`` / ``denoising_end``).
With the same components, scheduler, seed and arguments it returns stock's images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from pipelines.generation_defaults import GenerationDefaults
from pipelines.pipeline_img2img_xl import LatentDiffusionXLImg2ImgPipeline
from pipelines.pipeline_inpaint import InpaintStepHook, LatentDiffusionInpaintPipeline
from pipelines.pipeline_latent_diffusion import CallSetup, LatentDiffusionPipelineOutput
from pipelines.pipeline_latent_diffusion_xl import LatentDiffusionXLPipeline, timesteps_until
from pipelines.prompt_conditioning_xl import Size, XLInputs

logger = logging.getLogger(__name__)

XL_INPAINT_STRENGTH = 0.9999
"""Stock SDXL inpainting's default ``strength``: just below 1, so the masked area starts from the image's latents
noised to the first timestep rather than from pure noise."""


class LatentDiffusionXLInpaintPipeline(LatentDiffusionXLImg2ImgPipeline, LatentDiffusionInpaintPipeline):
    """SDXL inpainting with a base / refiner U-Net (4 channels: the kept region replaced after every step) or an
    SDXL inpainting U-Net (9 channels: mask and masked image as input channels), a drop-in for
    ``StableDiffusionXLInpaintPipeline``.

    Args: as :class:`~pipelines.LatentDiffusionXLImg2ImgPipeline` (``requires_aesthetics_score`` for a refiner-style
        U-Net).

    Where it differs from stock: as :class:`~pipelines.LatentDiffusionInpaintPipeline` (``height`` / ``width``
    default to the image's size, not the U-Net's native one; with a list of generators each output encodes its image
    with its own generator) and :class:`~pipelines.LatentDiffusionXLPipeline`; a VAE with ``latents_mean`` /
    ``latents_std`` normalises the image's latents as it denormalises the result (stock inpainting only scales them).
    """

    _callback_tensor_inputs = [*LatentDiffusionXLPipeline._callback_tensor_inputs, *InpaintStepHook.callback_names]
    stock_generation_defaults = GenerationDefaults(num_inference_steps=50, guidance_scale=7.5)

    # Both bases define these; the inpainting ones take the mask's arguments.
    prepare_latents = LatentDiffusionInpaintPipeline.prepare_latents

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
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        """Stock's components and settings (:class:`~pipelines.LatentDiffusionXLImg2ImgPipeline`)."""
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            requires_aesthetics_score,
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def inpaint_timesteps(
        self, setup: CallSetup, strength: float, timesteps: list[int] | None, sigmas: list[float] | None
    ) -> tuple[torch.Tensor, int, bool]:
        """The last ``strength`` fraction of the schedule (or the timesteps after ``denoising_start``, continuing a
        base model's noisy latents: no noise added), up to ``denoising_end``."""
        start = self._denoising_start if self._denoising_start is not None and 0 < self._denoising_start < 1 else None
        timesteps, num_steps = self.strength_timesteps(
            setup.num_inference_steps, strength, setup.device, timesteps, sigmas, start
        )
        end, num_train_timesteps = self._denoising_end, self.scheduler.config.num_train_timesteps
        timesteps, num_steps = timesteps_until(timesteps, end, num_train_timesteps)
        return timesteps, num_steps, start is None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = XL_INPAINT_STRENGTH,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
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
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        prompt_weighting: bool = False,
        long_prompts: bool = True,
        keep_unmasked_pixels: bool = False,
        mask_blur: float = 0.0,
        resamples: int = 0,
        **kwargs: Any,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Regenerate the white part of ``mask_image`` in ``image`` with the prompt(s).

        Args:
            image, mask_image, masked_image_latents, height, width, padding_mask_crop, keep_unmasked_pixels,
                mask_blur, resamples: as :meth:`LatentDiffusionInpaintPipeline.__call__`; ``image`` may also be a
                base model's ``output_type="latent"`` latents for a refiner (with ``denoising_start``).
            strength: in (0, 1] (default 0.9999, as stock; ignored with ``denoising_start``).
            denoising_start, denoising_end, aesthetic_score, negative_aesthetic_score: as
                :meth:`LatentDiffusionXLImg2ImgPipeline.__call__`.
            Everything else as :meth:`LatentDiffusionXLPipeline.__call__` (``callback_on_step_end_tensor_inputs``
            may also name ``mask`` and ``masked_image_latents``).
        """
        # 1. Check inputs.
        replacement = self.unet_kind() == "text-to-image"
        self.check_inpaint_inputs(
            image, mask_image, padding_mask_crop, output_type, keep_unmasked_pixels, mask_blur, resamples, replacement
        )
        self.check_strength(strength)
        self.start_denoising_split(denoising_start, denoising_end)
        height, width = self.default_height_width(image, height, width)
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
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )
        self.check_xl_inputs(prompt, prompt_embeds, negative_prompt_embeds, inputs)

        # 2. Encode the prompts with both encoders, the pooled embedding and the time ids.
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
            latents=None,
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

        # 3.-7. Timesteps, image and mask, latents, the loop with the U-Net kind's step hook, decoding.
        return self.inpaint_from_setup(
            setup,
            image,
            mask_image,
            masked_image_latents=masked_image_latents,
            height=height,
            width=width,
            padding_mask_crop=padding_mask_crop,
            strength=strength,
            timesteps=timesteps,
            sigmas=sigmas,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            keep_unmasked_pixels=keep_unmasked_pixels,
            mask_blur=mask_blur,
            resamples=resamples,
        )
