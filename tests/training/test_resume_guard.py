"""``--resume`` refuses a checkpoint written with another batch size, accumulation, data, model or method, naming
the field and both values, unless ``--resume-allow-changes``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ldm.errors import UserError
from tests.training.test_train_text_to_image import config
from training.resume_guard import resume_changes
from training.train_text_to_image import train


@pytest.fixture
def stopped_run(tiny_sd_dir, shapes_dir, tmp_path) -> Path:
    """A run stopped after its first checkpoint (step 1 of 2), on a copy of the shapes data."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    train(config(tiny_sd_dir, str(data), tmp_path / "run", max_train_steps=1, checkpointing_steps=1))
    return tmp_path


def resume(tiny_sd_dir: str, root: Path, **overrides):
    settings = dict(max_train_steps=2, checkpointing_steps=1, resume="latest") | overrides
    return train(config(tiny_sd_dir, str(root / "data"), root / "run", **settings))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_batch_size": 2}, "train_batch_size: 4 in the checkpoint, 2 now"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: 1 in the checkpoint, 2 now"),
        ({"lora_rank": 4}, "lora_rank: None in the checkpoint, 4 now"),
    ],
)
def test_a_changed_setting_is_refused_with_both_values(tiny_sd_dir, stopped_run, overrides, message):
    with pytest.raises(UserError, match="pass --resume-allow-changes") as raised:
        resume(tiny_sd_dir, stopped_run, **overrides)
    assert message in str(raised.value)
    assert sorted(p.name for p in (stopped_run / "run" / "checkpoints").iterdir()) == ["step-000001"]


def test_changed_data_is_refused_and_allowed_when_asked(tiny_sd_dir, stopped_run, caplog):
    metadata = stopped_run / "data" / "metadata.jsonl"
    lines = [json.loads(line) for line in metadata.read_text().splitlines()]
    lines[0]["text"] = "a different caption"
    metadata.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(UserError, match=r"fingerprint\.data: '[0-9a-f]{64}' in the checkpoint, '[0-9a-f]{64}' now"):
        resume(tiny_sd_dir, stopped_run)
    final = resume(tiny_sd_dir, stopped_run, resume_allow_changes=True)
    assert final.name == "pipeline" and "resuming from" in caplog.text and "fingerprint.data" in caplog.text


def test_the_same_settings_resume_and_old_checkpoints_without_a_field_are_not_held_against_it():
    saved = {"config": {"train_batch_size": 4}, "fingerprint": {}}
    current = {"config": {"train_batch_size": 4, "lora_rank": 8}, "fingerprint": {"data": "abc"}}
    assert resume_changes(saved, current, ["train_batch_size", "lora_rank", "fingerprint.data"]) == []
    assert resume_changes(saved, {"config": {"train_batch_size": 2}}, ["train_batch_size"]) == [
        ("train_batch_size", 4, 2)
    ]
