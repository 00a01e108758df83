"""The shapes world: vocabulary, shades, captions and the prompt grammar, rendered geometry (measured from the pixels)
and the dataset command (deterministic, complete metadata, refuses to overwrite)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from shapes.make_dataset import main
from shapes.world import (
    ANCHORS,
    BASE_RGB,
    CAPTION_FORMS,
    CENTRE_JITTER,
    COLOURS,
    FORM_ATTRIBUTES,
    HUE_BANDS,
    POSITIONS,
    SHADE_HUES,
    SHAPES,
    SIZE_RANGE,
    ShapeSpec,
    caption_of,
    colour_of_hue,
    parse_prompt,
    render,
    rgb_to_hsv,
    sample_rgb,
    sample_spec,
)
from training.records import load_image_caption_records


def test_hue_bands_tile_the_circle_and_shades_stay_well_inside():
    for degree in range(360):
        named = colour_of_hue(degree + 0.5)
        low, high = HUE_BANDS[named]
        assert low <= degree + 0.5 < high or low <= degree + 0.5 - 360 < high
    for colour in COLOURS:
        low, high = SHADE_HUES[colour]
        band_low, band_high = HUE_BANDS[colour]
        assert band_low + 5 <= low < high <= band_high - 5, colour  # a margin from every neighbouring colour
        assert colour_of_hue(rgb_to_hsv(BASE_RGB[colour])[0]) == colour


def test_sampled_shades_vary_but_keep_their_colour():
    rng = np.random.default_rng(7)
    for colour in COLOURS:
        shades = {sample_rgb(rng, colour) for _ in range(200)}
        assert len(shades) > 150, colour  # the shade varies
        for rgb in shades:
            hue, saturation, value = rgb_to_hsv(rgb)
            assert colour_of_hue(hue) == colour and saturation >= 0.6 and value >= 0.7, (colour, rgb)


def test_caption_forms_and_parse_round_trip():
    spec = sample_spec(np.random.default_rng(0), colour="orange", shape="triangle", position="left")
    assert caption_of(spec) == "an orange triangle on the left"
    assert caption_of(spec, "colour_shape") == "an orange triangle"
    assert caption_of(spec, "shape_position") == "a triangle on the left"
    assert caption_of(spec, "colour_position") == "an orange shape on the left"
    rng = np.random.default_rng(1)
    for _ in range(100):
        spec = sample_spec(rng)
        for form in CAPTION_FORMS:
            parsed = parse_prompt(caption_of(spec, form))
            assert parsed == {part: getattr(spec, part) for part in FORM_ATTRIBUTES[form]}, (spec, form)
    with pytest.raises(ValueError, match="caption form must be one of"):
        caption_of(spec, "short")


def test_parse_prompt_reads_weights_synonyms_and_refuses_two_objects():
    assert parse_prompt("A (RED:1.3) disc in the centre") == {"colour": "red", "shape": "circle", "position": "center"}
    assert parse_prompt("a violet square at the TOP, high quality") == {
        "colour": "purple",
        "shape": "square",
        "position": "top",
    }
    assert parse_prompt("a bright shape") == {}  # "bright" holds "right" but is not the word
    assert parse_prompt("a photo of a cat") == {}
    with pytest.raises(ValueError, match="names two colours"):
        parse_prompt("a red circle and a blue square")


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="colour must be one of"):
        ShapeSpec("pink", "circle", "left", (1, 2, 3), (0.3, 0.5), 0.3, (0, 0, 0))
    with pytest.raises(ValueError, match="must fit in the image"):
        ShapeSpec("red", "circle", "left", (200, 0, 0), (0.1, 0.5), 0.3, (0, 0, 0))
    with pytest.raises(ValueError, match="three integers"):
        ShapeSpec("red", "circle", "left", (300, 0, 0), (0.3, 0.5), 0.3, (0, 0, 0))


def _measured_box(image: Image.Image) -> tuple[float, float, float, float]:
    """(centre x, centre y, width, height) as fractions, from the pixels unlike the corner pixel's colour."""
    pixels = np.asarray(image, dtype=np.float64)
    distance = np.linalg.norm(pixels - pixels[0, 0], axis=-1)
    ys, xs = np.nonzero(distance > distance.max() / 2)
    side = image.width
    return (
        (xs.min() + xs.max() + 1) / 2 / side,
        (ys.min() + ys.max() + 1) / 2 / side,
        (xs.max() - xs.min() + 1) / side,
        (ys.max() - ys.min() + 1) / side,
    )


