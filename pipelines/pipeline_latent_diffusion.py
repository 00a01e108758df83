"""`LatentDiffusionPipeline`: text-to-image with a latent diffusion model (Rombach et al. 2022).

prompt -> CLIP tokens -> CLIP text embeddings -> U-Net denoising loop in latent space with classifier-free guidance
-> VAE decode -> image. With the same components, scheduler, seed and arguments it returns the same images as
diffusers' stock ``StableDiffusionPipeline``; on top of that it encodes prompts longer than 77 tokens in chunks instead
of truncating them (each prompt of a batch gets the image it gets alone), reads prompt weights such as ``(word:1.3)``
when asked (``prompt_weighting=True``), chooses the attention backend in one call, and retries a half-precision VAE
decode in float32 when it overflows (the "black image" bug) instead of returning NaNs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

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
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline, retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, deprecate, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ldm.attention import set_attention_backend
from ldm.errors import UserError
from ldm.guidance import guide, uses_classifier_free_guidance
from ldm.text import encode_prompts, prompt_chunk_count
from ldm.tokenizer import CLIP_MAX_LENGTH
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


@dataclass
class TextConditioning:
    """What the U-Net is conditioned on for one call: the prompt embeddings ``(B * n, L, D)``, the negative ones (None
    when the call does not guide), the padding mask of the embeddings (None: attend to all) and the U-Net's added
    conditions of the prompts (``added_cond_kwargs``: IP-Adapter image embeddings, SDXL's pooled text embedding and
    size/crop ids; None without) and of the negative prompts (``negative_added_cond_kwargs``, the same keys; None
    when the call does not guide). A guided step gives the U-Net each added condition as ``[negative; positive]``,
    an unguided one the positive alone."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    added_cond_kwargs: dict[str, Any] | None
    negative_added_cond_kwargs: dict[str, Any] | None = None


@dataclass
class FamilyInputs:
    """The call arguments that only some model families take (SDXL's second prompts, pooled embeddings and sizes),
    handed from ``__call__`` through :meth:`LatentDiffusionPipeline.start_call` to ``encode_conditioning``. Stable
    Diffusion 1.x/2.x has none."""


def concat_added_conditions(negative: dict[str, Any] | None, positive: dict[str, Any] | None) -> dict[str, Any] | None:
    """The U-Net's added conditions of a guided step: each one ``[negative; positive]`` along the batch (a list of
    tensors, as IP-Adapter image embeddings come, element by element)."""
    if positive is None:
        return None
    if negative is None:
        raise ValueError("a guided step needs the negative added conditions too (TextConditioning.negative_*)")

    def cat(neg: Any, pos: Any) -> Any:
        if isinstance(pos, (list, tuple)):
            return [torch.cat([n, q]) for n, q in zip(neg, pos, strict=True)]
        return torch.cat([neg, pos])

    return {key: cat(negative[key], value) for key, value in positive.items()}


