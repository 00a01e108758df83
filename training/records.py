"""Image–caption records: read them from five formats, detect the format, and check every image once.

:func:`load_image_caption_records` reads, detecting the format from ``source`` (:func:`detect_format`):

- ``imagefolder``: a folder of images with ``metadata.jsonl`` (or ``metadata.csv``) rows such as
  ``{"file_name": "a.png", "text": "a red circle"}`` (the ``datasets`` imagefolder convention; metadata files may sit
  in subfolders too, ``file_name`` is relative to the metadata file);
- ``captions``: a folder of images with kohya-ss side-car captions (``a.png`` + ``a.txt``), subfolders included;
  images in kohya's DreamBooth ``N_name`` folders (``10_sks dog/``) are repeated ``N`` times an epoch and captioned
  ``name`` when they have no caption file;
- ``save_to_disk``: a folder written by ``datasets.Dataset.save_to_disk`` (for a ``DatasetDict``, ``split`` picks one);
- ``parquet``: a ``.parquet`` file, a glob such as ``"data/*.parquet"``, or a folder of them;
- ``hub``: any other string shaped like a Hub dataset id, through ``datasets.load_dataset(source, split=split)``.

Records keep a reference to each image (a file path, or a row of the memory-mapped Arrow table), never decoded
pixels. :func:`scan_images` opens every image once to check it and record its size; unreadable files are skipped,
counted and logged, never fatal. :mod:`training.data` turns the records into training samples. The record types and
the reader of each format are in :mod:`training.record_formats`.

Several folders, each with its own repeats, loss weight and caption settings (kohya-ss's dataset-config subsets), are
one dataset through a dataset file (:func:`read_subsets`: ``--dataset subsets.toml``), read as :class:`Subset`
objects and concatenated by :func:`load_subsets`; each record knows its subset.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from ldm.errors import UserError
from training.captions import CaptionOptions, add_affixes
from training.config import ConfigError, from_dict, read_config_file
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
    "Subset",
    "dataset_subsets",
    "detect_format",
    "is_dataset_file",
    "load_image_caption_records",
    "load_subsets",
    "read_subsets",
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
    caption_extension: str = ".txt",
    default_caption: str | None = None,
) -> ImageCaptionRecords:
    """Read the image–caption records of ``source`` (any format of the module docstring), detected from the path.

    ``image_column`` / ``caption_column`` default to the first of :data:`IMAGE_COLUMNS` / :data:`CAPTION_COLUMNS`
    that exists (they do not apply to ``.txt`` captions); a name that does not exist raises a ``ValueError`` listing
    the columns that do. A caption cell may be a string or a list of strings (one is picked per sample). Images
    without a usable caption (missing, empty or not text) are skipped and counted. ``split`` applies to
    ``save_to_disk`` dataset dicts and Hub ids; ``cache_dir`` is ``datasets``' cache for parquet and Hub sources.
    With ``scan`` (the default, needed for bucketing), :func:`scan_images` then checks every image with
    ``num_workers`` threads. Raises ``ValueError`` naming the source when nothing usable is left. A dataset file
    (YAML, TOML or JSON) is read as subsets (:func:`read_subsets`, :func:`load_subsets`). Side-car captions
    are read from ``caption_extension`` files; kohya-ss ``N_name`` folders repeat and caption their images, and
    ``default_caption`` captions a caption-less folder's images (:func:`training.record_formats.load_captions`).
    """
    if is_dataset_file(source):
        subsets = read_subsets(source, Subset(caption_extension=caption_extension))
        columns = {"image_column": image_column, "caption_column": caption_column}
        return load_subsets(subsets, source=source, scan=scan, num_workers=num_workers, **columns)
    fmt, listing = _detect(source)
    if fmt in ("imagefolder", "captions") and listing is not None:
        if fmt == "imagefolder":
            records = load_imagefolder(source, listing.images, listing.metadata_files, image_column, caption_column)
        else:
            if image_column is not None or caption_column is not None:
                logger.info("%s has .txt captions: image_column and caption_column do not apply", source)
            records = load_captions(source, listing.images, caption_extension, default_caption)
    else:
        parquet_files = listing.parquet_files if listing is not None else None
        table, base_dir = open_table(source, fmt, split, cache_dir, parquet_files)
        records = records_from_table(source, fmt, table, base_dir, image_column, caption_column)
    if scan:
        records = scan_images(records, num_workers=num_workers)
    logger.info("training data: %s", records.summary())
    return records


@dataclass(frozen=True)
class Subset:
    """One part of the training data with its own settings (a kohya-ss dataset-config subset); the keys of a
    ``subsets:`` entry of a dataset file (:func:`read_subsets`).

    ``loss_weight`` multiplies the loss of this subset's samples (the batch's ``loss_weight``); ``num_repeats``
    repeats its images per epoch (times the ``N`` of kohya ``N_name`` folders); ``mask_dir``: masks of its images
    for ``--masked-loss`` (default: their alpha); ``default_caption`` captions its images that have no caption
    file (DreamBooth's instance or class prompt). The caption settings are :mod:`training.captions`'.
    """

    path: str = ""
    num_repeats: int = 1
    caption_extension: str = ".txt"
    default_caption: str | None = None
    loss_weight: float = 1.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout: float = 0.0
    mask_dir: str | None = None

    def validate(self) -> None:
        """Each value in range, else a :class:`ConfigError` naming the field."""
        if self.num_repeats < 1:
            raise ConfigError(f"num_repeats must be >= 1; got {self.num_repeats}")
        if not self.loss_weight >= 0.0 or self.loss_weight == float("inf"):
            raise ConfigError(f"loss_weight must be a finite number >= 0; got {self.loss_weight}")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(
                f"caption_extension must start with a dot, e.g. '.txt' or '.caption'; got {self.caption_extension!r}"
            )
        if self.keep_tokens < 0:
            raise ConfigError(f"keep_tokens must be >= 0; got {self.keep_tokens}")
        for name in ("caption_dropout", "caption_tag_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1); got {getattr(self, name)}")

    @property
    def caption_options(self) -> CaptionOptions:
        """The per-sample random caption changes (:func:`training.captions.process_caption`)."""
        return CaptionOptions(self.shuffle_caption, self.keep_tokens, self.caption_tag_dropout, self.caption_dropout)


_SUBSET_ALIASES = {  # kohya-ss's names of the same settings
    "image_dir": "path",
    "caption_dropout_rate": "caption_dropout",
    "caption_tag_dropout_rate": "caption_tag_dropout",
}


def _subset_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {_SUBSET_ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_")): v for k, v in data.items()}


DATASET_FILE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def is_dataset_file(source: str) -> bool:
    """Whether ``source`` is a dataset file of subsets (:func:`read_subsets`): a YAML, TOML or JSON file."""
    return Path(source).suffix in DATASET_FILE_SUFFIXES and Path(source).is_file()


def dataset_subsets(dataset: str, defaults: Subset = Subset()) -> list[Subset]:
    """The subsets of ``--dataset``: those of a dataset file (:func:`read_subsets`, ``defaults`` filling what it does
    not set), or the one subset ``dataset`` with the settings of ``defaults``."""
    return read_subsets(dataset, defaults) if is_dataset_file(dataset) else [replace(defaults, path=dataset)]


def read_subsets(path: str | Path, defaults: Subset = Subset()) -> list[Subset]:
    """The subsets of a dataset file (YAML, TOML or JSON): a ``subsets`` list of tables with the keys of
    :class:`Subset` (kohya's ``image_dir``, ``caption_dropout_rate`` and ``caption_tag_dropout_rate`` are read as
    ``path``, ``caption_dropout`` and ``caption_tag_dropout``). Other top-level keys (or a kohya ``[general]`` table)
    are defaults for every subset; what neither gives comes from ``defaults`` (the command's flags). Paths are used
    as given (relative to the working directory, as kohya's)::

        shuffle_caption = true
        keep_tokens = 1
        [[subsets]]
        path = "data/10_sks dog"
        [[subsets]]
        path = "data/dogs"
        loss_weight = 0.5
        caption_extension = ".caption"
    """
    data = read_config_file(path)
    if "datasets" in data:
        raise ConfigError(
            f"{path}: kohya's [[datasets]] nesting is not read; list the subsets at the top level ([[subsets]] in "
            "TOML, 'subsets:' in YAML) and set the resolution with --resolution"
        )
    entries = data.pop("subsets", None)
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{path} must hold a non-empty 'subsets' list of tables, each with a 'path'")
    general = data.pop("general", None)
    general = _subset_keys(general if isinstance(general, dict) else {}) | _subset_keys(data)
    base = {field: getattr(defaults, field) for field in Subset.__dataclass_fields__}
    subsets = []
    for number, entry in enumerate(entries, start=1):
        values = base | general | _subset_keys(entry)
        if not values.get("path"):
            raise ConfigError(f"subset {number} of {path} has no 'path' (the folder of its images)")
        subsets.append(from_dict(Subset, values, source=f"subset {number} of {path}"))
    return subsets


def load_subsets(
    subsets: Sequence[Subset],
    *,
    source: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    scan: bool = True,
    num_workers: int = 4,
) -> ImageCaptionRecords:
    """The records of every subset concatenated, each record knowing its subset (``record.subset``), its repeats
    (``num_repeats`` times kohya's folder ``N``) and with the subset's ``caption_prefix`` / ``caption_suffix`` in its
    captions (:func:`training.captions.add_affixes`). One subset may be any format; several must be image folders
    (their records are files). ``source`` names the whole (default: the one subset's path)."""
    if not subsets:
        raise ConfigError("there are no subsets to load")
    parts = []
    for number, subset in enumerate(subsets):
        subset.validate()
        records = load_image_caption_records(
            subset.path,
            image_column=image_column,
            caption_column=caption_column,
            scan=False,
            caption_extension=subset.caption_extension,
            default_caption=subset.default_caption,
        )
        if len(subsets) > 1 and records.table is not None:
            raise UserError(
                f"subset {subset.path} is a {records.format} dataset; several subsets must be image folders "
                "(metadata.jsonl or caption files)"
            )
        affixed = [
            replace(
                record,
                captions=tuple(add_affixes(c, subset.caption_prefix, subset.caption_suffix) for c in record.captions),
                repeats=record.repeats * subset.num_repeats,
                subset=number,
            )
            for record in records.records
        ]
        parts.append(replace(records, records=affixed))
    if len(parts) == 1:
        combined = replace(parts[0], source=source or parts[0].source)
    else:
        combined = ImageCaptionRecords(
            source or ", ".join(part.source for part in parts),
            "subsets",
            [record for part in parts for record in part.records],
            total=sum(part.total for part in parts),
            skipped_no_caption=sum(part.skipped_no_caption for part in parts),
        )
    if scan:
        combined = scan_images(combined, num_workers=num_workers)
    samples = sum(record.repeats for record in combined.records)
    if samples != len(combined):
        logger.info("%d images, %d samples an epoch with their repeats", len(combined), samples)
    return combined


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