def test_rendered_objects_sit_at_their_anchor_with_the_specified_size():
    rng = np.random.default_rng(3)
    size, pixel = 96, 1.0 / 96
    seen = set()
    for _ in range(150):
        spec = sample_spec(rng)
        seen.add((spec.shape, spec.position))
        image = render(spec, size)
        assert image.size == (size, size) and image.mode == "RGB"
        cx, cy, w, h = _measured_box(image)
        ax, ay = ANCHORS[spec.position]
        assert abs(cx - ax) <= CENTRE_JITTER + pixel and abs(cy - ay) <= CENTRE_JITTER + pixel, (spec, cx, cy)
        for extent in (w, h):
            assert SIZE_RANGE[0] - 1.5 * pixel <= extent <= SIZE_RANGE[1] + 1.5 * pixel, (spec, w, h)
        # Anti-aliased: edge pixels take values between the background and the object colour.
        values = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
        assert len(values) > 10
    assert len(seen) == len(SHAPES) * len(POSITIONS)


def _run(args: list[str]) -> int:
    return main([*args, "--no-progress"])


def test_dataset_is_deterministic_complete_and_readable_by_the_trainer(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--n", "24", "--size", "32", "--short-caption-fraction", "0.5"]
    assert _run(["--out", str(a), "--seed", "0", *common]) == 0
    assert capsys.readouterr().out.strip() == str(a)
    assert _run(["--out", str(b), "--seed", "0", *common]) == 0
    assert _run(["--out", str(c), "--seed", "1", *common, "--split-name", "test"]) == 0

    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 25
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    images_a = [(a / f"train-{i:06d}.png").read_bytes() for i in range(24)]
    images_c = [(c / f"test-{i:06d}.png").read_bytes() for i in range(24)]
    assert not set(images_a) & set(images_c)  # another seed, other renders

    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    forms = set()
    for row in rows:
        assert {"file_name", "text", "colour", "shape", "position", "caption_form", "split"} <= set(row)
        assert row["colour"] in COLOURS and row["shape"] in SHAPES and row["position"] in POSITIONS
        assert row["split"] == "train" and (a / row["file_name"]).is_file()
        asked = parse_prompt(row["text"])
        assert asked == {part: row[part] for part in FORM_ATTRIBUTES[row["caption_form"]]}
        forms.add(row["caption_form"])
        with Image.open(a / row["file_name"]) as image:
            assert image.size == (32, 32)
    assert "full" in forms and len(forms) >= 3  # half the captions are partial, in several forms
    assert [json.loads(line)["split"] for line in (c / "metadata.jsonl").read_text().splitlines()] == ["test"] * 24

    records = load_image_caption_records(str(a))
    assert len(records) == 24 and records[0].captions == (rows[0]["text"],)


def test_caption_fraction_extremes_and_a_prefix_that_does_not_depend_on_n(tmp_path):
    full, short, longer = tmp_path / "full", tmp_path / "short", tmp_path / "longer"
    assert _run(["--out", str(full), "--n", "10", "--size", "16", "--short-caption-fraction", "0"]) == 0
    assert _run(["--out", str(short), "--n", "10", "--size", "16", "--short-caption-fraction", "1"]) == 0
    assert _run(["--out", str(longer), "--n", "12", "--size", "16", "--short-caption-fraction", "0"]) == 0
    forms = [json.loads(line)["caption_form"] for line in (full / "metadata.jsonl").read_text().splitlines()]
    assert forms == ["full"] * 10
    forms = [json.loads(line)["caption_form"] for line in (short / "metadata.jsonl").read_text().splitlines()]
    assert "full" not in forms
    for i in range(10):
        name = f"train-{i:06d}.png"
        assert (full / name).read_bytes() == (longer / name).read_bytes()


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "train-999999.png").write_bytes(b"stale")
    assert _run(["--out", str(out), "--n", "3", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err
    assert not (out / "metadata.jsonl").exists()
    assert _run(["--out", str(out), "--n", "3", "--size", "16", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "train-999999.png").exists()
    assert len(list(out.glob("*.png"))) == 3


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert _run(["--out", str(tmp_path / "x"), "--n", "0"]) == 2
    assert "--n: must be in [1," in capsys.readouterr().err
    assert _run(["--out", str(tmp_path / "x"), "--n", "2", "--short-caption-fraction", "1.5"]) == 2
    assert "must be in [0.0, 1.0]" in capsys.readouterr().err
    assert _run(["--out", str(tmp_path / "x"), "--n", "2", "--split-name", "a/b"]) == 2
    assert "split must be letters" in capsys.readouterr().err
