"""The resume guard: ``--resume`` continues a run only with the settings that wrote the checkpoint.

A checkpoint's meta holds the run's config and a fingerprint of its data. Resuming with a different batch size,
gradient accumulation, dataset, model or method would not fail loudly: the optimizer state and the data position
would be read into another run, and the result silently be neither run (every fine-tuning tool has had resume bugs of
exactly this kind). :func:`check_resume` compares the fields a config class names in its ``RESUME_FIELDS`` and the
data fingerprint, and stops with the field and both values, unless the user passes ``--resume-allow-changes``, in
which case each change is logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from training.checkpoint_folders import read_manifest
from training.state_io import decode_plain

logger = logging.getLogger(__name__)


def checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    """The meta a checkpoint was written with (its config, step and fingerprints), without loading its states."""
    manifest = read_manifest(checkpoint)
    return decode_plain(manifest["meta"], f"{checkpoint.name}/meta")


def resume_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], fields: Sequence[str]
) -> list[tuple[str, Any, Any]]:
    """``(field, checkpoint's value, this run's value)`` for every field of ``fields`` (config keys, or
    ``fingerprint.NAME`` for a fingerprint) whose value differs. A checkpoint written before a field existed has no
    value for it and is not held against it."""
    changes = []
    for field in fields:
        section, _, key = field.rpartition(".")
        before = saved.get(section or "config", {})
        after = current.get(section or "config", {})
        if key in before and before[key] != after.get(key):
            changes.append((field.removeprefix("config."), before[key], after.get(key)))
    return changes


def check_resume(
    checkpoint: Path,
    current: Mapping[str, Any],
    fields: Sequence[str],
    *,
    allow_changes: bool = False,
) -> None:
    """Refuse to resume from ``checkpoint`` when a field of ``fields`` differs between its meta and ``current``
    (``{"config": ..., "fingerprint": ...}``), naming each field and both values; with ``allow_changes``, log them.

    Raises:
        UserError: a resume-critical setting changed and ``allow_changes`` is False.
    """
    changes = resume_changes(checkpoint_meta(checkpoint), current, fields)
    if not changes:
        return
    described = "; ".join(f"{field}: {before!r} in the checkpoint, {after!r} now" for field, before, after in changes)
    if allow_changes:
        logger.warning("resuming from %s with changed settings (--resume-allow-changes): %s", checkpoint, described)
        return
    raise UserError(
        f"--resume {checkpoint}: this run's settings differ from those that wrote the checkpoint ({described}); "
        "resume with the checkpoint's settings, or pass --resume-allow-changes to continue with the new ones"
    )
