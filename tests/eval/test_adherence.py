"""eval.adherence scores only what a prompt asks and writes a JSON report and a grid of misses; the command runs on
txt2img output and on an image folder (the analyzer itself: tests/shapes/test_analysis.py). Two-object prompts are
scored on count, colour, shape and relation, and reported apart from one-object ones, held-out pairings apart."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from eval.adherence import adherence_prompts, attribute_prompt, main, misses_grid, score_images
from shapes.make_dataset import main as make_dataset_main
from shapes.pairs import RELATIONS, canonical_pair, is_held_out, pair_caption, parse_pair_prompt, sample_pair
from shapes.world import ANCHORS, ATTRIBUTES, BASE_RGB, ShapeSpec, parse_prompt, render


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


# ---------------------------------------------------------------------------------------------------------------
# Two-object prompts


def test_pair_prompts_score_count_colour_shape_and_relation():
    image = canonical_pair(("red", "circle"), "left_of", ("blue", "square"))
    alone = render(ShapeSpec("red", "circle", "left", BASE_RGB["red"], (0.27, 0.5), 0.26, (225, 225, 220)), 64)
    report = score_images(
        [image, image, image, image, alone, image],
        [
            "a red circle to the left of a blue square",
            "a blue circle to the left of a red square",  # colours swapped
            "a red circle to the right of a blue square",  # relation flipped
            "a red square to the left of a blue circle",  # shapes swapped
            "a red circle to the left of a blue square",  # one object removed
            "a circle left of a blue shape",  # partial: the first colour and the second shape are not asked
        ],
    )
    right, colours, relation, shapes, removed, partial = report.records
    assert right.all_correct and right.matched == {"count": True, "colour": True, "shape": True, "relation": True}
    assert right.found == {
        "count": 2,
        "first": {"colour": "red", "shape": "circle"},
        "relation": "left_of",
        "second": {"colour": "blue", "shape": "square"},
    }
    assert colours.matched == {"count": True, "colour": False, "shape": True, "relation": True}
    assert relation.matched == {"count": True, "colour": True, "shape": True, "relation": False}
    assert shapes.matched == {"count": True, "colour": True, "shape": False, "relation": True}
    assert removed.matched == {"count": False, "colour": False, "shape": False, "relation": False}
    assert removed.found["count"] == 1 and removed.found["second"] == {} and removed.found["relation"] == "none"
    assert partial.all_correct and partial.matched == {"count": True, "colour": True, "shape": True, "relation": True}
    assert not any(r.held_out for r in report.records) and {r.objects for r in report.records} == {2}
    summary = report.summary()
    seen = summary["two_object_seen"]
    assert seen["images"] == 6 and seen["all_correct_rate"] == pytest.approx(2 / 6)
    assert seen["part_accuracy"] == pytest.approx({"count": 5 / 6, "colour": 4 / 6, "shape": 4 / 6, "relation": 4 / 6})
    assert summary["one_object"]["images"] == 0 and summary["two_object_held_out"]["images"] == 0


def test_one_object_and_held_out_pairings_are_reported_apart(tmp_path):
    single = _scene("red", "circle", "left")
    held = canonical_pair(("purple", "circle"), "above", ("green", "triangle"))
    seen = canonical_pair(("orange", "square"), "right_of", ("yellow", "circle"))
    images = [single, single, held, held, seen]
    prompts = [
        "a red circle on the left",
        "a blue circle on the left",
        "a purple circle above a green triangle",
        "a purple circle below a green triangle",
        "an orange square to the right of a yellow circle",
    ]
    report = score_images(images, prompts)
    assert [r.group for r in report.records] == [
        "one_object",
        "one_object",
        "two_object_held_out",
        "two_object_held_out",
        "two_object_seen",
    ]
    summary = json.loads(report.write_json(tmp_path / "a.json").read_text())["summary"]
    assert summary["images"] == 5 and summary["all_correct_rate"] == pytest.approx(3 / 5)
    assert summary["one_object"]["all_correct_rate"] == 0.5
    assert summary["one_object"]["part_accuracy"] == {"colour": 0.5, "shape": 1.0, "position": 1.0}
    assert summary["two_object_held_out"]["images"] == 2 and summary["two_object_held_out"]["all_correct_rate"] == 0.5
    assert summary["two_object_held_out"]["part_accuracy"]["relation"] == 0.5
    assert summary["two_object_seen"]["all_correct_rate"] == 1.0
    assert summary["part_counts"]["colour"] == {"asked": 5, "correct": 4}  # both kinds count towards colour
    assert summary["part_counts"]["relation"] == {"asked": 3, "correct": 2}

    grid = misses_grid(report, images, columns=2, cell=160)
    assert grid.size == (2 * 160, 160 + 52)  # a two-object miss takes four label lines
    strip = np.asarray(grid)[160 + 28 :, 160:]  # the red "got" lines of the pair miss
    assert ((strip[..., 0] > 150) & (strip[..., 1] < 80)).any()


def test_pair_renders_score_fully_right_when_softened():
    """Ground-truth pair renders, blurred (sigma 0.7 px) and noisy (std 4) like generated images, scored end to end
    (seeds the reader was not tuned on)."""
    images, prompts = [], []
    for i in range(150):
        rng = np.random.default_rng([314, i])
        spec = sample_pair(rng, background=("light", "dark")[i % 2], held_out=None)
        pixels = ndimage.gaussian_filter(np.asarray(render(spec, 64), dtype=np.float64), sigma=(0.7, 0.7, 0))
        images.append(np.clip(np.round(pixels + rng.normal(0.0, 4.0, pixels.shape)), 0, 255).astype(np.uint8))
        prompts.append(pair_caption(spec))
    report = score_images(images, prompts)
    assert report.all_correct_rate() >= 0.98, [r.to_dict()["found"] for r in report.misses()[:5]]


def _held_out(parsed: dict) -> bool:
    first, second = parsed["first"], parsed["second"]
    return is_held_out((first["colour"], second["colour"]), (first["shape"], second["shape"]))


def test_pair_prompts_are_balanced_deterministic_and_respect_the_pairings():
    prompts = adherence_prompts(80, seed=1, objects=2, pairings="seen")
    assert prompts == adherence_prompts(80, seed=1, objects=2, pairings="seen")
    assert prompts != adherence_prompts(80, seed=2, objects=2, pairings="seen")
    parsed = [parse_pair_prompt(p) for p in prompts]
    assert Counter(p["relation"] for p in parsed) == dict.fromkeys(RELATIONS, 20)
    assert all(p["first"]["colour"] != p["second"]["colour"] for p in parsed)
    pairs = [
        ((p["first"]["colour"], p["second"]["colour"]), (p["first"]["shape"], p["second"]["shape"])) for p in parsed
    ]
    assert not any(is_held_out(*pair) for pair in pairs) and len(set(prompts)) == 80
    held = [parse_pair_prompt(p) for p in adherence_prompts(40, seed=0, objects=2, pairings="held_out")]
    assert all(
        is_held_out((p["first"]["colour"], p["second"]["colour"]), (p["first"]["shape"], p["second"]["shape"]))
        for p in held
    )
    everything = adherence_prompts(1080, seed=0, objects=2)  # 6 x 5 colours, 3 x 3 shapes, 4 relations
    assert len(set(everything)) == 1080
    with pytest.raises(ValueError, match="apply to two-object prompts"):
        adherence_prompts(4, seed=0, pairings="seen")
    with pytest.raises(ValueError, match="one form"):
        adherence_prompts(4, seed=0, form="colour_shape", objects=2)


def test_cli_writes_pair_prompts_and_scores_a_two_object_dataset(tmp_path, capsys):
    path = tmp_path / "pairs.txt"
    argv = ["--write-prompts", str(path), "--objects", "2", "--pairings", "held_out", "--num-prompts", "8"]
    assert main([*argv, "--seed", "3"]) == 0
    assert path.read_text().splitlines() == adherence_prompts(8, seed=3, objects=2, pairings="held_out")
    assert main(["--write-prompts", str(path), "--pairings", "seen"]) == 2
    assert "apply to two-object prompts" in capsys.readouterr().err

    data = tmp_path / "data"
    argv = ["--out", str(data), "--n", "40", "--seed", "9", "--two-object-fraction", "0.6", "--held-out", "include"]
    assert make_dataset_main([*argv, "--no-progress"]) == 0
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        if row.get("objects") == 2:
            assert attribute_prompt(row) == row["text"]
    out = tmp_path / "results"
    assert main(["--images", str(data), "--out", str(out), "--use-attributes"]) == 0
    summary = json.loads((out / "adherence.json").read_text())["summary"]
    pairs = sum(row.get("objects") == 2 for row in rows)
    held = sum(bool(row.get("held_out")) for row in rows)
    assert summary["images"] == 40 and summary["all_correct_rate"] == 1.0
    assert summary["two_object_seen"]["images"] + summary["two_object_held_out"]["images"] == pairs
    assert summary["two_object_held_out"]["images"] == held and summary["one_object"]["images"] == 40 - pairs
    with pytest.raises(ValueError, match="first.shape"):
        attribute_prompt({"objects": 2, "first": {"colour": "red"}, "relation": "above", "second": rows[0]})
    capsys.readouterr()
