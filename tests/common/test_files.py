"""common.files: durable JSON that refuses NaN, a file's SHA-256 against hashlib's, and folders written whole."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from common.files import atomic_folder, read_json, sha256_file, write_json


def test_json_round_trip_and_nan_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"step": 3, "loss": [0.5, 0.25]})
    assert read_json(tmp_path / "a.json") == {"step": 3, "loss": [0.5, 0.25]}
    with pytest.raises(ValueError, match="Out of range float"):
        write_json(tmp_path / "b.json", {"loss": math.nan})


def test_sha256_file_reads_in_blocks_and_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "w.bin").write_bytes(data)
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "pipeline"
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(target) as staging:
        (staging / "config.json").write_text("")  # a half-written file, then a crash
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no partial folder
    (tmp_path / ".pipeline.partial").mkdir()  # what a SIGKILL midway leaves: cleared by the next attempt
    (tmp_path / ".pipeline.partial" / "stale.bin").write_text("x")
    with atomic_folder(target) as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    with atomic_folder(target) as staging:  # an older complete folder is replaced, not merged
        (staging / "model_index.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["model_index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
