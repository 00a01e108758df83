"""common.files: durable JSON that refuses NaN, and a file's SHA-256 against hashlib's."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from common.files import read_json, sha256_file, write_json


def test_json_round_trip_and_nan_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"step": 3, "loss": [0.5, 0.25]})
    assert read_json(tmp_path / "a.json") == {"step": 3, "loss": [0.5, 0.25]}
    with pytest.raises(ValueError, match="Out of range float"):
        write_json(tmp_path / "b.json", {"loss": math.nan})


def test_sha256_file_reads_in_blocks_and_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "w.bin").write_bytes(data)
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
