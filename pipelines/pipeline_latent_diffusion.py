"""`LatentDiffusionPipeline`: text-to-image with a latent diffusion model (Rombach et al. 2022).

prompt -> CLIP tokens -> CLIP text embeddings -> U-Net denoising loop in latent space with classifier-free guidance
-> VAE decode -> image. With the same components, scheduler, seed and arguments it returns the same images as
diffusers' stock ``StableDiffusionPipeline``; on top of that it encodes prompts longer than 77 tokens in chunks instead
of truncating them, reads prompt weights such as ``(word:1.3)``, chooses the attention backend in one call, and retries
a half-precision VAE decode in float32 when it overflows (the "black image" bug) instead of returning NaNs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.attention import set_attention_backend
from ldm.guidance import guide, uses_classifier_free_guidance
from ldm.text import encode_prompts, prompt_chunk_count
from pipelines.generation_defaults import FILENAME as GENERATION_DEFAULTS_FILE
from pipelines.generation_defaults import FULL_INTERVAL, GenerationDefaults, check_guidance_interval
from pipelines.single_file import check_checkpoint_format

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LatentDiffusionPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, a ``(B, H, W, 3)`` array in [0, 1], a ``(B, 3, H, W)`` tensor in [0, 1], or
    the final latents, as ``output_type`` asked."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _fix_legacy_scheduler_config(scheduler: KarrasDiffusionSchedulers | None) -> None:
    """Correct the two settings of early SD scheduler configs that stock ``StableDiffusionPipeline`` also corrects
    (``steps_offset`` 1, ``clip_sample`` off), so that both pipelines sample identically from such folders."""
    if scheduler is None:
        return
    fixes = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes:
        logger.warning("scheduler config is outdated; using %s as Stable Diffusion does", fixes)
        scheduler._internal_dict = FrozenDict({**scheduler.config, **fixes})


def _load_generation_defaults(model: str, kwargs: dict[str, Any]) -> GenerationDefaults:
    """The defaults of a local folder, or of a Hub repository when its file is reachable (a repository without one,
    or no network, gives stock's)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(model, GENERATION_DEFAULTS_FILE, revision=kwargs.get("revision"),
                                   cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
                                   local_files_only=kwargs.get("local_files_only", False))  # fmt: skip
        except (EntryNotFoundError, OSError, ValueError):
            logger.debug("no %s for %s", GENERATION_DEFAULTS_FILE, model, exc_info=True)
            return GenerationDefaults()
        folder = Path(path).parent
    return GenerationDefaults.load(folder)


class LatentDiffusionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
    FromSingleFileMixin,
):
    """Text-to-image generation with a latent diffusion model, a drop-in for ``StableDiffusionPipeline``.

    Args:
        vae: the frozen autoencoder mapping images to latents and back.
        text_encoder: a CLIP text transformer (``CLIPTextModel``, or :class:`ldm.text.OpenCLIPTextEncoder`).
        tokenizer: its ``CLIPTokenizer`` (:func:`ldm.tokenizer.build_clip_tokenizer` builds one offline).
        unet: the conditional noise-prediction U-Net.
        scheduler: any diffusers scheduler (DDIM, DDPM, PNDM, Euler, DPM-Solver++, UniPC, ...).

    Loads any Stable Diffusion 1.x / 2.x folder or Hub id with ``from_pretrained`` (a safety checker in it is not
    loaded), and saves folders that stock ``StableDiffusionPipeline.from_pretrained`` loads; ``from_single_file``
    reads one-file checkpoints in the original SD layout.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        _fix_legacy_scheduler_config(scheduler)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # Set once a half-precision decode has overflowed: later decodes go straight to float32.
        self._upcast_vae_decode = False
        # What a call uses for the settings it leaves out; from_pretrained reads the model's own.
        self.generation_defaults = GenerationDefaults()

    # ------------------------------------------------------------------------------------------------ load and save

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """``DiffusionPipeline.from_pretrained``, plus the model's recommended sampling settings
        (``generation_defaults.json`` in the folder or Hub repository, when it has one)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.generation_defaults = _load_generation_defaults(str(pretrained_model_name_or_path), kwargs)
        return pipe

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | Path, *, allow_pickle: bool = False, **kwargs: Any):
        """``FromSingleFileMixin.from_single_file``: a checkpoint in the original SD 1.x layout (one file, as
        :func:`pipelines.single_file.export_single_file` writes it), with the architecture, tokenizer and scheduler
        from ``config=`` (a diffusers folder or Hub id; offline, a local folder) and that folder's recommended
        sampling settings. A file that is not ``.safetensors`` is a pickle and is refused unless ``allow_pickle``.

        Raises:
            ValueError: a pickle file without ``allow_pickle``.
        """
        check_checkpoint_format(pretrained_model_link_or_path, allow_pickle)
        pipe = super().from_single_file(str(pretrained_model_link_or_path), **kwargs)
        if kwargs.get("config") is not None:
            pipe.generation_defaults = _load_generation_defaults(str(kwargs["config"]), kwargs)
        return pipe

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained``, plus ``generation_defaults.json`` when they are not stock's."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.generation_defaults != GenerationDefaults():
            self.generation_defaults.save(save_directory)

    # ------------------------------------------------------------------------------------------------ set-up helpers

    def set_attention_backend(self, backend: str = "sdpa", **kwargs: Any) -> None:
        """Use ``"sdpa"`` (default), ``"xformers"`` or ``"sliced"`` attention in the U-Net and VAE."""
        set_attention_backend([self.unet, self.vae], backend, **kwargs)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (less peak memory for large batches, same images)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        """Decode the whole batch at once again."""
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images in overlapping tiles, blended at the seams: bounded memory at 1024^2+."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        """Decode the whole image at once again."""
        self.vae.disable_tiling()

    @property
    def default_size(self) -> int:
        """The image side the U-Net was trained for (its latent sample size times the VAE factor)."""
        sample_size = self.unet.config.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        return sample_size * self.vae_scale_factor

    def sampling_settings(
        self,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> tuple[int, float, tuple[float, float]]:
        """The steps, guidance scale and guidance interval a call uses: the ones given, else the model's
        ``generation_defaults``.

        Raises:
            ValueError: a guidance interval that is not (lo, hi) with 0 <= lo < hi <= 1.
        """
        defaults = self.generation_defaults
        return (defaults.num_inference_steps if num_inference_steps is None else num_inference_steps,
                defaults.guidance_scale if guidance_scale is None else guidance_scale,
                defaults.guidance_interval if guidance_interval is None
                else check_guidance_interval(guidance_interval))  # fmt: skip

    # ---------------------------------------------------------------------------------------------------- 1. inputs

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        num_images_per_prompt: int,
        eta: float,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        """Raise a ``ValueError`` that names the fix for any argument the pipeline cannot use."""
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % factor != 0:
                raise ValueError(
                    f"{name} must be a positive multiple of {factor} (the VAE downsamples by {factor}); got {value}. "
                    f"Try {max(factor, round(value / factor) * factor) if isinstance(value, int) else 512}."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 disables guidance, 5-8 is usual); got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(
                f"guidance_rescale must be in [0, 1] (0 disables it, 0.7 is usual); got {guidance_rescale}"
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1; got {num_images_per_prompt}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like); got {eta}")
        if "eta" in self._scheduler_step_kwargs(None, eta):
            if eta > 1:
                raise ValueError(
                    f"eta must be in [0, 1] (0 is deterministic DDIM, 1 is DDPM-like; above 1 the step's noise "
                    f"exceeds its variance and the images come out NaN); got {eta}"
                )
            if eta == 1 and float(self.scheduler.alphas_cumprod[-1]) == 0:
                raise ValueError(
                    "eta 1 on this zero-terminal-SNR schedule gives NaN images: DDIM's first step takes the square "
                    "root of 1 - a - (1 - a), which can round below 0; use eta 0.99 or less, or the DDPM scheduler "
                    "for ancestral sampling"
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt (a string or a list of strings) or prompt_embeds")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
        if isinstance(prompt, list) and len(prompt) == 0:
            raise ValueError("prompt is an empty list; pass at least one prompt")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        batch_size = self._batch_size(prompt, prompt_embeds)
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {batch_size} prompts; pass one "
                "negative prompt per prompt, or a single string for all"
            )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )
        num_images = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"got {len(generator)} generators for {num_images} images ({batch_size} prompts x "
                f"{num_images_per_prompt} per prompt); pass one generator per image, or a single generator"
            )
        if latents is not None:
            expected = (num_images, self.unet.config.in_channels, height // factor, width // factor)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)} but {expected} is needed for {num_images} images of "
                    f"{height}x{width} (batch, latent channels, height / {factor}, width / {factor})"
                )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}"
            )

    @staticmethod
    def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

    # ---------------------------------------------------------------------------------------------------- 2. prompt

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts (and negative prompts, when guiding) to CLIP hidden states ``(B * n, 77 * chunks, D)``.

        A prompt of up to 75 tokens without weight syntax gives exactly stock diffusers' embeddings. Longer prompts
        are encoded in 75-token chunks that are concatenated (see :func:`ldm.text.encode_prompts`); the prompt and
        its negative are padded to the same number of chunks so the two guidance passes share one batch.
        """
        if lora_scale is not None and USE_PEFT_BACKEND:
            self._lora_scale = lora_scale
            scale_lora_layers(self.text_encoder, lora_scale)

        batch_size = self._batch_size(prompt, prompt_embeds)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        negatives: list[str] | None = None
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            negatives = self.maybe_convert_prompt(negatives, self.tokenizer)
        if prompts is not None:
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)

        chunk_length = self.tokenizer.model_max_length
        num_chunks = max(prompt_chunk_count(self.tokenizer, p) for p in (prompts or []) + (negatives or [""]))
        encode = {"clip_skip": clip_skip, "device": device, "dtype": self._text_dtype()}
        if prompt_embeds is None:
            prompt_embeds = encode_prompts(self.text_encoder, self.tokenizer, prompts, num_chunks=num_chunks, **encode)
        if negatives is not None:
            prompt_chunks = prompt_embeds.shape[1] // chunk_length
            if num_chunks > prompt_chunks:
                raise ValueError(
                    f"negative_prompt needs {num_chunks} chunks of {chunk_length} tokens but prompt_embeds has "
                    f"{prompt_chunks}; shorten the negative prompt or pass negative_prompt_embeds"
                )
            negative_prompt_embeds = encode_prompts(
                self.text_encoder, self.tokenizer, negatives, num_chunks=prompt_chunks, **encode
            )

        if lora_scale is not None and USE_PEFT_BACKEND:
            unscale_lora_layers(self.text_encoder, lora_scale)

        prompt_embeds = prompt_embeds.to(device=device, dtype=self._text_dtype())
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self._text_dtype())
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _text_dtype(self) -> torch.dtype:
        if self.text_encoder is not None:
            return self.text_encoder.dtype
        return self.unet.dtype

    # --------------------------------------------------------------------------------------------------- 3. latents

    def prepare_latents(
        self,
        num_images: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, I) in latent space (one draw per generator when a list is given), scaled by the scheduler's
        initial sigma (1 for DDPM/DDIM, sigma_max for Euler-type samplers)."""
        shape = (
            num_images,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def _scheduler_step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> dict[str, Any]:
        """``eta`` (DDIM's stochasticity) and ``generator`` for the schedulers whose ``step`` takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    # ---------------------------------------------------------------------------------------------------- 5. decode

    def decode_latents(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None):
        """Latents -> images in [-1, 1] with the VAE. A half-precision decode that overflows to NaN/inf (the SD 1.x
        VAE does at some resolutions) is redone in float32, and later calls decode in float32 directly."""
        latents = latents / self.vae.config.scaling_factor
        half = self.vae.dtype in (torch.float16, torch.bfloat16)
        if not (half and self._upcast_vae_decode):
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False, generator=generator)[0]
            if not half or torch.isfinite(image).all():
                return image
            logger.warning("the %s VAE decode overflowed (NaN/inf); decoding in float32 from now on", self.vae.dtype)
            self._upcast_vae_decode = True
        dtype = self.vae.dtype
        self.vae.to(torch.float32)
        try:
            image = self.vae.decode(latents.float(), return_dict=False, generator=generator)[0]
        finally:
            self.vae.to(dtype)
        return image

    # ----------------------------------------------------------------------------------------------------- 4. loop

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        *,
        guidance_scale: float,
        guidance_rescale: float,
        step_kwargs: dict[str, Any],
        guidance_interval: tuple[float, float] = FULL_INTERVAL,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        extra_channels: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        resamples: int = 0,
        renoise: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The sampling loop: at each timestep the U-Net's guided prediction, then the scheduler's step x_t -> x_{t-1}.

        With guidance the unconditional and conditional passes go through the U-Net as one batch ``[neg; pos]``, at
        the timesteps t with ``lo <= t / T <= hi`` for ``guidance_interval`` (lo, hi) (Kynkaanniemi et al. 2024);
        at the others the conditional pass alone. ``extra_channels`` (one copy per image) are concatenated to the
        U-Net input (an inpainting U-Net's mask and masked image);
        ``after_step(i, latents)`` may replace the latents after each step (inpainting puts the known region back).
        ``resamples`` > 0 redoes every step ``i`` that many more times, each time from ``renoise(i, latents)``: the
        step's result noised back to its timestep (RePaint's resampling; it needs a scheduler whose ``step`` keeps no
        state between calls). ``negative_prompt_embeds`` None means no guidance (a single conditional pass).
        """
        do_cfg = negative_prompt_embeds is not None
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        lo, hi = (bound * num_train_timesteps for bound in guidance_interval)

        def step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            guided = do_cfg and lo <= float(t) <= hi
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if extra_channels is not None:
                channels = torch.cat([extra_channels] * 2) if guided else extra_channels
                model_input = torch.cat([model_input, channels], dim=1)
            noise_pred = self.unet(
                model_input,
                t,
                encoder_hidden_states=embeds if guided else prompt_embeds,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
            if guided:
                noise_pred = guide(noise_pred, guidance_scale, guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            return after_step(i, latents) if after_step is not None else latents

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latents = step(i, t, latents)
                for _ in range(resamples):
                    latents = step(i, t, renoise(i, latents))

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    tensors["negative_prompt_embeds"] = negative_prompt_embeds
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        return latents

    # ------------------------------------------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Generate images from text.

        Args:
            prompt: the text(s) to draw. Longer than 77 tokens is fine; ``(word:1.3)`` weights a part.
            height, width: image size in pixels, multiples of the VAE factor (default: the model's native size).
            num_inference_steps: denoising steps (the scheduler picks which of the training timesteps to visit);
                default: the model's ``generation_defaults`` (50 for a Stable Diffusion folder).
            timesteps, sigmas: custom timesteps / sigmas for schedulers that accept them.
            guidance_scale: classifier-free guidance scale g; <= 1 disables guidance (and its extra U-Net pass);
                default: the model's ``generation_defaults`` (7.5 for a Stable Diffusion folder).
            negative_prompt: what to guide away from (replaces the empty prompt in the unconditional pass).
            num_images_per_prompt: images per prompt.
            eta: DDIM's eta (0: deterministic DDIM, 1: ancestral DDPM-like); ignored by other schedulers.
            generator: a ``torch.Generator`` (or one per image) for reproducible results.
            latents: initial noise of shape ``(B, C, H/f, W/f)``, instead of drawing it.
            prompt_embeds, negative_prompt_embeds: precomputed text embeddings instead of prompts.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`LatentDiffusionPipelineOutput` instead of a tuple.
            cross_attention_kwargs: passed to the attention processors (``{"scale": s}`` scales LoRA layers).
            guidance_rescale: phi of Lin et al. 2024 in [0, 1]; counters over-exposure at high guidance.
            guidance_interval: ``(lo, hi)``: guide only at the timesteps t with ``lo <= t / T <= hi`` (Kynkaanniemi
                et al. 2024), the others take the conditional pass alone (faster); default: the model's
                ``generation_defaults`` ((0, 1), every step, for a Stable Diffusion folder).
            clip_skip: use the hidden states this many layers before the text encoder's last.
            callback_on_step_end: ``f(pipe, step, timestep, tensors) -> dict`` called after each step; the tensors
                named in ``callback_on_step_end_tensor_inputs`` are passed and may be replaced.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        height = height or self.default_size
        width = width or self.default_size
        num_inference_steps, guidance_scale, guidance_interval = self.sampling_settings(
            num_inference_steps, guidance_scale, guidance_interval
        )

        # 1. Check inputs.
        self.check_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt,
            eta, negative_prompt, prompt_embeds, negative_prompt_embeds, generator, latents, output_type,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        device = self._execution_device
        do_cfg = uses_classifier_free_guidance(guidance_scale)
        num_images = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt

        # 2. Encode the prompt; with guidance, [negative; positive] go through the U-Net as one batch.
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )  # fmt: skip

        # 3. Sampling timesteps and the initial noise x_T.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(num_images, height, width, prompt_embeds.dtype, device, generator, latents)
        step_kwargs = self._scheduler_step_kwargs(generator, eta)

        # 4. The denoising loop: x_t -> x_{t-1} with the guided prediction.
        latents = self.denoise(
            latents, timesteps, num_inference_steps, prompt_embeds, negative_prompt_embeds if do_cfg else None,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, step_kwargs=step_kwargs,
            guidance_interval=guidance_interval,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 5. Decode the latents and convert to the requested output type.
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(latents, generator)
            image = self.image_processor.postprocess(image, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return LatentDiffusionPipelineOutput(images=image)
