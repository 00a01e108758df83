"""The checkpoint folders of a run: their layout, which ones are complete, listing, resuming, pruning, clean-up.

A checkpoint is a folder ``step-000123`` under the run's checkpoints directory::

    step-000123/
        checkpoint.json         manifest, written last: step, time, world size, meta, each file's size and sha256
        unet.safetensors        every tensor of the object's state dict, keyed by its path ("state/0/exp_avg", ...)
        unet.json               the rest of the state dict (numbers, strings, tuples, int keys), tensor placeholders
        optimizer.safetensors, optimizer.json, lr_scheduler.safetensors, lr_scheduler.json, ...
        rng/rank-0.safetensors  process 0's RNG states: torch CPU (+ CUDA), numpy, Python ``random``, named generators
        rng/rank-0.json
        rng/rank-1.safetensors  ... one pair per process

A run that shards its model (FSDP) writes the same files, with full tensors gathered from every process's shards
(``training.checkpoint``), so its checkpoints load on one machine too; only the RNG files are per process.

Everything is written into a hidden temporary sibling (``.tmp-step-000123-<random>``), fsynced, the manifest last, and
then renamed into place, so a crash at any moment leaves either the complete checkpoint or nothing that counts: a
folder is *complete* only if its manifest exists and lists files that all exist with the listed sizes, and only
complete folders are ever resumed from or counted by ``total_limit``.

This module decides which folders count and removes the ones that no longer should; writing and reading a checkpoint
is ``training.checkpoint``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from common.files import fsync_dir, read_json, sha256_file
from ldm.errors import UserError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "OLD_PREFIX",
    "TMP_PREFIX",
    "clean_stale",
    "complete_checkpoints",
    "describe_available",
    "hidden_sibling",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "read_manifest",
    "require_complete",
    "resolve_resume",
    "step_dir_name",
    "suggest_verified",
    "verifies",
]

logger = logging.getLogger(__name__)

FORMAT = "ldm-toolkit-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # the previous copy of a step while it is being re-saved
_TRASH_PREFIX = ".trash-"  # a pruned checkpoint while it is being deleted
_STALE_PREFIXES = (TMP_PREFIX, OLD_PREFIX, _TRASH_PREFIX)
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


# --------------------------------------------------------------------------------------------------------------------
# Layout: names, manifest, completeness


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` (``step-000123``)."""
    return f"step-{step:06d}"


def hidden_sibling(path: Path, prefix: str) -> Path:
    """A fresh hidden name beside ``path`` (``.tmp-step-000123-1a2b3c4d``), which never counts as a checkpoint."""
    return path.with_name(f"{prefix}{path.name}-{secrets.token_hex(4)}")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the checkpoint ``folder`` (check it with :func:`require_complete` first)."""
    return read_json(folder / MANIFEST)


def _incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None if it is one."""
    if not folder.is_dir():
        return "it does not exist" if not folder.exists() else "it is not a folder"
    if not (folder / MANIFEST).is_file():
        return f"it has no {MANIFEST} manifest (the manifest is written last, so the write was interrupted)"
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        return f"its manifest {MANIFEST} cannot be read ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"its {MANIFEST} is not a {FORMAT} manifest"
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        return (
            f"it was written in checkpoint format {manifest['format_version']}, newer than this code reads "
            f"({FORMAT_VERSION}); update the code"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and type(e.get("size")) is int for e in files.values()
    ):
        return f"its {MANIFEST} has no valid 'files' table"
    for name, entry in files.items():
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"its manifest lists a file outside the folder ({name!r})"
        if not file.is_file():
            return f"file {name} listed in the manifest is missing"
        if file.stat().st_size != entry["size"]:
            return f"file {name} has {file.stat().st_size} bytes but the manifest lists {entry['size']} (truncated)"
    return None


