"""The web demo: ``python -m pipelines.app [--model DIR_OR_ID] [--host 127.0.0.1] [--port 7860] [--out outputs/]``.

A local Gradio page for the model: a prompt, a negative prompt, steps and guidance scale (the model's
``generation_defaults`` to start with), a seed or a random one (the page shows the seed used), the number of images,
the size and the scheduler; and tabs for the editing modes: img2img, inpainting with a mask painted on the image, and
outpainting. Results are the PNGs saved in ``--out`` with their settings as PNG metadata (as ``txt2img`` writes
them), served as they are, so a downloaded image keeps its prompt and seed. One generation runs at a time (Gradio's
queue), with a progress bar; a setting that cannot work shows a message in the page that says what to change.

The generation itself is :mod:`pipelines.studio` (plain functions, testable without a browser); this module is the
layout and the command line. It binds to 127.0.0.1 unless ``--host`` says otherwise (or, on a Hugging Face Space,
``GRADIO_SERVER_NAME``). ``python -m pipelines.publish --space`` puts this file in a Space as ``app.py``, with the
model beside it in ``model/``, which is then the default ``--model``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image

from ldm.errors import OneLineParser, UserError, one_line, run_reporting
from pipelines.cli import DEFAULT_MODEL, add_speed_arguments, embedding_arg, int_at_least, lora_arg, speed_settings
from pipelines.families import require_supported_model
from pipelines.loading import resolve_device
from pipelines.pipeline_img2img import IMG2IMG_STRENGTH
from pipelines.schedulers import SAMPLERS, scheduler_name
from pipelines.studio import MAX_IMAGES, MODEL_SCHEDULER, Generation, Settings, Studio

logger = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).resolve().parent / "model"
"""Where ``publish --space`` puts the model, beside the Space's ``app.py``."""
OUTPAINT_SIDES = ("left", "right", "top", "bottom")
MAX_PORT = 65535
MAX_RESAMPLES = 8
RESAMPLES_LABEL = "Resamples (redo each step N more times so the new area matches; DDIM/DDPM)"
KEEP_LABEL = "Keep the unmasked pixels exactly (off: the decoded image everywhere, as stock diffusers)"


def port(text: str) -> int:
    """An ``argparse`` type: a TCP port number, 1 to 65535."""
    value = int_at_least(1)(text)
    if value > MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to {MAX_PORT}; got {value}")
    return value


# Shown under the prompt when the app runs the shipped shapes model: one object, two objects, and a pairing the model
# never saw together in training (a purple object with a triangle).
SHAPES_EXAMPLES = (
    "a red circle on the left",
    "a blue square at the top",
    "a red circle to the left of a blue square",
    "a yellow triangle above a green circle",
    "a purple circle to the right of an orange triangle",
)


def example_prompts(model_name: str) -> list[list[str]]:
    """The example prompts for ``model_name`` (rows for ``gr.Examples``): the shapes prompts for the shipped model,
    none for any other (its vocabulary is unknown)."""
    path = Path(model_name)
    shipped = path.is_dir() and path.resolve() == Path(DEFAULT_MODEL).resolve()
    return [[prompt] for prompt in SHAPES_EXAMPLES] if shipped else []


def default_model() -> str:
    """The model beside this file (a Space made by ``publish --space``), else the shipped shapes model."""
    return str(BUNDLED_MODEL) if (BUNDLED_MODEL / "model_index.json").is_file() else DEFAULT_MODEL


def editor_image_and_mask(value: dict[str, Any] | None) -> tuple[PIL.Image.Image | None, PIL.Image.Image | None]:
    """The uploaded image of a ``gr.ImageEditor`` value (PIL images) and the mask painted on it: white wherever a
    layer has paint (alpha > 0), black elsewhere; ``(None, None)`` without an upload.

    Raises:
        UserError: an image but no paint on it.
    """
    background = (value or {}).get("background")
    if background is None:
        return None, None
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA").resize(background.size, PIL.Image.Resampling.NEAREST))[..., 3]
        painted |= alpha > 0
    if not painted.any():
        raise UserError("nothing is painted: paint the area to regenerate on the image with the brush")
    return background.convert("RGB"), PIL.Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def gallery(generation: Generation) -> tuple[list[tuple[str, str]], str]:
    """The gallery value (each saved PNG as it is on disk, captioned with its seed) and the seed to show."""
    items = [(str(path), f"seed {generation.seed + i}") for i, path in enumerate(generation.paths)]
    return items, str(generation.seed)


