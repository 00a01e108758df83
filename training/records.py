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
counted and logged, never fatal. :mod:`training.data` turns the records into training samples.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "CAPTION_COLUMNS",
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "MAX_LISTED",
    "METADATA_FILES",
    "DataSummary",
    "ImageCaptionRecord",
    "ImageCaptionRecords",
    "SourceFormat",
    "detect_format",
    "load_image_caption_records",
    "scan_images",
]

logger = logging.getLogger(__name__)

SourceFormat = Literal["imagefolder", "captions", "save_to_disk", "parquet", "hub"]

IMAGE_COLUMNS = ("image", "img", "file_name", "path")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_LISTED = 20  # unreadable images warned about one by one; the rest go to DEBUG and a summary
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class ImageCaptionRecord:
    """One image and its caption(s): ``image`` is a file path or a row of :attr:`ImageCaptionRecords.table`."""

    image: str | int
    captions: tuple[str, ...]
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation, recorded by scan_images


@dataclass(frozen=True)
class DataSummary:
    """What a source held and what training uses, for the training log and the model card."""

    source: str
    format: SourceFormat
    total: int  # images found, captioned or not
    used: int
    skipped_no_caption: int
    skipped_corrupt: int  # unreadable: corrupt, truncated, empty or missing files

    def as_dict(self) -> dict[str, str | int]:
        """The summary as a JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.source} ({self.format}): {self.used} of {self.total} images used, "
            f"{self.skipped_no_caption} without a caption, {self.skipped_corrupt} unreadable"
        )


@dataclass
class ImageCaptionRecords:
    """The records of one source, with the counts of what was skipped and the means to open each image."""

    source: str
    format: SourceFormat
    records: list[ImageCaptionRecord]
    total: int
    skipped_no_caption: int = 0
    skipped_corrupt: int = 0
    table: datasets.Dataset | None = field(default=None, repr=False)  # the image column, decode=False
    base_dir: str | None = None  # where relative image paths stored in ``table`` are resolved

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageCaptionRecord:
        return self.records[index]

    def summary(self) -> DataSummary:
        """The counts: total, used, skipped without a caption, skipped unreadable (``str()`` for the log)."""
        return DataSummary(
            self.source, self.format, self.total, len(self.records), self.skipped_no_caption, self.skipped_corrupt
        )

    def image_name(self, index: int) -> str:
        """How logs name the image of record ``index``: its path, or the source and row."""
        image = self.records[index].image
        return image if isinstance(image, str) else f"{self.source} row {image}"

    def open_image(self, index: int) -> Image.Image:
        """Open (lazily, not decode) the image of record ``index``; use it as a context manager."""
        image = self.records[index].image
        if isinstance(image, str):
            return Image.open(image)
        assert self.table is not None, "row records need the table they index"
        cell = self.table[image][self.table.column_names[0]]
        if cell is None or (cell.get("bytes") is None and not cell.get("path")):
            raise ValueError("the image cell is empty (no bytes and no path)")
        if cell.get("bytes") is not None:
            return Image.open(io.BytesIO(cell["bytes"]))
        path = cell["path"]
        if self.base_dir is not None and not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(self.base_dir, path)
        return Image.open(path)


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
            records = _load_imagefolder(source, listing.images, listing.metadata_files, image_column, caption_column)
        else:
            if image_column is not None or caption_column is not None:
                logger.info("%s has .txt captions: image_column and caption_column do not apply", source)
            records = _load_captions(source, listing.images)
    else:
        parquet_files = listing.parquet_files if listing is not None else None
        table, base_dir = _open_table(source, fmt, split, cache_dir, parquet_files)
        records = _records_from_table(source, fmt, table, base_dir, image_column, caption_column)
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
        raise ValueError(
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
    raise ValueError(f"{source} is not an existing file or folder, nor a Hub dataset id such as 'user/name'")


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


def _resolve_column(kind: str, requested: str | None, columns: Sequence[str], defaults: Sequence[str]) -> str:
    """The column to read for ``kind`` ("image" or "caption"): the requested one, or the first default present."""
    option = f"--{kind}-column"
    listing = ", ".join(columns)
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"{kind} column {requested!r} not found; the dataset has columns: {listing}; pass {option}"
            )
        return requested
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(
        f"no {kind} column found (looked for {', '.join(defaults)}); the dataset has columns: {listing}; pass {option}"
    )


def _as_captions(cell: object) -> tuple[str, ...]:
    """The usable captions of a cell: a string or a list of strings, stripped; anything else is no caption."""
    items = cell if isinstance(cell, list | tuple) else [cell]
    return tuple(item.strip() for item in items if isinstance(item, str) and item.strip())


def _finish(records: ImageCaptionRecords, hint: str) -> ImageCaptionRecords:
    """Raise at once when ``records`` has no image or no caption; otherwise log what was skipped."""
    if records.total == 0:
        raise ValueError(
            f"no images found in {records.source} (read as {records.format}); expected image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) with captions, or a dataset with rows"
        )
    if not records.records:
        raise ValueError(f"0 of {records.total} images in {records.source} have a caption; {hint}")
    if records.skipped_no_caption:
        logger.warning(
            "%d of %d images in %s have no usable caption and are skipped",
            records.skipped_no_caption,
            records.total,
            records.source,
        )
    return records


def _load_imagefolder(
    source: str,
    images: list[Path],
    metadata_files: list[Path],
    image_column: str | None,
    caption_column: str | None,
) -> ImageCaptionRecords:
    rows: list[tuple[Path, dict[str, Any]]] = []
    for metadata in metadata_files:
        with open(metadata, encoding="utf-8-sig", errors="replace", newline="") as file:
            if metadata.suffix == ".csv":
                rows.extend((metadata.parent, row) for row in csv.DictReader(file))
                continue
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    logger.warning("%s:%d is not valid JSON (%s); skipping the line", metadata, line_number, err)
                    continue
                if isinstance(row, dict):
                    rows.append((metadata.parent, row))
                else:
                    logger.warning("%s:%d is not a JSON object; skipping the line", metadata, line_number)
    if not rows:
        raise ValueError(f"the metadata files of {source} have no rows: {', '.join(map(str, metadata_files))}")
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    if image_column == "image" and "image" not in columns and "file_name" in columns:
        image_column = "file_name"  # datasets' imagefolder exposes file_name as an "image" column
    image_key = _resolve_column("image", image_column, columns, IMAGE_COLUMNS)
    caption_key = _resolve_column("caption", caption_column, columns, CAPTION_COLUMNS)
    records, listed, no_caption, named_rows = [], set(), 0, 0
    for base, row in rows:
        name = row.get(image_key)
        if not isinstance(name, str) or not name:
            logger.warning("a row of the metadata in %s has no %r; skipping it", base, image_key)
            continue
        path = os.path.normpath(base / name)
        listed.add(path)
        named_rows += 1
        captions = _as_captions(row.get(caption_key))
        if captions:
            records.append(ImageCaptionRecord(path, captions))
        else:
            no_caption += 1
    unlisted = [path for path in map(os.path.normpath, images) if path not in listed]
    if unlisted:
        logger.warning(
            "%d images in %s are in no metadata file (e.g. %s); they count as having no caption",
            len(unlisted),
            source,
            unlisted[0],
        )
    result = ImageCaptionRecords(
        source, "imagefolder", records, named_rows + len(unlisted), no_caption + len(unlisted)
    )
    return _finish(result, f"check the {caption_key!r} field of {', '.join(map(str, metadata_files))}")


def _load_captions(source: str, images: list[Path]) -> ImageCaptionRecords:
    records, missing, empty, multiline = [], [], 0, 0
    for image in tqdm(images, desc="reading captions", unit="file", disable=len(images) < 10_000):
        text_file = image.with_suffix(".txt")
        try:
            text = text_file.read_text(encoding="utf-8-sig", errors="replace")
        except FileNotFoundError:
            missing.append(image)
            continue
        except OSError as err:
            logger.warning("cannot read the caption file %s (%s); skipping its image", text_file, err)
            empty += 1
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            empty += 1
            continue
        multiline += len(lines) > 1
        records.append(ImageCaptionRecord(str(image), (lines[0],)))
    if missing:
        logger.warning(
            "%d of %d images in %s have no .txt caption file and are skipped (e.g. %s)",
            len(missing),
            len(images),
            source,
            ", ".join(str(path) for path in missing[:3]),
        )
    if multiline:
        logger.warning("%d caption files have several lines; as kohya-ss does, only the first is used", multiline)
    result = ImageCaptionRecords(source, "captions", records, len(images), len(missing) + empty)
    return _finish(
        result,
        "add a caption file next to each image (a.png + a.txt), or a metadata.jsonl with file_name and text fields",
    )


def _open_table(
    source: str, fmt: SourceFormat, split: str, cache_dir: str | None, parquet_files: list[Path] | None = None
) -> tuple[datasets.Dataset, str]:
    """The ``datasets.Dataset`` behind a save_to_disk, parquet or Hub source, and the folder for relative paths.

    ``parquet_files`` is the listing :func:`_detect` already made of a folder of parquet files.
    """
    if fmt == "save_to_disk":
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split {split!r} not found in {source}; it has splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded, source
    if fmt == "parquet":
        path = Path(source).expanduser()
        if parquet_files is not None:
            files = [str(file) for file in parquet_files]
        elif path.is_file():
            files = [str(path)]
        else:
            files = sorted(file for file in glob.glob(source, recursive=True) if file.endswith(".parquet"))
        if not files:
            raise ValueError(f"no .parquet files match {source}")
        return datasets.Dataset.from_parquet(files, cache_dir=cache_dir), os.path.dirname(files[0])
    try:
        loaded = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as err:  # the Hub, the network and dataset scripts fail in many ways; all mean the same here
        raise ValueError(
            f"{source} is not a local file or folder, and datasets.load_dataset could not load it as a Hub dataset "
            f"(split {split!r}): {err}"
        ) from err
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(
            f"datasets.load_dataset({source!r}, split={split!r}) gave a {type(loaded).__name__}, not a Dataset; "
            "pass one split name (streaming datasets are not supported)"
        )
    return loaded, os.getcwd()


def _records_from_table(
    source: str,
    fmt: SourceFormat,
    table: datasets.Dataset,
    base_dir: str,
    image_column: str | None,
    caption_column: str | None,
) -> ImageCaptionRecords:
    image_key = _resolve_column("image", image_column, table.column_names, IMAGE_COLUMNS)
    caption_key = _resolve_column("caption", caption_column, table.column_names, CAPTION_COLUMNS)
    try:
        images = table.select_columns([image_key]).cast_column(image_key, datasets.Image(decode=False))
        images = images.with_format(None)  # a saved dataset may carry a torch/numpy format: we want raw cells
    except Exception as err:  # pyarrow and datasets raise several types for an impossible cast
        raise ValueError(
            f"column {image_key!r} of {source} does not hold images (its type is {table.features[image_key]}); "
            "pass --image-column with a column of images, image bytes or paths"
        ) from err
    records, no_caption = [], 0
    for row, cell in enumerate(table.select_columns([caption_key]).with_format(None)[caption_key]):
        captions = _as_captions(cell)
        if captions:
            records.append(ImageCaptionRecord(row, captions))
        else:
            no_caption += 1
    result = ImageCaptionRecords(source, fmt, records, len(table), no_caption, table=images, base_dir=base_dir)
    return _finish(result, f"check its {caption_key!r} column or pass --caption-column")


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
        raise ValueError(
            f"none of the {len(records)} captioned images of {records.source} could be read; the first error: "
            f"{records.image_name(0)}: {errors[0]}"
        )
    return replace(records, records=kept, skipped_corrupt=records.skipped_corrupt + len(errors))
