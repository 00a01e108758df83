"""Training checkpoints that never lose work: atomic, complete-or-absent folders of safetensors and JSON.

A checkpoint is a folder ``step-000123`` under the run's checkpoints directory::

    step-000123/
        checkpoint.json         manifest, written last: step, time, world size, meta, each file's size and sha256
        unet.safetensors        every tensor of the object's state dict, keyed by its path ("state/0/exp_avg", ...)
        unet.json               the rest of the state dict (numbers, strings, tuples, int keys), tensor placeholders
        optimizer.safetensors, optimizer.json, lr_scheduler.safetensors, lr_scheduler.json, ...
        rng/rank-0.safetensors  process 0's RNG states: torch CPU (+ CUDA), numpy, Python ``random``, named generators
        rng/rank-0.json
        rng/rank-1.safetensors  ... one pair per process

Everything is written into a hidden temporary sibling (``.tmp-step-000123-<random>``), fsynced, the manifest last, and
then renamed into place, so a crash at any moment leaves either the complete checkpoint or nothing that counts: a
folder is *complete* only if its manifest exists and lists files that all exist with the listed sizes, and only
complete folders are ever resumed from or counted by ``total_limit``. Nothing is pickled.

This module owns the folders: their layout, the atomic writes, the manifest, which folders count, and how several
processes share the work. How a state dict becomes a safetensors file and a JSON skeleton, and how the RNG states are
taken and put back, is ``training.state_io``; :class:`StopSignal` lives in ``training.signals`` and is re-exported.

Typical use in a training loop::

    resume = resolve_resume(checkpoints_dir, args.resume)  # None, "latest" or a path
    if resume is not None:
        meta = load_checkpoint(resume, objects, generators={"data": gen}, accelerator=accelerator)
        step = meta["step"]
    with StopSignal() as stop:
        while step < max_steps:
            ...
            if step % every == 0 or stop.any_requested(accelerator):
                save_checkpoint(checkpoints_dir, step, objects, generators={"data": gen}, meta={"step": step},
                                accelerator=accelerator, total_limit=3)
            if stop.any_requested(accelerator):
                break
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from training.signals import StopSignal
from training.state_io import (
    capture_rng_state,
    decode_plain,
    decode_state,
    encode_plain,
    encode_state,
    restore_rng_state,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "Stateful",
    "StopSignal",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = "ldm-toolkit-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RNG_DIR = "rng"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # the previous copy of a step while it is being re-saved
_TRASH_PREFIX = ".trash-"  # a pruned checkpoint while it is being deleted
_STALE_PREFIXES = (_TMP_PREFIX, _OLD_PREFIX, _TRASH_PREFIX)


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)``: modules, optimizers, LR schedulers, EMA, ..."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


# --------------------------------------------------------------------------------------------------------------------
# Files


def _fsync_file(path: Path) -> None:
    with open(path, "ab") as f:  # append mode: a writable descriptor (Windows needs one) that changes nothing
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_state(folder: Path, stem: str, state: Any, what: str, kind: str) -> None:
    """Write ``state`` as ``{stem}.safetensors`` (all tensors) and ``{stem}.json`` (the skeleton)."""
    doc, tensors = encode_state(state, what)
    save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    _fsync_file(folder / f"{stem}.safetensors")
    _write_json(folder / f"{stem}.json", {"format_version": FORMAT_VERSION, "kind": kind, **doc})


def _read_state(folder: Path, stem: str, what: str, device: str) -> Any:
    """The state that :func:`_write_state` wrote, its tensors on ``device``."""
    doc = _read_json(folder / f"{stem}.json")
    return decode_state(doc, load_file(str(folder / f"{stem}.safetensors"), device=device), what)


# --------------------------------------------------------------------------------------------------------------------
# Layout: names, manifest, completeness


def _step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _rng_stem(rank: int) -> str:
    return f"rank-{rank}"


def _hidden_sibling(path: Path, prefix: str) -> Path:
    """A fresh hidden name beside ``path`` (``.tmp-step-000123-1a2b3c4d``), which never counts as a checkpoint."""
    return path.with_name(f"{prefix}{path.name}-{secrets.token_hex(4)}")


def _qualified_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _read_manifest(folder: Path) -> dict[str, Any]:
    return _read_json(folder / MANIFEST)


def _incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None if it is one."""
    if not folder.is_dir():
        return "it does not exist" if not folder.exists() else "it is not a folder"
    if not (folder / MANIFEST).is_file():
        return f"it has no {MANIFEST} manifest (the manifest is written last, so the write was interrupted)"
    try:
        manifest = _read_manifest(folder)
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


