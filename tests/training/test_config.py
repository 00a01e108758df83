"""Typed training configs: flags and config files with the same names, precedence, and errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from ldm.errors import UserError
from training.command import run_command
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
    config = parse(
        [
            "--learning-rate",
            "3e-4",
            "--steps",
            "5",
            "--mode",
            "v",
            "--gamma",
            "5",
            "--flip",
            "--prompts",
            "a red circle",
            "a blue square",
        ]
    )
    assert config == Example(3e-4, 5, "v", 5.0, True, ["a red circle", "a blue square"])
    assert parse(["--gamma", "none"]).gamma is None


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "learning-rate: 0.001\nsteps: 7\nmode: v\nflip: true\nprompts: [a, b]\n"),
        (".toml", 'learning_rate = 0.001\nsteps = 7\nmode = "v"\nflip = true\nprompts = ["a", "b"]\n'),
        (".json", '{"learning_rate": 0.001, "steps": 7, "mode": "v", "flip": true, "prompts": ["a", "b"]}'),
    ],
)
def test_config_files_use_the_flag_names_and_flags_win(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert read_config_file(path)["prompts"] == ["a", "b"]
    config = parse(["--config", str(path), "--steps", "9"])
    assert config == Example(1e-3, 9, "v", None, True, ["a", "b"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"learning_rat": 1}, "unknown key 'learning_rat'.*did you mean 'learning_rate'"),
        ({"mode": "x0"}, "mode must be one of 'eps', 'v'; got 'x0'"),
        ({"steps": 2.5}, "steps must be an int"),
        ({"steps": "many"}, "steps must be an int; got 'many'"),
        ({"flip": "maybe"}, "flip must be true or false"),
        ({"learning_rate": None}, "learning_rate must be a float; got null"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Example, data)


def run(argv: list[str], train=lambda config: Path("out")) -> int:
    return run_command(Example, train, argv, "example", "An example command.")


def test_command_line_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    assert run(["--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown key 'stepz'" in err and "bad.yaml" in err
    assert run(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("steps: [3\n")
    assert run(["--config", str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file") and "is not valid YAML" in err and err.strip().count("\n") == 0
    assert run(["--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: steps must be >= 1; got 0\n"
    assert run(["--steps", "3"]) == 0
    assert capsys.readouterr().out == "out\n"


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_a_config_file_not_in_utf8_is_one_line_naming_the_line_and_the_fix(tmp_path, capsys, suffix):
    text = {".yaml": "steps: 3\nprompts: [café]\n", ".json": '{"steps": 3,\n"prompts": ["café"]}', ".toml": ""}
    text[".toml"] = 'steps = 3\nprompts = ["café"]\n'
    (tmp_path / f"latin1{suffix}").write_bytes(text[suffix].encode("latin-1"))
    assert run(["--config", str(tmp_path / f"latin1{suffix}")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {tmp_path / 'latin1'}{suffix}, line 2: byte 0xe9 is not UTF-8")
    assert "save it as UTF-8" in err and err.strip().count("\n") == 0


def test_commands_report_user_errors_in_one_line_and_keep_other_tracebacks(capsys):
    def bad_input(config: Example) -> Path:
        raise UserError("the dataset folder is empty;\n pass one with images")

    def library_bug(config: Example) -> Path:
        raise ValueError("a bug inside a library")

    assert run([], bad_input) == 2
    assert capsys.readouterr().err == "error: the dataset folder is empty; pass one with images\n"
    with pytest.raises(ValueError, match="a bug inside a library"):
        run([], library_bug)
    assert issubclass(ConfigError, UserError)
