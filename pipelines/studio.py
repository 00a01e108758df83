"""The generation behind the web app (:mod:`pipelines.app`): one loaded model, text-to-image and the editing modes
(img2img, inpainting, outpainting), as plain functions that need neither Gradio nor a browser.

Each mode builds a :class:`~pipelines.generate.GenerationRequest` and runs it through
:func:`pipelines.generate.generate`, the path ``txt2img``, ``img2img`` and ``inpaint`` take, so an image made here is
the one the command makes with the same settings, with the same PNG metadata. A setting that cannot work raises
:class:`~ldm.errors.UserError` with a message that says what to change; the page shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import PIL.Image
import torch

from ldm.errors import UserError
from pipelines.generate import (
    Generation,
    GenerationRequest,
    ImageToImage,
    Inpaint,
    Mode,
    Outpaint,
    SpeedSettings,
    TextToImage,
    generate,
)
from pipelines.hires import HiresFix
from pipelines.loading import Embedding, LoadedModel, LoraWeights, ModelSettings, load_model
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from pipelines.schedulers import SAMPLERS

__all__ = ["MAX_IMAGES", "MODEL_SCHEDULER", "Generation", "Settings", "Studio", "fit_image"]

MODEL_SCHEDULER = "model's"
"""The scheduler choice that keeps the one saved with the model."""
MAX_IMAGES = 4


@dataclass(frozen=True)
class Settings:
    """What every mode is asked for. ``steps`` / ``guidance_scale`` ``None``: the model's ``generation_defaults``;
    ``seed`` ``None``: a random seed (reported back)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str = MODEL_SCHEDULER
    prompt_weighting: bool = True

    def check(self) -> None:
        """Raises :class:`UserError` naming the setting to change (the app's limits; the rest is the request's)."""
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise UserError(f"number of images must be 1 to {MAX_IMAGES}; got {self.num_images}")
        if self.scheduler not in (MODEL_SCHEDULER, *SAMPLERS):
            raise UserError(
                f"unknown scheduler {self.scheduler!r}; choose one of {MODEL_SCHEDULER}, {', '.join(SAMPLERS)}"
            )

    def request(self, mode: Mode) -> GenerationRequest:
        """The generation request of these settings in ``mode``."""
        self.check()
        return GenerationRequest(
            prompts=(self.prompt,),
            mode=mode,
            negative_prompt=self.negative_prompt or None,
            num_images=self.num_images,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=None if self.scheduler == MODEL_SCHEDULER else self.scheduler,
            seed=self.seed,
            prompt_weighting=self.prompt_weighting,
        )


