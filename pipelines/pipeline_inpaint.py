"""`LatentDiffusionInpaintPipeline`: inpainting with a latent diffusion model, a drop-in for diffusers'
``StableDiffusionInpaintPipeline`` (white in ``mask_image`` = regenerate, black = keep).

Both kinds of U-Net that stock takes, exactly as stock runs them, through one :class:`StepHook` of the text-to-image
loop (:meth:`LatentDiffusionPipeline.denoise`):

- an **inpainting U-Net** (``2 * C + 1`` input channels, 9 for SD): the mask and the masked image's latents are
  concatenated to its input at every step (:class:`MaskedImageInput`);
- a **text-to-image U-Net** (``C`` channels): after every step the kept region of the latents is replaced by the
  original's latents forward-noised to the next timestep (the blended-diffusion / RePaint way; Avrahami et al. 2022,
  Lugmayr et al. 2022) (:class:`KnownRegionReplacement`).

Extras, each off by default so that the images are stock's: ``keep_unmasked_pixels`` pastes the original pixels back
outside the (``mask_blur``-feathered) mask after decoding, so they are exactly the original's (and the latent mask
then covers every block with a masked pixel); ``resamples`` redoes each step with RePaint's resampling.
Outpainting: :func:`pipelines.masks.outpaint_canvas` pads the image and masks the new area; then inpaint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ldm.diffusion import q_sample_from
from ldm.errors import UserError
from pipelines.denoising import StepHook
from pipelines.masks import latent_mask, paste_unmasked, warn_if_mask_is_uniform
from pipelines.pipeline_img2img import LatentDiffusionImg2ImgPipeline, expand_to_batch
from pipelines.pipeline_latent_diffusion import CallSetup, LatentDiffusionPipelineOutput

logger = logging.getLogger(__name__)

INPAINT_STRENGTH = 1.0
"""Stock's default ``strength`` for inpainting: the masked area starts from pure noise."""


class InpaintStepHook(StepHook):
    """What both ways of inpainting hold: the latent-size mask ``(B, 1, h, w)`` and the masked image's latents
    ``(B, C, h, w)``, which a ``callback_on_step_end`` may read and replace as ``mask`` and ``masked_image_latents``
    (doubled for the guided ``[neg; pos]`` batch at guided steps, as stock passes them)."""

    callback_names = ("mask", "masked_image_latents")

    def __init__(self, mask: torch.Tensor, masked_image_latents: torch.Tensor):
        self.mask = mask
        self.masked_image_latents = masked_image_latents

    def callback_tensors(self, guided: bool) -> dict[str, torch.Tensor]:
        """``mask`` and ``masked_image_latents``, doubled at a guided step."""
        return {
            name: torch.cat([getattr(self, name)] * 2) if guided else getattr(self, name)
            for name in self.callback_names
        }

    def set_callback_tensors(self, tensors: dict[str, torch.Tensor], guided: bool) -> None:
        """Take back a returned ``mask`` / ``masked_image_latents`` (one half of a doubled one)."""
        for name in self.callback_names:
            if name in tensors:
                value, current = tensors.pop(name), getattr(self, name)
                setattr(self, name, value.chunk(2)[1] if value.shape[0] == 2 * current.shape[0] else value)


class MaskedImageInput(InpaintStepHook):
    """An inpainting U-Net's extra input channels: the mask and the masked image's latents, concatenated after the
    latents (doubled for the guided ``[neg; pos]`` batch)."""

    def unet_input(self, model_input: torch.Tensor, guided: bool) -> torch.Tensor:
        """``[x_t, mask, masked image latents]`` along the channels."""
        extra = torch.cat([self.mask, self.masked_image_latents], dim=1)
        return torch.cat([model_input, torch.cat([extra] * 2) if guided else extra], dim=1)


