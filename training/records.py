"""Image–caption records: read them from five formats, detect the format, and check every image once.

:func:`load_image_caption_records` reads, detecting the format from ``source`` (:func:`detect_format`):

- ``imagefolder``: a folder of images with ``metadata.jsonl`` (or ``metadata.csv``) rows such as
  ``{"file_name": "a.png", "text": "a red circle"}`` (the ``datasets`` imagefolder convention; metadata files may sit
  in subfolders too, ``file_name`` is relative to the metadata file);
- ``captions``: a folder of images with kohya-ss side-car captions (``a.png`` + ``a.txt``), subfolders included;
- ``save_to_disk``: a folder written by ``datasets.Dataset.save_to_disk`` (for a ``DatasetDict``, ``split`` picks one);
- ``parquet``: a ``.parquet`` file, a glob such as ``"data/*.parquet"``, or a folder of them;
- ``hub``: any other string shaped like a Hub dataset id, through ``datasets.load_dataset(source, split=split)``.

Records keep a reference to each image (a file path, or a row of the memory-mapped Arrow table), never decoded
pixels. :func:`scan_images` opens every image once to check it and record its size; unreadable files are skipped,
counted and logged, never fatal. :mod:`training.data` turns the records into training samples. The record types and
the reader of each format are in :mod:`training.record_formats`.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from ldm.errors import UserError
from training.record_formats import (
    IMAGE_EXTENSIONS,
    METADATA_FILES,
    ImageCaptionRecords,
    SourceFormat,
    load_captions,
    load_imagefolder,
    open_table,
    records_from_table,
)

__all__ = [
    "MAX_LISTED",
    "detect_format",
    "load_image_caption_records",
    "scan_images",
]

logger = logging.getLogger(__name__)

MAX_LISTED = 20  # unreadable images warned about one by one; the rest go to DEBUG and a summary
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_EXIF_ORIENTATION = 0x0112


def load_image_caption_records(
    source: str,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    scan: bool = True,
    num_workers: int = 4,
) -> ImageCaptionRecords:
    """Read the image–caption records of ``source`` (any format of the module docstring), detected from the path.

    ``image_column`` / ``caption_column`` default to the first of :data:`IMAGE_COLUMNS` / :data:`CAPTION_COLUMNS`
    that exists (they do not apply to ``.txt`` captions); a name that does not exist raises a ``ValueError`` listing
    the columns that do. A caption cell may be a string or a list of strings (one is picked per sample). Images
    without a usable caption (missing, empty or not text) are skipped and counted. ``split`` applies to
    ``save_to_disk`` dataset dicts and Hub ids; ``cache_dir`` is ``datasets``' cache for parquet and Hub sources.
    With ``scan`` (the default, needed for bucketing), :func:`scan_images` then checks every image with
    ``num_workers`` threads. Raises ``ValueError`` naming the source when nothing usable is left.
    """
    fmt, listing = _detect(source)
    if fmt in ("imagefolder", "captions") and listing is not None:
        if fmt == "imagefolder":
            records = load_imagefolder(source, listing.images, listing.metadata_files, image_column, caption_column)
        else:
            if image_column is not None or caption_column is not None:
                logger.info("%s has .txt captions: image_column and caption_column do not apply", source)
            records = load_captions(source, listing.images)
    else:
        parquet_files = listing.parquet_files if listing is not None else None
        table, base_dir = open_table(source, fmt, split, cache_dir, parquet_files)
        records = records_from_table(source, fmt, table, base_dir, image_column, caption_column)
    if scan:
        records = scan_images(records, num_workers=num_workers)
    logger.info("training data: %s", records.summary())
    return records


def detect_format(source: str) -> SourceFormat:
    """Which of the five formats ``source`` is, from the path alone (plus a listing of a folder)."""
    return _detect(source)[0]


class _Listing(NamedTuple):
    """What :func:`_walk` found under a folder, each list sorted."""

    images: list[Path]
    metadata_files: list[Path]
    parquet_files: list[Path]


def _detect(source: str) -> tuple[SourceFormat, _Listing | None]:
    """The format of ``source`` and, for a folder, its listing (:func:`_walk`), so a big folder is listed once."""
    path = Path(source).expanduser()
    if not path.exists() and any(char in source for char in "*?["):
        return "parquet", None
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet", None
        raise UserError(
            f"{source} is a file but not a .parquet file; pass a folder of images, a .parquet file or glob, "
            "a folder written by datasets' save_to_disk, or a Hub dataset id"
        )
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "save_to_disk", None
        listing = _walk(path)
        if listing.metadata_files:
            return "imagefolder", listing
        return ("parquet" if listing.parquet_files else "captions"), listing
    if _HUB_ID.fullmatch(source) and ".." not in source:
        return "hub", None
    raise UserError(f"{source} is not an existing file or folder, nor a Hub dataset id such as 'user/name'")


def _walk(folder: Path) -> _Listing:
    """Images, metadata files and parquet files under ``folder``, sorted; hidden files and folders are ignored."""
    images, metadata_files, parquet_files = [], [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            if name.startswith("."):  # includes macOS "._a.png" resource forks, which are not images
                continue
            suffix = os.path.splitext(name)[1].lower()
            path = Path(root, name)
            if suffix in IMAGE_EXTENSIONS:
                images.append(path)
            elif name in METADATA_FILES:
                metadata_files.append(path)
            elif suffix == ".parquet":
                parquet_files.append(path)
    return _Listing(images, metadata_files, parquet_files)


def scan_images(records: ImageCaptionRecords, *, num_workers: int = 4, progress: bool = True) -> ImageCaptionRecords:
    """Open every image once (``PIL.Image.verify`` and its size); drop the unreadable ones, counted and logged.

    Returns new records with each ``size`` set (``(width, height)`` after EXIF rotation) and ``skipped_corrupt``
    increased. Corrupt, truncated, zero-byte and missing files are skipped with a warning naming each (the first
    :data:`MAX_LISTED`; the rest at DEBUG level) and a summary. Raises ``ValueError`` if none can be read.
    """

    def probe(index: int) -> tuple[int, int] | str:
        try:
            with records.open_image(index) as image:
                width, height = image.size
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in image.info else 1
                image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for broken files
            return f"{type(err).__name__}: {err}"
        if width <= 0 or height <= 0:
            return f"its size is {width}x{height}"
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    kept, errors = [], []
    chunk = 4096  # map() submits all its work at once: chunks keep millions of images from making millions of futures
    with (
        ThreadPoolExecutor(max(1, num_workers)) as pool,
        tqdm(total=len(records), desc="checking images", unit="image", disable=not progress) as bar,
    ):
        for start in range(0, len(records), chunk):
            for index, result in enumerate(pool.map(probe, range(start, min(start + chunk, len(records)))), start):
                if isinstance(result, str):
                    errors.append(result)
                    level = logging.WARNING if len(errors) <= MAX_LISTED else logging.DEBUG
                    logger.log(level, "skipping unreadable image %s: %s", records.image_name(index), result)
                else:
                    kept.append(replace(records.records[index], size=result))
                bar.update()
    if len(errors) > MAX_LISTED:
        logger.warning("... and %d more unreadable images (listed at DEBUG level)", len(errors) - MAX_LISTED)
    if errors:
        logger.warning(
            "skipped %d of %d images of %s: unreadable (corrupt, truncated, empty or missing)",
            len(errors),
            len(records),
            records.source,
        )
    if not kept:
        raise UserError(
            f"none of the {len(records)} captioned images of {records.source} could be read; the first error: "
            f"{records.image_name(0)}: {errors[0]}"
        )
    return replace(records, records=kept, skipped_corrupt=records.skipped_corrupt + len(errors))
