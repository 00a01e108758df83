"""The model card of a trained model and its training figures (the loss curve)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.plots import line_chart


def loss_curve_png(steps: Sequence[int], losses: Sequence[float], path: str | Path) -> Path:
    """The training loss per step and its running mean (over 20 steps) as a PNG, log scale."""
    window = max(1, min(20, len(losses)))
    smooth = np.convolve(np.asarray(losses, dtype=np.float64), np.ones(window) / window, mode="valid")
    series = {"loss": (steps, losses), f"mean of {window}": (steps[window - 1 :], smooth)}
    return line_chart(path, series, title="training loss", xlabel="step", ylabel="loss", logy=True, markers=False)


def write_model_card(
    folder: str | Path,
    *,
    base_model: str,
    data: dict[str, Any],
    config: dict[str, Any],
    steps: int,
    sample_grid_file: str | None,
    lora: bool,
    pipeline_class: str = "LatentDiffusionPipeline",
) -> Path:
    """A ``README.md`` model card with Hub metadata: what the model started from, the data, the recipe, samples,
    and how to load it (with ``pipeline_class``, the family's pipeline in :mod:`pipelines`)."""
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
    if lora:
        load = [
            f'pipe = {pipeline_class}.from_pretrained("{base_model or "path/to/the/base/model"}")',
            'pipe.load_lora_weights("path/to/this/folder")',
        ]
        other_tools = ["", "`kohya_lora.safetensors` is the same LoRA in kohya's layout (AUTOMATIC1111, ComfyUI)."]
    else:
        load, other_tools = [f'pipe = {pipeline_class}.from_pretrained("path/to/this/folder")'], []
    lines += ["## Use", "", "```python", f"from pipelines import {pipeline_class}", "", *load, "```", *other_tools, ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
