"""Training state as plain data: nested state dicts <-> (tensors for safetensors, JSON skeleton), and the RNG states.

:func:`encode_state` turns a state dict (nested dicts, lists and tuples of tensors, numbers, strings, ...) into a
JSON-safe document and a flat ``{key: tensor}`` dict that ``safetensors.torch.save_file`` accepts: every tensor is
replaced by a placeholder naming its key (its path in the state, ``"state/0/exp_avg"``), and whatever JSON cannot say
on its own (tuples, int keys, inf/nan, ``torch.dtype``, ``torch.Size``, numpy arrays and scalars, bytes) is tagged so
that :func:`decode_state` gives back the same types and the same bits. Tensors that share memory or are not contiguous
are copied, since safetensors refuses the first and writes only the second. Nothing is pickled: a value without a safe
encoding is refused with its path.

:func:`capture_rng_state` and :func:`restore_rng_state` take and put back one process's random state (torch CPU and
CUDA, numpy, Python ``random`` and named ``torch.Generator`` s) as such a state dict.

When a model is sharded (FSDP2's ``fully_shard`` makes its parameters, and so the optimizer's and EMA's tensors,
``DTensor`` s that each hold 1/N of the values), :func:`full_tensors` gathers every process's shards into the full
tensors a checkpoint stores, and :func:`shard_like` cuts loaded full tensors back into this process's shards. A
checkpoint of a sharded run is then the same files as one of a single-process run: it loads on one machine.

These functions know nothing of files or folders; ``training.checkpoint`` decides where the pieces go.
"""

from __future__ import annotations

import base64
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm.errors import UserError

logger = logging.getLogger(__name__)

_TAG = "__type__"


# --------------------------------------------------------------------------------------------------------------------
# Encoding


