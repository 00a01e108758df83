"""The generation behind the web app (:mod:`pipelines.app`): one loaded model, text-to-image and the editing modes
(img2img, inpainting, outpainting), and the PNGs they write, as plain functions that need neither Gradio nor a
browser.

Every image is saved as ``txt2img`` saves it (:func:`pipelines.cli.save_png`: numbered on in the output folder, the
settings and seed as PNG text metadata), and the page shows those files, so a downloaded image still says how it was
made. Image ``i`` of a request has seed ``seed + i`` (the ``txt2img`` convention), so text-to-image gives the same
images as ``python -m pipelines.txt2img`` with the same settings. A setting that cannot work raises ``ValueError``
with a message that says what to change; the page shows it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import PIL.Image
import torch

from pipelines.cli import (
    MAX_SEED,
    format_interval,
    generators_for,
    image_seeds,
    load_pipeline,
    next_index,
    resolve_dtype,
    save_png,
)
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from pipelines.pipeline_latent_diffusion_edit import LatentDiffusionEditPipeline, outpaint_canvas
from pipelines.schedulers import SCHEDULERS, make_scheduler, scheduler_name

MODEL_SCHEDULER = "model's"
"""The scheduler choice that keeps the one saved with the model."""
MAX_IMAGES = 4
RANDOM_SEEDS = 2**32
"""A random seed is drawn below this (as ``txt2img`` draws one): short enough to read off the page and retype."""


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

    def check(self) -> None:
        """Raises ``ValueError`` naming the setting to change."""
        if not self.prompt.strip():
            raise ValueError("the prompt is empty; type what the image should show")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"number of images must be 1 to {MAX_IMAGES}; got {self.num_images}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1; got {self.steps}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0 (<= 1 turns guidance off); got {self.guidance_scale}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"the seed must be a whole number from 0 to 2**63 - 1, or random; got {self.seed}")
        if self.scheduler not in (MODEL_SCHEDULER, *SCHEDULERS):
            raise ValueError(
                f"unknown scheduler {self.scheduler!r}; choose one of {MODEL_SCHEDULER}, {', '.join(SCHEDULERS)}"
            )


class Generation(NamedTuple):
    """The PNGs one request wrote (image ``i`` has seed ``seed + i``) and that first seed."""

    paths: list[Path]
    seed: int


def fit_image(image: PIL.Image.Image, max_side: int, multiple: int) -> PIL.Image.Image:
    """``image`` in RGB, scaled down to at most ``max_side`` pixels a side (keeping its aspect ratio) and with sides
    rounded down to multiples of ``multiple`` (the VAE factor); an image that already fits is returned unscaled."""
    scale = min(1.0, max_side / max(image.size))
    size = tuple(max(multiple, int(side * scale) // multiple * multiple) for side in image.size)
    image = image.convert("RGB")
    return image if size == image.size else image.resize(size, PIL.Image.Resampling.LANCZOS)


class Studio:
    """A loaded model, the folder its images go to, and a method per mode.

    Text-to-image runs on ``pipe``; the editing modes on a :class:`LatentDiffusionEditPipeline` sharing its weights.
    Calls are meant to come one at a time (the app queues them): a request's scheduler choice is set on the model.
    """

    def __init__(self, pipe: LatentDiffusionPipeline, model: str, out: Path):
        self.pipe = pipe
        self.edit_pipe = LatentDiffusionEditPipeline.sharing(pipe)
        self.model_scheduler = pipe.scheduler
        self.model = model
        self.out = out

    @classmethod
    def load(cls, model: str, out: Path, device: torch.device) -> Studio:
        """Load ``model`` (a pipeline folder or Hub id) onto ``device`` (float16 on cuda and mps, float32 elsewhere).

        Raises:
            ValueError: the model does not load, or ``out`` is a file.
        """
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; pass a folder (it is created if missing)")
        pipe = load_pipeline(model, resolve_dtype("auto", device))
        return cls(pipe.to(device), model, out)

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

    def text_to_image(self, settings: Settings, width: int, height: int) -> Generation:
        """Draw ``settings.num_images`` images of ``width`` x ``height`` pixels; the PNGs carry ``txt2img``'s
        metadata."""
        for name, side in (("width", width), ("height", height)):
            if not (side % self.size_step == 0 and self.size_step <= side <= self.max_size):
                raise ValueError(
                    f"{name} must be a multiple of {self.size_step} from {self.size_step} to {self.max_size}; "
                    f"got {side}"
                )
        metadata = {"guidance_rescale": "0.0", "height": str(height), "width": str(width)}
        return self._generate(self.pipe, settings, {"height": height, "width": width}, metadata)

    def image_to_image(self, settings: Settings, image: PIL.Image.Image | None, strength: float) -> Generation:
        """Redraw ``image`` with the prompt (SDEdit); ``strength`` in (0, 1] is how much of it is redone."""
        image = self._fit(image, "upload the image to redraw")
        metadata = {"mode": "img2img", "strength": str(float(strength))}
        return self._edit(settings, image, {"image": image, "strength": strength}, metadata)

    def inpaint(
        self,
        settings: Settings,
        image: PIL.Image.Image | None,
        mask: PIL.Image.Image | None,
        strength: float = 1.0,
        mask_blur: float = 0.0,
        resamples: int = 0,
    ) -> Generation:
        """Regenerate the white area of ``mask`` (any size: it is scaled to the image) and keep the rest;
        ``resamples`` > 0 redoes each step that many more times so the new area agrees with the kept one."""
        image = self._fit(image, "upload an image and paint the area to regenerate")
        if mask is None:
            raise ValueError("paint the area to regenerate on the image")
        mask = mask.convert("L").resize(image.size, PIL.Image.Resampling.NEAREST)
        inputs = {"image": image, "mask_image": mask, "strength": strength}
        metadata = {"mode": "inpaint", "strength": str(float(strength))}
        return self._edit(settings, image, {**inputs, **self._blend(mask_blur, resamples)}, metadata)

    def outpaint(
        self,
        settings: Settings,
        image: PIL.Image.Image | None,
        sides: dict[str, int],
        mask_blur: float = 0.0,
        resamples: int = 0,
    ) -> Generation:
        """Extend ``image`` by ``sides`` pixels (``left``, ``right``, ``top``, ``bottom``) and fill the new area."""
        image = self._fit(image, "upload the image to extend")
        canvas, mask = outpaint_canvas(image, **sides, multiple=self.size_step)
        inputs = {"image": canvas, "mask_image": mask, "strength": 1.0, **self._blend(mask_blur, resamples)}
        spec = ",".join(f"{side}={px}" for side, px in sides.items() if px)
        return self._edit(settings, canvas, inputs, {"mode": "outpaint", "outpaint": spec})

    # ------------------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _blend(mask_blur: float, resamples: int) -> dict[str, Any]:
        """How a masked edit joins the new area to the kept one: the pipeline's ``mask_blur`` and ``resamples``."""
        return {"mask_blur": float(mask_blur), "resamples": int(resamples)}

    def _fit(self, image: PIL.Image.Image | None, missing: str) -> PIL.Image.Image:
        if image is None:
            raise ValueError(f"no image: {missing}")
        return fit_image(image, self.max_size, self.size_step)

    def _edit(
        self, settings: Settings, image: PIL.Image.Image, inputs: dict[str, Any], metadata: dict[str, str]
    ) -> Generation:
        size = {"height": str(image.height), "width": str(image.width)}
        blend = {key: str(inputs[key]) for key in ("mask_blur", "resamples") if key in inputs}
        return self._generate(self.edit_pipe, settings, inputs, {**metadata, **blend, **size})

    def _generate(
        self,
        pipe: LatentDiffusionPipeline,
        settings: Settings,
        inputs: dict[str, Any],
        metadata: dict[str, str],
    ) -> Generation:
        """Check the settings, sample with ``pipe`` and save the PNGs with the settings and ``metadata``."""
        settings.check()
        scheduler = self.model_scheduler
        if settings.scheduler != MODEL_SCHEDULER:
            scheduler = make_scheduler(settings.scheduler, self.model_scheduler.config)
        self.pipe.scheduler = self.edit_pipe.scheduler = scheduler
        steps, guidance_scale, interval = pipe.sampling_settings(settings.steps, settings.guidance_scale)
        seed = settings.seed if settings.seed is not None else secrets.randbelow(RANDOM_SEEDS)
        seeds = image_seeds(seed, settings.num_images)
        images = pipe(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            guidance_interval=interval,
            num_images_per_prompt=settings.num_images,
            generator=generators_for(seeds),
            output_type="pil",
            **inputs,
        ).images
        common = {
            "prompt": settings.prompt,
            "negative_prompt": settings.negative_prompt,
            "steps": str(steps),
            "guidance_scale": str(guidance_scale),
            "guidance_interval": format_interval(interval),
            "eta": "0.0",
            "scheduler": scheduler_name(scheduler),
            "model": self.model,
            **metadata,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        paths = [
            save_png(image, self.out, next_index(self.out), image_seed, {**common, "seed": str(image_seed)})
            for image, image_seed in zip(images, seeds, strict=True)
        ]
        return Generation(paths, seed)
