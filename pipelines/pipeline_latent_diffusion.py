"""`LatentDiffusionPipeline`: text-to-image with a latent diffusion model (Rombach et al. 2022).

prompt -> CLIP tokens -> CLIP text embeddings -> U-Net denoising loop in latent space with classifier-free guidance
-> VAE decode -> image. With the same components, scheduler, seed and arguments it returns the same images as
diffusers' stock ``StableDiffusionPipeline``; on top of that it encodes prompts longer than 77 tokens in chunks instead
of truncating them (each prompt of a batch gets the image it gets alone), reads prompt weights such as ``(word:1.3)``
when asked (``prompt_weighting=True``), chooses the attention backend in one call, and retries a half-precision VAE
decode in float32 when it overflows (the "black image" bug) instead of returning NaNs.

The steps of a call are in order here, except two concepts that have their own modules: prompt conditioning
(:mod:`pipelines.prompt_conditioning`) and the denoising loop (:mod:`pipelines.denoising`).
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
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, deprecate
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ldm.attention import set_attention_backend
from ldm.errors import UserError
from ldm.guidance import uses_classifier_free_guidance
from pipelines.denoising import DenoisingLoopMixin, StepHook
from pipelines.fast_mode import FastModeMixin
from pipelines.generation_defaults import FILENAME as GENERATION_DEFAULTS_FILE
from pipelines.generation_defaults import GenerationDefaults, check_guidance_interval
from pipelines.prompt_conditioning import FamilyInputs, PromptConditioningMixin, TextConditioning
from pipelines.single_file import check_checkpoint_format
from pipelines.step_cache import StepCachingMixin

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LatentDiffusionPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, a ``(B, H, W, 3)`` array in [0, 1], a ``(B, 3, H, W)`` tensor in [0, 1], or
    the final latents, as ``output_type`` asked."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class CallSetup:
    """A call's settled arguments, as :meth:`LatentDiffusionPipeline.start_call` returns them: the conditioning, the
    step count and guidance interval (the model's ``generation_defaults`` where not given), the batch, and what the
    denoising loop takes from the call (generator, eta, callbacks)."""

    conditioning: TextConditioning
    num_inference_steps: int
    guidance_interval: tuple[float, float]
    batch_size: int
    num_images: int
    device: torch.device
    generator: torch.Generator | list[torch.Generator] | None
    eta: float
    callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None
    callback_on_step_end_tensor_inputs: list[str]
    callback: Callable | None = None
    callback_steps: int | None = None


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


def _load_generation_defaults(
    model: str, kwargs: dict[str, Any], stock: GenerationDefaults | None = None
) -> GenerationDefaults:
    """The defaults of a local folder, or of a Hub repository when its file is reachable (a repository without one,
    or no network, gives ``stock``, the stock pipeline's defaults for the model's family: SD's if None)."""
    stock = stock or GenerationDefaults()
    folder = Path(model).expanduser()
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(
                model,
                GENERATION_DEFAULTS_FILE,
                revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"),
                token=kwargs.get("token"),
                local_files_only=kwargs.get("local_files_only", False),
            )
        except (EntryNotFoundError, OSError, ValueError):
            logger.debug("no %s for %s", GENERATION_DEFAULTS_FILE, model, exc_info=True)
            return stock
        folder = Path(path).parent
    if not (folder / GENERATION_DEFAULTS_FILE).is_file():
        return stock
    return GenerationDefaults.load(folder)


class LatentDiffusionPipeline(
    PromptConditioningMixin,
    DenoisingLoopMixin,
    FastModeMixin,
    StepCachingMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    """Text-to-image generation with a latent diffusion model, a drop-in for ``StableDiffusionPipeline``.

    Args:
        vae: the frozen autoencoder mapping images to latents and back.
        text_encoder: a CLIP text transformer (``CLIPTextModel``, or :class:`ldm.text.OpenCLIPTextEncoder`).
        tokenizer: its ``CLIPTokenizer`` (:func:`ldm.tokenizer.build_clip_tokenizer` builds one offline).
        unet: the conditional noise-prediction U-Net.
        scheduler: any diffusers scheduler (DDIM, DDPM, PNDM, Euler, DPM-Solver++, UniPC, LCM, ...).
        safety_checker, feature_extractor, requires_safety_checker: accepted as stock takes them (so
            ``LatentDiffusionPipeline(**stock_pipe.components)`` works) and kept, but no safety check is run.
        image_encoder: a ``CLIPVisionModelWithProjection`` for IP-Adapters (``load_ip_adapter`` loads one).

    Loads any Stable Diffusion 1.x / 2.x folder or Hub id with ``from_pretrained`` (a safety checker in it is not
    loaded), and saves folders that stock ``StableDiffusionPipeline.from_pretrained`` loads; ``from_single_file``
    reads one-file checkpoints in the original SD layout. ``from_pipe`` shares components with a stock pipeline
    either way; LoRAs (LCM-LoRA included), textual inversions and IP-Adapters load through diffusers' mixins.

    Where it differs from stock (each switchable): prompts longer than 77 tokens are encoded in chunks, not
    truncated (``long_prompts=False`` truncates them as stock); ``prompt_weighting=True`` reads ``(word:1.3)``
    weights (off by default, so brackets are text as in stock); ``guidance_interval`` guides only part of the steps
    (default every step, unless the model's ``generation_defaults.json`` says otherwise); a half-precision VAE decode
    that overflows is redone in float32; no safety checker runs; unknown keyword arguments raise a ``TypeError``
    instead of being ignored.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # What a call uses for the settings it and the model's generation_defaults.json leave out: stock's.
    stock_generation_defaults = GenerationDefaults()

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
        super().__init__()
        _fix_legacy_scheduler_config(scheduler)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        if safety_checker is not None:
            logger.warning(
                "%s keeps the safety_checker it is given but does not run it; check images yourself if you need to",
                type(self).__name__,
            )
        self._init_state()

    def _init_state(self) -> None:
        """The state every pipeline of ours sets up after registering its modules (shared by the families)."""
        vae = getattr(self, "vae", None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # Set once a half-precision decode has overflowed: later decodes go straight to float32.
        self._upcast_vae_decode = False
        # What a call uses for the settings it leaves out; from_pretrained reads the model's own.
        self.generation_defaults = self.stock_generation_defaults

    # ------------------------------------------------------------------------------------------------ load and save

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """``DiffusionPipeline.from_pretrained``, plus the model's recommended sampling settings
        (``generation_defaults.json`` in the folder or Hub repository, when it has one). A safety checker in the
        folder is not loaded unless passed as ``safety_checker=``."""
        if "safety_checker" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("safety_checker", None)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.generation_defaults = _load_generation_defaults(
            str(pretrained_model_name_or_path), kwargs, cls.stock_generation_defaults
        )
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any):
        """``DiffusionPipeline.from_pipe`` (share the components of another pipeline, stock's or ours), keeping the
        ``generation_defaults`` of a pipeline of ours."""
        pipe = super().from_pipe(pipeline, **kwargs)
        defaults = getattr(pipeline, "generation_defaults", None)
        if isinstance(defaults, GenerationDefaults):
            pipe.generation_defaults = defaults
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
            pipe.generation_defaults = _load_generation_defaults(
                str(kwargs["config"]), kwargs, cls.stock_generation_defaults
            )
        return pipe

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained``, plus ``generation_defaults.json`` when they are not stock's."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.generation_defaults != self.stock_generation_defaults:
            self.generation_defaults.save(save_directory)

    # ------------------------------------------------------------------------------------- call state (as in stock)

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running call (a ``callback_on_step_end`` may change ``_guidance_scale``)."""
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        """The guidance rescale phi of the running call."""
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        """The running call's ``clip_skip``."""
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current step guides: g > 1, and never for an LCM U-Net (guidance is in its embedding)."""
        return uses_classifier_free_guidance(self._guidance_scale) and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        """The running call's ``cross_attention_kwargs``."""
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        """How many timesteps the running call visits."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to skip the remaining steps (as in stock)."""
        return self._interrupt

    def _start_call(
        self,
        guidance_scale: float,
        guidance_rescale: float,
        clip_skip: int | None,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> None:
        """Set the call state that the properties (``guidance_scale``, ``do_classifier_free_guidance``, ...) read."""
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs, self._interrupt = clip_skip, cross_attention_kwargs, False

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
        if num_inference_steps is None:
            num_inference_steps = defaults.num_inference_steps
        if guidance_scale is None:
            guidance_scale = defaults.guidance_scale
        if guidance_interval is None:
            guidance_interval = defaults.guidance_interval
        else:
            guidance_interval = check_guidance_interval(guidance_interval)
        return num_inference_steps, guidance_scale, guidance_interval

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
        """Raise a ``UserError`` that names the fix for any argument the pipeline cannot use."""
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % factor != 0:
                raise UserError(
                    f"{name} must be a positive multiple of {factor} (the VAE downsamples by {factor}); got {value}. "
                    f"Try {max(factor, round(value / factor) * factor) if isinstance(value, int) else 512}."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps}")
        if guidance_scale < 0:
            raise UserError(f"guidance_scale must be >= 0 (1 disables guidance, 5-8 is usual); got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(
                f"guidance_rescale must be in [0, 1] (0 disables it, 0.7 is usual); got {guidance_rescale}"
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be an integer >= 1; got {num_images_per_prompt}")
        if eta < 0:
            raise UserError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like); got {eta}")
        if "eta" in self._scheduler_step_kwargs(None, eta):
            if eta > 1:
                raise UserError(
                    f"eta must be in [0, 1] (0 is deterministic DDIM, 1 is DDPM-like; above 1 the step's noise "
                    f"exceeds its variance and the images come out NaN); got {eta}"
                )
            if eta == 1 and float(self.scheduler.alphas_cumprod[-1]) == 0:
                raise UserError(
                    "eta 1 on this zero-terminal-SNR schedule gives NaN images: DDIM's first step takes the square "
                    "root of 1 - a - (1 - a), which can round below 0; use eta 0.99 or less, or the DDPM scheduler "
                    "for ancestral sampling"
                )
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")

        if prompt is not None and prompt_embeds is not None:
            raise UserError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise UserError("pass a prompt (a string or a list of strings) or prompt_embeds")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise UserError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
        if isinstance(prompt, list) and len(prompt) == 0:
            raise UserError("prompt is an empty list; pass at least one prompt")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise UserError("pass either negative_prompt or negative_prompt_embeds, not both")
        batch_size = self._batch_size(prompt, prompt_embeds)
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise UserError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {batch_size} prompts; pass one "
                "negative prompt per prompt, or a single string for all"
            )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise UserError(
                    f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )
        num_images = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != num_images:
            raise UserError(
                f"got {len(generator)} generators for {num_images} images ({batch_size} prompts x "
                f"{num_images_per_prompt} per prompt); pass one generator per image, or a single generator"
            )
        if latents is not None:
            expected = (num_images, self.unet.config.in_channels, height // factor, width // factor)
            if tuple(latents.shape) != expected:
                raise UserError(
                    f"latents have shape {tuple(latents.shape)} but {expected} is needed for {num_images} images of "
                    f"{height}x{width} (batch, latent channels, height / {factor}, width / {factor})"
                )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise UserError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}"
            )

    def check_ip_adapter_inputs(
        self, ip_adapter_image: PipelineImageInput | None, ip_adapter_image_embeds: list[torch.Tensor] | None
    ) -> None:
        """Raise a ``UserError`` naming the fix for IP-Adapter inputs the pipeline cannot use."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise UserError("pass either ip_adapter_image or ip_adapter_image_embeds, not both")
        if getattr(self.unet, "encoder_hid_proj", None) is None:
            raise UserError("ip_adapter_image needs an IP-Adapter: call pipe.load_ip_adapter(...) first")
        if ip_adapter_image is not None and self.image_encoder is None:
            raise UserError(
                "ip_adapter_image needs an image_encoder (a CLIPVisionModelWithProjection); load the IP-Adapter with "
                "its image encoder, or pass ip_adapter_image_embeds"
            )
        if ip_adapter_image_embeds is not None and (
            not isinstance(ip_adapter_image_embeds, list) or any(e.ndim not in (3, 4) for e in ip_adapter_image_embeds)
        ):
            raise UserError(
                "ip_adapter_image_embeds must be a list of 3D or 4D tensors, one per IP-Adapter (with guidance, "
                "[negative; positive] along the first axis, as prepare_ip_adapter_image_embeds returns them)"
            )

    @staticmethod
    def _deprecated_callback(kwargs: dict[str, Any]) -> tuple[Callable | None, int | None]:
        """Stock's deprecated ``callback`` / ``callback_steps`` arguments, with stock's warnings."""
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:
            raise TypeError(f"__call__() got unexpected keyword arguments {sorted(kwargs)}")
        message = (
            "Passing `{}` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`"
        )
        if callback is not None:
            deprecate("callback", "1.0.0", message.format("callback"))
        if callback_steps is not None:
            deprecate("callback_steps", "1.0.0", message.format("callback_steps"))
            if not isinstance(callback_steps, int) or callback_steps <= 0:
                raise UserError(f"callback_steps must be a positive integer; got {callback_steps!r}")
        return callback, callback_steps

    # 2. prompt: encode_prompt and encode_conditioning come from PromptConditioningMixin (prompt_conditioning.py).

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

    # 4. loop: denoise comes from DenoisingLoopMixin (denoising.py).

    # ----------------------------------------------------------------------------- the steps shared by every __call__

    def start_call(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        *,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_images_per_prompt: int,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        guidance_rescale: float,
        guidance_interval: tuple[float, float] | None,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        cross_attention_kwargs: dict[str, Any] | None,
        clip_skip: int | None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
        ip_adapter_image: PipelineImageInput | None,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        prompt_weighting: bool,
        long_prompts: bool,
        deprecated: dict[str, Any],
        family_inputs: FamilyInputs | None = None,
    ) -> CallSetup:
        """Steps 1 and 2 of every call of this pipeline and its img2img / inpaint subclasses: fill in the model's
        defaults, check the arguments (``deprecated`` is the call's ``**kwargs``: stock's ``callback`` and
        ``callback_steps``), set the call state the properties read, and encode the prompts (``family_inputs``:
        the family's own arguments, for its ``encode_conditioning``)."""
        callback, callback_steps = self._deprecated_callback(deprecated)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_inference_steps, guidance_scale, guidance_interval = self.sampling_settings(
            num_inference_steps, guidance_scale, guidance_interval
        )
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_rescale,
            num_images_per_prompt,
            eta,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            generator,
            latents,
            output_type,
            tensor_inputs,
        )
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds)
        self._start_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device = self._execution_device
        conditioning = self.encode_conditioning(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            num_images_per_prompt,
            device,
            prompt_weighting,
            ip_adapter_image,
            ip_adapter_image_embeds,
            long_prompts,
            family_inputs,
        )
        batch_size = self._batch_size(prompt, prompt_embeds)
        return CallSetup(
            conditioning,
            num_inference_steps,
            guidance_interval,
            batch_size,
            batch_size * num_images_per_prompt,
            device,
            generator,
            eta,
            callback_on_step_end,
            tensor_inputs,
            callback,
            callback_steps,
        )

    def run_denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        setup: CallSetup,
        step_hook: StepHook | None = None,
    ) -> torch.Tensor:
        """:meth:`denoise` with this call's state, conditioning and (for an LCM U-Net) guidance embedding."""
        conditioning = setup.conditioning
        return self.denoise(
            latents,
            timesteps,
            num_inference_steps,
            conditioning.prompt_embeds,
            conditioning.negative_prompt_embeds,
            guidance_scale=self.guidance_scale,
            guidance_rescale=self.guidance_rescale,
            guidance_interval=setup.guidance_interval,
            step_kwargs=self._scheduler_step_kwargs(setup.generator, setup.eta),
            cross_attention_kwargs=self.cross_attention_kwargs,
            callback_on_step_end=setup.callback_on_step_end,
            callback_on_step_end_tensor_inputs=setup.callback_on_step_end_tensor_inputs,
            step_hook=step_hook,
            timestep_cond=self.guidance_embedding(latents.shape[0], latents.device, latents.dtype),
            added_cond_kwargs=conditioning.added_cond_kwargs,
            prompt_attention_mask=conditioning.attention_mask,
            negative_attention_mask=conditioning.attention_mask,
            callback=setup.callback,
            callback_steps=setup.callback_steps,
            negative_added_cond_kwargs=conditioning.negative_added_cond_kwargs,
        )

    def finish_call(
        self,
        latents: torch.Tensor,
        setup: CallSetup,
        output_type: str,
        return_dict: bool,
        images: Any = None,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Step 5 of every call: ``images`` (when not given, ``latents`` decoded with the call's generator) in
        ``output_type``, or the latents themselves for ``"latent"``; the offload hooks freed; stock's output."""
        if output_type == "latent":
            images = latents
        elif images is None:
            images = self.decode_latents(latents, setup.generator)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LatentDiffusionPipelineOutput(images=images)

    # ---------------------------------------------------------------------------------------------------- 5. decode

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> the VAE's: divided by the VAE's ``scaling_factor``."""
        return latents / self.vae.config.scaling_factor

    def decode_in_float32(self) -> bool:
        """Whether a half-precision VAE decodes in float32 right away: once a half-precision decode has overflowed."""
        return self._upcast_vae_decode

    def decode_latents(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None):
        """Latents -> images in [-1, 1] with the VAE. A half-precision decode that overflows to NaN/inf (the SD 1.x
        VAE does at some resolutions) is redone in float32, and later calls decode in float32 directly."""
        half = self.vae.dtype in (torch.float16, torch.bfloat16)
        if not (half and self.decode_in_float32()):
            vae_latents = self.unscale_latents(latents).to(self.vae.dtype)
            image = self.vae.decode(vae_latents, return_dict=False, generator=generator)[0]
            if not half or torch.isfinite(image).all():
                return image
            logger.warning("the %s VAE decode overflowed (NaN/inf); decoding in float32 from now on", self.vae.dtype)
            self._upcast_vae_decode = True
        dtype = self.vae.dtype
        self.vae.to(torch.float32)
        try:
            image = self.vae.decode(self.unscale_latents(latents.float()), return_dict=False, generator=generator)[0]
        finally:
            self.vae.to(dtype)
        return image

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
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        prompt_weighting: bool = False,
        long_prompts: bool = True,
        **kwargs: Any,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Generate images from text.

        Args:
            prompt: the text(s) to draw. Longer than 77 tokens is fine (each prompt of a batch gets the image it
                gets alone). With ``prompt_weighting``, ``(word:1.3)`` weights a part.
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
            ip_adapter_image, ip_adapter_image_embeds: an image prompt for the IP-Adapter(s) loaded with
                ``load_ip_adapter`` (one image per adapter), or its precomputed embeddings, as in stock.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`LatentDiffusionPipelineOutput` instead of a tuple.
            cross_attention_kwargs: passed to the attention processors (``{"scale": s}`` scales LoRA layers).
            guidance_rescale: phi of Lin et al. 2024 in [0, 1]; counters over-exposure at high guidance.
            clip_skip: use the hidden states this many layers before the text encoder's last.
            callback_on_step_end: ``f(pipe, step, timestep, tensors) -> dict`` called after each step; the tensors
                named in ``callback_on_step_end_tensor_inputs`` (default ``["latents"]``) are passed and may be
                replaced; it may change ``pipe._guidance_scale`` or set ``pipe._interrupt``.
            guidance_interval: ``(lo, hi)``: guide only at the timesteps t with ``lo <= t / T <= hi`` (Kynkaanniemi
                et al. 2024), the others take the conditional pass alone (faster); default: the model's
                ``generation_defaults`` ((0, 1), every step, for a Stable Diffusion folder).
            prompt_weighting: read AUTOMATIC1111's emphasis syntax (``(word)`` x1.1, ``[word]`` /1.1,
                ``(word:1.3)``) in prompts and negative prompts; off (default) they are literal text, as in stock.
            long_prompts: encode prompts longer than 75 tokens in 75-token chunks (default); off, they are cut to
                their first 75 tokens with a warning, as in stock.
            callback, callback_steps: deprecated (as in stock): ``callback(step, t, latents)`` every
                ``callback_steps`` steps.
        """
        height = height or self.default_size
        width = width or self.default_size
        # 1.-2. Check the inputs; encode the prompt (and the negative prompt when guiding) and the IP-Adapter image.
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
        )

        # 3. Sampling timesteps and the initial noise x_T.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, setup.num_inference_steps, setup.device, timesteps, sigmas
        )
        dtype = setup.conditioning.prompt_embeds.dtype
        latents = self.prepare_latents(setup.num_images, height, width, dtype, setup.device, generator, latents)

        # 4. The denoising loop: x_t -> x_{t-1} with the guided prediction.
        latents = self.run_denoise(latents, timesteps, num_inference_steps, setup)

        # 5. Decode the latents and convert to the requested output type.
        return self.finish_call(latents, setup, output_type, return_dict)
