"""eval.adherence reads colour, shape and position back from images it was not tuned on, scores only what a prompt
asks, and writes a JSON report and a grid of misses; the command runs on txt2img output and on an image folder."""

from __future__ import annotations

import colorsys
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from eval.adherence import adherence_prompts, analyze_image, main, misses_grid, score_images
from training.make_shapes_dataset import main as make_dataset_main
from training.shapes import ANCHORS, ATTRIBUTES, COLOURS, POSITIONS, SHAPES, ShapeSpec, parse_prompt, render

# A palette of CSS named colours, chosen here and nowhere else: the analyzer never saw these shades.
CSS_PALETTE = {
    "red": [(220, 20, 60), (178, 34, 34), (205, 92, 92), (200, 0, 0)],
    "orange": [(255, 140, 0), (255, 127, 40), (230, 120, 20), (210, 105, 30)],
    "yellow": [(255, 215, 0), (255, 255, 0), (240, 230, 60), (218, 200, 32)],
    "green": [(50, 205, 50), (34, 139, 34), (46, 139, 87), (124, 220, 0)],
    "blue": [(65, 105, 225), (30, 144, 255), (0, 0, 160), (70, 130, 180)],
    "purple": [(128, 0, 128), (148, 0, 211), (138, 43, 226), (186, 85, 211)],
}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """A CSS swatch of ``colour`` jittered in HSV (hue +-3 degrees, saturation and value +-0.08)."""
    r, g, b = CSS_PALETTE[colour][rng.integers(len(CSS_PALETTE[colour]))]
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    return _hsv(h + rng.uniform(-3, 3) / 360, s + rng.uniform(-0.08, 0.08), v + rng.uniform(-0.08, 0.08))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Mid greys, tinted light and tinted dark backgrounds: none of them the generator's near-greys."""
    kind = rng.integers(3)
    if kind == 0:
        return _hsv(0, 0, rng.uniform(0.35, 0.65))
    if kind == 1:
        return _hsv(rng.uniform(), rng.uniform(0.10, 0.25), rng.uniform(0.80, 0.97))
    return _hsv(rng.uniform(), rng.uniform(0.20, 0.45), rng.uniform(0.10, 0.30))


def _draw_independently(spec: ShapeSpec, size: int, equilateral: bool) -> Image.Image:
    """The test's own drawing: 2x supersampling and a box filter (the project renders at 4x with Lanczos)."""
    big = 2 * size
    canvas = Image.new("RGB", (big, big), spec.background)
    draw = ImageDraw.Draw(canvas)
    cx, cy, half = spec.centre[0] * big, spec.centre[1] * big, spec.size * big / 2
    if spec.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=spec.rgb)
    elif spec.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=spec.rgb)
    else:
        h = half * (3**0.5 / 2 if equilateral else 1.0)
        draw.polygon([(cx, cy - h), (cx + half, cy + h), (cx - half, cy + h)], fill=spec.rgb)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _held_out_scenes(n: int, seed: int) -> tuple[list[Image.Image], list[str], list[dict[str, str]]]:
    """Ground-truth renders drawn unlike the dataset: CSS shades, other backgrounds, sizes, jitter and renderers."""
    rng = np.random.default_rng(seed)
    images, prompts, truths = [], [], []
    for i in range(n):
        colour, shape, position = COLOURS[i % 6], SHAPES[(i // 6) % 3], POSITIONS[(i // 18) % 5]
        size = (32, 64, 96)[rng.integers(3)]
        extent = rng.uniform(0.27, 0.42)
        jitter = rng.uniform(-0.035, 0.035, size=2)
        centre = (ANCHORS[position][0] + jitter[0], ANCHORS[position][1] + jitter[1])
        spec = ShapeSpec(colour, shape, position, _shade(rng, colour), centre, extent, _background(rng))
        own = rng.random() < 0.5
        images.append(_draw_independently(spec, size, rng.random() < 0.5) if own else render(spec, size))
        prompts.append(f"a {colour} {shape} {position}")
        truths.append(spec.attributes())
    return images, prompts, truths


def test_analyzer_reads_held_out_renders_it_was_not_tuned_on():
    images, prompts, _ = _held_out_scenes(360, seed=20240917)
    report = score_images(images, prompts)
    accuracy, rate = report.part_accuracy(), report.all_correct_rate()
    misses = [(r.prompt, r.found, round(r.analysis.fill_ratio or 0, 3)) for r in report.misses()[:5]]
    message = f"all parts correct {rate:.3f}; per part {accuracy}; first misses {misses}"
    assert len(report.records) == 360 and rate >= 0.99, message
    assert all(value >= 0.99 for value in accuracy.values()), message


def test_blank_and_noisy_blank_images_have_no_object():
    rng = np.random.default_rng(0)
    noisy = np.clip(128 + rng.normal(0, 4, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    for image in (Image.new("RGB", (64, 64), (240, 240, 235)), Image.new("RGB", (32, 32), (20, 20, 60)), noisy):
        analysis = analyze_image(image)
        assert analysis.attributes() == {"colour": "none", "shape": "none", "position": "none"}
        assert not analysis.found and analysis.centre is None


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
    assert main(["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--images", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no prompted images" in capsys.readouterr().err