class _Encoder:
    """Turns a nested state into a JSON-safe skeleton, collecting tensors (contiguous, unshared) under path keys."""

    def __init__(self, what: str, allow_tensors: bool = True) -> None:
        self.what = what
        self.allow_tensors = allow_tensors
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[str, int]] = set()

    def _tensor_key(self, path: tuple[Any, ...]) -> str:
        base = "/".join(str(p) for p in path) or "tensor"
        key, n = base, 1
        while key in self.tensors:
            key, n = f"{base}~{n}", n + 1
        return key

    def _store(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> str:
        if not self.allow_tensors:
            raise TypeError(
                f"{self.what}{_where(path)} is an array; {self.what} must be JSON-like data, so put "
                "tensors in the state dict of an object passed in `objects`"
            )
        if tensor.is_meta:
            raise ValueError(f"{self.what}{_where(path)} is a meta tensor (no data); materialise the model first")
        original = tensor.detach()
        tensor = original.to("cpu") if original.device.type != "cpu" else original
        storage = tensor.untyped_storage()
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        storage_key = (str(original.device), original.untyped_storage().data_ptr())
        # safetensors refuses tensors that share memory and writes only contiguous ones: copy where needed.
        if tensor is original and (storage_key in self._storages or not whole or not tensor.is_contiguous()):
            tensor = tensor.contiguous().clone()
        elif not tensor.is_contiguous():
            tensor = tensor.contiguous()
        if original.numel() > 0:
            self._storages.add(storage_key)
        key = self._tensor_key(path)
        self.tensors[key] = tensor
        return key

    def encode(self, value: Any, path: tuple[Any, ...] = ()) -> Any:
        """The JSON-safe skeleton of ``value``."""
        if value is None or type(value) in (bool, int, str):
            return value
        if type(value) is float:
            return value if math.isfinite(value) else {_TAG: "float", "value": repr(value)}
        if isinstance(value, torch.Tensor):
            return {_TAG: "tensor", "key": self._store(value, path)}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.fields is not None:
                raise TypeError(
                    f"{self.what}{_where(path)} is a numpy array of dtype {value.dtype}; only plain "
                    "numeric arrays can be checkpointed"
                )
            raw = torch.from_numpy(np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy())
            key = self._store(raw, path)
            return {_TAG: "ndarray", "key": key, "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, np.generic):
            return {_TAG: "npscalar", "dtype": value.dtype.str, "value": self.encode(value.item(), path)}
        if isinstance(value, torch.dtype):
            return {_TAG: "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Size):
            return {_TAG: "size", "dims": list(value)}
        if isinstance(value, torch.device):
            return {_TAG: "device", "name": str(value)}
        if type(value) is bytes:
            return {_TAG: "bytes", "base64": base64.b64encode(value).decode("ascii")}
        if type(value) is tuple:
            return {_TAG: "tuple", "items": [self.encode(v, (*path, i)) for i, v in enumerate(value)]}
        if type(value) is list:
            return [self.encode(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(type(k) is str for k in value) and _TAG not in value:
                return {k: self.encode(v, (*path, k)) for k, v in value.items()}
            return {
                _TAG: "dict",
                "items": [[self._encode_key(k, path), self.encode(v, (*path, k))] for k, v in value.items()],
            }
        raise TypeError(
            f"{self.what}{_where(path)} has type {type(value).__module__}.{type(value).__qualname__}, which a "
            "checkpoint cannot store without pickle; use tensors, numbers, strings, None, lists, tuples, dicts, "
            "numpy arrays, torch.dtype or torch.Size (convert it in the object's state_dict/load_state_dict)"
        )

    def _encode_key(self, key: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(key, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{self.what}{_where(path)} has a tensor as a dict key; use a number or string key")
        return self.encode(key, (*path, "<key>"))


def _where(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path)


def encode_state(state: Any, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON-safe document and the tensors that together store ``state``; :func:`decode_state` inverts it.

    Args:
        state: a state dict, or any nesting of dicts, lists and tuples of the supported values.
        what: the name used for ``state`` in error messages (``"optimizer"``), followed by the offending value's path.

    Returns:
        ``(doc, tensors)``: ``doc["state"]`` is the skeleton with a placeholder for each tensor, plus
        ``doc["module_metadata"]`` where ``state`` carries an ``nn.Module`` state dict's ``_metadata`` (per-submodule
        versions); ``tensors`` maps each placeholder's key to a contiguous CPU tensor that shares memory with no
        other one, ready for ``safetensors.torch.save_file``.

    Raises:
        TypeError: for a value with no safe encoding (a set, an arbitrary object, a tensor as a dict key, ...).
        ValueError: for a meta tensor, which has no data to store.
    """
    encoder = _Encoder(what)
    doc: dict[str, Any] = {"state": encoder.encode(state)}
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, dict):
        doc["module_metadata"] = encode_plain(dict(metadata), f"{what}._metadata")
    return doc, encoder.tensors


def decode_state(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], what: str) -> Any:
    """Rebuild the state that :func:`encode_state` turned into ``doc`` and ``tensors`` (same types, same bits).

    An ``nn.Module`` state dict comes back as an ``OrderedDict`` with its ``_metadata``. Raises ``ValueError``, naming
    ``what``, for a placeholder whose tensor is missing or a tag this version of the code does not know.
    """
    state = _decode(doc["state"], tensors, what)
    if "module_metadata" in doc and isinstance(state, dict):
        state = OrderedDict(state)
        state._metadata = decode_plain(doc["module_metadata"], what)  # type: ignore[attr-defined]
    return state


def encode_plain(value: Any, what: str) -> Any:
    """The JSON-safe skeleton of JSON-like data (``meta``): like :func:`encode_state`, but tensors are refused."""
    return _Encoder(what, allow_tensors=False).encode(value)


def decode_plain(value: Any, what: str) -> Any:
    """Rebuild the data that :func:`encode_plain` encoded."""
    return _decode(value, {}, what)


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], what: str) -> Any:
    """Rebuild the value encoded by :class:`_Encoder` from its skeleton and tensors."""
    if isinstance(value, list):
        return [_decode(v, tensors, what) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v, tensors, what) for k, v in value.items()}
    if tag in ("tensor", "ndarray"):
        if value["key"] not in tensors:
            raise UserError(
                f"{what}: tensor {value['key']!r} is listed in the JSON but missing from the safetensors "
                "file; the checkpoint is damaged, resume from another one"
            )
        tensor = tensors[value["key"]]
        if tag == "tensor":
            return tensor
        raw = tensor.cpu().numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if tag == "float":
        return float(value["value"])
    if tag == "tuple":
        return tuple(_decode(v, tensors, what) for v in value["items"])
    if tag == "dict":
        return {_decode(k, tensors, what): _decode(v, tensors, what) for k, v in value["items"]}
    if tag == "npscalar":
        return np.dtype(value["dtype"]).type(_decode(value["value"], tensors, what))
    if tag == "dtype":
        dtype = getattr(torch, value["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{what}: unknown torch dtype {value['name']!r}; this torch version cannot load it")
        return dtype
    if tag == "size":
        return torch.Size(value["dims"])
    if tag == "device":
        return torch.device(value["name"])
    if tag == "bytes":
        return base64.b64decode(value["base64"])
    raise UserError(f"{what}: unknown value type {tag!r} in the JSON; it was written by a newer version of the code")


# --------------------------------------------------------------------------------------------------------------------
# Sharded tensors


def is_sharded(state: Any) -> bool:
    """Whether ``state`` (a tensor, or any nesting of dicts, lists and tuples) holds a ``DTensor``."""
    if isinstance(state, DTensor):
        return True
    if isinstance(state, Mapping):
        return any(is_sharded(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(is_sharded(v) for v in state)
    return False


def full_tensors(state: Any, *, keep: bool = True) -> Any:
    """``state`` with every ``DTensor`` replaced by its full value as a plain CPU tensor; the rest is kept as is.

    Gathering is a collective: every process of the mesh must call this on a state of the same structure (the state
    dict of the same sharded object), one tensor gathered at a time. A process that only takes part (``keep=False``:
    not the one that writes) drops each gathered tensor at once and gets None in its place, so that it never holds
    the whole state. A state without ``DTensor`` s is returned unchanged, with no communication.
    """
    if not is_sharded(state):
        return state
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if keep else None
    if isinstance(state, Mapping):
        return _same_kind(state, {k: full_tensors(v, keep=keep) for k, v in state.items()})
    if isinstance(state, tuple):
        return tuple(full_tensors(v, keep=keep) for v in state)
    return [full_tensors(v, keep=keep) for v in state]


def _same_kind(original: Mapping[str, Any], items: dict[str, Any]) -> dict[str, Any]:
    """``items`` as the kind of mapping ``original`` is: an ``nn.Module`` state dict (an ``OrderedDict``) keeps its
    ``_metadata`` (per-submodule versions that ``load_state_dict`` reads)."""
    if not isinstance(original, OrderedDict):
        return items
    copy = OrderedDict(items)
    metadata = getattr(original, "_metadata", None)
    if metadata is not None:
        copy._metadata = metadata  # type: ignore[attr-defined]
    return copy


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this process's shard of it when ``like`` is a ``DTensor`` (same mesh and
    placements, cut locally: every process holds ``full``), else ``full`` itself.

    Raises:
        UserError: ``full`` has another shape than ``like``'s full shape (the checkpoint is of another model).
    """
    if not isinstance(like, DTensor):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise UserError(
            f"a checkpoint tensor of shape {tuple(full.shape)} cannot be loaded into a sharded tensor of shape "
            f"{tuple(like.shape)}; resume with the model the checkpoint was written for"
        )
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_state_like(state: Any, template: Any) -> Any:
    """``state`` (full tensors, as loaded) with each tensor whose counterpart at the same place in ``template`` (the
    object's current state dict) is a ``DTensor`` cut into this process's shard (:func:`shard_like`)."""
    if isinstance(state, torch.Tensor):
        return shard_like(state, template) if isinstance(template, DTensor) else state
    if isinstance(state, Mapping) and isinstance(template, Mapping):
        sharded = {k: shard_state_like(v, template[k]) if k in template else v for k, v in state.items()}
        return _same_kind(state, sharded)
    if isinstance(state, (list, tuple)) and isinstance(template, (list, tuple)) and len(state) == len(template):
        items = [shard_state_like(v, t) for v, t in zip(state, template)]
        return tuple(items) if isinstance(state, tuple) else items
    return state


def shard_optimizer_state_like(state: dict[str, Any], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """A full optimizer state dict (``torch.optim.Optimizer.state_dict()`` layout, as loaded) with the per-parameter
    tensors of each sharded parameter (those of the parameter's shape: AdamW's ``exp_avg``, ``exp_avg_sq``) cut into
    this process's shard. ``param_groups`` are the optimizer's current ones; parameters are matched by the ids of the
    saved groups, in order, as ``Optimizer.load_state_dict`` matches them."""
    params: dict[Any, torch.Tensor] = {}
    for saved, group in zip(state["param_groups"], param_groups):
        params.update(zip(saved["params"], group["params"]))
    if not any(isinstance(p, DTensor) for p in params.values()):
        return state
    per_param = {}
    for index, entry in state["state"].items():
        param = params.get(index)
        per_param[index] = {
            key: shard_like(value, param)
            if isinstance(value, torch.Tensor) and param is not None and value.dim() > 0 and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    return {**state, "state": per_param}


# --------------------------------------------------------------------------------------------------------------------
# RNG


def capture_rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """This process's random state: torch CPU (+ CUDA once initialised), numpy, Python ``random``, ``generators``.

    The result is a state dict that :func:`encode_state` stores and :func:`restore_rng_state` puts back.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
        "generator_devices": {name: str(gen.device) for name, gen in generators.items()},
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator], source: str) -> None:
    """Put back the random state taken by :func:`capture_rng_state`, so that random streams continue identically.

    Args:
        state: the captured state (after an encode/decode round trip).
        generators: the generators to restore, by the names they were captured under; every one must be in
            ``state`` (extra ones there are logged and left alone).
        source: where ``state`` comes from, for messages (``"checkpoint runs/x/step-000300"``).

    CUDA states are restored only when as many CUDA devices are visible as when captured; otherwise a warning says
    that CUDA random streams will differ.
    """
    saved = state["generators"]
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise UserError(
            f"{source} has no state for generator(s) {missing}; it has {sorted(saved)}. "
            "Pass the generator names used when it was saved"
        )
    extra = sorted(set(saved) - set(generators))
    if extra:
        logger.warning("%s has generator state(s) %s that were not passed; they are not restored", source, extra)
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state["cuda"]
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "%s holds CUDA RNG states for %d device(s) but %d are visible: CUDA random streams will differ "
                "from an uninterrupted run",
                source,
                len(cuda),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
    for name, gen in generators.items():
        try:
            gen.set_state(saved[name].cpu())
        except RuntimeError as exc:
            raise UserError(
                f"cannot restore generator {name!r} (a {gen.device} generator) from the state saved "
                f"for a {state['generator_devices'].get(name)} generator in {source}: {exc}"
            ) from exc
