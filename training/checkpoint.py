"""Training checkpoints that never lose work: atomic, complete-or-absent folders of safetensors and JSON.

Each checkpoint is a folder ``step-000123`` of safetensors and JSON files with a manifest written last; its layout,
which folders count as complete, listing, resuming and pruning are ``training.checkpoint_folders``. This module
writes and reads the folders: the atomic writes, the manifest, and how several processes share the work. How a state
dict becomes a safetensors file and a JSON skeleton, and how the RNG states are taken and put back, is
``training.state_io``; :class:`StopSignal` lives in ``training.signals``. Nothing is pickled.

Sharded models (FSDP2 through accelerate, ``recipes/accelerate/fsdp_sdxl.yaml``) are saved whole: every process
takes part in gathering each object's ``DTensor`` s (the model's weights, the optimizer's moments) and the main process
writes full tensors, the same files as a single-process run writes, so a checkpoint loads on one machine; loading
cuts them back into each process's shards. Resuming a sharded run takes the same number of processes (its RNG files).

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

import logging
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from common.files import fsync_dir, fsync_file, read_json, replace_folder, sha256_file, write_json
from ldm.errors import UserError
from training.checkpoint_folders import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OLD_PREFIX,
    TMP_PREFIX,
    clean_stale,
    complete_checkpoints,
    hidden_sibling,
    prune_checkpoints,
    read_manifest,
    require_complete,
    step_dir_name,
    suggest_verified,
)
from training.state_io import (
    capture_rng_state,
    decode_plain,
    decode_state,
    encode_plain,
    encode_state,
    full_tensors,
    restore_rng_state,
    shard_optimizer_state_like,
    shard_state_like,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "Stateful",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RNG_DIR = "rng"


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)``: modules, optimizers, LR schedulers, EMA, ..."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


# --------------------------------------------------------------------------------------------------------------------
# Files of one checkpoint


def _rng_stem(rank: int) -> str:
    return f"rank-{rank}"


def _qualified_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _write_state(folder: Path, stem: str, state: Any, what: str, kind: str) -> None:
    """Write ``state`` as ``{stem}.safetensors`` (all tensors) and ``{stem}.json`` (the skeleton)."""
    doc, tensors = encode_state(state, what)
    save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    fsync_file(folder / f"{stem}.safetensors")
    write_json(folder / f"{stem}.json", {"format_version": FORMAT_VERSION, "kind": kind, **doc})


def _read_state(folder: Path, stem: str, what: str, device: str) -> Any:
    """The state that :func:`_write_state` wrote, its tensors on ``device``."""
    doc = read_json(folder / f"{stem}.json")
    return decode_state(doc, load_file(str(folder / f"{stem}.safetensors"), device=device), what)


def read_object_state(folder: str | Path, name: str, device: str = "cpu") -> Any:
    """The state dict that object ``name`` had when checkpoint ``folder`` was written (``unet``, ``ema``, ...),
    read without restoring anything: for exporting or inspecting a checkpoint."""
    folder = Path(folder)
    if not (folder / f"{name}.json").is_file():
        raise UserError(f"checkpoint {folder} has no {name!r} state")
    return _read_state(folder, name, name, device)


def _full_state(obj: Any, keep: bool) -> Any:
    """``obj.state_dict()`` with sharded tensors gathered in full (a collective when ``obj`` is sharded: every
    process calls it for the same objects in the same order); a process that does not ``keep`` them (does not write)
    drops each gathered tensor at once."""
    return full_tensors(obj.state_dict(), keep=keep)


def _sharded_like(obj: Any, state: Any) -> Any:
    """A loaded full ``state`` laid out as ``obj`` holds it: cut into this process's shards where ``obj`` is sharded
    (an optimizer by its parameters, anything else by its current state dict), else unchanged."""
    param_groups = getattr(obj, "param_groups", None)
    if isinstance(param_groups, list) and isinstance(state, dict) and {"state", "param_groups"} <= state.keys():
        return shard_optimizer_state_like(state, param_groups)
    if isinstance(obj, torch.nn.Module) and not any(isinstance(p, DTensor) for p in obj.parameters()):
        return state
    return shard_state_like(state, obj.state_dict())


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
        accelerator: with several processes, every process must call this; the main one writes the objects (gathered
            in full from every process's shards where they are sharded) and the manifest, each one its own RNG file.
            Without one, the caller is the only process.
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
    final = root / step_dir_name(step)

    # 1. the main process creates the temporary folder; every process learns its name
    tmp_name, error = None, None
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = hidden_sibling(final, TMP_PREFIX)
            (tmp / _RNG_DIR).mkdir(parents=True)
            tmp_name = tmp.name
        except OSError as exc:
            error = f"cannot create a temporary checkpoint folder in {root}: {exc}"
    tmp_name, error = _broadcast([tmp_name, error], accelerator)
    if error is not None:
        raise OSError(error)
    tmp = root / tmp_name

    # 2. main writes the objects (every process gathers the shards of sharded ones), every process its RNG states;
    # failures anywhere abort everywhere
    own_exc: BaseException | None = None
    try:
        for name, obj in objects.items():
            state = _full_state(obj, keep=is_main)
            if is_main:
                _write_state(tmp, name, state, name, _qualified_name(obj))
            del state
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
                    clean_stale(root)
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
        files[file.relative_to(tmp).as_posix()] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
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
    write_json(tmp / MANIFEST, manifest)
    fsync_dir(tmp / _RNG_DIR)
    fsync_dir(tmp)
    root = final.parent
    # re-saving a step replaces the old copy; a leftover of a kill is removed with the other stale folders
    replace_folder(tmp, final, hidden_sibling(final, OLD_PREFIX))
    later = [path.name for saved_step, path in complete_checkpoints(root) if saved_step > step]
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
        map_location: device the tensors are loaded to before ``load_state_dict`` (sharded objects: before each
            process cuts out its shards, on the device of its shards).
        strict_rng: if the checkpoint was written by a different number of processes, raise (True) or only warn and
            restore RNG states where this process has a file (False; random streams then differ).
        verify: check every file's sha256 against the manifest first.
    """
    path = Path(path)
    require_complete(path, "load", path.parent)
    manifest = read_manifest(path)
    generators = dict(generators or {})
    _check_names(objects, generators)
    saved = manifest["objects"]
    missing = [name for name in objects if name not in saved]
    if missing:
        raise UserError(
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
            raise UserError(message + ", or pass strict_rng=False to accept different random streams")
        logger.warning("%s; continuing with different random streams (strict_rng=False)", message)
    if verify:
        for name, entry in manifest["files"].items():
            if "sha256" in entry and sha256_file(path / name) != entry["sha256"]:
                raise UserError(
                    f"checkpoint file {path / name} is corrupt (its sha256 differs from the manifest). "
                    f"{suggest_verified(path.parent, corrupt=path)}"
                )
    device = str(map_location)
    for name, obj in objects.items():
        state = _read_state(path, name, f"{path.name}/{name}", device)
        try:
            obj.load_state_dict(_sharded_like(obj, state))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
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
