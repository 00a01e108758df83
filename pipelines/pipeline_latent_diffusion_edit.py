"""`LatentDiffusionEditPipeline`: edit an image with a text-to-image latent diffusion model.

- **img2img** (SDEdit, Meng et al. 2022): the image is encoded with the VAE, forward-noised to the timestep that
  ``strength`` picks (q(x_t | x_0), DDPM eq. 4, through ``scheduler.add_noise``) and denoised with the prompt. Same
  images as stock ``StableDiffusionImg2ImgPipeline`` on the same components, scheduler and seed.
- **inpainting** (white in ``mask_image`` = regenerate): with a plain 4-channel U-Net, after every step the known
  region of the latents is replaced by the original latents forward-noised to the next timestep (the RePaint /
  blended-diffusion way; Lugmayr et al. 2022, Avrahami et al. 2022); with a 9-channel inpainting U-Net the mask and the
  masked image's latents are concatenated to its input, as stock ``StableDiffusionInpaintPipeline`` does. Either way
  the decoded image is blended with the original in pixel space through the (optionally feathered) mask, so pixels
  the mask leaves out are exactly the original's.
- **outpainting**: :func:`outpaint_canvas` pads the image and masks the new area; then inpaint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.diffusion import q_sample_from
from ldm.guidance import uses_classifier_free_guidance
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline, LatentDiffusionPipelineOutput

IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0


def outpaint_canvas(
    image: PIL.Image.Image,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: Literal["edge"] | tuple[int, int, int] = "edge",
    multiple: int = 8,
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Pad ``image`` by the given pixels per side for outpainting; returns ``(canvas, mask)``.

    The canvas is rounded up to multiples of ``multiple`` (the VAE factor); the extra pixels go to the right / bottom
    unless only the left / top is extended. The mask is white (regenerate) on the new area and black on the original.
    ``fill`` is what the new area starts as: ``"edge"`` repeats the border pixels outwards (a start that matters only
    for ``strength`` < 1), or an RGB colour.

    Raises:
        ValueError: a negative extension, or nothing to extend.
    """
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"outpaint {name} must be a whole number of pixels >= 0; got {value!r}")
    if not any(sides.values()):
        raise ValueError("outpaint needs at least one of left, right, top, bottom > 0 (pixels to add on that side)")
    if fill != "edge" and not (isinstance(fill, tuple) and len(fill) == 3):
        raise ValueError(f"fill must be 'edge' or an (r, g, b) tuple; got {fill!r}")

    def round_up(size: int, before: int, after: int) -> tuple[int, int]:
        extra = -(size + before + after) % multiple
        return (before + extra, after) if before > 0 and after == 0 else (before, after + extra)

    width, height = image.size
    left, right = round_up(width, left, right)
    top, bottom = round_up(height, top, bottom)
    pixels = np.asarray(image.convert("RGB"))
    padding = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(pixels, padding, mode="edge")
    else:
        canvas = np.stack([np.pad(pixels[..., c], padding[:2], constant_values=fill[c]) for c in range(3)], axis=-1)
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top : top + height, left : left + width] = 0
    return PIL.Image.fromarray(canvas), PIL.Image.fromarray(mask, mode="L")


