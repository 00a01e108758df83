"""Small file primitives shared by the checkpoint code, the trainers and evaluation: fsync, durable JSON, a file's
sha256, a folder written whole or not at all, strict UTF-8 text.

``training.checkpoint`` and ``training.checkpoint_folders`` build atomic checkpoints from these; the trainers write
their final models with :func:`atomic_folder`; ``eval.inception`` checks weights files with :func:`sha256_file`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "NotUTF8Error",
    "atomic_folder",
    "fsync_dir",
    "fsync_file",
    "read_json",
    "read_utf8",
    "sha256_file",
    "write_json",
]


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "ab") as f:  # append mode: a writable descriptor (Windows needs one) that changes nothing
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (creations, renames) to disk; a no-op where folders cannot be fsynced."""
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (no NaN or inf) and fsync it before returning."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    """The JSON value stored in ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Write a folder whole or not at all: the block writes into a temporary folder beside ``target``
    (``.NAME.partial``), which is fsynced and renamed to ``target`` when the block ends without an error (an older
    ``target`` is replaced). A kill or an error midway leaves no ``target`` that looks complete; the partial folder
    is removed on an error and cleared by the next attempt after a kill."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in staging.rglob("*"):
        if path.is_file():
            fsync_file(path)
    replace_folder(staging, target, target.with_name(f".{target.name}.old"))


def replace_folder(staging: Path, target: Path, old: Path) -> None:
    """Rename the complete folder ``staging`` to ``target``. An existing ``target`` is first moved aside to ``old``
    and deleted once the new one is in place, so at every moment ``target`` is either the old folder or the new one
    (a kill in between leaves ``old`` behind, for the caller's clean-up of stale folders)."""
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
        fsync_dir(target.parent)


class NotUTF8Error(ValueError):
    """A text file that is not UTF-8; the message names the file, the line, the byte and the fix."""


def read_utf8(path: Path) -> str:
    """The text of ``path`` read as UTF-8 (a byte-order mark dropped). Bytes that are not UTF-8 (a file saved as
    Latin-1 or cp1252) raise :class:`NotUTF8Error`, rather than turning into ``\ufffd`` characters unnoticed."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        name = Path(path).name
        raise NotUTF8Error(
            f"{path}, line {line}: byte 0x{data[err.start]:02x} is not UTF-8 (the file was saved in another "
            f"encoding, e.g. Latin-1 or cp1252); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {name} > fixed && "
            f"mv fixed {name}"
        ) from None
