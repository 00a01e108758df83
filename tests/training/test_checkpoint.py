"""Tests for ``training.checkpoint``: bit-exact round trips, resume equals uninterrupted training, crash safety.

The serialisation of single states and the RNG capture are tested in ``test_state_io``, ``StopSignal`` in
``test_signals``; here they are exercised through whole checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from torch import nn

from ldm.presets import build_unet, get_preset
from tests.training.test_state_io import assert_same, seed_globals
from training import checkpoint as ckpt
from training import signals
from training.checkpoint import load_checkpoint, save_checkpoint
from training.checkpoint_folders import latest_checkpoint, list_checkpoints, prune_checkpoints, resolve_resume
from training.signals import StopSignal

REPO = Path(__file__).resolve().parents[2]


class _Crash(BaseException):
    """Stands for the process dying (kill -9, power loss): not an ``Exception``, so no clean-up code runs."""


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _make_run(seed: int) -> dict[str, Any]:
    """A tiny model with dropout (global torch RNG), AdamW, warmup+cosine LR, EMA and a data generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.GELU(), nn.Linear(16, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=6)
    ema = EMAModel(model.parameters(), decay=0.9)
    return {
        "objects": {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "ema": ema},
        "generators": {"data": torch.Generator().manual_seed(seed + 100)},
    }


def _train(run: dict[str, Any], steps: int) -> None:
    """Steps whose data and noise come from the data generator and the global torch, numpy and Python RNGs."""
    objects, gen = run["objects"], run["generators"]["data"]
    model, optimizer = objects["model"], objects["optimizer"]
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 8, generator=gen)
        target = torch.randn(4, 8, generator=gen)
        weight = 1.0 + float(np.random.rand()) + random.random()
        loss = ((model(x) - target) ** 2).mean() * weight
        loss.backward()
        optimizer.step()
        objects["lr_scheduler"].step()
        objects["ema"].step(model.parameters())
        optimizer.zero_grad()


