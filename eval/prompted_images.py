"""Images with the prompts they were made for, as :mod:`eval.clip_score` and :mod:`eval.adherence` read them.

``--images`` is a folder (or its ``metadata.jsonl``) of either kind:

- the output of :mod:`pipelines.txt2img`: PNGs carrying a ``prompt`` text chunk (:func:`png_prompt`);
- an image folder with captions as training reads them (``metadata.jsonl`` / ``metadata.csv`` rows with
  ``file_name`` and ``text``, or ``.txt`` side-cars; the first caption of a list), used for the images without a PNG
  prompt.

With ``row_prompt``, the prompts are made from the rows of the folder's ``metadata.jsonl`` instead (e.g. from the
attribute columns that :mod:`shapes.make_dataset` writes). Images are every image file under the folder
(recursively, sorted: :func:`common.images.list_image_files`); those without a prompt, and unreadable ones, are
skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.images import list_image_files
from ldm.errors import UserError
from training.records import load_image_caption_records

__all__ = ["METADATA_JSONL", "PromptedImages", "RowPrompt", "load_prompted_images", "png_prompt"]

logger = logging.getLogger(__name__)

METADATA_JSONL = "metadata.jsonl"

RowPrompt = Callable[[Mapping[str, Any]], str]  # a metadata row -> its prompt; raises ValueError for a bad row


def png_prompt(path: str | Path) -> str | None:
    """The ``prompt`` PNG text chunk of an image file (None when it has none, or is not a PNG)."""
    with Image.open(path) as image:
        text = getattr(image, "text", None) or {}  # PngImageFile.text reads the chunks after the pixels too
        prompt = text.get("prompt")
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else None


@dataclass
class PromptedImages:
    """The images of a folder that have a prompt, and the counts of those that did not or could not be read."""

    source: str
    files: list[Path]
    prompts: list[str]
    skipped_no_prompt: int = 0
    unreadable: int = 0


def load_prompted_images(
    source: str | Path, *, max_images: int | None = None, row_prompt: RowPrompt | None = None
) -> PromptedImages:
    """Every image file under ``source`` (a folder, or its ``metadata.jsonl``) with its prompt: the PNG ``prompt``
    chunk, else the folder's caption; with ``row_prompt``, ``row_prompt(row)`` of the image's ``metadata.jsonl`` row
    (module docstring). The first ``max_images`` images with a prompt are kept. Raises ``ValueError`` naming the fix
    when ``source`` is missing or no image has a prompt."""
    folder = _images_folder(Path(source).expanduser())
    files = list_image_files(folder)
    if not files:
        raise UserError(
            f"no prompted images in {folder}: it holds no image files (png, jpg, ...); pass a folder written by "
            "pipelines.txt2img or an image folder with metadata.jsonl"
        )
    result = PromptedImages(str(folder), [], [])
    if row_prompt is None:
        prompts = _png_or_caption_prompts(folder, files, result)
    else:
        rows = _row_prompts(folder, row_prompt)
        prompts = {path: rows.get(os.path.normpath(path)) for path in files}
    no_prompt = [path for path, prompt in prompts.items() if prompt is None]
    for path, prompt in prompts.items():
        if prompt is not None and (max_images is None or len(result.files) < max_images):
            result.files.append(path)
            result.prompts.append(prompt)
    result.skipped_no_prompt = len(no_prompt)
    if not result.files:
        raise UserError(
            f"no prompted images in {folder}: none of the {len(files)} images under {folder} has a prompt; expected "
            "PNGs written by pipelines.txt2img (a 'prompt' text chunk) or a metadata.jsonl with file_name and text"
        )
    if no_prompt:
        logger.warning(
            "%d images under %s have no prompt and are skipped (e.g. %s)",
            len(no_prompt),
            folder,
            ", ".join(path.name for path in no_prompt[:3]),
        )
    return result


def _images_folder(source: Path) -> Path:
    """The folder ``source`` names: itself, or the folder of a ``metadata.jsonl``."""
    if source.is_dir():
        return source
    if source.is_file() and source.name == METADATA_JSONL:
        return source.parent
    if source.is_file():
        raise UserError(f"--images {source} is a file; pass a folder of images or its {METADATA_JSONL}")
    raise UserError(
        f"--images {source} does not exist (no such folder); pass a folder of images written by pipelines.txt2img "
        f"or an image folder with {METADATA_JSONL}"
    )


def _png_or_caption_prompts(folder: Path, files: list[Path], result: PromptedImages) -> dict[Path, str | None]:
    """Each readable file's PNG prompt, else its caption in the folder (None without either); unreadable files are
    left out and counted in ``result``."""
    prompts: dict[Path, str | None] = {}
    for path in files:
        try:
            prompts[path] = png_prompt(path)
        except Exception as err:  # PIL raises many types; one bad file must not stop an evaluation
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            result.unreadable += 1
    if any(prompt is None for prompt in prompts.values()):
        captions = _folder_captions(folder)
        prompts = {path: prompt or captions.get(os.path.normpath(path)) for path, prompt in prompts.items()}
    return prompts


def _folder_captions(folder: Path) -> dict[str, str]:
    """Normalised image path -> first caption, from the folder's metadata files or ``.txt`` side-cars (if any)."""
    try:
        records = load_image_caption_records(str(folder), scan=False)
    except ValueError as err:  # no metadata and no side-car captions: only PNG prompts are available
        logger.debug("no captions in %s: %s", folder, err)
        return {}
    return {os.path.normpath(r.image): r.captions[0] for r in records.records if isinstance(r.image, str)}


def _row_prompts(folder: Path, row_prompt: RowPrompt) -> dict[str, str]:
    """Normalised image path -> ``row_prompt(row)`` for every row of ``folder``'s ``metadata.jsonl``."""
    metadata = folder / METADATA_JSONL
    if not metadata.is_file():
        raise UserError(f"{folder} has no {METADATA_JSONL}; prompts made from metadata rows need one")
    prompts = {}
    for line_number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{metadata}:{line_number} is not a JSON object with a 'file_name'; fix the row")
        try:
            prompts[os.path.normpath(folder / row["file_name"])] = row_prompt(row)
        except ValueError as err:
            raise UserError(f"{metadata}:{line_number} {err}") from err
    return prompts