def _require_complete(path: Path, action: str, checkpoints_dir: str | Path) -> None:
    """Raise ``ValueError`` saying why ``path`` cannot be used to ``action`` and which checkpoints can."""
    reason = _incomplete_reason(path)
    if reason is not None:
        raise ValueError(
            f"cannot {action} {path}: it is not a complete checkpoint because {reason}. "
            f"{_describe_available(checkpoints_dir)}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Listing and resuming


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
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
    return [path for _, path in _complete_checkpoints(Path(checkpoints_dir))]


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
    _require_complete(path, "resume from", checkpoints_dir)
    return path


def _describe_available(checkpoints_dir: str | Path) -> str:
    names = [str(p) for p in list_checkpoints(checkpoints_dir)]
    if not names:
        return f"There is no complete checkpoint in {checkpoints_dir}; leave resume unset to start fresh."
    return f"Complete checkpoints in {checkpoints_dir}: {names} (or pass 'latest')."


# --------------------------------------------------------------------------------------------------------------------
# Pruning and clean-up


def _remove_tree(path: Path) -> None:
    """Delete a folder so that a crash midway leaves only a temporary folder, never a half-deleted step folder."""
    doomed = _hidden_sibling(path, _TRASH_PREFIX)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _clean_stale(root: Path) -> list[Path]:
    """Remove temporary folders left by interrupted saves; a complete one whose step folder is missing (a crash
    between the manifest and the rename) is renamed into place instead. Returns the removed folders."""
    removed: list[Path] = []
    stale = sorted(c for c in root.iterdir() if c.is_dir() and c.name.startswith(_STALE_PREFIXES))
    # newest writes first: a .tmp folder is newer than an .old copy of the same step
    for folder in sorted(stale, key=lambda c: not c.name.startswith(_TMP_PREFIX)):
        match = re.match(r"^\.(?:tmp|old)-(step-\d{6,})-", folder.name)
        target = root / match.group(1) if match else None
        if target is not None and not target.exists() and _incomplete_reason(folder) is None:
            os.replace(folder, target)
            _fsync_dir(root)
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
    removed = _clean_stale(root)
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
        _fsync_dir(root)
    return removed


# --------------------------------------------------------------------------------------------------------------------
# Processes


def _process_info(accelerator: Accelerator | None) -> tuple[int, int, bool]:
    if accelerator is None:
        return 0, 1, True
    return accelerator.process_index, accelerator.num_processes, accelerator.is_main_process


def _broadcast(values: list[Any], accelerator: Accelerator | None) -> list[Any]:
    if accelerator is None or accelerator.num_processes == 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values, from_process=0)


def _gather(value: Any, accelerator: Accelerator | None) -> list[Any]:
    if accelerator is None or accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


# --------------------------------------------------------------------------------------------------------------------
# Save / load


