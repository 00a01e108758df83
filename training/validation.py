"""Validation samples during training (a PNG grid of fixed prompts and seeds) and the model card of a trained model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid

from pipelines import LatentDiffusionPipeline
from training.plots import line_chart


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


def loss_curve_png(steps: Sequence[int], losses: Sequence[float], path: str | Path) -> Path:
    """The training loss per step and its running mean (over 20 steps) as a PNG, log scale."""
    window = max(1, min(20, len(losses)))
    smooth = np.convolve(np.asarray(losses, dtype=np.float64), np.ones(window) / window, mode="valid")
    series = {"loss": (steps, losses), f"mean of {window}": (steps[window - 1 :], smooth)}
    return line_chart(path, series, title="training loss", xlabel="step", ylabel="loss", logy=True, markers=False)


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
