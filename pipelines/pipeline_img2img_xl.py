"""`LatentDiffusionXLImg2ImgPipeline`: SDXL image-to-image and the SDXL refiner, a drop-in for diffusers'
``StableDiffusionXLImg2ImgPipeline``.

The SDEdit loop of :class:`~pipelines.LatentDiffusionImg2ImgPipeline` with SDXL's conditioning
(:class:`~pipelines.LatentDiffusionXLPipeline`). Two things are the refiner's: ``denoising_start`` continues a base
model's ``denoising_end`` latents (already noisy: no noise is added) over the remaining timesteps, and a refiner U-Net
(``requires_aesthetics_score=True``) is conditioned on an aesthetic score instead of the target size (sec. 2.5 of
the SDXL paper). With the same components, scheduler, seed and arguments it returns stock's images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ldm.errors import UserError
from ldm.micro_conditioning import aesthetic_time_ids, size_crop_time_ids
from pipelines.pipeline_img2img import LatentDiffusionImg2ImgPipeline
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipelineOutput
from pipelines.pipeline_latent_diffusion_xl import LatentDiffusionXLPipeline, timesteps_until
from pipelines.prompt_conditioning_xl import Size, XLInputs

logger = logging.getLogger(__name__)

XL_IMG2IMG_STRENGTH = 0.3
"""Stock SDXL img2img's default ``strength``."""