@dataclass(frozen=True)
class SettingsInputs:
    """The page's components for the settings every mode shares."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    steps: gr.Slider
    guidance_scale: gr.Slider
    seed: gr.Number
    random_seed: gr.Checkbox
    num_images: gr.Slider
    scheduler: gr.Dropdown
    prompt_weighting: gr.Checkbox | None = None

    def components(self) -> set[gr.components.Component]:
        """All of them, as the inputs of an event."""
        return {getattr(self, field.name) for field in fields(self)} - {None}

    def read(self, values: dict[gr.components.Component, Any]) -> Settings:
        """The settings in an event's values.

        Raises:
            UserError: no seed typed while "Random seed" is off.
        """
        if not values[self.random_seed] and values[self.seed] is None:
            raise UserError("type a seed, or tick Random seed")
        return Settings(
            prompt=values[self.prompt] or "",
            negative_prompt=values[self.negative_prompt] or "",
            steps=int(values[self.steps]),
            guidance_scale=float(values[self.guidance_scale]),
            seed=None if values[self.random_seed] else values[self.seed],
            num_images=int(values[self.num_images]),
            scheduler=values[self.scheduler],
            prompt_weighting=True if self.prompt_weighting is None else bool(values[self.prompt_weighting]),
        )


def connect(
    button: gr.Button,
    mode: Callable[..., Generation],
    shared: SettingsInputs,
    inputs: list[gr.components.Component],
    outputs: list[gr.components.Component],
) -> None:
    """On a click, run ``mode(settings, *inputs' values)`` and show its images and seed in ``outputs``, queued one at
    a time with every other mode; a ``UserError`` becomes a message in the page, and the pipeline's tqdm bar drives
    the page's progress bar."""

    # Gradio finds the progress tracker by this default value.
    def run(values: dict, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:  # noqa: B008
        try:
            return gallery(mode(shared.read(values), *(values[component] for component in inputs)))
        except UserError as err:
            raise gr.Error(one_line(err), print_exception=False) from None

    button.click(
        run,
        inputs={*shared.components(), *inputs},
        outputs=outputs,
        concurrency_id="generate",
        concurrency_limit=1,
    )


def settings_panel(studio: Studio, prompt: gr.Textbox, negative_prompt: gr.Textbox) -> SettingsInputs:
    """The settings accordion: steps and guidance (starting at the model's defaults), seed, images, scheduler,
    prompt weighting."""
    defaults = studio.pipe.generation_defaults
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            steps = gr.Slider(1, 150, defaults.num_inference_steps, step=1, precision=0, label="Steps")
            guidance_scale = gr.Slider(0, 20, defaults.guidance_scale, step=0.1, label="Guidance scale")
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
            random_seed = gr.Checkbox(label="Random seed", value=True)
            num_images = gr.Slider(1, MAX_IMAGES, 1, step=1, precision=0, label="Images")
        scheduler = gr.Dropdown(
            [MODEL_SCHEDULER, *SAMPLERS],
            value=MODEL_SCHEDULER,
            label=f"Scheduler (the model's: {scheduler_name(studio.model.scheduler)})",
        )
        prompt_weighting = gr.Checkbox(label="Prompt weighting: (word:1.3), (word), [word]", value=True)
    return SettingsInputs(
        prompt, negative_prompt, steps, guidance_scale, seed, random_seed, num_images, scheduler, prompt_weighting
    )


def build_app(studio: Studio) -> gr.Blocks:
    """The page: the prompts, a tab per mode, the shared settings, and the results."""
    size = {"minimum": studio.size_step, "maximum": studio.max_size, "step": studio.size_step, "precision": 0}
    upload = {"type": "pil", "sources": ["upload", "clipboard"]}
    model_name = Path(studio.model_name).name if Path(studio.model_name).is_dir() else studio.model_name
    with gr.Blocks(title="ldm-toolkit", analytics_enabled=False) as demo:
        gr.Markdown(f"# ldm-toolkit\nModel: `{model_name}`. Image *i* of a run has seed *seed + i*.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on the left")
                negative_prompt = gr.Textbox(label="Negative prompt", placeholder="what to steer away from")
                examples = example_prompts(studio.model_name)
                if examples:
                    gr.Examples(examples, inputs=[prompt], label="Example prompts")
                with gr.Tabs():
                    with gr.Tab("Text to image"):
                        with gr.Row():
                            width = gr.Slider(label="Width", value=studio.default_size, **size)
                            height = gr.Slider(label="Height", value=studio.default_size, **size)
                        with gr.Row():
                            hires_scale = gr.Slider(1.0, 4.0, 1.0, step=0.25, label="Hires fix: upscale (1 = off)")
                            hires_strength = gr.Slider(0.05, 1.0, 0.5, step=0.05, label="Hires fix: strength")
                        txt2img = gr.Button("Generate", variant="primary")
                    with gr.Tab("Image to image"):
                        img2img_image = gr.Image(label="Image to redraw", **upload)
                        img2img_strength = gr.Slider(0.05, 1.0, IMG2IMG_STRENGTH, step=0.05, label="Strength")
                        img2img = gr.Button("Redraw", variant="primary")
                    with gr.Tab("Inpaint"):
                        editor = gr.ImageEditor(
                            label="Image: paint the area to regenerate",
                            elem_id="inpaint-editor",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                            layers=False,
                            transforms=(),
                            **upload,
                        )
                        inpaint_strength = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="Strength")
                        inpaint_blur = gr.Slider(0, 16, 0, step=0.5, label="Mask blur (px)")
                        inpaint_resamples = gr.Slider(0, MAX_RESAMPLES, 0, step=1, precision=0, label=RESAMPLES_LABEL)
                        inpaint_keep = gr.Checkbox(label=KEEP_LABEL, value=True)
                        inpaint = gr.Button("Inpaint", variant="primary")
                    with gr.Tab("Outpaint"):
                        outpaint_image = gr.Image(label="Image to extend", **upload)
                        with gr.Row():
                            sides = [
                                gr.Slider(0, studio.default_size, 0, step=studio.size_step, label=f"{side} (px)")
                                for side in OUTPAINT_SIDES
                            ]
                        outpaint_blur = gr.Slider(0, 16, 0, step=0.5, label="Mask blur (px)")
                        outpaint_resamples = gr.Slider(0, MAX_RESAMPLES, 0, step=1, precision=0, label=RESAMPLES_LABEL)
                        outpaint_keep = gr.Checkbox(label=KEEP_LABEL, value=True)
                        outpaint = gr.Button("Outpaint", variant="primary")
                shared = settings_panel(studio, prompt, negative_prompt)
            with gr.Column():
                results = gr.Gallery(label="Results", columns=2, buttons=["download", "fullscreen"])
                seed_used = gr.Textbox(label="Seed used", interactive=False)

        def run_inpaint(
            settings: Settings, value: dict | None, strength: float, blur: float, resamples: float, keep: bool
        ) -> Generation:
            image, mask = editor_image_and_mask(value)
            return studio.inpaint(settings, image, mask, strength, blur, int(resamples), keep_unmasked_pixels=keep)

        def run_outpaint(settings: Settings, image: PIL.Image.Image | None, *values: float) -> Generation:
            *pixels, blur, resamples, keep = values
            sides = dict(zip(OUTPAINT_SIDES, map(int, pixels)))
            return studio.outpaint(settings, image, sides, blur, int(resamples), keep_unmasked_pixels=bool(keep))

        outputs = [results, seed_used]
        connect(txt2img, studio.text_to_image, shared, [width, height, hires_scale, hires_strength], outputs)
        connect(img2img, studio.image_to_image, shared, [img2img_image, img2img_strength], outputs)
        inpaint_inputs = [editor, inpaint_strength, inpaint_blur, inpaint_resamples, inpaint_keep]
        connect(inpaint, run_inpaint, shared, inpaint_inputs, outputs)
        outpaint_inputs = [outpaint_image, *sides, outpaint_blur, outpaint_resamples, outpaint_keep]
        connect(outpaint, run_outpaint, shared, outpaint_inputs, outputs)
    demo.queue(default_concurrency_limit=1)
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The ``app`` argument parser (errors: one line on stderr, exit status 2)."""
    parser = OneLineParser(prog="python -m pipelines.app", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=default_model(),
        metavar="FOLDER_OR_HUB_ID",
        help="a diffusers pipeline folder or a Hub id (default: the model beside app.py in a Space made by publish "
        "--space, else the shipped shapes model, models/shapes)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    parser.add_argument(
        "--port",
        type=port,
        default=os.environ.get("GRADIO_SERVER_PORT", "7860"),  # checked by the type, as a typed port is
        metavar="N",
        help="port (default 7860)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs"), metavar="FOLDER", help="where the PNGs go (default outputs/)"
    )
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="cuda, cuda:1, mps, cpu, or auto")
    parser.add_argument(
        "--lora",
        type=lora_arg,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA (diffusers or kohya .safetensors, or a LoRA folder) at SCALE (default 1); repeatable",
    )
    parser.add_argument(
        "--embedding",
        type=embedding_arg,
        action="append",
        default=[],
        metavar="PATH[:TOKEN]",
        help="add a textual-inversion embedding as TOKEN (default: its own token, else the file name); repeatable",
    )
    add_speed_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve the page until interrupted; a bad argument or model: one ``error:`` line, status 2."""
    args = build_parser().parse_or_status(argv)
    if isinstance(args, int):
        return args

    def body() -> None:
        require_supported_model(args.model)
        device = resolve_device(args.device)
        speed = speed_settings(args)
        studio = Studio.load(args.model, args.out, device, tuple(args.lora), tuple(args.embedding), speed)
        build_app(studio).launch(server_name=args.host, server_port=args.port, allowed_paths=[str(args.out.resolve())])

    return run_reporting(body, "the app")


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("pipelines.fast_mode").setLevel(logging.INFO)  # compile time, apart from the images
    sys.exit(main())
