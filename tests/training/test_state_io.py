"""Tests for ``training.state_io``: state dicts through stock safetensors files and JSON text, bit for bit, and RNG."""

from __future__ import annotations

import json
import logging
import math
import random
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.state_io import (
    capture_rng_state,
    decode_plain,
    decode_state,
    encode_plain,
    encode_state,
    restore_rng_state,
)

# --------------------------------------------------------------------------------------------------------------------
# helpers (test_checkpoint uses them too)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of nested states: same types (tuples stay tuples, int keys stay ints), tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b)} is not a tensor"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{b.shape}"
        a_bytes = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a_bytes, b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), f"{where} differs"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{where}: {type(b)} is not a mapping"
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys differ (types or order)"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), f"{where}: {a} {b}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def seed_globals(seed: int) -> None:
    """Seed the global torch, numpy and Python RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _round_trip(state: Any, folder: Path, what: str = "state") -> Any:
    """``state`` through real files: a stock safetensors file for the tensors, strict JSON text for the skeleton."""
    doc, tensors = encode_state(state, what)
    save_file(tensors, str(folder / "state.safetensors"))
    text = json.dumps(doc, allow_nan=False)
    return decode_state(json.loads(text), load_file(str(folder / "state.safetensors")), what)


# --------------------------------------------------------------------------------------------------------------------
# state dicts


def test_special_values_shared_and_strided_tensors_round_trip(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "tied_a": base,
        "tied_b": base,  # the same tensor twice: safetensors refuses shared memory unless it is copied
        "transposed": base.t(),  # non-contiguous view of the same storage
        "slice": base[1:3],  # contiguous view of part of a storage
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "bf16": torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "uint8": torch.arange(256, dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
        "int_keys": {0: "zero", 1: (1, 2.5, None), -3: [True, False]},
        "floats": [float("inf"), float("-inf"), float("nan"), -0.0, 1e-310, 0.1],
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "numpy": np.arange(5, dtype=np.uint32),
        "numpy_scalar": np.float32(1.5),
        "bytes": b"\x00\xff",
        "nested": {"__type__": "looks like a tag", "list": [{"a": torch.ones(2)}]},
        "tuple_key": {(1, "a"): 2},
    }
    restored = _round_trip(state, tmp_path)
    assert_same(state, restored)
    assert restored["int_keys"][1][2] is None


def test_module_state_dict_keeps_its_keys_and_metadata(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = module.state_dict()
    doc, tensors = encode_state(state, "model")
    assert sorted(tensors) == sorted(state)  # tensors keyed by their state dict key: a plain state dict file
    restored = _round_trip(state, tmp_path, "model")
    assert type(restored) is OrderedDict and restored._metadata == state._metadata
    assert_same(state, restored)
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    other.load_state_dict(restored)
    assert_same(state, other.state_dict())


def test_plain_data_round_trips_without_tensors() -> None:
    meta = {"epoch": 2, "lr": float("inf"), "betas": (0.9, 0.99), 3: None}
    encoded = encode_plain(meta, "meta")
    assert_same(meta, decode_plain(json.loads(json.dumps(encoded, allow_nan=False)), "meta"))


def test_values_without_a_safe_encoding_are_refused_with_the_path() -> None:
    with pytest.raises(TypeError, match=r"custom\['groups'\]\[0\].*set"):
        encode_state({"groups": [{1, 2}]}, "custom")
    with pytest.raises(TypeError, match="meta.*JSON-like"):
        encode_plain({"loss": torch.tensor(1.0)}, "meta")
    with pytest.raises(ValueError, match=r"model\['w'\] is a meta tensor"):
        encode_state({"w": torch.empty(2, device="meta")}, "model")
    with pytest.raises(TypeError, match="tensor as a dict key"):
        encode_state({torch.tensor(1): 2}, "custom")
    with pytest.raises(TypeError, match="numpy array of dtype object"):
        encode_state({"a": np.array([None, 1], dtype=object)}, "custom")


def test_damaged_or_newer_documents_are_refused() -> None:
    doc, _ = encode_state({"w": torch.ones(2)}, "model")
    with pytest.raises(ValueError, match=r"model: tensor 'w' is listed in the JSON but missing.*damaged"):
        decode_state(doc, {}, "model")
    with pytest.raises(ValueError, match="unknown value type 'complex'.*newer version"):
        decode_plain({"__type__": "complex", "value": "1j"}, "meta")
    with pytest.raises(ValueError, match="unknown torch dtype 'float128'"):
        decode_plain({"__type__": "dtype", "name": "float128"}, "meta")


# --------------------------------------------------------------------------------------------------------------------
# RNG


def test_rng_states_and_named_generators_continue_identically(tmp_path: Path) -> None:
    seed_globals(7)
    generators = {"data": torch.Generator().manual_seed(1), "noise": torch.Generator().manual_seed(2)}
    torch.randn(5, generator=generators["data"])  # not at the seed any more
    state = _round_trip(capture_rng_state(generators), tmp_path, "rng")

    def draws() -> list[Any]:
        return [
            torch.rand(4),
            np.random.rand(3),
            np.random.randn(1),
            random.random(),
            random.gauss(0, 1),
            torch.rand(3, generator=generators["data"]),
            torch.rand(3, generator=generators["noise"]),
        ]

    expected = draws()
    seed_globals(123)
    generators["data"].manual_seed(55)
    generators["noise"].manual_seed(66)
    restore_rng_state(state, generators, "test state")
    assert_same(expected, draws())


def test_restoring_rng_names_missing_generators_and_logs_extra_ones(caplog) -> None:
    state = capture_rng_state({"data": torch.Generator()})
    with pytest.raises(ValueError, match=r"test state has no state for generator\(s\) \['noise'\]; it has \['data'\]"):
        restore_rng_state(state, {"noise": torch.Generator()}, "test state")
    with caplog.at_level(logging.WARNING, logger="training.state_io"):
        restore_rng_state(state, {}, "test state")
    assert "['data']" in caplog.text and "not restored" in caplog.text