class LatentDiffusionXLImg2ImgPipeline(LatentDiffusionXLPipeline, LatentDiffusionImg2ImgPipeline):
    """SDXL image-to-image and refiner, a drop-in for ``StableDiffusionXLImg2ImgPipeline``.

    Args: as :class:`LatentDiffusionXLPipeline` (a refiner has no ``text_encoder`` / ``tokenizer``), plus
        requires_aesthetics_score: the U-Net takes ``(original size, crop, aesthetic score)`` as its time ids (the
            SDXL refiner) instead of ``(original size, crop, target size)``.
    """

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
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    @property
    def denoising_start(self) -> float | None:
        """The running call's ``denoising_start`` (where a refiner takes over from the base model)."""
        return self._denoising_start

    def start_denoising_split(self, denoising_start: float | None, denoising_end: float | None) -> float | None:
        """Check and record the call's ``denoising_start`` / ``denoising_end``; returns ``denoising_start`` where it
        splits the schedule (in (0, 1)), else None.

        Raises:
            UserError: a value outside [0, 1], or a start at or after the end.
        """
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not 0 <= value <= 1:
                raise UserError(f"{name} must be in (0, 1) (a fraction of the denoising); got {value}")
        if denoising_start is not None and denoising_end is not None and 0 < denoising_end <= denoising_start < 1:
            raise UserError(
                f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end}): the refiner "
                "starts where the base model ends"
            )
        self._denoising_start, self._denoising_end = denoising_start, denoising_end
        return denoising_start if denoising_start is not None and 0 < denoising_start < 1 else None

    # ---------------------------------------------------------------------------------------------------- 2. prompt

    def micro_conditioning(
        self, inputs: XLInputs, dtype: torch.dtype, projection_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock img2img's time ids: the negative sizes default to the positive ones one by one; a refiner
        (``requires_aesthetics_score``) takes the aesthetic scores in place of the target sizes."""
        negative_original = inputs.negative_original_size or inputs.original_size
        if self.config.requires_aesthetics_score:
            time_ids = aesthetic_time_ids(inputs.original_size, inputs.crops_coords_top_left, inputs.aesthetic_score)
            negative = aesthetic_time_ids(
                negative_original, inputs.negative_crops_coords_top_left, inputs.negative_aesthetic_score
            )
        else:
            time_ids = size_crop_time_ids(inputs.original_size, inputs.crops_coords_top_left, inputs.target_size)
            negative = size_crop_time_ids(
                negative_original,
                inputs.negative_crops_coords_top_left,
                inputs.negative_target_size or inputs.target_size,
            )
        self.check_time_ids(time_ids, projection_dim)
        return time_ids.to(dtype), negative.to(dtype)

    # --------------------------------------------------------------------------------------------------- 3. latents

    def get_timesteps(
        self,
        num_inference_steps: int,
        strength: float,
        device: torch.device | None = None,
        denoising_start: float | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Stock's: the last ``strength`` fraction of the schedule, or with ``denoising_start`` the timesteps
        t < round(T * (1 - denoising_start)) (one more for a second-order scheduler that would stop mid-step)."""
        if denoising_start is None:
            return super().get_timesteps(num_inference_steps, strength, device)
        T = self.scheduler.config.num_train_timesteps
        cutoff = int(round(T - denoising_start * T))
        count = int((self.scheduler.timesteps < cutoff).sum())
        if self.scheduler.order == 2 and count % 2 == 0:
            count += 1
        t_start = len(self.scheduler.timesteps) - count
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start)
        return self.scheduler.timesteps[t_start:], count

    def strength_timesteps(
        self,
        num_inference_steps: int,
        strength: float,
        device: torch.device,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The scheduler's timesteps cut to the last ``strength`` fraction, or with ``denoising_start`` to those
        after it (:meth:`get_timesteps`).

        Raises:
            UserError: no step is left.
        """
        all_timesteps, num_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        timesteps, num_steps = self.get_timesteps(num_steps, strength, device, denoising_start)
        if num_steps < 1:
            raise UserError(
                f"strength {strength} x {len(all_timesteps)} steps leaves no denoising step; raise strength or "
                "num_inference_steps"
            )
        return timesteps, num_steps

    def _encode_vae_image(
        self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents sampled from the VAE posterior (image ``i`` with generator ``i`` for
        a list), as stock SDXL: in float32 for a VAE with ``force_upcast``, cast back to the images' dtype, then
        scaled, normalised with ``latents_mean`` / ``latents_std`` where the VAE's config has them."""
        dtype, vae_dtype = image.dtype, self.vae.dtype
        upcast = self.vae.config.force_upcast
        if upcast:
            image = image.float()
            self.vae.to(torch.float32)
        try:
            if isinstance(generator, list):
                posterior = [self.vae.encode(image[i : i + 1]) for i in range(len(image))]
                latents = torch.cat([retrieve_latents(p, g) for p, g in zip(posterior, generator, strict=True)])
            else:
                latents = retrieve_latents(self.vae.encode(image), generator=generator)
        finally:
            if upcast:
                self.vae.to(vae_dtype)
        latents = latents.to(dtype)
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return config.scaling_factor * latents
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, dtype)
        return (latents - mean) * config.scaling_factor / std

    def prepare_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        add_noise: bool = True,
    ) -> torch.Tensor:
        """The image's latents (a refiner's input latents as they are), noised to ``timestep`` unless ``add_noise``
        is off (a refiner continuing a base model's noisy latents)."""
        image = image.to(device=device, dtype=dtype)
        num_images = batch_size * num_images_per_prompt
        latents = self.encode_images(image, batch_size, num_images, generator)
        if not add_noise:
            return latents
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(latents, noise, timestep)

    # ------------------------------------------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = XL_IMG2IMG_STRENGTH,
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
        **kwargs: Any,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Redraw ``image`` with the prompt, or refine a base model's latents.

        Args:
            image: the image (or, for a refiner, the base model's ``output_type="latent"`` latents) to start from.
            strength: in (0, 1] (default 0.3, as stock): how much of the denoising is redone (ignored with
                ``denoising_start``).
            denoising_start: in (0, 1): continue a base model that stopped at ``denoising_end=denoising_start``
                from its latents (no noise is added).
            aesthetic_score, negative_aesthetic_score: a refiner's conditioning (``requires_aesthetics_score``).
            Everything else as :meth:`LatentDiffusionXLPipeline.__call__`.
        """
        # 1. Check inputs; the size is the image's.
        if image is None:
            raise UserError("pass the image to start from as image (a PIL image, a tensor, an array or latents)")
        self.check_strength(strength)
        start = self.start_denoising_split(denoising_start, denoising_end)
        init_image = self.image_processor.preprocess(image)
        height, width = (int(side) for side in init_image.shape[-2:])
        if init_image.shape[1] == self.vae.config.latent_channels:
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
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

        # 2. Encode the prompts.
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

        # 3. Timesteps: the last `strength` fraction (or from denoising_start); the image's latents noised to them.
        timesteps, num_inference_steps = self.strength_timesteps(
            setup.num_inference_steps, strength, setup.device, timesteps, sigmas, start
        )
        dtype = setup.conditioning.prompt_embeds.dtype
        if latents is None:
            latents = self.prepare_latents(
                init_image,
                timesteps[:1].repeat(setup.num_images),
                setup.batch_size,
                num_images_per_prompt,
                dtype,
                setup.device,
                generator,
                add_noise=start is None,
            )
        timesteps, num_inference_steps = timesteps_until(
            timesteps, denoising_end, self.scheduler.config.num_train_timesteps
        )

        # 4. The text-to-image loop from there.
        latents = self.run_denoise(latents, timesteps, num_inference_steps, setup)

        # 5. Decode.
        return self.finish_call(latents, setup, output_type, return_dict)
