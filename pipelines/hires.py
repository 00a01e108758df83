"""Hires fix: draw at the model's size, upscale, then redraw the details at the larger size with img2img.

A model asked directly for an image larger than it was trained at repeats its subject and loses composition; a base
pass at its own size fixes the composition, and an img2img pass over an upscaled copy at a moderate strength adds
the detail of the larger size (AUTOMATIC1111's "Hires. fix", kohya's ``gen_img``'s highres fix). The upscale is of
the latents (``"latent"``: the base pass's latents resized, no decode in between) or of the pixels (``"pixel"``:
decoded, resized with Lanczos, encoded again by the img2img pass). The second pass is the family's own img2img
pipeline built from the same components (``from_pipe``), with the same prompts, guidance and generators (they carry
on from where the base pass left them), so the result is a function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import PIL.Image
import torch
import torch.nn.functional as F

from ldm.errors import UserError
from pipelines.families import family_of_unet, pipelines_of

Upscale = Literal["latent", "pixel"]
UPSCALES: tuple[Upscale, ...] = ("latent", "pixel")


@dataclass(frozen=True)
class HiresFix:
    """The second pass of a hires fix.

    Attributes:
        scale: how much larger the final image is than the base pass's (each side), > 1.
        strength: how much of the upscaled image the img2img pass redraws, in (0, 1].
        upscale: resize the latents (``"latent"``) or the decoded pixels (``"pixel"``).
        steps: the img2img pass's ``num_inference_steps`` (None: the base pass's; it runs ``strength`` of them).
    """

    scale: float = 2.0
    strength: float = 0.5
    upscale: Upscale = "latent"
    steps: int | None = None

    def check(self) -> None:
        """Raises UserError naming the setting that is out of range."""
        if not self.scale > 1.0:
            raise UserError(f"--hires-scale must be > 1 (the final image is that much larger); got {self.scale}")
        if not 0.0 < self.strength <= 1.0:
            raise UserError(f"--hires-strength must be in (0, 1]; got {self.strength}")
        if self.upscale not in UPSCALES:
            raise UserError(f"--hires-upscale must be one of {', '.join(UPSCALES)}; got {self.upscale!r}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--hires-steps must be >= 1; got {self.steps}")


def upscaled_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """``(height, width)`` times ``scale``, rounded to a multiple of ``multiple`` (the VAE's factor)."""
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))  # type: ignore[return-value]


def hires_fix(pipe: Any, hires: HiresFix, *, output_type: str = "pil", **kwargs: Any) -> Any:
    """Run ``pipe`` (a text-to-image pipeline) with ``kwargs``, then the hires pass of ``hires``; returns the
    img2img pipeline's output (``.images`` in ``output_type``). ``height`` / ``width`` in ``kwargs`` are the base
    pass's (default: the model's size); ``num_inference_steps`` and the prompts, guidance, generators and other
    shared arguments go to both passes."""
    hires.check()
    base = pipe(output_type="latent", **kwargs).images
    factor = pipe.vae_scale_factor
    height, width = upscaled_size(base.shape[-2] * factor, base.shape[-1] * factor, hires.scale, factor)
    if hires.upscale == "latent":
        image: Any = F.interpolate(base, size=(height // factor, width // factor), mode="bilinear")
    else:
        image = [picture.resize((width, height), PIL.Image.LANCZOS) for picture in _decode(pipe, base)]
    second = pipelines_of(family_of_unet(pipe.unet.config)).img2img.from_pipe(pipe)
    second.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    shared = {key: value for key, value in kwargs.items() if key not in ("height", "width", "num_inference_steps")}
    steps = hires.steps or kwargs.get("num_inference_steps")
    steps_argument = {} if steps is None else {"num_inference_steps": steps}
    return second(image=image, strength=hires.strength, output_type=output_type, **steps_argument, **shared)


@torch.no_grad()
def _decode(pipe: Any, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """The base pass's latents as PIL images, by the pipeline's own decode (its half-precision fallback included)
    and post-processing."""
    return pipe.image_processor.postprocess(pipe.decode_latents(latents), output_type="pil")