class KnownRegionReplacement(InpaintStepHook):
    """Inpainting with a text-to-image U-Net: after each step the kept region (mask 0) of x_{t'} is the original's
    latents forward-noised to t' with the initial noise (q(x_t' | x_0), as stock), the last step's the original's
    latents themselves. With ``resamples`` > 0 each step is redone that many more times from its result noised back
    to the step's timestep with fresh noise (RePaint, Lugmayr et al. 2022, jump length 1)."""

    def __init__(
        self,
        mask: torch.Tensor,
        masked_image_latents: torch.Tensor,
        image_latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        scheduler: Any,
        resamples: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ):
        super().__init__(mask, masked_image_latents)
        self.image_latents, self.noise = image_latents, noise
        self.timesteps, self.scheduler, self.generator = timesteps, scheduler, generator
        self.resamples = resamples

    def after_step(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """``(1 - m) * q(x_t' | x_0) + m * x_t'`` for the next timestep t' (x_0 itself after the last step)."""
        known = self.image_latents
        if i < len(self.timesteps) - 1:
            known = self.scheduler.add_noise(self.image_latents, self.noise, self.timesteps[i + 1 : i + 2])
        return (1 - self.mask) * known + self.mask * latents

    def renoise(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """x_t' -> x_t by q(x_t | x_t') with fresh noise, to redo step i (t' = -1, the data, after the last step)."""
        after = int(self.timesteps[i + 1]) if i < len(self.timesteps) - 1 else -1
        fresh = randn_tensor(latents.shape, generator=self.generator, device=latents.device, dtype=latents.dtype)
        return q_sample_from(latents, after, int(self.timesteps[i]), fresh, self.scheduler.alphas_cumprod)


class LatentDiffusionInpaintPipeline(LatentDiffusionImg2ImgPipeline):
    """Inpainting and outpainting with the components of a :class:`LatentDiffusionPipeline` (a text-to-image U-Net)
    or of an inpainting model (a ``2 * C + 1``-channel U-Net), a drop-in for ``StableDiffusionInpaintPipeline``.

    ``LatentDiffusionInpaintPipeline.from_pipe(pipe)`` shares a loaded pipeline's components and its
    ``generation_defaults``; ``LatentDiffusionInpaintPipeline(**stock_pipe.components)`` takes stock's.
    """

    _callback_tensor_inputs = [
        *LatentDiffusionImg2ImgPipeline._callback_tensor_inputs,
        *InpaintStepHook.callback_names,
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Any = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    # ---------------------------------------------------------------------------------------------------- 1. inputs

    def default_height_width(
        self, image: PipelineImageInput, height: int | None, width: int | None
    ) -> tuple[int, int]:
        """``height`` / ``width`` as given, else the image's (rounded down to the VAE factor). Stock defaults to the
        U-Net's native size instead, and resizes the image to it. A single unbatched image (a ``(C, H, W)`` tensor,
        such as a base model's ``images[0]`` latents, or an ``(H, W, C)`` array) counts as a batch of one, as
        stock's image processor takes it."""
        first = image[0] if isinstance(image, list) else image
        if height is not None and width is not None:
            return height, width
        if isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim == 3:
            first = first[None]
        image_height, image_width = self.image_processor.get_default_height_width(first)
        if isinstance(first, torch.Tensor) and first.shape[-3] == self.vae.config.latent_channels:
            image_height, image_width = image_height * self.vae_scale_factor, image_width * self.vae_scale_factor
        return height or image_height, width or image_width

    def unet_kind(self) -> str:
        """``"inpainting"`` for a ``2 * C + 1``-channel U-Net, ``"text-to-image"`` for a ``C``-channel one.

        Raises:
            UserError: any other channel count.
        """
        in_channels, latent_channels = self.unet.config.in_channels, self.vae.config.latent_channels
        if in_channels == 2 * latent_channels + 1:
            return "inpainting"
        if in_channels == latent_channels:
            return "text-to-image"
        raise UserError(
            f"the U-Net takes {in_channels} input channels; inpainting needs {latent_channels} (a text-to-image "
            f"model) or {2 * latent_channels + 1} (an inpainting model)"
        )

    def check_inpaint_inputs(
        self,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        padding_mask_crop: int | None,
        output_type: str,
        keep_unmasked_pixels: bool,
        mask_blur: float,
        resamples: int,
        replacement: bool,
    ) -> None:
        """Check what inpainting adds to the text-to-image inputs (``padding_mask_crop`` as stock)."""
        if image is None:
            raise UserError("pass the image to inpaint as image (a PIL image, a tensor or an array)")
        if mask_image is None:
            raise UserError("pass mask_image: white = regenerate, black = keep (for no mask use img2img)")
        if padding_mask_crop is not None:
            if not isinstance(image, PIL.Image.Image) or not isinstance(mask_image, PIL.Image.Image):
                raise UserError("padding_mask_crop needs image and mask_image as PIL images")
            if output_type != "pil":
                raise UserError(
                    f"padding_mask_crop needs output_type 'pil' (it pastes into the image); got {output_type!r}"
                )
        if mask_blur < 0:
            raise UserError(f"mask_blur must be >= 0 pixels (0: a hard mask edge); got {mask_blur}")
        if mask_blur > 0 and not keep_unmasked_pixels:
            raise UserError("mask_blur feathers the paste of the original pixels: pass keep_unmasked_pixels=True too")
        self.check_resamples(resamples, replacement)

    def check_resamples(self, resamples: int, replacement: bool) -> None:
        """``resamples`` is a whole number >= 0; > 0 needs a text-to-image U-Net and a scheduler without memory."""
        if not isinstance(resamples, int) or resamples < 0:
            raise UserError(f"resamples must be a whole number >= 0 (extra passes per step); got {resamples!r}")
        if resamples == 0:
            return
        if not replacement:
            raise UserError(
                "resamples is for inpainting with a text-to-image U-Net (an inpainting U-Net sees the kept region "
                "directly); leave resamples at 0"
            )
        if not isinstance(self.scheduler, (DDIMScheduler, DDPMScheduler)):
            raise UserError(
                f"resamples redoes steps, which needs a scheduler whose step keeps no state (DDIM or DDPM); this "
                f"pipeline has {type(self.scheduler).__name__}. Set pipe.scheduler = "
                "DDIMScheduler.from_config(pipe.scheduler.config), or leave resamples at 0"
            )

    # --------------------------------------------------------------------------------------------------- 3. latents

    def prepare_latents(
        self,
        batch_size: int,
        num_images_per_prompt: int,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        image: torch.Tensor,
        timestep: torch.Tensor,
        is_strength_max: bool,
        return_image_latents: bool,
        add_noise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The initial latents, the noise they were made with, and the image's latents (None unless needed), with
        stock's random draws in stock's order: the image's posterior sample (when strength < 1 or the image latents
        are needed), then the noise. At strength 1 the latents are pure noise; below, the image's latents noised to
        ``timestep``; given ``latents`` are the noise (as stock). With one generator per output and fewer images,
        each output's copy of its image is encoded with its own generator (:meth:`encode_images`). ``add_noise``
        False (an SDXL refiner's ``denoising_start``): the image's latents are already noisy and are the initial
        latents as they are (the noise is still drawn, for the kept region)."""
        num_images = batch_size * num_images_per_prompt
        image_latents = None
        if return_image_latents or not add_noise or (latents is None and not is_strength_max):
            image = image.to(device=device, dtype=dtype)
            # In the standard memory layout, as stock's copy is: a half-precision VAE can return channels-last
            # latents, for which the U-Net's kernels round differently.
            image_latents = self.encode_images(image, batch_size, num_images, generator).contiguous()
        if latents is None or not add_noise:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if not add_noise:
                latents = image_latents
            elif is_strength_max:
                latents = noise * self.scheduler.init_noise_sigma
            else:
                latents = self.scheduler.add_noise(image_latents, noise, timestep)
        else:
            noise = latents.to(device=device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma
        return latents, noise, image_latents

    def prepare_mask_latents(
        self,
        mask: torch.Tensor,
        masked_image: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        latent_size: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        cover: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent-size mask ``(B * n, 1, h, w)`` (:func:`pipelines.masks.latent_mask`) and the masked image's
        latents ``(B * n, C, h, w)`` (encoded unless given as latents), not doubled for guidance (the step hook does
        that at the guided steps)."""
        num_images = batch_size * num_images_per_prompt
        mask = latent_mask(mask, latent_size, cover).to(device=device, dtype=dtype)
        masked_image = masked_image.to(device=device, dtype=dtype)
        masked_image_latents = self.encode_images(masked_image, batch_size, num_images, generator, "masked image")
        masked_image_latents = masked_image_latents.contiguous()  # as prepare_latents
        mask = expand_to_batch(mask, batch_size, num_images, "mask")
        return mask, masked_image_latents.to(device=device, dtype=dtype)

    # ---------------------------------------------------------------------------------------------------- 5. decode

    def decode_inpainted(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        init_image: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Latents -> images in [-1, 1]; an ``AsymmetricAutoencoderKL`` decodes with the original image and the
        pixel mask as its conditioning (as stock), any other VAE as the text-to-image pipeline does."""
        if not isinstance(self.vae, AsymmetricAutoencoderKL):
            return self.decode_latents(latents, generator)
        init_image = init_image.to(device=latents.device, dtype=latents.dtype)
        mask = mask.to(device=latents.device, dtype=latents.dtype)
        return self.vae.decode(
            latents / self.vae.config.scaling_factor,
            generator=generator,
            image=init_image,
            mask=mask,
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = INPAINT_STRENGTH,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_weighting: bool = False,
        long_prompts: bool = True,
        keep_unmasked_pixels: bool = False,
        mask_blur: float = 0.0,
        resamples: int = 0,
        **kwargs: Any,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Regenerate the white part of ``mask_image`` in ``image`` with the prompt.

        Args:
            prompt: what the regenerated area should show.
            image: the image to inpaint (PIL, a tensor / array in [0, 1], or latents); one, one per prompt or one per
                output image. With a list of generators each output encodes its image with its own generator, so
                it equals its single run (stock encodes a shared image once, with the first generator).
            mask_image: white (>= 0.5 after binarizing) is regenerated, black is kept; resized to the image's size.
                All white or all black runs (with a warning), as in stock.
            masked_image_latents: the masked image's latents, instead of encoding ``image * (mask < 0.5)``.
            height, width: the size to resize image and mask to (default: the image's size, rounded down to the VAE
                factor; stock defaults to the U-Net's native size).
            padding_mask_crop: inpaint only a crop around the mask, this many pixels wider, resized to ``height`` x
                ``width``, and paste it back into the image (as stock; needs PIL inputs and output).
            strength: in (0, 1] (default 1, as stock): how much of the denoising is redone; 1 starts the masked
                area from pure noise.
            latents: the initial noise ``(B * n, C, h, w)`` instead of drawing it.
            keep_unmasked_pixels: paste the original pixels back outside the mask after decoding, so they are
                exactly the original's (off, as stock: the whole image is the decoded latents, and the kept area
                changes slightly through the VAE). With a text-to-image U-Net the latent mask then covers every
                latent whose pixel block has a masked pixel, so every masked pixel is regenerated.
            mask_blur: with ``keep_unmasked_pixels``, the standard deviation in pixels of the Gaussian feathering of
                that paste (0: hard edge; pixels farther than 3 * mask_blur from the mask are the original's).
            resamples: with a text-to-image U-Net, redo every step this many more times from its result noised back
                to the step's timestep with fresh noise (RePaint's resampling, Lugmayr et al. 2022), so the new area
                agrees with the kept one instead of only sitting next to it. Costs ``1 + resamples`` times the U-Net
                passes; needs DDIM or DDPM. 0 (default): stock's plain replacement.
            Everything else as :meth:`LatentDiffusionPipeline.__call__`. With ``output_type="latent"`` the final
            latents are returned (no paste).
        """
        replacement = self.unet_kind() == "text-to-image"  # for the checks; inpaint_from_setup asks again

        # 1. Check inputs.
        self.check_inpaint_inputs(
            image, mask_image, padding_mask_crop, output_type, keep_unmasked_pixels, mask_blur, resamples, replacement
        )
        self.check_strength(strength)
        height, width = self.default_height_width(image, height, width)

        # 2. Encode the prompt (`latents` are checked against the VAE's channels in prepare_latents, not the U-Net's).
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
        )
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

    def inpaint_timesteps(
        self, setup: CallSetup, strength: float, timesteps: list[int] | None, sigmas: list[float] | None
    ) -> tuple[torch.Tensor, int, bool]:
        """The timesteps to run, their number, and whether the initial latents get noise added: the last
        ``strength`` fraction of the schedule, from the image noised to its first timestep (the SDXL pipeline adds
        the base + refiner split)."""
        timesteps, num_steps = self.strength_timesteps(
            setup.num_inference_steps, strength, setup.device, timesteps, sigmas
        )
        return timesteps, num_steps, True

    def inpaint_from_setup(
        self,
        setup: CallSetup,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        *,
        masked_image_latents: torch.Tensor | None,
        height: int,
        width: int,
        padding_mask_crop: int | None,
        strength: float,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        latents: torch.Tensor | None,
        output_type: str,
        return_dict: bool,
        keep_unmasked_pixels: bool,
        mask_blur: float,
        resamples: int,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """The rest of an inpainting call once :meth:`start_call` has settled the conditioning (checked inputs, as
        :meth:`__call__` takes them): timesteps, image and mask, initial latents, the loop with the step hook of the
        U-Net's kind, decoding and the optional paste."""
        replacement = self.unet_kind() == "text-to-image"
        batch_size, num_images, device, generator = setup.batch_size, setup.num_images, setup.device, setup.generator
        num_images_per_prompt = num_images // batch_size
        dtype = setup.conditioning.prompt_embeds.dtype

        # 3. Timesteps: the last `strength` fraction of the schedule.
        timesteps, num_inference_steps, add_noise = self.inpaint_timesteps(setup, strength, timesteps, sigmas)
        latent_timestep = timesteps[:1].repeat(num_images)

        # 4. The image in [-1, 1] and the mask in {0, 1}, cropped around the mask with padding_mask_crop.
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        init_image = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        ).to(dtype=torch.float32)
        mask_condition = self.mask_processor.preprocess(
            mask_image, height=height, width=width, resize_mode=resize_mode, crops_coords=crops_coords
        )
        warn_if_mask_is_uniform(mask_condition)
        image_is_latents = init_image.shape[1] == self.vae.config.latent_channels
        if image_is_latents and keep_unmasked_pixels:
            raise UserError("keep_unmasked_pixels pastes the original pixels: pass the image as pixels, not latents")

        # 5. Initial latents and the masked image's latents, in stock's order of random draws.
        factor = self.vae_scale_factor
        shape = (num_images, self.vae.config.latent_channels, height // factor, width // factor)
        latents, noise, image_latents = self.prepare_latents(
            batch_size,
            num_images_per_prompt,
            shape,
            dtype,
            device,
            generator,
            latents,
            init_image,
            latent_timestep,
            is_strength_max=strength == 1,
            return_image_latents=replacement,
            add_noise=add_noise,
        )
        if masked_image_latents is not None:
            masked_image = masked_image_latents
        elif image_is_latents:  # e.g. a base model's latents for a refiner: masked in latent space
            masked_image = init_image * (latent_mask(mask_condition, tuple(init_image.shape[-2:])) < 0.5)
        else:
            masked_image = init_image * (mask_condition < 0.5)
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition,
            masked_image,
            batch_size,
            num_images_per_prompt,
            tuple(latents.shape[-2:]),
            dtype,
            device,
            generator,
            cover=keep_unmasked_pixels and replacement,
        )

        # 6. The text-to-image loop, with the mask as input channels or as a replacement after each step.
        if replacement:
            hook = KnownRegionReplacement(
                mask, masked_image_latents, image_latents, noise, timesteps, self.scheduler, resamples, generator
            )
        else:
            hook = MaskedImageInput(mask, masked_image_latents)
        latents = self.run_denoise(latents, timesteps, num_inference_steps, setup, step_hook=hook)

        # 7. Decode; optionally keep the original's pixels outside the (feathered) mask.
        result = None
        if output_type != "latent":
            result = self.decode_inpainted(latents, generator, init_image, mask_condition)
            if keep_unmasked_pixels:
                original = expand_to_batch(init_image.to(result.device), batch_size, num_images)
                pixel_mask = expand_to_batch(mask_condition.to(result.device), batch_size, num_images, "mask")
                result = paste_unmasked(result, original, pixel_mask, mask_blur)
            result = self.image_processor.postprocess(result, output_type=output_type)
            if padding_mask_crop is not None:
                result = [self.image_processor.apply_overlay(mask_image, image, im, crops_coords) for im in result]
        return self.finish_call(latents, setup, output_type, return_dict, images=result)
