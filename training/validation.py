"""Validation samples during training (a PNG grid of fixed prompts and seeds) and the model card of a trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid

from pipelines import LatentDiffusionPipeline


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


def loss_curve_png(steps: list[int], losses: list[float], path: str | Path) -> Path:
    """Plot the training loss (and a running mean) to a small PNG without matplotlib."""
    width, height, margin = 480, 240, 24
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    if len(losses) >= 2:
        values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
        smooth = np.convolve(values, np.ones(min(20, len(values))) / min(20, len(values)), mode="valid")
        lo, hi = float(values.min()), float(values.max()) if values.max() > values.min() else float(values.min()) + 1
        for series, colour in ((values, (170, 190, 230)), (smooth, (20, 60, 160))):
            xs = np.linspace(margin, width - margin, len(series)).astype(int)
            ys = (height - margin - (series - lo) / (hi - lo) * (height - 2 * margin)).astype(int)
            for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
                n = max(abs(x1 - x0), abs(y1 - y0), 1)
                canvas[np.linspace(y0, y1, n + 1).astype(int), np.linspace(x0, x1, n + 1).astype(int)] = colour
    canvas[height - margin, margin : width - margin] = 0
    canvas[margin : height - margin, margin] = 0
    path = Path(path)
    PIL.Image.fromarray(canvas).save(path)
    return path


def write_model_card(folder: str | Path, *, base_model: str, data: dict[str, Any], config: dict[str, Any],
                     steps: int, sample_grid_file: str | None, lora: bool) -> Path:  # fmt: skip
    """A ``README.md`` model card with Hub metadata: what the model started from, the data, the recipe, samples."""
    folder = Path(folder)
    tags = ["text-to-image", "diffusers", "latent-diffusion"] + (["lora"] if lora else [])
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "license: other"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    kind = "LoRA for" if lora else "Fine-tuned from" if base_model else "Trained from scratch:"
    lines += [f"# {folder.name}", "", f"{kind} {base_model or 'a ' + str(config.get('preset')) + ' U-Net'}.", ""]
    lines += ["## Data", "", "```json", json.dumps(data, indent=2), "```", ""]
    lines += ["## Training", "", f"{steps} optimizer steps with `python -m training.train_text_to_image`:", ""]
    lines += ["```json", json.dumps(config, indent=2, default=str), "```", ""]
    if sample_grid_file:
        lines += ["## Samples", "", f"![validation samples]({sample_grid_file})", ""]
    lines += ["## Use", "", "```python", "from pipelines import LatentDiffusionPipeline", "",
              'pipe = LatentDiffusionPipeline.from_pretrained("path/to/this/folder")', "```", ""]  # fmt: skip
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
