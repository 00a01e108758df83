"""The image–caption record types, and the reader of each source format that produces them.

:class:`ImageCaptionRecords` holds the records of one source: a reference to each image (a file path, or a row of the
memory-mapped Arrow table), its captions, and the counts of what was skipped; never decoded pixels. The readers here
turn one format each into records: an ``imagefolder`` with metadata files, kohya-ss ``.txt`` side-car ``captions``,
and a ``datasets`` table (``save_to_disk``, ``parquet``, ``hub``). Use them through
:func:`training.records.load_image_caption_records`, which detects the format.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
from PIL import Image
from tqdm.auto import tqdm

from common.files import NotUTF8Error, read_utf8
from common.images import IMAGE_EXTENSIONS
from ldm.errors import UserError

__all__ = [
    "CAPTION_COLUMNS",
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "METADATA_FILES",
    "DataSummary",
    "ImageCaptionRecord",
    "ImageCaptionRecords",
    "Region",
    "SourceFormat",
    "kohya_folder",
    "load_captions",
    "load_imagefolder",
    "open_table",
    "records_from_table",
]

logger = logging.getLogger(__name__)

SourceFormat = Literal["imagefolder", "captions", "save_to_disk", "parquet", "hub", "subsets"]

IMAGE_COLUMNS = ("image", "img", "file_name", "path")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")


# --------------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class Region:
    """Where the thing a caption's ``phrase`` names is: ``box`` ``(x0, y0, x1, y1)`` in fractions of the image
    (``y`` down), for the grounding loss (``training.grounding``)."""

    phrase: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class ImageCaptionRecord:
    """One image and its caption(s): ``image`` is a file path or a row of :attr:`ImageCaptionRecords.table`."""

    image: str | int
    captions: tuple[str, ...]
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation, recorded by scan_images
    repeats: int = 1  # samples of this image per epoch (kohya-ss "N_name" folders times the subset's num_repeats)
    subset: int = 0  # which subset of a multi-subset dataset it comes from (training.records.Subset)
    regions: tuple[Region, ...] = ()  # a metadata row's "regions": where its caption's phrases are


def parse_regions(value: Any, where: str) -> tuple[Region, ...]:
    """The ``regions`` field of a metadata row, ``[{"phrase": str, "box": [x0, y0, x1, y1]}, ...]`` with the box in
    fractions of the image (``0 <= x0 < x1 <= 1``, the same for ``y``); ``UserError`` naming ``where`` otherwise."""
    if value is None:
        return ()
    example = '[{"phrase": "red circle", "box": [0.1, 0.4, 0.3, 0.6]}]'
    if not isinstance(value, list):
        raise UserError(f"{where}: regions must be a list like {example}; got {value!r}")
    regions = []
    for entry in value:
        phrase, box = (entry.get("phrase"), entry.get("box")) if isinstance(entry, dict) else (None, None)
        valid = (
            isinstance(phrase, str)
            and phrase.strip()
            and isinstance(box, list)
            and len(box) == 4
            and all(isinstance(c, int | float) for c in box)
            and 0 <= box[0] < box[2] <= 1
            and 0 <= box[1] < box[3] <= 1
        )
        if not valid:
            raise UserError(
                f"{where}: a region must name a phrase and a box [x0, y0, x1, y1] of fractions of the image with "
                f"x0 < x1 and y0 < y1, like {example}; got {entry!r}"
            )
        regions.append(Region(phrase.strip(), tuple(float(c) for c in box)))
    return tuple(regions)


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


# --------------------------------------------------------------------------------------------------------------------
# Readers


def _resolve_column(kind: str, requested: str | None, columns: Sequence[str], defaults: Sequence[str]) -> str:
    """The column to read for ``kind`` ("image" or "caption"): the requested one, or the first default present."""
    option = f"--{kind}-column"
    listing = ", ".join(columns)
    if requested is not None:
        if requested not in columns:
            raise UserError(
                f"{kind} column {requested!r} not found; the dataset has columns: {listing}; pass {option}"
            )
        return requested
    for name in defaults:
        if name in columns:
            return name
    raise UserError(
        f"no {kind} column found (looked for {', '.join(defaults)}); the dataset has columns: {listing}; pass {option}"
    )


def _as_captions(cell: object) -> tuple[str, ...]:
    """The usable captions of a cell: a string or a list of strings, stripped; anything else is no caption."""
    items = cell if isinstance(cell, list | tuple) else [cell]
    return tuple(item.strip() for item in items if isinstance(item, str) and item.strip())


def _finish(records: ImageCaptionRecords, hint: str) -> ImageCaptionRecords:
    """Raise at once when ``records`` has no image or no caption; otherwise log what was skipped."""
    if records.total == 0:
        raise UserError(
            f"no images found in {records.source} (read as {records.format}); expected image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) with captions, or a dataset with rows"
        )
    if not records.records:
        raise UserError(f"0 of {records.total} images in {records.source} have a caption; {hint}")
    if records.skipped_no_caption:
        logger.warning(
            "%d of %d images in %s have no usable caption and are skipped",
            records.skipped_no_caption,
            records.total,
            records.source,
        )
    return records


def read_text_file(path: Path) -> str:
    """A metadata or caption file as text (:func:`common.files.read_utf8`); not UTF-8 is a :class:`UserError`."""
    try:
        return read_utf8(path)
    except NotUTF8Error as err:
        raise UserError(str(err)) from None


def load_imagefolder(
    source: str,
    images: list[Path],
    metadata_files: list[Path],
    image_column: str | None,
    caption_column: str | None,
) -> ImageCaptionRecords:
    """Records of an imagefolder: ``images`` found under ``source``, captioned by the rows of ``metadata_files``."""
    rows: list[tuple[Path, dict[str, Any]]] = []
    for metadata in metadata_files:
        with io.StringIO(read_text_file(metadata), newline="") as file:
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
        raise UserError(f"the metadata files of {source} have no rows: {', '.join(map(str, metadata_files))}")
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
            regions = parse_regions(row.get("regions"), f"the metadata row of {name} in {base}")
            records.append(ImageCaptionRecord(path, captions, regions=regions))
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


def kohya_folder(relative: Path) -> tuple[int, str] | None:
    """``(repeats, class name)`` of an image at ``relative`` (to the dataset folder) whose top folder is named as
    kohya-ss DreamBooth folders are, ``N_name`` (``10_sks dog``: 10 repeats, class name ``sks dog``); else None."""
    if len(relative.parts) < 2:
        return None
    match = _KOHYA_FOLDER.fullmatch(relative.parts[0])
    return (int(match[1]), match[2].strip()) if match else None


def load_captions(
    source: str, images: list[Path], caption_extension: str = ".txt", default_caption: str | None = None
) -> ImageCaptionRecords:
    """Records of ``images`` captioned by the first line of their kohya-ss side-car caption files (``a.png`` +
    ``a.txt``; ``caption_extension`` ``".caption"`` reads ``a.caption``); ``default_caption`` captions the images
    without one (DreamBooth's instance prompt), else they are skipped.

    kohya-ss's DreamBooth layout: the images in a top folder of ``source`` named ``N_name`` (``10_sks dog``) are
    repeated ``N`` times per epoch (``0_name`` folders are skipped), and those without a caption file (or with an
    empty one) get ``name`` as their caption (the class-token caption). Unlike kohya, which ignores them, images
    outside such folders are read too, as plain side-car captioned images.
    """
    root = Path(source).expanduser()
    kohya = {image: kohya_folder(image.relative_to(root)) for image in images}
    records, missing, empty, multiline, ignored = [], [], 0, 0, 0
    for image in tqdm(images, desc="reading captions", unit="file", disable=len(images) < 10_000):
        repeats, class_name = kohya[image] or (1, None)
        if repeats < 1:
            ignored += 1
            continue
        text_file = image.with_suffix(caption_extension)
        try:
            text = read_text_file(text_file)
        except FileNotFoundError:
            text = None
        except OSError as err:
            logger.warning("cannot read the caption file %s (%s); skipping its image", text_file, err)
            empty += 1
            continue
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not lines and (class_name or default_caption):
            lines = [class_name or default_caption]
        elif text is None:
            missing.append(image)
            continue
        elif not lines:
            empty += 1
            continue
        multiline += len(lines) > 1
        records.append(ImageCaptionRecord(str(image), (lines[0],), repeats=repeats))
    if ignored:
        logger.warning("%d images in %s are in 0_name folders (0 repeats) and are skipped", ignored, source)
    if missing:
        logger.warning(
            "%d of %d images in %s have no %s caption file and are skipped (e.g. %s)",
            len(missing),
            len(images),
            source,
            caption_extension,
            ", ".join(str(path) for path in missing[:3]),
        )
    if multiline:
        logger.warning("%d caption files have several lines; as kohya-ss does, only the first is used", multiline)
    result = ImageCaptionRecords(source, "captions", records, len(images), len(missing) + empty + ignored)
    return _finish(
        result,
        f"add a caption file next to each image (a.png + a{caption_extension}), or a metadata.jsonl with file_name "
        "and text fields, or put the images in kohya-ss N_name folders (10_sks dog/) to caption them with the name",
    )


def open_table(
    source: str, fmt: SourceFormat, split: str, cache_dir: str | None, parquet_files: list[Path] | None = None
) -> tuple[datasets.Dataset, str]:
    """The ``datasets.Dataset`` behind a save_to_disk, parquet or Hub source, and the folder for relative paths.

    ``parquet_files`` is the listing :func:`training.records.detect_format` already made of a folder of parquet files.
    """
    if fmt == "save_to_disk":
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"split {split!r} not found in {source}; it has splits: {', '.join(loaded)}")
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
            raise UserError(f"no .parquet files match {source}")
        return datasets.Dataset.from_parquet(files, cache_dir=cache_dir), os.path.dirname(files[0])
    try:
        loaded = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as err:  # the Hub, the network and dataset scripts fail in many ways; all mean the same here
        raise UserError(
            f"{source} is not a local file or folder, and datasets.load_dataset could not load it as a Hub dataset "
            f"(split {split!r}): {err}"
        ) from err
    if not isinstance(loaded, datasets.Dataset):
        raise UserError(
            f"datasets.load_dataset({source!r}, split={split!r}) gave a {type(loaded).__name__}, not a Dataset; "
            "pass one split name (streaming datasets are not supported)"
        )
    return loaded, os.getcwd()


def records_from_table(
    source: str,
    fmt: SourceFormat,
    table: datasets.Dataset,
    base_dir: str,
    image_column: str | None,
    caption_column: str | None,
) -> ImageCaptionRecords:
    """Records of the rows of ``table`` (from :func:`open_table`): each refers to its row, read without decoding."""
    image_key = _resolve_column("image", image_column, table.column_names, IMAGE_COLUMNS)
    caption_key = _resolve_column("caption", caption_column, table.column_names, CAPTION_COLUMNS)
    try:
        images = table.select_columns([image_key]).cast_column(image_key, datasets.Image(decode=False))
        images = images.with_format(None)  # a saved dataset may carry a torch/numpy format: we want raw cells
    except Exception as err:  # pyarrow and datasets raise several types for an impossible cast
        raise UserError(
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