def _check_names(objects: Mapping[str, Any], generators: Mapping[str, Any]) -> None:
    for name in objects:
        if not isinstance(name, str) or not _NAME.match(name) or name == Path(MANIFEST).stem:
            raise ValueError(
                f"object name {name!r} cannot be a checkpoint file name; use letters, digits, '_', '-', "
                f"'.' (not starting with '.'), and not {Path(MANIFEST).stem!r}"
            )
        obj = objects[name]
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(
                f"object {name!r} ({type(obj).__name__}) has no state_dict()/load_state_dict(); pass a "
                "module, optimizer, LR scheduler, EMA model or another object with both methods"
            )
        wrapped = isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel))
        if wrapped or (
            isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "_orig_mod", None), torch.nn.Module)
        ):
            raise ValueError(
                f"object {name!r} is a wrapped model ({type(obj).__name__}), whose state dict keys carry a wrapper "
                "prefix; pass the unwrapped model: accelerator.unwrap_model(model)"
            )
    for name, gen in generators.items():
        if not isinstance(gen, torch.Generator):
            raise TypeError(f"generator {name!r} is a {type(gen).__name__}, not a torch.Generator")


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    objects: Mapping[str, Stateful],
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    meta: Mapping[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoints_dir/step-{step:06d}`` atomically and return its path (on every process).

    Args:
        checkpoints_dir: the run's checkpoints folder (created if missing).
        step: the global step the checkpoint is taken at; an existing checkpoint of this step is replaced atomically.
        objects: name -> object with ``state_dict()``; pass unwrapped models (``accelerator.unwrap_model``).
        generators: named ``torch.Generator`` s (data order, noise) whose states are saved per process.
        meta: JSON-like data returned by :func:`load_checkpoint` (epoch, step, config, ...).
        accelerator: with several processes, every process must call this; the main one writes the objects and the
            manifest, each one its own RNG file. Without one, the caller is the only process.
        total_limit: if given, afterwards keep only the newest ``total_limit`` complete checkpoints.
    """
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be a non-negative int; got {step!r}")
    if total_limit is not None and (type(total_limit) is not int or total_limit < 1):
        raise ValueError(f"total_limit must be a positive integer or None (keep all); got {total_limit!r}")
    generators = dict(generators or {})
    _check_names(objects, generators)
    encoded_meta = encode_plain(dict(meta or {}), "meta")
    root = Path(checkpoints_dir)
    rank, world, is_main = _process_info(accelerator)
    final = root / _step_dir_name(step)

    # 1. the main process creates the temporary folder; every process learns its name
    tmp_name, error = None, None
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = _hidden_sibling(final, _TMP_PREFIX)
            (tmp / _RNG_DIR).mkdir(parents=True)
            tmp_name = tmp.name
        except OSError as exc:
            error = f"cannot create a temporary checkpoint folder in {root}: {exc}"
    tmp_name, error = _broadcast([tmp_name, error], accelerator)
    if error is not None:
        raise OSError(error)
    tmp = root / tmp_name

    # 2. main writes the objects, every process its RNG states; failures anywhere abort everywhere
    own_exc: BaseException | None = None
    try:
        if is_main:
            for name, obj in objects.items():
                _write_state(tmp, name, obj.state_dict(), name, _qualified_name(obj))
        rng_state = capture_rng_state(generators)
        _write_state(tmp / _RNG_DIR, _rng_stem(rank), rng_state, f"rng of process {rank}", "rng")
    except Exception as exc:
        own_exc = exc
    errors = [e for e in _gather(None if own_exc is None else f"process {rank}: {own_exc!r}", accelerator) if e]
    if errors:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if own_exc is not None:
            raise own_exc
        raise RuntimeError(f"checkpoint for step {step} was not written; {'; '.join(errors)}")

    # 3. main writes the manifest last, renames the folder into place and prunes
    own_exc, error = None, None
    if is_main:
        try:
            _finish(tmp, final, step, world, objects, generators, encoded_meta)
        except Exception as exc:
            own_exc, error = exc, repr(exc)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:  # the checkpoint is safe now; a failed clean-up must not stop training
                if total_limit is not None:
                    prune_checkpoints(root, total_limit, keep=final)
                else:
                    _clean_stale(root)
            except OSError as exc:
                logger.warning("saved %s but could not remove old checkpoints or temporary folders: %s", final, exc)
    (error,) = _broadcast([error], accelerator)
    if own_exc is not None:
        raise own_exc
    if error is not None:
        raise RuntimeError(f"checkpoint for step {step} was not completed by the main process: {error}")
    logger.info("saved checkpoint %s", final)
    return final


def _finish(
    tmp: Path,
    final: Path,
    step: int,
    world: int,
    objects: Mapping[str, Any],
    generators: Mapping[str, Any],
    encoded_meta: Any,
) -> None:
    """Write the manifest of the filled ``tmp`` folder, then rename it to ``final`` (replacing an older copy)."""
    for rank in range(world):
        if not (tmp / _RNG_DIR / f"{_rng_stem(rank)}.safetensors").is_file():
            raise RuntimeError(
                f"process {rank} wrote no RNG file to {tmp / _RNG_DIR}; the checkpoints folder must be "
                "on a file system that every process sees"
            )
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[file.relative_to(tmp).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": world,
        "objects": {name: _qualified_name(obj) for name, obj in objects.items()},
        "generators": sorted(generators),
        "meta": encoded_meta,
        "files": files,
    }
    _write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp / _RNG_DIR)
    _fsync_dir(tmp)
    root = final.parent
    if final.exists():  # re-saving a step: move the old one aside, rename the new one in, then delete the old one
        old = _hidden_sibling(final, _OLD_PREFIX)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)  # leftovers are removed with the other stale folders
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    later = [path.name for saved_step, path in _complete_checkpoints(root) if saved_step > step]
    if later:
        logger.warning(
            "checkpoints with later steps than %d exist in %s (%s), so 'latest' resolves to them; delete "
            "them if they belong to an abandoned run",
            step,
            root,
            ", ".join(later),
        )


def load_checkpoint(
    path: str | Path,
    objects: Mapping[str, Stateful],
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    accelerator: Accelerator | None = None,
    map_location: str | torch.device = "cpu",
    strict_rng: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore ``objects`` (``load_state_dict``) and this process's RNG states from ``path``; return the meta.

    Args:
        path: a complete checkpoint folder (see :func:`resolve_resume`).
        objects: name -> object to restore; every name must be in the checkpoint (extra ones there are logged).
        generators: named generators to restore (the same names as when saving).
        accelerator: the current run's; its process index picks the RNG file. Without one: process 0 of 1.
        map_location: device the tensors are loaded to before ``load_state_dict``.
        strict_rng: if the checkpoint was written by a different number of processes, raise (True) or only warn and
            restore RNG states where this process has a file (False; random streams then differ).
        verify: check every file's sha256 against the manifest first.
    """
    path = Path(path)
    _require_complete(path, "load", path.parent)
    manifest = _read_manifest(path)
    generators = dict(generators or {})
    _check_names(objects, generators)
    saved = manifest["objects"]
    missing = [name for name in objects if name not in saved]
    if missing:
        raise ValueError(
            f"checkpoint {path} has no object(s) {missing}; it has {sorted(saved)}. Pass the names used "
            "when saving, or start this object fresh by leaving it out of `objects`"
        )
    extra = sorted(set(saved) - set(objects))
    if extra:
        logger.warning("checkpoint %s also holds %s, which were not passed and are not restored", path, extra)
    rank, world, _ = _process_info(accelerator)
    saved_world = manifest["world_size"]
    if saved_world != world:
        message = (
            f"checkpoint {path} was written by {saved_world} process(es) but this run has {world}: resume "
            f"with {saved_world} process(es) (e.g. `accelerate launch --num_processes {saved_world}`) to "
            "continue the same random streams"
        )
        if strict_rng:
            raise ValueError(message + ", or pass strict_rng=False to accept different random streams")
        logger.warning("%s; continuing with different random streams (strict_rng=False)", message)
    if verify:
        for name, entry in manifest["files"].items():
            if "sha256" in entry and _sha256(path / name) != entry["sha256"]:
                raise ValueError(
                    f"checkpoint file {path / name} is corrupt (its sha256 differs from the manifest); "
                    f"resume from another checkpoint. {_describe_available(path.parent)}"
                )
    device = str(map_location)
    for name, obj in objects.items():
        state = _read_state(path, name, f"{path.name}/{name}", device)
        try:
            obj.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"cannot load {name!r} from {path}: {exc}. The object must have the same structure as "
                f"when saved (a {saved[name]})"
            ) from exc
    rng_stem = _rng_stem(rank)
    if (path / _RNG_DIR / f"{rng_stem}.json").is_file():
        rng_state = _read_state(path / _RNG_DIR, rng_stem, f"{path.name}/{_RNG_DIR}/{rng_stem}", "cpu")
        restore_rng_state(rng_state, generators, f"checkpoint {path}")
    else:  # only reachable with strict_rng=False and more processes than when saved
        logger.warning(
            "checkpoint %s has no RNG state for process %d; its random streams start from the current state",
            path,
            rank,
        )
    logger.info("loaded checkpoint %s (step %s)", path, manifest["step"])
    return decode_plain(manifest["meta"], f"{path.name}/meta")