def feather_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``(B, 1, H, W)`` mask with standard deviation ``sigma`` pixels (kernel radius ceil(3 sigma),
    edges replicated); pixels farther than the radius from the mask stay exactly 0. ``sigma`` = 0 returns ``mask``."""
    if sigma <= 0:
        return mask
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(mask.dtype)
    blurred = F.pad(mask, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def _image_size(image: PipelineImageInput) -> tuple[int, int]:
    """``(height, width)`` of a PIL image, a ``(B, C, H, W)`` / ``(C, H, W)`` tensor, an ``(B, H, W, C)`` /
    ``(H, W, C)`` array, or the first of a list of them."""
    if isinstance(image, list):
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    if isinstance(image, np.ndarray):
        return tuple(image.shape[-3:-1]) if image.ndim >= 3 and image.shape[-1] in (1, 3, 4) else image.shape[-2:]
    raise ValueError(f"image must be a PIL image, a torch tensor or a numpy array; got {type(image).__name__}")


class LatentDiffusionEditPipeline(LatentDiffusionPipeline):
    """img2img, inpainting and outpainting with the components of a :class:`LatentDiffusionPipeline`.

    :meth:`sharing` makes one from a loaded text-to-image pipeline, sharing its weights and defaults.
    """

    @classmethod
    def sharing(cls, pipe: LatentDiffusionPipeline) -> LatentDiffusionEditPipeline:
        """An edit pipeline on ``pipe``'s components (the same modules, no copy) with its ``generation_defaults``."""
        edit = cls(**pipe.components)
        edit.generation_defaults = pipe.generation_defaults
        return edit

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    # ---------------------------------------------------------------------------------------------------- 1. inputs

    def check_edit_inputs(
        self, image: PipelineImageInput, mask_image: PipelineImageInput | None, strength: float, mask_blur: float
    ) -> tuple[int, int]:
        """Check the image, mask, strength and mask blur; returns the image's ``(height, width)``."""
        if image is None:
            raise ValueError("pass the image to edit as image (a PIL image, a tensor or an array)")
        height, width = _image_size(image)
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"image size {width}x{height} is not a multiple of {factor} (the VAE downsamples by {factor}); "
                f"resize or crop it to {width - width % factor or factor}x{height - height % factor or factor}"
            )
        if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
            raise ValueError(
                f"strength must be in (0, 1] (the fraction of the denoising that is redone; 1 ignores the image "
                f"outside the mask's known region); got {strength}"
            )
        if mask_blur < 0:
            raise ValueError(f"mask_blur must be >= 0 pixels (0: a hard mask edge); got {mask_blur}")
        if mask_image is not None:
            mask_height, mask_width = _image_size(mask_image)
            if (mask_height, mask_width) != (height, width):
                raise ValueError(
                    f"mask_image is {mask_width}x{mask_height} but image is {width}x{height}; pass a mask of the "
                    "image's size (white = regenerate, black = keep)"
                )
        elif mask_blur > 0:
            raise ValueError("mask_blur needs a mask_image; leave it out for img2img")
        return height, width

    @staticmethod
    def check_mask(mask: torch.Tensor) -> None:
        """A binarized ``(B, 1, H, W)`` mask must both keep and regenerate something."""
        if not (mask >= 0.5).any():
            raise ValueError(
                "mask_image is all black: nothing to regenerate; paint the area to redo white, or leave mask_image "
                "out to edit the whole image (img2img)"
            )
        if (mask >= 0.5).all():
            raise ValueError(
                "mask_image is all white: nothing is kept; use text-to-image, or img2img (no mask) with strength 1"
            )

    def check_resamples(self, resamples: int, replacement_inpainting: bool) -> None:
        """``resamples`` is a whole number >= 0; > 0 needs replacement inpainting and a scheduler without memory."""
        if not isinstance(resamples, int) or resamples < 0:
            raise ValueError(f"resamples must be a whole number >= 0 (extra passes per step); got {resamples!r}")
        if resamples == 0:
            return
        if not replacement_inpainting:
            raise ValueError(
                "resamples is for inpainting with a text-to-image (4-channel) U-Net: pass a mask_image, or leave "
                "resamples at 0 (img2img has no kept region to agree with; an inpainting U-Net sees it directly)"
            )
        if not isinstance(self.scheduler, (DDIMScheduler, DDPMScheduler)):
            raise ValueError(
                f"resamples redoes steps, which needs a scheduler whose step keeps no state (DDIM or DDPM); this "
                f"pipeline has {type(self.scheduler).__name__}. Set pipe.scheduler = "
                "DDIMScheduler.from_config(pipe.scheduler.config), or leave resamples at 0"
            )

    # --------------------------------------------------------------------------------------------------- 3. latents

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """The last ``int(num_inference_steps * strength)`` steps of the schedule (as stock img2img does); returns them
        and their number. SDEdit starts there from the image noised to the first of them."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def encode_image(
        self,
        image: torch.Tensor,
        num_images: int,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """Images in [-1, 1] ``(1 or B, 3, H, W)`` -> scaled latents ``(num_images, C, H/f, W/f)``, sampled from the
        VAE posterior with ``generator`` as stock does; with one generator per image, image ``i`` is encoded with
        generator ``i`` (so it does not depend on the other images)."""
        repeats = num_images // image.shape[0]
        if isinstance(generator, list):
            image = image.repeat_interleave(repeats, dim=0)
            latents = [retrieve_latents(self.vae.encode(image[i : i + 1]), generator[i]) for i in range(num_images)]
            latents = torch.cat(latents)
        else:
            latents = retrieve_latents(self.vae.encode(image), generator=generator).repeat_interleave(repeats, dim=0)
        return self.vae.config.scaling_factor * latents

    def prepare_mask(
        self, mask_image: PipelineImageInput, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The binarized pixel mask ``(B, 1, H, W)`` (1 = regenerate) and its latent-size version ``(B, 1, H/f, W/f)``
        for replacing the known region: 1 where any pixel of the latent's f x f block is masked."""
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width).to(device=device, dtype=dtype)
        factor = self.vae_scale_factor
        return mask, F.max_pool2d(mask, kernel_size=factor, stride=factor)

    # ------------------------------------------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput | None = None,
        strength: float | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        mask_blur: float = 0.0,
        resamples: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Edit ``image`` with the prompt: img2img without ``mask_image``, inpainting with it.

        Args:
            prompt: what the edited image should show.
            image: the image to edit (PIL, or a tensor / array in [0, 1]); its sides must be multiples of the VAE
                factor. One image, or one per prompt.
            mask_image: same size as ``image``; white (>= 0.5) is regenerated, black is kept.
            strength: in (0, 1]: how much of the denoising is redone (default 0.8 for img2img, 1 for inpainting, as
                stock). Low keeps the image's layout; 1 starts the regenerated area from pure noise.
            mask_blur: standard deviation in pixels of the Gaussian feathering of the final pixel-space blend (0:
                hard edge; unmasked pixels farther than 3 * mask_blur from the mask are exactly the original's).
            resamples: inpainting with a plain U-Net: redo every denoising step this many more times, each time from
                its result noised back to the step's timestep with fresh noise (RePaint's resampling, Lugmayr et al.
                2022, jump length 1), so the new area agrees with the kept one instead of only sitting next to it.
                Costs ``1 + resamples`` times the U-Net passes; needs DDIM or DDPM (schedulers whose step keeps no
                state). 0 (default): plain replacement.
            Everything else as :meth:`LatentDiffusionPipeline.__call__`. With ``output_type="latent"`` the final
            latents are returned, before the pixel-space blend.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        inpainting = mask_image is not None
        if strength is None:
            strength = INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH
        num_inference_steps, guidance_scale, guidance_interval = self.sampling_settings(
            num_inference_steps, guidance_scale, guidance_interval
        )

        # 1. Check inputs.
        height, width = self.check_edit_inputs(image, mask_image, strength, mask_blur)
        self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt,
            eta, negative_prompt, prompt_embeds, negative_prompt_embeds, generator, None, output_type,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        in_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"the U-Net takes {in_channels} input channels; editing needs {latent_channels} (a text-to-image "
                f"model) or {2 * latent_channels + 1} (an inpainting model)"
            )
        inpainting_unet = in_channels == 2 * latent_channels + 1
        if inpainting_unet and not inpainting:
            raise ValueError("this U-Net is an inpainting model (9 input channels); pass a mask_image")
        self.check_resamples(resamples, inpainting and not inpainting_unet)
        device = self._execution_device
        do_cfg = uses_classifier_free_guidance(guidance_scale)
        batch_size = self._batch_size(prompt, prompt_embeds)
        num_images = batch_size * num_images_per_prompt

        # 2. Encode the prompt.
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )  # fmt: skip
        dtype = prompt_embeds.dtype

        # 3. The image in [-1, 1] and the mask in {0, 1}.
        init_image = self.image_processor.preprocess(image, height=height, width=width).to(device=device, dtype=dtype)
        if init_image.shape[0] not in (1, batch_size):
            raise ValueError(f"got {init_image.shape[0]} images for {batch_size} prompts; pass one, or one per prompt")
        if inpainting:
            mask, latent_mask = self.prepare_mask(mask_image, height, width, device, dtype)
            self.check_mask(mask)
            if mask.shape[0] not in (1, batch_size):
                raise ValueError(f"got {mask.shape[0]} masks for {batch_size} prompts; pass one, or one per prompt")

        # 4. Timesteps: the last `strength` fraction of the schedule.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        requested_steps = num_inference_steps
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength)
        if num_inference_steps < 1:
            raise ValueError(
                f"strength {strength} x {requested_steps} steps leaves no denoising step; raise "
                "strength or num_inference_steps"
            )
        latent_timestep = timesteps[:1].repeat(num_images)

        # 5. Initial latents: the image's latents noised to the first timestep (SDEdit), or pure noise when an
        #    inpainting run regenerates from scratch (strength 1), in the order stock draws them from the generator.
        needs_image_latents = not inpainting or not inpainting_unet or strength < 1
        image_latents = self.encode_image(init_image, num_images, generator) if needs_image_latents else None
        shape = (num_images, latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if inpainting and strength == 1:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(image_latents, noise, latent_timestep)

        # 6. Inpainting conditioning: an inpainting U-Net sees the mask and the masked image's latents.
        if inpainting_unet:
            masked_image = init_image * (mask < 0.5)
            masked_image_latents = self.encode_image(masked_image, num_images, generator)
        if inpainting:
            mask = mask.repeat_interleave(num_images // mask.shape[0], dim=0)
            latent_mask = latent_mask.repeat_interleave(num_images // latent_mask.shape[0], dim=0)
        if inpainting_unet:
            model_mask = F.interpolate(mask, size=shape[-2:])
            conditioning = torch.cat([model_mask, masked_image_latents], dim=1)

        # 7. The denoising loop; with a plain U-Net the known region is put back after every step.
        def put_back_known_region(i: int, latents: torch.Tensor) -> torch.Tensor:
            # The known region at the next step's noise level, q(x_{t'} | x_0) with the same noise as x_T.
            known = image_latents
            if i < len(timesteps) - 1:
                known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            return (1 - latent_mask) * known + latent_mask * latents

        def renoise(i: int, latents: torch.Tensor) -> torch.Tensor:
            # x_{t'} -> x_t, q(x_t | x_{t'}) with fresh noise: undo step i to redo it (t' = -1 after the last: data).
            after = int(timesteps[i + 1]) if i < len(timesteps) - 1 else -1
            fresh = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            return q_sample_from(latents, after, int(timesteps[i]), fresh, self.scheduler.alphas_cumprod)

        latents = self.denoise(
            latents, timesteps, num_inference_steps, prompt_embeds, negative_prompt_embeds if do_cfg else None,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
            step_kwargs=self._scheduler_step_kwargs(generator, eta), cross_attention_kwargs=cross_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            extra_channels=conditioning if inpainting_unet else None,
            after_step=put_back_known_region if inpainting and not inpainting_unet else None,
            resamples=resamples, renoise=renoise,
        )  # fmt: skip

        # 8. Decode; when inpainting, keep the original's pixels outside the (feathered) mask.
        if output_type == "latent":
            result = latents
        else:
            result = self.decode_latents(latents, generator)
            if inpainting:
                blend = feather_mask(mask, mask_blur).to(result.dtype)
                original = init_image.repeat_interleave(num_images // init_image.shape[0], dim=0).to(result.dtype)
                result = (1 - blend) * original + blend * result
            result = self.image_processor.postprocess(result, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return LatentDiffusionPipelineOutput(images=result)
