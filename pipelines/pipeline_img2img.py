"""`LatentDiffusionImg2ImgPipeline`: image-to-image with a text-to-image latent diffusion model (SDEdit, Meng et al.
2022), a drop-in for diffusers' ``StableDiffusionImg2ImgPipeline``.

image -> VAE posterior sample (scaled latents x_0) -> forward-noised to the timestep that ``strength`` picks
(q(x_t | x_0), DDPM eq. 4, through ``scheduler.add_noise``) -> the text-to-image loop
(:meth:`LatentDiffusionPipeline.denoise`) over the remaining timesteps -> VAE decode. With the same components,
scheduler, seed and arguments it returns stock's images; the latents' size is the encoded image's, so a VAE with
another factor (``AutoencoderTiny``) works as in stock. Long prompts, prompt weighting, the guidance interval and the
half-precision decode retry come from the text-to-image pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from ldm.errors import UserError
from pipelines.pipeline_latent_diffusion import (
    LatentDiffusionPipeline,
    LatentDiffusionPipelineOutput,
)

logger = logging.getLogger(__name__)

IMG2IMG_STRENGTH = 0.8
"""Stock's default ``strength`` for img2img."""


def expand_to_batch(images: torch.Tensor, num_prompts: int, num_images: int, what: str = "image") -> torch.Tensor:
    """``images`` ``(m, ...)`` repeated to ``num_images`` rows: one per image (as is), one per prompt (each repeated
    for that prompt's images, so image i goes with prompt i), or any other count that divides ``num_images`` (tiled,
    as stock does).

    Raises:
        UserError: a count that does not divide ``num_images``.
    """
    count = images.shape[0]
    if count == num_images:
        return images
    if count == num_prompts:
        return images.repeat_interleave(num_images // num_prompts, dim=0)
    if num_images % count:
        raise UserError(
            f"got {count} {what}s for {num_images} images ({num_prompts} prompts); pass one {what}, one per prompt, "
            "or a number that divides the number of images"
        )
    return images.repeat(num_images // count, *([1] * (images.ndim - 1)))


class LatentDiffusionImg2ImgPipeline(LatentDiffusionPipeline):
    """Image-to-image with the components of a :class:`LatentDiffusionPipeline`, a drop-in for
    ``StableDiffusionImg2ImgPipeline``.

    ``LatentDiffusionImg2ImgPipeline.from_pipe(pipe)`` shares a loaded pipeline's components (no copy) and its
    ``generation_defaults``; ``LatentDiffusionImg2ImgPipeline(**stock_pipe.components)`` takes stock's.
    """

    # ---------------------------------------------------------------------------------------------------- 1. inputs

    @staticmethod
    def check_strength(strength: float) -> None:
        """``strength`` is a number in [0, 1] (as stock); 0 is refused later when it leaves no step."""
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise UserError(
                f"strength must be in (0, 1] (the fraction of the denoising that is redone: low keeps the image, 1 "
                f"starts from pure noise); got {strength}"
            )

    # --------------------------------------------------------------------------------------------------- 3. latents

    def get_timesteps(
        self, num_inference_steps: int, strength: float, device: torch.device | None = None
    ) -> tuple[torch.Tensor, int]:
        """The last ``int(num_inference_steps * strength)`` steps of the schedule, as stock; returns them and their
        number. SDEdit starts there from the image noised to the first of them."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def strength_timesteps(
        self,
        num_inference_steps: int,
        strength: float,
        device: torch.device,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The scheduler's timesteps (``num_inference_steps``, or custom ``timesteps`` / ``sigmas``) cut to the
        last ``strength`` fraction.

        Raises:
            UserError: no step is left.
        """
        all_timesteps, num_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        timesteps, num_steps = self.get_timesteps(num_steps, strength, device)
        if num_steps < 1:
            raise UserError(
                f"strength {strength} x {len(all_timesteps)} steps leaves no denoising step; raise strength or "
                "num_inference_steps"
            )
        return timesteps, num_steps

    def _encode_vae_image(
        self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` -> scaled latents sampled from the VAE posterior, as stock: with a list
        of generators image ``i`` is encoded with generator ``i``."""
        if isinstance(generator, list):
            latents = [retrieve_latents(self.vae.encode(image[i : i + 1]), generator[i]) for i in range(len(image))]
            latents = torch.cat(latents)
        else:
            latents = retrieve_latents(self.vae.encode(image), generator=generator)
        return self.vae.config.scaling_factor * latents

    def encode_images(
        self,
        image: torch.Tensor,
        batch_size: int,
        num_images: int,
        generator: torch.Generator | list[torch.Generator] | None,
        what: str = "image",
    ) -> torch.Tensor:
        """Images ``(m, 3, H, W)`` in [-1, 1] (or latents ``(m, C, h, w)``, kept) -> latents for ``num_images`` outputs
        of ``batch_size`` prompts (:func:`expand_to_batch`). With one generator per output the images are expanded
        first and output ``i`` is encoded with generator ``i``, so it does not depend on the rest of the batch (stock
        img2img does this; stock inpainting encodes an image once, with the first generator)."""
        if image.shape[1] == self.vae.config.latent_channels:
            return expand_to_batch(image, batch_size, num_images, what)
        if isinstance(generator, list):
            return self._encode_vae_image(expand_to_batch(image, batch_size, num_images, what), generator)
        return expand_to_batch(self._encode_vae_image(image, generator), batch_size, num_images, what)

    def prepare_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) at ``timestep`` for the image's latents x_0 (stock's signature and random draws: the
        posterior samples, then the noise). ``image`` is ``(m, 3, H, W)`` in [-1, 1], or latents ``(m, C, h, w)``;
        the noise has the latents' shape, whatever the VAE's factor."""
        image = image.to(device=device, dtype=dtype)
        num_images = batch_size * num_images_per_prompt
        image_latents = self.encode_images(image, batch_size, num_images, generator)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(image_latents, noise, timestep)

    # ------------------------------------------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = IMG2IMG_STRENGTH,
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
        **kwargs: Any,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Redraw ``image`` with the prompt.

        Args:
            prompt: what the new image should show.
            image: the image to start from (PIL, or a tensor / array in [0, 1], or latents with the VAE's channel
                count); one, one per prompt, or one per image. Its size is rounded down to a multiple of the VAE
                factor, as stock does.
            strength: in (0, 1] (default 0.8, as stock): how much of the denoising is redone; the last
                ``int(num_inference_steps * strength)`` steps run. Low keeps the image's layout, 1 ignores it.
            Everything else as :meth:`LatentDiffusionPipeline.__call__` (``num_inference_steps`` and
            ``guidance_scale`` default to the model's ``generation_defaults``).
        """
        # 1. Check inputs; the size is the image's.
        if image is None:
            raise UserError("pass the image to start from as image (a PIL image, a tensor or an array)")
        self.check_strength(strength)
        init_image = self.image_processor.preprocess(image)
        height, width = init_image.shape[-2:]
        if init_image.shape[1] == self.vae.config.latent_channels:
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor

        # 2. Encode the prompt.
        setup = self.start_call(
            prompt,
            int(height),
            int(width),
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

        # 3. Timesteps: the last `strength` fraction of the schedule; the image's latents noised to the first.
        timesteps, num_inference_steps = self.strength_timesteps(
            setup.num_inference_steps, strength, setup.device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            init_image,
            timesteps[:1].repeat(setup.num_images),
            setup.batch_size,
            num_images_per_prompt,
            setup.conditioning.prompt_embeds.dtype,
            setup.device,
            generator,
        )

        # 4. The text-to-image loop from there.
        latents = self.run_denoise(latents, timesteps, num_inference_steps, setup)

        # 5. Decode.
        return self.finish_call(latents, setup, output_type, return_dict)
