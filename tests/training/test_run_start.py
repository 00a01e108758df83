"""What a run checks before any work: one run per output folder (training.run_lock), an output folder it can
write, and pickle weights only with --allow-pickle."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from ldm.errors import UserError
from training.run_lock import LOCK_NAME, acquire_output_lock, release_output_lock
from training.train_text_to_image import main


def write_lock(folder, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": time.time()}
    (folder / LOCK_NAME).write_text(json.dumps(holder))


def test_a_live_holder_is_refused_a_dead_one_taken_over(tmp_path, caplog):
    live = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, live.pid)
        with pytest.raises(UserError, match=rf"another run \(pid {live.pid} on .*\) is writing to --output-dir"):
            acquire_output_lock(tmp_path)
    finally:
        live.kill()
        live.wait()
    # the same pid is now gone: its lock is stale
    with caplog.at_level(logging.WARNING, logger="training.run_lock"):
        path = acquire_output_lock(tmp_path)
    assert f"taking over the stale lock of pid {live.pid}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert acquire_output_lock(tmp_path) == path  # re-entrant within a process
    release_output_lock(tmp_path)
    assert not path.exists()


def test_a_lock_from_another_host_names_it_and_how_to_clear_it(tmp_path):
    write_lock(tmp_path, 1, host="other-machine")
    message = r"locked by a run on another machine \(pid 1 on other-machine.*remove .*\.lock"
    with pytest.raises(UserError, match=message):
        acquire_output_lock(tmp_path)
    release_output_lock(tmp_path)  # not ours: left alone
    assert (tmp_path / LOCK_NAME).exists()


def test_a_second_run_into_a_busy_output_dir_is_one_line_before_any_work(tiny_sd_dir, shapes_dir, tmp_path, capsys):
    live = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path / "run", live.pid)
        argv = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, "--output-dir", str(tmp_path / "run")]
        assert main([*argv, "--resolution", "64", "--max-train-steps", "1", "--report-to", "none"]) == 2
    finally:
        live.kill()
        live.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"error: another run (pid {live.pid}") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written


def test_an_output_dir_that_cannot_be_written_is_refused_at_the_start(tiny_sd_dir, shapes_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    for out, message in [
        (tmp_path / "a-file", "is a file, not a folder"),
        (tmp_path / "a-file" / "run", "is not writable"),
    ]:
        argv = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, "--output-dir", str(out)]
        assert main([*argv, "--max-train-steps", "1", "--report-to", "none"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output-dir {out} ") and message in err and err.count("\n") == 1


def test_pickle_weights_need_allow_pickle_to_fine_tune(tiny_sd_dir, shapes_dir, tmp_path, capsys):
    import shutil

    import safetensors.torch
    import torch

    model = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, model)
    unet_weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(safetensors.torch.load_file(unet_weights), unet_weights.with_suffix(".bin"))
    unet_weights.unlink()
    argv = ["--pretrained-model", str(model), "--dataset", shapes_dir, "--output-dir", str(tmp_path / "run")]
    argv += ["--resolution", "64", "--max-train-steps", "1", "--report-to", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --pretrained-model {model} has pickle weights (unet): loading them can run code")
    assert "pass --allow-pickle if you trust the files" in err and not (tmp_path / "run" / "checkpoints").exists()
    assert main([*argv, "--allow-pickle"]) == 0
    assert (tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_model(
    tiny_sd_dir, shapes_dir, tmp_path, capsys, monkeypatch, kind
):
    import errno

    from safetensors import SafetensorError

    import training.train_text_to_image as trainer

    def full(*args, **kwargs):
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No sp" })')

    monkeypatch.setattr(trainer, "write_model_card", full)
    run = tmp_path / "run"
    argv = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, "--output-dir", str(run), "--resolution", "64"]
    assert main([*argv, "--max-train-steps", "2", "--checkpointing-steps", "2", "--report-to", "none"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars of loading and training
    assert err.startswith(f"error: the disk of --output-dir {run} is full (")
    assert "a checkpoint needs about" in err and "rerun with --resume latest" in err
    assert not (run / "pipeline").exists() and (run / "checkpoints" / "step-000002").is_dir()
