"""Typed training configs: flags and config files with the same names, precedence, and errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from training.config import ConfigError, from_dict, help_field, parse_config, read_config_file


@dataclass
class Example:
    learning_rate: float = help_field(1e-4, "lr")
    steps: int = help_field(10, "steps")
    mode: Literal["eps", "v"] = help_field("eps", "target")
    gamma: float | None = help_field(None, "min-SNR gamma")
    flip: bool = help_field(False, "flip")
    prompts: list[str] = help_field([], "prompts")

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1; got {self.steps}")


def parse(argv: list[str]) -> Example:
    return parse_config(Example, argv, prog="test", description="test")


def test_defaults_and_flags():
    assert parse([]) == Example()
    config = parse(["--learning-rate", "3e-4", "--steps", "5", "--mode", "v", "--gamma", "5", "--flip",
                    "--prompts", "a red circle", "a blue square"])  # fmt: skip
    assert config == Example(3e-4, 5, "v", 5.0, True, ["a red circle", "a blue square"])
    assert parse(["--gamma", "none"]).gamma is None


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "learning-rate: 0.001\nsteps: 7\nmode: v\nflip: true\nprompts: [a, b]\n"),
    (".toml", 'learning_rate = 0.001\nsteps = 7\nmode = "v"\nflip = true\nprompts = ["a", "b"]\n'),
    (".json", '{"learning_rate": 0.001, "steps": 7, "mode": "v", "flip": true, "prompts": ["a", "b"]}'),
])  # fmt: skip
def test_config_files_use_the_flag_names_and_flags_win(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert read_config_file(path)["prompts"] == ["a", "b"]
    config = parse(["--config", str(path), "--steps", "9"])
    assert config == Example(1e-3, 9, "v", None, True, ["a", "b"])


@pytest.mark.parametrize("data, message", [
    ({"learning_rat": 1}, "unknown key 'learning_rat'.*did you mean 'learning_rate'"),
    ({"mode": "x0"}, "mode must be one of 'eps', 'v'; got 'x0'"),
    ({"steps": 2.5}, "steps must be an int"),
    ({"steps": "many"}, "steps must be an int; got 'many'"),
    ({"flip": "maybe"}, "flip must be true or false"),
    ({"learning_rate": None}, "learning_rate must be a float; got null"),
    ({"steps": 0}, "steps must be >= 1"),
])  # fmt: skip
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Example, data)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--config", str(tmp_path / "bad.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown key 'stepz'" in err and "bad.yaml" in err
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "missing.yaml")])
    assert "does not exist" in capsys.readouterr().err
