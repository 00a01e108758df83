"""eval.adherence scores only what a prompt asks and writes a JSON report and a grid of misses; the command runs on
txt2img output and on an image folder (the analyzer itself: tests/shapes/test_analysis.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from eval.adherence import adherence_prompts, main, misses_grid, score_images
from shapes.make_dataset import main as make_dataset_main
from shapes.world import ANCHORS, ATTRIBUTES, ShapeSpec, parse_prompt, render


def _scene(colour: str, shape: str, position: str, size: int = 64) -> Image.Image:
    rgb = {"red": (210, 30, 30), "blue": (30, 60, 210), "green": (40, 170, 60)}[colour]
    spec = ShapeSpec(colour, shape, position, rgb, ANCHORS[position], 0.35, (235, 235, 235))
    return render(spec, size)


def test_partial_prompts_count_only_the_asked_parts_and_wrong_prompts_miss():
    image = _scene("red", "circle", "left")
    report = score_images(
        [image] * 4,
        ["a red circle", "a circle on the left", "a blue circle on the left", "a red shape at the top"],
    )
    right_partial, right_other, wrong_colour, wrong_position = report.records
    assert right_partial.asked == {"colour": "red", "shape": "circle"} and right_partial.all_correct
    assert set(right_partial.matched) == {"colour", "shape"}  # the position is not scored
    assert right_other.all_correct
    assert wrong_colour.matched == {"colour": False, "shape": True, "position": True} and not wrong_colour.all_correct
    assert wrong_position.matched == {"colour": True, "position": False}
    assert report.part_counts() == {
        "colour": {"asked": 3, "correct": 2},
        "shape": {"asked": 3, "correct": 3},
        "position": {"asked": 3, "correct": 2},
    }
    assert report.all_correct_rate() == 0.5
    assert report.part_accuracy()["colour"] == pytest.approx(2 / 3)
    only_colour = score_images([image], ["a red shape on the left"])
    assert only_colour.part_accuracy()["shape"] is None  # never asked


def test_prompts_outside_the_grammar_are_skipped_and_listed():
    image = _scene("green", "square", "right")
    report = score_images([image, image, image], ["a photo of a cat", "a red and a blue circle", "a green square"])
    assert len(report.records) == 1 and report.records[0].all_correct
    assert [s["prompt"] for s in report.skipped] == ["a photo of a cat", "a red and a blue circle"]
    assert report.summary()["skipped"] == 2
    with pytest.raises(ValueError, match="one prompt per image"):
        score_images([image], [])


def test_json_and_misses_grid_are_written_and_load_back(tmp_path):
    images = [_scene("red", "circle", "left"), _scene("blue", "square", "top"), Image.new("RGB", (64, 64))]
    report = score_images(images, ["a red circle on the left", "a red square at the top", "a green triangle"])
    path = report.write_json(tmp_path / "deep" / "adherence.json")
    loaded = json.loads(path.read_text())
    assert loaded["summary"]["images"] == 3 and loaded["summary"]["misses"] == 2
    assert loaded["summary"]["no_object"] == 1 and loaded["summary"]["all_correct_rate"] == pytest.approx(1 / 3)
    record = loaded["records"][1]
    assert record["found"] == {"colour": "blue", "shape": "square", "position": "top"}
    assert record["matched"] == {"colour": False, "shape": True, "position": True}
    assert 0.95 < record["diagnostics"]["fill_ratio"] <= 1.0
    assert loaded["records"][2]["found"]["shape"] == "none"

    grid = misses_grid(report, images, columns=4, cell=120)
    grid.save(tmp_path / "misses.png")
    with Image.open(tmp_path / "misses.png") as reloaded:
        assert reloaded.size == (2 * 120, 120 + 28)  # two misses in one row, each with its label strip
        cells = np.asarray(reloaded.convert("RGB"))
    assert (cells[120:, :, 0] > 150).any() and (cells[120:, :, 1] < 80).any()  # the red "got" label is drawn
    assert misses_grid(score_images(images[:1], ["a red circle"]), images[:1]).size[0] > 0  # no misses


def test_adherence_prompts_are_balanced_deterministic_and_parse_back():
    prompts = adherence_prompts(90, seed=1)
    assert prompts == adherence_prompts(90, seed=1) and prompts != adherence_prompts(90, seed=2)
    combos = Counter(tuple(parse_prompt(p)[a] for a in ATTRIBUTES) for p in prompts)
    assert len(combos) == 90 and set(combos.values()) == {1}  # every combination once
    assert len(adherence_prompts(200, seed=0)) == 200
    short = adherence_prompts(18, seed=0, form="colour_shape")
    assert all(set(parse_prompt(p)) == {"colour", "shape"} for p in short) and len(set(short)) == 18


def test_cli_scores_a_folder_of_txt2img_pngs(tmp_path, capsys, caplog):
    folder = tmp_path / "samples"
    folder.mkdir()
    scenes = [
        (("red", "circle", "left"), "a red circle on the left"),
        (("blue", "square", "top"), "a (blue:1.2) square at the top"),
        (("green", "triangle", "center"), "a green triangle in the center"),
        (("green", "circle", "bottom"), "a blue circle at the bottom"),  # the miss
    ]
    for i, (attributes, prompt) in enumerate(scenes):
        info = PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("seed", str(i))
        _scene(*attributes).save(folder / f"{i:05d}-{i}-x.png", pnginfo=info)
    _scene("red", "circle", "left").save(folder / "no-prompt.png")  # skipped with a warning

    out = tmp_path / "results"
    assert main(["--images", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "adherence.json"), str(out / "misses.png")]
    summary = json.loads((out / "adherence.json").read_text())["summary"]
    assert summary["images"] == 4 and summary["misses"] == 1
    assert summary["part_accuracy"] == {"colour": 0.75, "shape": 1.0, "position": 1.0}
    with Image.open(out / "misses.png") as grid:
        assert grid.width > 0
    assert "no-prompt.png" in caplog.text


def test_cli_scores_a_generated_dataset_against_its_attributes(tmp_path, capsys):
    data = tmp_path / "data"
    argv = ["--out", str(data), "--n", "40", "--size", "48", "--seed", "5", "--short-caption-fraction", "0.5"]
    assert make_dataset_main([*argv, "--no-progress"]) == 0
    for extra in ([], ["--use-attributes"]):
        out = tmp_path / f"results{len(extra)}"
        assert main(["--images", str(data / "metadata.jsonl"), "--out", str(out), *extra]) == 0
        summary = json.loads((out / "adherence.json").read_text())["summary"]
        assert summary["images"] == 40 and summary["all_correct_rate"] == 1.0
    counts = summary["part_counts"]
    assert all(counts[part]["asked"] == 40 for part in ATTRIBUTES)  # every part scored with --use-attributes
    capsys.readouterr()


def test_cli_writes_prompts_and_rejects_bad_input(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    assert main(["--write-prompts", str(path), "--num-prompts", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert path.read_text().splitlines() == adherence_prompts(12, seed=3)
    none = tmp_path / "none.txt"
    assert main(["--write-prompts", str(none), "--num-prompts", "0"]) == 2
    assert "--num-prompts must be at least 1; got 0" in capsys.readouterr().err and not none.exists()
    assert main(["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--images", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no prompted images" in capsys.readouterr().err