def require_complete(path: Path, action: str, checkpoints_dir: str | Path) -> None:
    """Raise ``ValueError`` saying why ``path`` cannot be used to ``action`` and which checkpoints can."""
    reason = _incomplete_reason(path)
    if reason is not None:
        raise UserError(
            f"cannot {action} {path}: it is not a complete checkpoint because {reason}. "
            f"{describe_available(checkpoints_dir)}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Listing and resuming


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints in ``root``, oldest first; incomplete folders are logged."""
    if not root.is_dir():
        return []
    complete: list[tuple[int, Path]] = []
    ignored: list[str] = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            reason = _incomplete_reason(child)
            if reason is None:
                complete.append((int(match.group(1)), child))
            else:
                ignored.append(f"{child.name} ({reason})")
        elif child.name.startswith(_STALE_PREFIXES) and child.is_dir():
            ignored.append(f"{child.name} (temporary folder of an interrupted save; removed by the next save)")
    if ignored:
        logger.warning("ignoring incomplete checkpoint folders in %s: %s", root, "; ".join(sorted(ignored)))
    return sorted(complete)


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``checkpoints_dir``, oldest step first; incomplete folders are logged, skipped."""
    return [path for _, path in complete_checkpoints(Path(checkpoints_dir))]


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoints_dir``, or None if there is none."""
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(checkpoints_dir: str | Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from: None for None, the latest (or None) for ``"latest"``, else the given folder.

    A path that is not absolute and does not exist is also looked up inside ``checkpoints_dir`` (``"step-000300"``).
    Raises ``ValueError`` naming the problem and the complete checkpoints if the path is not a complete checkpoint.
    """
    if resume is None:
        return None
    if str(resume) == "latest":
        latest = latest_checkpoint(checkpoints_dir)
        if latest is None:
            logger.info("no complete checkpoint in %s to resume from: training starts fresh", checkpoints_dir)
        else:
            logger.info("resuming from the latest checkpoint %s", latest)
        return latest
    path = Path(resume)
    if not path.exists() and not path.is_absolute() and (Path(checkpoints_dir) / path).exists():
        path = Path(checkpoints_dir) / path
    require_complete(path, "resume from", checkpoints_dir)
    return path


def verifies(folder: Path) -> bool:
    """Whether the checkpoint ``folder`` is complete and every file's sha256 matches its manifest (reads them all)."""
    if _incomplete_reason(folder) is not None:
        return False
    files = read_manifest(folder)["files"]
    return all("sha256" not in entry or sha256_file(folder / name) == entry["sha256"] for name, entry in files.items())


def suggest_verified(checkpoints_dir: str | Path, corrupt: Path) -> str:
    """A sentence for a corrupt checkpoint's error: the newest other checkpoint whose files verify, to resume from."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        if path != corrupt and verifies(path):
            return f"The newest checkpoint whose files verify is {path}: resume with --resume {path}."
    return f"No other checkpoint in {checkpoints_dir} verifies; leave resume unset to start fresh."


def describe_available(checkpoints_dir: str | Path) -> str:
    """A sentence for error messages: the complete checkpoints in ``checkpoints_dir``, or that there is none."""
    names = [str(p) for p in list_checkpoints(checkpoints_dir)]
    if not names:
        return f"There is no complete checkpoint in {checkpoints_dir}; leave resume unset to start fresh."
    return f"Complete checkpoints in {checkpoints_dir}: {names} (or pass 'latest')."


# --------------------------------------------------------------------------------------------------------------------
# Pruning and clean-up


def _remove_tree(path: Path) -> None:
    """Delete a folder so that a crash midway leaves only a temporary folder, never a half-deleted step folder."""
    doomed = hidden_sibling(path, _TRASH_PREFIX)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary folders left by interrupted saves; a complete one whose step folder is missing (a crash
    between the manifest and the rename) is renamed into place instead. Returns the removed folders."""
    removed: list[Path] = []
    stale = sorted(c for c in root.iterdir() if c.is_dir() and c.name.startswith(_STALE_PREFIXES))
    # newest writes first: a .tmp folder is newer than an .old copy of the same step
    for folder in sorted(stale, key=lambda c: not c.name.startswith(TMP_PREFIX)):
        match = re.match(r"^\.(?:tmp|old)-(step-\d{6,})-", folder.name)
        target = root / match.group(1) if match else None
        if target is not None and not target.exists() and _incomplete_reason(folder) is None:
            os.replace(folder, target)
            fsync_dir(root)
            logger.warning("recovered complete checkpoint %s from interrupted save folder %s", target, folder.name)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def prune_checkpoints(checkpoints_dir: str | Path, total_limit: int, *, keep: Path | None = None) -> list[Path]:
    """Remove the oldest complete checkpoints beyond ``total_limit`` and stale temporary folders; return the removed.

    The newest checkpoint and ``keep`` (the one just written) are never removed; incomplete ``step-*`` folders are
    left alone (they are logged by :func:`list_checkpoints`).
    """
    if type(total_limit) is not int or total_limit < 1:
        raise ValueError(
            f"total_limit must be a positive integer (the number of checkpoints to keep); got {total_limit!r}"
        )
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    removed = clean_stale(root)
    checkpoints = list_checkpoints(root)
    protected = {checkpoints[-1].resolve()} if checkpoints else set()
    if keep is not None:
        protected.add(Path(keep).resolve())
    excess = len(checkpoints) - total_limit
    for path in checkpoints:
        if excess <= 0:
            break
        if path.resolve() in protected:
            continue
        _remove_tree(path)
        removed.append(path)
        excess -= 1
        logger.info("removed old checkpoint %s (total_limit=%d)", path, total_limit)
    if removed:
        fsync_dir(root)
    return removed
