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
    kind: str = "pipeline",
    placeholder_token: str | None = None,
    pipeline_class: str = "LatentDiffusionPipeline",
) -> Path:
    """A ``README.md`` model card with Hub metadata: what the model started from, the data, the recipe, samples,
    and how to load it (with ``pipeline_class``, the family's pipeline in :mod:`pipelines`). ``kind``: the final
    folder's (``pipeline``, ``lora`` or ``embedding``); ``placeholder_token``: a textual-inversion token trained with
    it, whose embedding files sit in the folder."""
    folder = Path(folder)
    lora = kind == "lora"
    extra_tags = (["lora"] if lora else []) + (["textual_inversion"] if placeholder_token else [])
    tags = ["text-to-image", "diffusers", "latent-diffusion", *extra_tags]
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "license: other"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    if placeholder_token:
        lines.append(f"instance_prompt: {json.dumps(placeholder_token)}")  # the Hub's trigger words
    lines += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    what = {"lora": "LoRA for", "embedding": "Textual-inversion embedding for"}.get(kind)
    what = what or ("Fine-tuned from" if base_model else "Trained from scratch:")
    lines += [f"# {folder.name}", "", f"{what} {base_model or 'a ' + str(config.get('preset')) + ' U-Net'}.", ""]
    if placeholder_token:
        lines += [f"Trigger word: `{placeholder_token}` (put it in the prompt).", ""]
    lines += ["## Data", "", "```json", json.dumps(data, indent=2), "```", ""]
    lines += ["## Training", "", f"{steps} optimizer steps with `python -m training.train_text_to_image`:", ""]
    lines += ["```json", json.dumps(config, indent=2, default=str), "```", ""]
    if sample_grid_file:
        lines += ["## Samples", "", f"![validation samples]({sample_grid_file})", ""]
    load, other_tools = [f'pipe = {pipeline_class}.from_pretrained("path/to/this/folder")'], []
    if kind != "pipeline":
        load = [f'pipe = {pipeline_class}.from_pretrained("{base_model or "path/to/the/base/model"}")']
    if lora and not (folder / "pytorch_lora_weights.safetensors").is_file():  # LoHa / LoKr: LyCORIS's file only
        load.append("# diffusers loads no LoHa / LoKr: use kohya_lora.safetensors in AUTOMATIC1111 or ComfyUI")
    elif lora:
        load.append('pipe.load_lora_weights("path/to/this/folder")')
        other_tools = ["", "`kohya_lora.safetensors` is the same LoRA in kohya's layout (AUTOMATIC1111, ComfyUI)."]
    if placeholder_token and "XL" in pipeline_class:  # SDXL: one set of vectors per text encoder
        load += [
            "from safetensors.torch import load_file",
            'state = load_file("path/to/this/folder/learned_embeds.safetensors")',
            f'pipe.load_textual_inversion(state["clip_l"], token="{placeholder_token}", '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
            f'pipe.load_textual_inversion(state["clip_g"], token="{placeholder_token}", '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
        ]
    elif placeholder_token:
        load.append(f'pipe.load_textual_inversion("path/to/this/folder", token="{placeholder_token}")')
    if placeholder_token:
        other_tools += ["", "The embedding named after the token is the same vectors in AUTOMATIC1111's format."]
    lines += ["## Use", "", "```python", f"from pipelines import {pipeline_class}", "", *load, "```", *other_tools, ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
