"""The one generate-and-save path behind ``txt2img``, ``img2img``, ``inpaint``, the studio and the web app.

A :class:`GenerationRequest` says what to draw (prompts, sampling settings, seed) and its :class:`Mode` how (text to
image, img2img, inpainting, outpainting: each mode is one small class that names its pipeline and its inputs).
:func:`generate` loads the model (cached, :func:`pipelines.loading.load_model`), sets the sampler, draws the seeds,
calls the pipeline and writes each image as a PNG with its settings as text metadata: our keys, and an
AUTOMATIC1111-style ``parameters`` chunk (:mod:`pipelines.infotext`).

Image ``i`` of a request (counted over all prompts) is drawn with its own CPU ``torch.Generator`` seeded
``seed + i``, so any image can be made again alone with ``seed + i`` and one image; CPU noise is the same on every
device.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import PIL.Image
import torch
from PIL.PngImagePlugin import PngInfo

from ldm.errors import UserError
from pipelines.families import Task
from pipelines.generation_defaults import check_guidance_interval
from pipelines.hires import HiresFix, hires_fix, upscaled_size
from pipelines.infotext import PARAMETERS_KEY, a1111_clip_skip, format_parameters
from pipelines.loading import LoadedModel, ModelSettings, load_model
from pipelines.masks import outpaint_canvas
from pipelines.pipeline_img2img import IMG2IMG_STRENGTH
from pipelines.pipeline_inpaint import INPAINT_STRENGTH
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from pipelines.schedulers import a1111_sampler, canonical_name, make_scheduler, scheduler_name
from pipelines.token_merging import MAX_RATIO as MAX_TOME_RATIO

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
RANDOM_SEEDS = 2**32
"""A random seed is drawn below this: short enough to read off and retype."""
SLUG_LENGTH = 48
INDEX_PATTERN = re.compile(r"^(\d+)-")
OUTPAINT_SIDES = ("left", "right", "top", "bottom")


# ------------------------------------------------------------------------------------------------------- modes


class Prepared(NamedTuple):
    """What a mode gives the pipeline call and the image metadata; ``call`` draws instead of the pipeline itself
    (a hires fix's two passes), with the same arguments."""

    inputs: dict[str, Any]
    width: int
    height: int
    metadata: dict[str, str]
    a1111: dict[str, str]
    call: Callable[..., Any] | None = None


class Mode(Protocol):
    """How a request draws: the task it runs (which names the pipeline of the model's family, see
    :class:`pipelines.families.FamilyPipelines`) and the inputs it adds to the common ones."""

    name: ClassVar[str]
    task: ClassVar[Task]

    def prepare(self, pipe: LatentDiffusionPipeline) -> Prepared:
        """The pipeline inputs of this mode, the image size, and its metadata (ours and A1111's keys)."""
        ...


@dataclass(frozen=True)
class TextToImage:
    """Text to image at ``height`` x ``width`` pixels (``None``: the model's native size); with ``hires``, that is
    the base pass of a hires fix (:mod:`pipelines.hires`) and the image is ``hires.scale`` times larger."""

    height: int | None = None
    width: int | None = None
    hires: HiresFix | None = None

    name: ClassVar[str] = "txt2img"
    task: ClassVar[Task] = "text_to_image"

    def prepare(self, pipe: LatentDiffusionPipeline) -> Prepared:
        factor = pipe.vae_scale_factor
        for name, side in (("height", self.height), ("width", self.width)):
            if side is not None and side % factor:
                raise UserError(
                    f"--{name} {side} must be a multiple of {factor} (the VAE downsamples by {factor}); try "
                    f"{max(factor, round(side / factor) * factor)}"
                )
        height, width = self.height or pipe.default_size, self.width or pipe.default_size
        inputs = {"height": self.height, "width": self.width}
        if self.hires is None:
            return Prepared(inputs, width, height, {}, {})
        self.hires.check()
        hires = self.hires
        final_height, final_width = upscaled_size(height, width, hires.scale, factor)
        metadata = {
            "hires_scale": f"{hires.scale:g}",
            "hires_strength": f"{hires.strength:g}",
            "hires_upscale": hires.upscale,
            **({} if hires.steps is None else {"hires_steps": str(hires.steps)}),
        }
        a1111 = {
            "Hires upscale": f"{hires.scale:g}",
            "Hires upscaler": "Latent" if hires.upscale == "latent" else "Lanczos",
            "Denoising strength": f"{hires.strength:g}",
            **({} if hires.steps is None else {"Hires steps": str(hires.steps)}),
        }
        return Prepared(inputs, final_width, final_height, metadata, a1111, partial(hires_fix, pipe, hires))


@dataclass(frozen=True)
class ImageToImage:
    """SDEdit: redraw ``image`` with the prompt; ``strength`` in (0, 1] is how much is redone. ``source`` names the
    image in the metadata."""

    image: PIL.Image.Image
    strength: float = IMG2IMG_STRENGTH
    source: str = ""

    name: ClassVar[str] = "img2img"
    task: ClassVar[Task] = "img2img"

    def prepare(self, pipe: LatentDiffusionPipeline) -> Prepared:
        metadata = {"image": self.source, "strength": str(float(self.strength))}
        inputs = {"image": self.image, "strength": self.strength}
        return Prepared(inputs, *self.image.size, metadata, {"Denoising strength": f"{self.strength:g}"})


@dataclass(frozen=True)
class Inpaint:
    """Regenerate the white area of ``mask`` in ``image``. ``mask_blur`` feathers the final blend, ``resamples``
    redoes each step (RePaint), ``keep_unmasked_pixels`` pastes the original back outside the mask (off: stock's
    image). ``source`` / ``mask_source`` name the files in the metadata."""

    image: PIL.Image.Image
    mask: PIL.Image.Image
    strength: float = INPAINT_STRENGTH
    mask_blur: float = 0.0
    resamples: int = 0
    keep_unmasked_pixels: bool = True
    source: str = ""
    mask_source: str = ""

    name: ClassVar[str] = "inpaint"
    task: ClassVar[Task] = "inpaint"

    def prepare(self, pipe: LatentDiffusionPipeline) -> Prepared:
        return _masked(self.image, self.mask, self, {"image": self.source, "mask": self.mask_source})


@dataclass(frozen=True)
class Outpaint:
    """Extend ``image`` by ``sides`` pixels (``left``, ``right``, ``top``, ``bottom``) and fill the new area; the
    blend settings as :class:`Inpaint`'s."""

    image: PIL.Image.Image
    sides: dict[str, int] = field(default_factory=dict)
    mask_blur: float = 0.0
    resamples: int = 0
    keep_unmasked_pixels: bool = True
    source: str = ""
    strength: ClassVar[float] = INPAINT_STRENGTH

    name: ClassVar[str] = "outpaint"
    task: ClassVar[Task] = "inpaint"

    def prepare(self, pipe: LatentDiffusionPipeline) -> Prepared:
        canvas, mask = outpaint_canvas(self.image, **self.sides, multiple=pipe.vae_scale_factor)
        spec = ",".join(f"{side}={px}" for side, px in self.sides.items() if px)
        return _masked(canvas, mask, self, {"image": self.source, "outpaint": spec})


def _masked(
    image: PIL.Image.Image, mask: PIL.Image.Image, mode: Inpaint | Outpaint, metadata: dict[str, str]
) -> Prepared:
    """The inputs and metadata the two masked modes share."""
    inputs = {
        "image": image,
        "mask_image": mask,
        "strength": mode.strength,
        "mask_blur": float(mode.mask_blur),
        "resamples": int(mode.resamples),
        "keep_unmasked_pixels": mode.keep_unmasked_pixels,
    }
    metadata = {
        **{key: value for key, value in metadata.items() if value},
        "strength": str(float(mode.strength)),
        "mask_blur": str(float(mode.mask_blur)),
        "resamples": str(int(mode.resamples)),
        "keep_unmasked_pixels": str(mode.keep_unmasked_pixels).lower(),
    }
    a1111 = {"Denoising strength": f"{mode.strength:g}", "Mask blur": f"{mode.mask_blur:g}"}
    return Prepared(inputs, *image.size, metadata, a1111)


# ------------------------------------------------------------------------------------------------------- speed


@dataclass(frozen=True)
class SpeedSettings:
    """How a request runs, not what it draws: ``fast`` (:meth:`~pipelines.fast_mode.FastModeMixin.enable_fast_mode`:
    channels_last, fused QKV, ``torch.compile``; the same images up to float rounding), ``step_cache`` (DeepCache: the
    full U-Net every N steps, :meth:`~pipelines.step_cache.StepCachingMixin.enable_step_caching`; None or 1: off) and
    ``tome`` (the share of tokens merged by ToMe, :meth:`~pipelines.step_cache.StepCachingMixin.enable_token_merging`;
    0: off). The last two trade some fidelity for speed."""

    fast: bool = False
    step_cache: int | None = None
    tome: float = 0.0

    @property
    def step_cache_interval(self) -> int | None:
        """The step-caching interval, None when off (1 caches nothing, so it is off too)."""
        return self.step_cache if self.step_cache is not None and self.step_cache > 1 else None

    def check(self) -> None:
        """Raises :class:`UserError` naming the setting to change."""
        if self.step_cache is not None and (isinstance(self.step_cache, bool) or self.step_cache < 1):
            raise UserError(f"step cache interval must be an integer >= 1 (1: off); got {self.step_cache}")
        if not 0 <= self.tome <= MAX_TOME_RATIO:
            raise UserError(f"token merging ratio must be in [0, {MAX_TOME_RATIO}] (0: off); got {self.tome}")

    def apply(self, pipe: LatentDiffusionPipeline) -> None:
        """Switch ``pipe``'s fast mode, step caching and token merging to these settings (each only when it
        changes: a cached model keeps its compiled U-Net from request to request)."""
        if self.fast != pipe.fast_mode_enabled:
            if self.fast:
                pipe.enable_fast_mode()
            else:
                pipe.disable_fast_mode()
        interval = self.step_cache_interval
        if interval != pipe.step_caching_interval:
            if interval is None:
                pipe.disable_step_caching()
            else:
                pipe.enable_step_caching(interval=interval)
        # ToMe patches the U-Net, which the pipelines of other tasks share: undo it whatever this pipe recorded.
        if self.tome:
            if pipe.token_merging_ratio != self.tome:
                pipe.enable_token_merging(self.tome)
        else:
            pipe.disable_token_merging()

    def metadata(self) -> tuple[dict[str, str], dict[str, str]]:
        """Our metadata keys and AUTOMATIC1111's for the settings that are on."""
        ours, a1111 = {}, {}
        if self.fast:
            ours["fast_mode"] = "true"
        if self.step_cache_interval is not None:
            ours["step_cache"] = str(self.step_cache_interval)
            a1111["Step cache"] = str(self.step_cache_interval)
        if self.tome:
            ours["tome"] = f"{self.tome:g}"
            a1111["Token merging ratio"] = f"{self.tome:g}"
        return ours, a1111


# ----------------------------------------------------------------------------------------------------- request


@dataclass(frozen=True)
class GenerationRequest:
    """What to draw. ``None`` for ``steps`` / ``guidance_scale`` / ``guidance_interval``: the model's
    ``generation_defaults``; for ``scheduler``: the model's own sampler; for ``seed``: a random one (reported back).

    ``num_images`` images are drawn per prompt, ``batch_size`` prompts per pipeline call; ``speed`` says how fast
    (:class:`SpeedSettings`: fast mode, step caching, token merging; default all off).
    """

    prompts: tuple[str, ...]
    mode: Mode = field(default_factory=TextToImage)
    negative_prompt: str | None = None
    num_images: int = 1
    batch_size: int = 1
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    eta: float = 0.0
    scheduler: str | None = None
    seed: int | None = None
    prompt_weighting: bool = True
    long_prompts: bool = True
    speed: SpeedSettings = field(default_factory=SpeedSettings)

    def check(self) -> None:
        """Raises :class:`UserError` naming the setting to change."""
        self.speed.check()
        if not self.prompts or any(not prompt.strip() for prompt in self.prompts):
            raise UserError("the prompt is empty; type what the image should show")
        if self.num_images < 1 or self.batch_size < 1:
            raise UserError(f"number of images and batch size must be >= 1; got {self.num_images}, {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be at least 1; got {self.steps}")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale < math.inf:
            raise UserError(
                f"guidance scale must be >= 0 and finite (<= 1 turns guidance off); got {self.guidance_scale}"
            )
        if not 0 <= self.guidance_rescale <= 1:
            raise UserError(f"guidance rescale must be in [0, 1]; got {self.guidance_rescale}")
        if self.guidance_interval is not None:
            try:
                check_guidance_interval(self.guidance_interval)
            except ValueError as err:
                raise UserError(str(err)) from None
        if self.clip_skip is not None and self.clip_skip < 1:
            raise UserError(f"clip skip must be >= 1 (layers skipped before the last); got {self.clip_skip}")
        if not self.eta >= 0:
            raise UserError(f"eta must be >= 0; got {self.eta}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise UserError(f"the seed must be a whole number from 0 to 2**63 - 1, or random; got {self.seed}")
        if self.scheduler is not None:
            canonical_name(self.scheduler)


class Generation(NamedTuple):
    """The PNGs one request wrote (image ``i`` has seed ``seed + i``) and that first seed."""

    paths: list[Path]
    seed: int


# ------------------------------------------------------------------------------------------------- seeds, files


def image_seeds(seed: int, num_images: int, start: int = 0) -> list[int]:
    """The seeds of images ``start .. start + num_images - 1`` of a run whose first image has seed ``seed``."""
    return [seed + start + i for i in range(num_images)]


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded with its seed (CPU noise is the same on every device)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def slugify(text: str, max_length: int = SLUG_LENGTH) -> str:
    """A file-name-safe ASCII slug of a prompt: ``"A Fox, (snow:1.2)!"`` -> ``"a-fox-snow-1-2"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


def next_index(folder: Path) -> int:
    """The number after the highest ``NNNNN-`` prefix of the PNGs in ``folder`` (0 for none)."""
    indices = [int(m.group(1)) for p in folder.glob("*.png") if (m := INDEX_PATTERN.match(p.name))]
    return max(indices, default=-1) + 1


def save_png(image: PIL.Image.Image, folder: Path, index: int, seed: int, metadata: dict[str, str]) -> Path:
    """Write ``image`` as ``<index>-<seed>-<slug of the prompt>.png`` with ``metadata`` as PNG text chunks.

    Never overwrites: a taken name moves on to the next index. Returns the path written.
    """
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    slug = slugify(metadata.get("prompt", ""))
    while True:
        path = folder / f"{index:05d}-{seed}-{slug}.png"
        try:
            with path.open("xb") as file:
                image.save(file, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            index += 1


def batches(items: tuple[str, ...], size: int) -> Iterator[tuple[int, list[str]]]:
    """``(index of the first item, items)`` for consecutive batches of ``size`` items."""
    for start in range(0, len(items), size):
        yield start, list(items[start : start + size])


def format_interval(interval: tuple[float, float]) -> str:
    """``(0.5, 1.0)`` -> ``"0.5,1"``, the form ``--guidance-interval`` reads (for image metadata)."""
    return ",".join(f"{bound:g}" for bound in interval)


def model_label(model: str) -> str:
    """The model's name for A1111's ``Model:`` (a folder's name, or the Hub id)."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


# -------------------------------------------------------------------------------------------------- generation


def _metadata(
    request: GenerationRequest,
    loaded: LoadedModel,
    prepared: Prepared,
    steps: int,
    guidance_scale: float,
    interval: tuple[float, float],
) -> tuple[dict[str, str], dict[str, str]]:
    """The metadata every image of a request shares: our keys, and the A1111 settings of its ``parameters``
    line (the seed is added per image)."""
    scheduler = loaded.pipe.scheduler
    settings = loaded.settings
    ours = {
        "mode": request.mode.name,
        "negative_prompt": request.negative_prompt or "",
        "steps": str(steps),
        "guidance_scale": str(guidance_scale),
        "guidance_interval": format_interval(interval),
        "guidance_rescale": str(request.guidance_rescale),
        "eta": str(request.eta),
        "scheduler": scheduler_name(scheduler),
        "height": str(prepared.height),
        "width": str(prepared.width),
        "model": settings.model,
        "prompt_weighting": str(request.prompt_weighting).lower(),
        "long_prompts": str(request.long_prompts).lower(),
        **prepared.metadata,
    }
    speed_ours, speed_a1111 = request.speed.metadata()
    ours.update(speed_ours)
    optional = {
        "clip_skip": None if request.clip_skip is None else str(request.clip_skip),
        "loras": ", ".join(map(str, settings.loras)) or None,
        "embeddings": ", ".join(map(str, settings.embeddings)) or None,
    }
    ours.update({key: value for key, value in optional.items() if value is not None})
    sampler, schedule_type = a1111_sampler(scheduler)
    a1111 = {
        "Steps": str(steps),
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": f"{guidance_scale:g}",
        "Seed": None,  # per image
        "Size": f"{prepared.width}x{prepared.height}",
        "Model": model_label(settings.model),
        **prepared.a1111,
        "Clip skip": str(a1111_clip_skip(request.clip_skip)) if request.clip_skip else None,
        "Guidance interval": format_interval(interval) if interval != (0.0, 1.0) else None,
        "Guidance rescale": f"{request.guidance_rescale:g}" if request.guidance_rescale else None,
        "Eta": f"{request.eta:g}" if request.eta else None,
        "Loras": ", ".join(map(str, settings.loras)) or None,
        "Embeddings": ", ".join(map(str, settings.embeddings)) or None,
        **speed_a1111,
    }
    return ours, a1111


def generate(
    request: GenerationRequest,
    settings: ModelSettings | LoadedModel,
    out: Path,
    on_saved: Callable[[Path], None] | None = None,
) -> Generation:
    """Load the model (or use the loaded one), draw ``request`` and save each image in ``out``; ``on_saved(path)``
    is called as each PNG is written. Returns the paths and the first seed.

    Raises:
        UserError: a setting, model, LoRA, embedding or input that cannot work (the message names the fix).
    """
    request.check()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder (it is created if missing)")
    loaded = settings if isinstance(settings, LoadedModel) else load_model(settings)
    scheduler = loaded.scheduler
    if request.scheduler is not None:
        scheduler = make_scheduler(request.scheduler, loaded.scheduler.config)
    loaded.set_scheduler(scheduler)
    pipe = loaded.pipeline(request.mode.task)
    request.speed.apply(pipe)
    prepared = request.mode.prepare(pipe)
    steps, guidance_scale, interval = pipe.sampling_settings(
        request.steps, request.guidance_scale, request.guidance_interval
    )
    seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEEDS)
    ours, a1111 = _metadata(request, loaded, prepared, steps, guidance_scale, interval)

    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    num_batches = -(-len(request.prompts) // request.batch_size)
    for batch_number, (first, batch) in enumerate(batches(request.prompts, request.batch_size), start=1):
        seeds = image_seeds(seed, len(batch) * request.num_images, start=first * request.num_images)
        pipe.set_progress_bar_config(desc=f"batch {batch_number}/{num_batches}" if num_batches > 1 else None)
        images = (prepared.call or pipe)(
            prompt=batch,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            guidance_rescale=request.guidance_rescale,
            guidance_interval=interval,
            num_images_per_prompt=request.num_images,
            eta=request.eta,
            generator=generators_for(seeds),
            clip_skip=request.clip_skip,
            prompt_weighting=request.prompt_weighting,
            long_prompts=request.long_prompts,
            output_type="np",  # checked for NaN before it becomes a PNG (NaN would quietly turn black)
            **prepared.inputs,
        ).images
        for i, image_seed in enumerate(seeds):
            if not np.isfinite(images[i]).all():
                raise UserError(
                    f"the model produced NaN or infinite values for {batch[i // request.num_images]!r} (seed "
                    f"{image_seed}); nothing was saved for it. Lower the guidance scale or guidance rescale, or use "
                    "--dtype float32 (half precision can overflow)"
                )
        images = pipe.numpy_to_pil(images)
        # The pipeline orders images prompt by prompt: [p0 #0, p0 #1, ..., p1 #0, ...], as the seeds are.
        for i, (image, image_seed) in enumerate(zip(images, seeds, strict=True)):
            prompt = batch[i // request.num_images]
            parameters = format_parameters(prompt, request.negative_prompt, {**a1111, "Seed": str(image_seed)})
            metadata = {"prompt": prompt, "seed": str(image_seed), **ours, PARAMETERS_KEY: parameters}
            path = save_png(image, out, next_index(out), image_seed, metadata)
            if on_saved is not None:
                on_saved(path)
            paths.append(path)
    if request.seed is None:
        logger.info("random seed %d (image i of this run has seed %d + i)", seed, seed)
    return Generation(paths, seed)