def fit_image(image: PIL.Image.Image, max_side: int, multiple: int) -> PIL.Image.Image:
    """``image`` in RGB, scaled down to at most ``max_side`` pixels a side (keeping its aspect ratio) and with sides
    rounded down to multiples of ``multiple`` (the VAE factor); an image that already fits is returned unscaled."""
    scale = min(1.0, max_side / max(image.size))
    size = tuple(max(multiple, int(side * scale) // multiple * multiple) for side in image.size)
    image = image.convert("RGB")
    return image if size == image.size else image.resize(size, PIL.Image.Resampling.LANCZOS)


class Studio:
    """A loaded model, the folder its images go to, how fast it draws (``speed``: fast mode, step caching, token
    merging, as the app's flags set them), and a method per mode. Calls are meant to come one at a time (the app
    queues them): a request's scheduler choice is set on the model."""

    def __init__(self, model: LoadedModel, out: Path, speed: SpeedSettings | None = None):
        self.model = model
        self.out = out
        self.speed = speed or SpeedSettings()

    @classmethod
    def load(
        cls,
        model: str,
        out: Path,
        device: torch.device,
        loras: tuple[LoraWeights, ...] = (),
        embeddings: tuple[Embedding, ...] = (),
        speed: SpeedSettings | None = None,
    ) -> Studio:
        """Load ``model`` (a pipeline folder or Hub id) onto ``device`` (float16 on cuda and mps, float32 elsewhere)
        with ``loras`` and ``embeddings`` applied; every request runs with ``speed`` (default: all off).

        Raises:
            UserError: the model does not load, or ``out`` is a file.
        """
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a folder (it is created if missing)")
        settings = ModelSettings(model, device=str(device), loras=loras, embeddings=embeddings)
        speed = speed or SpeedSettings()
        speed.check()
        return cls(load_model(settings), out, speed)

    @property
    def pipe(self) -> LatentDiffusionPipeline:
        """The text-to-image pipeline."""
        return self.model.pipe

    @property
    def model_name(self) -> str:
        """The ``--model`` the studio was loaded from."""
        return self.model.settings.model

    @property
    def default_size(self) -> int:
        """The image side the model was trained for."""
        return self.pipe.default_size

    @property
    def max_size(self) -> int:
        """The largest image side the app offers: twice the trained size."""
        return 2 * self.pipe.default_size

    @property
    def size_step(self) -> int:
        """Image sides are multiples of this (the VAE's downsampling factor)."""
        return self.pipe.vae_scale_factor

    def text_to_image(
        self, settings: Settings, width: int, height: int, hires_scale: float = 1.0, hires_strength: float = 0.5
    ) -> Generation:
        """Draw ``settings.num_images`` images of ``width`` x ``height`` pixels; with ``hires_scale`` > 1, that is the
        base pass of a hires fix whose images are ``hires_scale`` times larger (:mod:`pipelines.hires`, latent
        upscale, img2img at ``hires_strength``)."""
        for name, side in (("width", width), ("height", height)):
            if not (side % self.size_step == 0 and self.size_step <= side <= self.max_size):
                raise UserError(
                    f"{name} must be a multiple of {self.size_step} from {self.size_step} to {self.max_size}; "
                    f"got {side}"
                )
        hires = HiresFix(float(hires_scale), float(hires_strength)) if hires_scale > 1 else None
        return self._generate(settings, TextToImage(height=height, width=width, hires=hires))

    def image_to_image(self, settings: Settings, image: PIL.Image.Image | None, strength: float) -> Generation:
        """Redraw ``image`` with the prompt (SDEdit); ``strength`` in (0, 1] is how much of it is redone."""
        image = self._fit(image, "upload the image to redraw")
        return self._generate(settings, ImageToImage(image, strength=float(strength)))

    def inpaint(
        self,
        settings: Settings,
        image: PIL.Image.Image | None,
        mask: PIL.Image.Image | None,
        strength: float = 1.0,
        mask_blur: float = 0.0,
        resamples: int = 0,
        keep_unmasked_pixels: bool = True,
    ) -> Generation:
        """Regenerate the white area of ``mask`` (any size: it is scaled to the image) and keep the rest;
        ``resamples`` > 0 redoes each step that many more times so the new area agrees with the kept one."""
        image = self._fit(image, "upload an image and paint the area to regenerate")
        if mask is None:
            raise UserError("paint the area to regenerate on the image")
        mask = mask.convert("L").resize(image.size, PIL.Image.Resampling.NEAREST)
        mode = Inpaint(image, mask, float(strength), float(mask_blur), int(resamples), keep_unmasked_pixels)
        return self._generate(settings, mode)

    def outpaint(
        self,
        settings: Settings,
        image: PIL.Image.Image | None,
        sides: dict[str, int],
        mask_blur: float = 0.0,
        resamples: int = 0,
        keep_unmasked_pixels: bool = True,
    ) -> Generation:
        """Extend ``image`` by ``sides`` pixels (``left``, ``right``, ``top``, ``bottom``) and fill the new area."""
        image = self._fit(image, "upload the image to extend")
        mode = Outpaint(image, dict(sides), float(mask_blur), int(resamples), keep_unmasked_pixels)
        return self._generate(settings, mode)

    def _fit(self, image: PIL.Image.Image | None, missing: str) -> PIL.Image.Image:
        if image is None:
            raise UserError(f"no image: {missing}")
        return fit_image(image, self.max_size, self.size_step)

    def _generate(self, settings: Settings, mode: Mode) -> Generation:
        return generate(replace(settings.request(mode), speed=self.speed), self.model, self.out)
