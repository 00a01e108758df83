"""A grid of sample images: fixed prompts and seeds, one row per prompt (validation during training, model cards)."""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.utils import make_image_grid

from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline


@torch.no_grad()
def sample_grid(
    pipe: LatentDiffusionPipeline,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    images_per_prompt: int = 2,
) -> PIL.Image.Image:
    """One row per prompt, ``images_per_prompt`` columns; image j of every prompt uses seed ``seed + j``, so grids
    of successive steps are comparable cell by cell."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(seed + j) for j in range(images_per_prompt)]
        images += pipe(
            prompt,
            num_images_per_prompt=images_per_prompt,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        ).images
    return make_image_grid(images, rows=len(prompts), cols=images_per_prompt)
