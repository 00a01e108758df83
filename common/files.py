"""Small file primitives shared by the checkpoint code and evaluation: fsync, durable JSON, a file's sha256.

``training.checkpoint`` and ``training.checkpoint_folders`` build atomic checkpoints from these; ``eval.inception``
checks weights files with :func:`sha256_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "fsync_file", "read_json", "sha256_file", "write_json"]


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