def _states(objects: Mapping[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in objects.items()}


class _Custom:
    """A small custom stateful object (like a LoRA adapter view) whose state exercises every special case."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _step_names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------------------------------------
# round trips


def test_stop_signal_is_re_exported() -> None:
    assert StopSignal is signals.StopSignal


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    seed_globals(0)
    run = _make_run(seed=0)
    _train(run, 3)
    expected = _states(run["objects"])
    path = save_checkpoint(tmp_path, 3, run["objects"], meta={"epoch": 1, "step": 3})

    fresh = _make_run(seed=1)
    assert not torch.equal(fresh["objects"]["model"][0].weight, run["objects"]["model"][0].weight)
    meta = load_checkpoint(path, fresh["objects"])
    assert meta == {"epoch": 1, "step": 3}
    for name, state in expected.items():
        assert_same(state, fresh["objects"][name].state_dict(), name)
    betas = fresh["objects"]["optimizer"].state_dict()["param_groups"][0]["betas"]
    assert betas == (0.8, 0.95) and type(betas) is tuple
    assert list(fresh["objects"]["optimizer"].state_dict()["state"]) == [0, 1, 2, 3]
    assert fresh["objects"]["ema"].optimization_step == 3
    # the learning rate schedule continues identically
    for objects in (run["objects"], fresh["objects"]):
        objects["optimizer"].step()
        objects["lr_scheduler"].step()
    assert run["objects"]["lr_scheduler"].get_last_lr() == fresh["objects"]["lr_scheduler"].get_last_lr()
    assert run["objects"]["optimizer"].param_groups[0]["lr"] == fresh["objects"]["optimizer"].param_groups[0]["lr"]


def test_module_file_is_a_plain_state_dict_that_stock_safetensors_loads(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(get_preset("tiny"))
        other = build_unet(get_preset("tiny"))
    path = save_checkpoint(tmp_path, 1, {"unet": unet})
    stock = load_file(path / "unet.safetensors")
    # same keys, same bits: the module's file is an ordinary state dict (safetensors stores keys sorted)
    assert_same(dict(sorted(unet.state_dict().items())), stock)
    load_checkpoint(path, {"unet": other})
    assert_same(unet.state_dict(), other.state_dict())


def test_resume_matches_uninterrupted_training(tmp_path: Path) -> None:
    """The key property: 3 steps, save, fresh objects, load, 3 steps == 6 steps straight."""
    seed_globals(0)
    straight = _make_run(seed=0)
    _train(straight, 6)

    seed_globals(0)
    first = _make_run(seed=0)
    _train(first, 3)
    save_checkpoint(tmp_path, 3, first["objects"], generators=first["generators"], meta={"step": 3})
    del first

    seed_globals(999)  # a new process: different global RNG, different initial weights
    resumed = _make_run(seed=5)
    path = resolve_resume(tmp_path, "latest")
    assert path == tmp_path / "step-000003"
    meta = load_checkpoint(path, resumed["objects"], generators=resumed["generators"])
    _train(resumed, 6 - meta["step"])

    for name, obj in straight["objects"].items():
        assert_same(obj.state_dict(), resumed["objects"][name].state_dict(), name)
    for a, b in zip(straight["objects"]["model"].parameters(), resumed["objects"]["model"].parameters()):
        assert torch.equal(a, b)


def test_values_without_a_safe_encoding_are_refused_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['groups'\]\[0\].*set"):
        save_checkpoint(tmp_path, 0, {"custom": _Custom({"groups": [{1, 2}]})})
    with pytest.raises(TypeError, match="meta.*JSON-like"):
        save_checkpoint(tmp_path, 0, {}, meta={"loss": torch.tensor(1.0)})
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_bitsandbytes_8bit_adam_round_trip(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    runs = []
    for seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = nn.Linear(64, 64)
        runs.append((model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=16)))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    model, optimizer = runs[0]
    for _ in range(2):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_checkpoint(tmp_path, 2, {"model": model, "optimizer": optimizer})
    assert any(t.dtype == torch.uint8 for t in load_file(path / "optimizer.safetensors").values())
    load_checkpoint(path, {"model": runs[1][0], "optimizer": runs[1][1]})
    assert_same(optimizer.state_dict(), runs[1][1].state_dict())
    for model, optimizer in runs:
        model(x).square().mean().backward()
        optimizer.step()
    assert torch.equal(runs[0][0].weight, runs[1][0].weight)


# --------------------------------------------------------------------------------------------------------------------
# crash safety, total_limit, re-saving


def test_interrupted_writes_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    run = _make_run(seed=0)
    good = save_checkpoint(tmp_path, 3, run["objects"])

    # a failing write (exception while writing the manifest) cleans up after itself
    real_write_json = ckpt.write_json

    def failing_manifest(path: Path, data: Any) -> None:
        if path.name == ckpt.MANIFEST:
            raise OSError("disk full")
        real_write_json(path, data)

    monkeypatch.setattr(ckpt, "write_json", failing_manifest)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 6, run["objects"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]

    # a crash (the process dies) while writing leaves a temporary folder, which does not count
    def crash_on_manifest(path: Path, data: Any) -> None:
        if path.name == ckpt.MANIFEST:
            raise _Crash
        real_write_json(path, data)

    monkeypatch.setattr(ckpt, "write_json", crash_on_manifest)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, 9, run["objects"])
    monkeypatch.setattr(ckpt, "write_json", real_write_json)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-000009-")]

    # a step folder with a truncated file, and one without a manifest
    truncated = tmp_path / "step-000012"
    shutil.copytree(good, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(100)
    shutil.copytree(good, tmp_path / "step-000015")
    (tmp_path / "step-000015" / ckpt.MANIFEST).unlink()

    with caplog.at_level(logging.WARNING, logger="training.checkpoint_folders"):
        assert list_checkpoints(tmp_path) == [good]
    assert "step-000012" in caplog.text and "truncated" in caplog.text and "step-000015" in caplog.text
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume(tmp_path, "latest") == good
    with pytest.raises(ValueError, match=r"step-000012.*truncated.*step-000003"):
        resolve_resume(tmp_path, str(truncated))

    # the next save removes the stale temporary folder, keeps the incomplete step folders for inspection
    save_checkpoint(tmp_path, 18, run["objects"], total_limit=5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-000003", "step-000012", "step-000015", "step-000018"]


def test_crash_between_manifest_and_rename_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-save that dies between moving the old folder aside and renaming the new one in is recovered."""
    run = _make_run(seed=0)
    save_checkpoint(tmp_path, 3, run["objects"], meta={"version": "old"})
    real_replace = os.replace
    calls = []

    def crash_on_second_rename(src: Any, dst: Any) -> None:
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise _Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, 3, run["objects"], meta={"version": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert latest_checkpoint(tmp_path) is None  # step-000003 is momentarily absent: both copies are hidden

    save_checkpoint(tmp_path, 6, run["objects"])  # the next save puts the newest complete copy back
    assert _step_names(list_checkpoints(tmp_path)) == ["step-000003", "step-000006"]
    assert load_checkpoint(tmp_path / "step-000003", {})["version"] == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_total_limit_keeps_the_newest_and_never_deletes_before_the_new_one_is_complete(tmp_path: Path) -> None:
    run = _make_run(seed=0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, run["objects"], total_limit=2)
    assert _step_names(list_checkpoints(tmp_path)) == ["step-000004", "step-000005"]

    class Broken(_Custom):
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("cannot gather weights")

    with pytest.raises(RuntimeError, match="cannot gather"):
        save_checkpoint(tmp_path, 6, {**run["objects"], "broken": Broken({})}, total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]

    # re-saving an earlier step (resumed from an older checkpoint) keeps the one just written and the newest
    path = save_checkpoint(tmp_path, 2, run["objects"], total_limit=2)
    assert _step_names(list_checkpoints(tmp_path)) == ["step-000002", "step-000005"]
    assert path.is_dir()
    assert _step_names(prune_checkpoints(tmp_path, 1)) == ["step-000002"]
    assert _step_names(list_checkpoints(tmp_path)) == ["step-000005"]
    with pytest.raises(ValueError, match="total_limit"):
        prune_checkpoints(tmp_path, 0)


def test_resaving_a_step_replaces_it_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _make_run(seed=0), _make_run(seed=1)
    save_checkpoint(tmp_path, 3, first["objects"])

    def failing_finish(*args: Any) -> None:
        raise OSError("no space left")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_finish", failing_finish)
        with pytest.raises(OSError, match="no space"):
            save_checkpoint(tmp_path, 3, second["objects"])
    target = _make_run(seed=2)
    load_checkpoint(tmp_path / "step-000003", target["objects"])  # the old one is intact
    assert_same(first["objects"]["model"].state_dict(), target["objects"]["model"].state_dict())

    save_checkpoint(tmp_path, 3, second["objects"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]
    load_checkpoint(tmp_path / "step-000003", target["objects"])
    assert_same(second["objects"]["model"].state_dict(), target["objects"]["model"].state_dict())


def test_checkpoints_hold_only_safetensors_and_json_and_never_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle / torch.save / torch.load used")

    for module, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    seed_globals(0)
    run = _make_run(seed=0)
    _train(run, 2)
    path = save_checkpoint(tmp_path, 2, run["objects"], generators=run["generators"], meta={"lr": 1e-2})
    load_checkpoint(path, _make_run(seed=1)["objects"], generators=run["generators"])
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == sorted(
        [f"{n}.{ext}" for n in run["objects"] for ext in ("json", "safetensors")]
        + ["checkpoint.json", "rng/rank-0.json", "rng/rank-0.safetensors"]
    )
    for file in path.rglob("*.json"):
        json.loads(file.read_text())
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["step"] == 2 and manifest["world_size"] == 1
    assert set(manifest["files"]) == set(files) - {"checkpoint.json"}
    assert all(manifest["files"][f]["size"] == (path / f).stat().st_size for f in manifest["files"])


# --------------------------------------------------------------------------------------------------------------------
# errors


def test_resume_errors_name_the_problem_and_the_choices(tmp_path: Path) -> None:
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path / "missing", "latest") is None
    with pytest.raises(ValueError, match="does not exist.*no complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "step-000100"))
    save_checkpoint(tmp_path, 100, {})
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(ValueError, match=r"no checkpoint.json manifest.*step-000100"):
        resolve_resume(tmp_path, str(tmp_path / "not-a-checkpoint"))
    assert resolve_resume(tmp_path, "step-000100") == tmp_path / "step-000100"  # relative to the folder


def test_load_errors(tmp_path: Path, caplog) -> None:
    run = _make_run(seed=0)
    path = save_checkpoint(tmp_path, 1, run["objects"], generators=run["generators"])
    with pytest.raises(ValueError, match=r"no object\(s\) \['text_encoder'\].*'ema', 'lr_scheduler', 'model'"):
        load_checkpoint(path, {"text_encoder": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"generator\(s\) \['noise'\]"):
        load_checkpoint(path, {}, generators={"noise": torch.Generator()})
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        load_checkpoint(path, {"model": run["objects"]["model"]})
    assert "ema" in caplog.text and "not restored" in caplog.text
    with pytest.raises(ValueError, match="cannot load 'model'"):
        load_checkpoint(path, {"model": nn.Linear(3, 3)})
    with pytest.raises(ValueError, match="object name"):
        save_checkpoint(tmp_path, 2, {"checkpoint": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="unwrap_model"):
        save_checkpoint(tmp_path, 2, {"model": nn.DataParallel(nn.Linear(2, 2))})

    # written by 2 processes, loaded by 1: raise by default, naming the fix
    manifest = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps({**manifest, "world_size": 2}))
    with pytest.raises(ValueError, match=r"2 process\(es\).*--num_processes 2.*strict_rng=False"):
        load_checkpoint(path, {})
    load_checkpoint(path, {}, strict_rng=False)

    # same size, flipped byte: complete-looking but corrupt
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt .* No other checkpoint in .* verifies; leave resume unset"):
        load_checkpoint(path, {"model": run["objects"]["model"]}, strict_rng=False)


def test_a_corrupt_latest_checkpoint_suggests_the_newest_that_verifies(tmp_path: Path) -> None:
    run = _make_run(0)
    for step in (1, 2, 3):
        _train(run, 1)
        save_checkpoint(tmp_path, step, run["objects"])
    step_2, step_3 = tmp_path / "step-000002", tmp_path / "step-000003"
    for path in (step_2, step_3):  # the same size, one byte changed: both still look complete
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == step_3
    message = f"is corrupt .* The newest checkpoint whose files verify is {tmp_path / 'step-000001'}: resume with"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(step_3, {"model": run["objects"]["model"]})


# --------------------------------------------------------------------------------------------------------------------
# accelerate


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_single_process_accelerator_works_the_same(tmp_path: Path, accelerator) -> None:
    seed_globals(0)
    run = _make_run(seed=0)
    objects = run["objects"]
    model, optimizer, lr_scheduler = accelerator.prepare(
        objects["model"], objects["optimizer"], objects["lr_scheduler"]
    )
    prepared = {"model": accelerator.unwrap_model(model), "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    _train({"objects": {**prepared, "ema": objects["ema"]}, "generators": run["generators"]}, 2)
    path = save_checkpoint(tmp_path, 2, {**prepared, "ema": objects["ema"]}, accelerator=accelerator, total_limit=1)
    assert path == tmp_path / "step-000002"
    assert json.loads((path / "checkpoint.json").read_text())["world_size"] == 1

    fresh = _make_run(seed=1)
    load_checkpoint(path, fresh["objects"], accelerator=accelerator)
    assert_same(objects["optimizer"].state_dict(), fresh["objects"]["optimizer"].state_dict())
    assert_same(objects["model"].state_dict(), fresh["objects"]["model"].state_dict())
    assert load_checkpoint(path, fresh["objects"]) == {}  # and without the accelerator: same single-process layout


_TWO_PROCESS_SCRIPT = """
import json, os, random, signal, sys, time
import numpy as np, torch
from accelerate import Accelerator
from training.checkpoint import load_checkpoint, save_checkpoint
from training.signals import StopSignal

out = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
torch.manual_seed(rank); np.random.seed(rank); random.seed(rank)
gen = torch.Generator().manual_seed(10 + rank)
model = torch.nn.Linear(3, 3)
path = save_checkpoint(out, 5, {"model": model}, generators={"data": gen}, accelerator=accelerator, total_limit=1)
expected = [torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random(), torch.rand(2, generator=gen).tolist()]
torch.manual_seed(99); np.random.seed(99); random.seed(99); gen.manual_seed(99)
load_checkpoint(path, {"model": torch.nn.Linear(3, 3)}, generators={"data": gen}, accelerator=accelerator)
got = [torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random(), torch.rand(2, generator=gen).tolist()]
with StopSignal() as stop:
    before = stop.any_requested(accelerator)
    if rank == 1:  # only one process is signalled; both must learn it, to stop (and checkpoint) at the same step
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    after = stop.any_requested(accelerator)
with open(f"{out}/result-{rank}.json", "w") as f:
    json.dump({"path": str(path), "same": expected == got, "draw": expected[0], "stop": [before, after]}, f)
accelerator.wait_for_everyone()
"""


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "two_processes.py"
    script.write_text(textwrap.dedent(_TWO_PROCESS_SCRIPT))
    out = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = [json.loads((out / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["same"] for r in results) and results[0]["draw"] != results[1]["draw"]
    assert [r["stop"] for r in results] == [[False, True], [False, True]]
    assert {r["path"] for r in results} == {str(out / "step-000005")}
    assert sorted(p.name for p in (out / "step-000005" / "rng").iterdir()) == [
        "rank-0.json",
        "rank-0.safetensors",
        "rank-1.json",
        "rank-1.safetensors",
    ]
    manifest = json.loads((out / "step-000005" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and "rng/rank-1.safetensors" in manifest["files"]