def split_added_conditions(both: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``[negative; positive]`` added conditions (as stock's ``prepare_ip_adapter_image_embeds`` returns them when
    guiding) split into the negative and the positive halves."""

    def half(value: Any, index: int) -> Any:
        if isinstance(value, (list, tuple)):
            return [v.chunk(2)[index] for v in value]
        return value.chunk(2)[index]

    return {k: half(v, 0) for k, v in both.items()}, {k: half(v, 1) for k, v in both.items()}


def padding_mask(counts: list[int], num_images_per_prompt: int, device: torch.device) -> torch.Tensor | None:
    """``(B * n, 77 * max(counts))``: 1 on the first ``counts[b]`` chunks of prompt ``b``, 0 on the chunks its batch
    adds beyond them; None when every prompt has the same count (no mask: the call is stock's)."""
    if min(counts) == max(counts):
        return None
    positions = torch.arange(max(counts) * CLIP_MAX_LENGTH, device=device)
    lengths = torch.tensor(counts, device=device)[:, None] * CLIP_MAX_LENGTH
    return (positions[None, :] < lengths).long().repeat_interleave(num_images_per_prompt, dim=0)


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


class StepHook:
    """What a pipeline adds to each step of LatentDiffusionPipeline.denoise; this base adds nothing."""

    resamples: int = 0  # redo each step this many more times from renoise(i, latents) (RePaint)

    def unet_input(self, model_input: torch.Tensor, guided: bool) -> torch.Tensor:
        """The U-Net's input after ``scale_model_input``; may concat channels (doubled when ``guided``)."""
        return model_input

    def after_step(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents after step ``i`` (inpainting puts the known region back)."""
        return latents

    def renoise(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """Step ``i``'s result noised back to its timestep, to redo the step (needed when ``resamples`` > 0)."""
        raise NotImplementedError

    def callback_tensors(self, guided: bool) -> dict[str, torch.Tensor]:
        """The hook's tensors a ``callback_on_step_end`` may ask for by name (stock inpainting's ``mask``, ...)."""
        return {}

    def set_callback_tensors(self, tensors: dict[str, torch.Tensor], guided: bool) -> None:
        """Take back the hook's tensors among those a ``callback_on_step_end`` returned."""


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
    # Callback tensor names that are added conditions: name -> (added_cond_kwargs key, which half). "both" is
    # [negative; positive] at a guided step (the positive alone otherwise), "negative" the negative half.
    _callback_added_conditions: dict[str, tuple[str, Literal["both", "negative"]]] = {}
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

    @staticmethod
    def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

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
        prompt_weighting: bool = False,
        long_prompts: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts (and negative prompts, when guiding) to CLIP hidden states ``(B * n, 77 * chunks, D)``.

        A prompt of up to 75 tokens gives exactly stock diffusers' embeddings (with ``prompt_weighting`` on, only
        when it has no weight syntax). Longer prompts are encoded in 75-token chunks that are concatenated (see
        :func:`ldm.text.encode_prompts`); a batch is padded to its longest prompt's chunk count with chunks of the
        empty prompt (:meth:`prompt_padding_mask` says which positions are such padding). ``prompt_weighting``
        reads A1111's ``(word:1.3)`` / ``[word]`` weights; off (the default, as stock), brackets are text.
        ``long_prompts=False`` cuts every prompt to its first 75 tokens instead, as stock does (with its warning).
        With both ``prompt_embeds`` and ``negative_prompt_embeds`` given, no tokenizer or text encoder is needed.

        Raises:
            UserError: a negative prompt longer than the ``prompt_embeds`` given.
        """
        text_encoder = self.text_encoder
        if lora_scale is not None and USE_PEFT_BACKEND and text_encoder is not None:
            self._lora_scale = lora_scale
            scale_lora_layers(text_encoder, lora_scale)

        prompts, negatives = self._prompt_texts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_classifier_free_guidance
        )
        truncate = not long_prompts
        encode = {
            "clip_skip": clip_skip,
            "device": device,
            "dtype": self._text_dtype(),
            "weighting": prompt_weighting,
            "truncate": truncate,
        }
        if prompt_embeds is None:
            num_chunks = max(self._chunk_counts(prompts, negatives, prompt_weighting, truncate))
            prompt_embeds = encode_prompts(text_encoder, self.tokenizer, prompts, num_chunks=num_chunks, **encode)
        if negatives is not None:
            prompt_chunks = prompt_embeds.shape[1] // CLIP_MAX_LENGTH
            needed = max(prompt_chunk_count(self.tokenizer, n, prompt_weighting, truncate) for n in negatives)
            if needed > prompt_chunks:
                raise UserError(
                    f"negative_prompt needs {needed} chunks of {CLIP_MAX_LENGTH} tokens but prompt_embeds has "
                    f"{prompt_chunks}; shorten the negative prompt or pass negative_prompt_embeds"
                )
            negative_prompt_embeds = encode_prompts(
                text_encoder, self.tokenizer, negatives, num_chunks=prompt_chunks, **encode
            )

        if lora_scale is not None and USE_PEFT_BACKEND and text_encoder is not None:
            unscale_lora_layers(text_encoder, lora_scale)

        prompt_embeds = prompt_embeds.to(device=device, dtype=self._text_dtype())
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self._text_dtype())
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

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
        """The prompt (and, when guiding, negative prompt) embeddings, their padding mask and the IP-Adapter image
        embeddings of this call (call :meth:`_start_call` first: guidance, ``clip_skip`` and the LoRA scale are read
        from the call state). ``family_inputs``: none for this family."""
        do_cfg = self.do_classifier_free_guidance
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
            prompt_weighting=prompt_weighting,
            long_prompts=long_prompts,
        )
        attention_mask = self.prompt_padding_mask(
            prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_weighting, device, long_prompts
        )
        added, negative_added = self.ip_adapter_conditions(
            ip_adapter_image, ip_adapter_image_embeds, device, prompt_embeds.shape[0]
        )
        return TextConditioning(
            prompt_embeds, negative_prompt_embeds if do_cfg else None, attention_mask, added, negative_added
        )

    def ip_adapter_conditions(
        self,
        ip_adapter_image: PipelineImageInput | None,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        device: torch.device,
        num_images: int,
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The IP-Adapter image embeddings as added conditions of the prompts and (when guiding) of the negative
        prompts, as stock computes them; None without an image prompt (and for the negative when not guiding)."""
        do_cfg = self.do_classifier_free_guidance
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return None, None
        image_embeds = self.prepare_ip_adapter_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, num_images, do_cfg
        )
        if not do_cfg:
            return {"image_embeds": image_embeds}, None
        negative, positive = split_added_conditions({"image_embeds": image_embeds})
        return positive, negative

    def prompt_padding_mask(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        prompt_weighting: bool,
        device: torch.device,
        long_prompts: bool = True,
    ) -> torch.Tensor | None:
        """Which positions of :meth:`encode_prompt`'s embeddings the U-Net attends to, ``(B * n, 77 * chunks)``.

        Each prompt (with its negative, padded to the pair's chunk count as A1111 does) has its own chunk count; the
        chunks a batch adds beyond it to reach its longest prompt are masked, so a prompt's image does not depend on
        the other prompts of its batch. None when no row is padded (or for precomputed embeddings): then the U-Net
        gets no mask and the call is stock's.
        """
        if prompt is None:
            return None
        prompts, negatives = self._prompt_texts(prompt, negative_prompt, None, None, do_classifier_free_guidance)
        counts = self._chunk_counts(prompts, negatives, prompt_weighting, not long_prompts)
        return padding_mask(counts, num_images_per_prompt, device)

    def _prompt_texts(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        do_classifier_free_guidance: bool,
    ) -> tuple[list[str] | None, list[str] | None]:
        """The prompts and negative prompts still to encode, as lists (textual-inversion tokens expanded)."""
        batch_size = self._batch_size(prompt, prompt_embeds)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        negatives: list[str] | None = None
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            negatives = self.maybe_convert_prompt(negatives, self.tokenizer)
        if prompts is not None and prompt_embeds is None:
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        return prompts, negatives

    def _chunk_counts(
        self, prompts: list[str], negatives: list[str] | None, weighting: bool, truncate: bool = False
    ) -> list[int]:
        """Per prompt, the chunks it and its negative need (at least 1; exactly 1 with ``truncate``)."""
        negatives = negatives or [""] * len(prompts)
        count = partial(prompt_chunk_count, self.tokenizer, weighting=weighting, truncate=truncate)
        return [max(count(p), count(n)) for p, n in zip(prompts, negatives, strict=True)]

    def _text_dtype(self) -> torch.dtype:
        if self.text_encoder is not None:
            return self.text_encoder.dtype
        return self.unet.dtype

    # IP-Adapter image embeddings exactly as stock computes them (from self.image_encoder / feature_extractor).
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds

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

    # ----------------------------------------------------------------------------------------------------- 4. loop

    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding

    def guidance_embedding(self, num_images: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """An LCM U-Net's guidance condition (``unet.config.time_cond_proj_dim`` set): the embedding of g - 1 that
        stock passes as ``timestep_cond``; None for other U-Nets."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        scale = torch.tensor(self.guidance_scale - 1).repeat(num_images)
        return self.get_guidance_scale_embedding(scale, embedding_dim=dim).to(device=device, dtype=dtype)

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
        step_hook: StepHook | None = None,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        callback: Callable | None = None,
        callback_steps: int | None = None,
        negative_added_cond_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The sampling loop: at each timestep the U-Net's guided prediction, then the scheduler's step x_t -> x_{t-1}.

        With guidance the unconditional and conditional passes go through the U-Net as one batch ``[neg; pos]``, at
        the timesteps t with ``lo <= t / T <= hi`` for ``guidance_interval`` (lo, hi) (Kynkaanniemi et al. 2024);
        at the others the conditional pass alone. ``negative_prompt_embeds`` None means no guidance (a single
        conditional pass). ``self.guidance_scale`` is read at every step, so ``callback_on_step_end`` may change it
        (to 1 or below it drops guidance for the remaining steps); ``self.interrupt`` skips the remaining steps.

        The callback sees stock's tensors: ``prompt_embeds`` is ``[neg; pos]`` at guided steps; returned tensors
        replace ours (a ``prompt_embeds`` of the doubled batch is split back into the two halves).

        ``step_hook`` (a :class:`StepHook`) adds what image editing needs: channels concatenated to the U-Net input,
        a replacement of the latents after each step, and RePaint resampling of each step.
        ``timestep_cond`` (LCM's guidance embedding) goes to the U-Net as in stock; ``added_cond_kwargs`` and
        ``negative_added_cond_kwargs`` (IP-Adapter image embeddings, SDXL's pooled embedding and size/crop ids) of
        the prompts and negative prompts go as ``[negative; positive]`` at guided steps, the positive alone at the
        others. ``prompt_attention_mask`` / ``negative_attention_mask`` ``(B, L)`` mask padded positions of the
        embeddings (a batch of prompts with different chunk counts); None attends to all.
        """
        hook = step_hook or StepHook()
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        lo, hi = (bound * num_train_timesteps for bound in guidance_interval)

        cond = TextConditioning(
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            added_cond_kwargs,
            negative_added_cond_kwargs,
        )

        def guided_at(t: torch.Tensor) -> bool:
            return (
                cond.negative_prompt_embeds is not None and self.do_classifier_free_guidance and lo <= float(t) <= hi
            )

        def step(i: int, t: torch.Tensor, latents: torch.Tensor, guided: bool) -> torch.Tensor:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = hook.unet_input(self.scheduler.scale_model_input(model_input, t), guided)
            embeds = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]) if guided else cond.prompt_embeds
            mask = prompt_attention_mask
            if guided and prompt_attention_mask is not None:
                mask = torch.cat([negative_attention_mask, prompt_attention_mask])
            cond_kwargs = cond.added_cond_kwargs
            if guided:
                cond_kwargs = concat_added_conditions(cond.negative_added_cond_kwargs, cond.added_cond_kwargs)
            noise_pred = self.unet(
                model_input,
                t,
                encoder_hidden_states=embeds,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=cond_kwargs,
                encoder_attention_mask=mask,
                return_dict=False,
            )[0]
            if guided:
                noise_pred = guide(noise_pred, self._guidance_scale, self._guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            return hook.after_step(i, latents)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                guided = guided_at(t)
                latents = step(i, t, latents, guided)
                for _ in range(hook.resamples):
                    latents = step(i, t, hook.renoise(i, latents), guided)

                if callback_on_step_end is not None:
                    latents = self._step_end_callback(
                        callback_on_step_end, tensor_inputs, i, t, guided, latents, cond, hook
                    )

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % (callback_steps or 1) == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, latents)
        return latents

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

    def _step_end_callback(
        self,
        callback_on_step_end: Callable,
        tensor_inputs: list[str],
        i: int,
        t: torch.Tensor,
        guided: bool,
        latents: torch.Tensor,
        cond: TextConditioning,
        hook: StepHook,
    ) -> torch.Tensor:
        """Call ``callback_on_step_end(pipe, i, t, tensors)`` with the tensors it names, as stock passes them
        (``prompt_embeds`` and the added conditions such as SDXL's ``add_text_embeds`` are ``[negative; positive]`` at
        a guided step), and take back the ones it returns: the latents are returned, the conditioning is updated in
        ``cond`` (a returned tensor of the doubled batch is split back into the two halves)."""
        negative_added = cond.negative_added_cond_kwargs or {}
        # name -> (negative, positive) for the tensors stock passes as [negative; positive] at a guided step
        pairs = {"prompt_embeds": (cond.negative_prompt_embeds, cond.prompt_embeds)}
        tensors: dict[str, Any] = {"latents": latents, "negative_prompt_embeds": cond.negative_prompt_embeds}
        for name, (key, which) in self._callback_added_conditions.items():
            if which == "negative":
                tensors[name] = negative_added.get(key)
            else:
                pairs[name] = (negative_added.get(key), cond.added_cond_kwargs[key])
        passed = {
            name: torch.cat([negative, positive]) if guided else positive
            for name, (negative, positive) in pairs.items()
            if name in tensor_inputs
        }
        tensors.update(passed)
        tensors.update(hook.callback_tensors(guided))
        outputs = callback_on_step_end(self, i, t, {name: tensors[name] for name in tensor_inputs})

        latents = outputs.pop("latents", latents)
        if "negative_prompt_embeds" in outputs:
            cond.negative_prompt_embeds = outputs.pop("negative_prompt_embeds")
        for name, (key, which) in self._callback_added_conditions.items():
            if which == "negative" and name in outputs:
                cond.negative_added_cond_kwargs[key] = outputs.pop(name)
        for name, (negative, positive) in pairs.items():
            returned = outputs.pop(name, None)
            if returned is None or returned is passed.get(name):
                continue
            if guided and returned.shape[0] == 2 * positive.shape[0]:
                negative, positive = returned.chunk(2)
            else:
                positive = returned
            if name == "prompt_embeds":
                cond.negative_prompt_embeds, cond.prompt_embeds = negative, positive
            else:
                key = self._callback_added_conditions[name][0]
                cond.added_cond_kwargs[key] = positive
                if cond.negative_added_cond_kwargs is not None:
                    cond.negative_added_cond_kwargs[key] = negative
        hook.set_callback_tensors(outputs, guided)
        return latents

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
