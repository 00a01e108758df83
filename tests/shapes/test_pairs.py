"""Two-object scenes of the shapes world: captions and their parser, the layout rules measured from the pixels, the
held-out pairings, and the dataset command's two-object rows."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from shapes.make_dataset import main, make_dataset
from shapes.pairs import (
    MIN_PAIR_DISTANCE,
    PAIR_SIZE_RANGE,
    RELATION_PHRASES,
    RELATIONS,
    ObjectSpec,
    PairSpec,
    canonical_pair,
    is_held_out,
    pair_caption,
    parse_pair_prompt,
    relation_of,
    sample_pair,
)
from shapes.world import COLOURS, SHAPES, parse_prompt, render
from training.records import load_image_caption_records


def test_pair_caption_is_the_issue_grammar_and_parses_back():
    for (c1, s1), relation, (c2, s2) in [
        (("red", "circle"), "left_of", ("blue", "square")),
        (("green", "triangle"), "above", ("orange", "triangle")),
        (("orange", "square"), "below", ("purple", "circle")),
        (("yellow", "circle"), "right_of", ("red", "triangle")),
    ]:
        attributes = {
            "first": {"colour": c1, "shape": s1},
            "relation": relation,
            "second": {"colour": c2, "shape": s2},
        }
        caption = pair_caption(attributes)
        article = "an" if c2 == "orange" else "a"
        assert (
            caption == f"{'an' if c1 == 'orange' else 'a'} {c1} {s1} {RELATION_PHRASES[relation]} {article} {c2} {s2}"
        )
        assert parse_pair_prompt(caption) == attributes
    assert pair_caption(sample_pair(np.random.default_rng(0), ("red", "circle"), "above", ("blue", "square"))) == (
        "a red circle above a blue square"
    )


def test_pair_parser_reads_synonyms_and_weights_and_refuses_what_it_cannot_read():
    assert parse_pair_prompt("A (violet:1.2) disc left of a green SQUARE") == {
        "first": {"colour": "purple", "shape": "circle"},
        "relation": "left_of",
        "second": {"colour": "green", "shape": "square"},
    }
    assert parse_pair_prompt("a red shape beneath a triangle") == {
        "first": {"colour": "red"},
        "relation": "below",
        "second": {"shape": "triangle"},
    }
    assert parse_pair_prompt("a red circle on the left") is None  # one object: no relation
    with pytest.raises(ValueError, match="2 relations"):
        parse_pair_prompt("a red circle above a blue square below a green circle")
    with pytest.raises(ValueError, match="two colours for one object"):
        parse_pair_prompt("a red blue circle above a green square")
    with pytest.raises(ValueError, match="names two colours"):
        parse_prompt("a red circle to the left of a blue square")  # the one-object grammar refuses two objects


def test_is_held_out_is_a_purple_object_together_with_a_triangle():
    assert is_held_out(("purple", "red"), ("circle", "triangle"))
    assert is_held_out(("red", "purple"), ("triangle", "square"))
    assert is_held_out(("purple", "red"), ("triangle", "circle"))  # a purple triangle beside anything
    assert not is_held_out(("purple", "red"), ("circle", "square"))
    assert not is_held_out(("red", "blue"), ("triangle", "triangle"))
    held = [
        (c1, s1, c2, s2)
        for (c1, s1), (c2, s2) in itertools.product(itertools.product(COLOURS, SHAPES), repeat=2)
        if c1 != c2 and is_held_out((c1, c2), (s1, s2))
    ]
    # Ordered pairs with a purple object: 2 orders x 3 purple shapes x 15 others; those with no triangle: 2 x 2 x 10.
    assert len(held) == 2 * 3 * 15 - 2 * 2 * 10


def _object_mask(spec: PairSpec, which: str, size: int) -> np.ndarray:
    """The pixels covered by one object alone: it rendered over the plain background."""
    obj = getattr(spec, which)
    other = spec.second if which == "first" else spec.first
    alone = PairSpec(
        first=obj
        if which == "first"
        else ObjectSpec(other.colour, other.shape, spec.background, other.centre, other.size),
        relation=spec.relation,
        second=obj
        if which == "second"
        else ObjectSpec(other.colour, other.shape, spec.background, other.centre, other.size),
        background=spec.background,
    )
    pixels = np.asarray(render(alone, size)).astype(int)
    return np.abs(pixels - np.array(spec.background)).sum(axis=-1) > 30


def test_sampled_layouts_keep_the_rules_measured_from_the_pixels():
    rng = np.random.default_rng(11)
    size = 128
    relations = set()
    for _ in range(120):
        spec = sample_pair(rng)
        relations.add(spec.relation)
        assert spec.first.colour != spec.second.colour
        assert not is_held_out((spec.first.colour, spec.second.colour), (spec.first.shape, spec.second.shape))
        masks = [_object_mask(spec, which, size) for which in ("first", "second")]
        assert not (masks[0] & masks[1]).any()  # no overlap
        centres = []
        for mask in masks:
            ys, xs = np.nonzero(mask)
            extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / size
            assert PAIR_SIZE_RANGE[0] - 0.02 <= extent <= PAIR_SIZE_RANGE[1] + 0.02
            centres.append(((xs.min() + xs.max() + 1) / 2 / size, (ys.min() + ys.max() + 1) / 2 / size))
        assert relation_of(*centres) == spec.relation  # what the pixels show is what the caption says
        axis = 0 if spec.relation in ("left_of", "right_of") else 1
        along = abs(centres[1][axis] - centres[0][axis])
        assert along >= MIN_PAIR_DISTANCE - 0.02 and along > abs(centres[1][1 - axis] - centres[0][1 - axis])
    assert relations == set(RELATIONS)


def test_sample_pair_keeps_what_is_fixed_and_draws_the_pairings_asked():
    rng = np.random.default_rng(3)
    spec = sample_pair(rng, ("red", None), "below", (None, "square"))
    assert (spec.first.colour, spec.relation, spec.second.shape) == ("red", "below", "square")
    for _ in range(50):
        held = sample_pair(rng, held_out=True)
        assert is_held_out((held.first.colour, held.second.colour), (held.first.shape, held.second.shape))
    with pytest.raises(ValueError, match="cannot form a held-out pairing"):
        sample_pair(rng, ("red", "circle"), None, ("blue", "square"), held_out=True)
    with pytest.raises(ValueError, match="cannot form a seen pairing"):
        sample_pair(rng, ("purple", "circle"), None, ("blue", "triangle"))
    with pytest.raises(ValueError, match="differ in colour"):
        sample_pair(rng, ("red", None), None, ("red", None))


def test_pair_spec_validation_names_the_problem():
    red = ObjectSpec("red", "circle", (215, 40, 40), (0.25, 0.5), 0.25)
    with pytest.raises(ValueError, match="differ in colour"):
        PairSpec(red, "left_of", ObjectSpec("red", "square", (215, 40, 40), (0.75, 0.5), 0.25), (225, 225, 220))
    blue_near = ObjectSpec("blue", "square", (40, 90, 220), (0.5, 0.5), 0.25)
    with pytest.raises(ValueError, match="unambiguously"):
        PairSpec(red, "left_of", blue_near, (225, 225, 220))  # only 0.25 apart
    blue_diagonal = ObjectSpec("blue", "square", (40, 90, 220), (0.7, 0.85), 0.25)
    with pytest.raises(ValueError, match="farther apart along it than across it"):
        PairSpec(ObjectSpec("red", "circle", (215, 40, 40), (0.3, 0.3), 0.25), "left_of", blue_diagonal, (0, 0, 0))
    with pytest.raises(ValueError, match="relation must be one of"):
        PairSpec(red, "near", blue_near, (225, 225, 220))


def test_canonical_pair_draws_the_relation_it_names():
    for relation in RELATIONS:
        pixels = np.asarray(canonical_pair(("red", "circle"), relation, ("blue", "square"), size=64)).astype(int)
        red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
        blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
        centres = [(np.nonzero(m)[1].mean() / 64, np.nonzero(m)[0].mean() / 64) for m in (red, blue)]
        assert relation_of(*centres) == relation


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_dataset_mixes_two_object_scenes_and_leaves_the_held_out_pairings_out(tmp_path):
    make_dataset(tmp_path / "one", n=24, seed=4, progress=False)
    make_dataset(tmp_path / "zero", n=24, seed=4, progress=False, two_object_fraction=0.0)
    assert _rows(tmp_path / "one") == _rows(tmp_path / "zero")  # fraction 0 is the one-object dataset exactly
    assert (tmp_path / "one" / "train-000005.png").read_bytes() == (
        tmp_path / "zero" / "train-000005.png"
    ).read_bytes()

    make_dataset(tmp_path / "mixed", n=400, seed=4, progress=False, two_object_fraction=0.5)
    rows = _rows(tmp_path / "mixed")
    pairs = [r for r in rows if r.get("objects") == 2]
    assert 150 <= len(pairs) <= 250
    assert not any(r["held_out"] for r in pairs)
    for row in pairs:
        assert parse_pair_prompt(row["text"]) == {
            "first": {"colour": row["first"]["colour"], "shape": row["first"]["shape"]},
            "relation": row["relation"],
            "second": {"colour": row["second"]["colour"], "shape": row["second"]["shape"]},
        }
        colours = (row["first"]["colour"], row["second"]["colour"])
        shapes = (row["first"]["shape"], row["second"]["shape"])
        assert not ("purple" in colours and "triangle" in shapes)
    # The first samples do not depend on n, and the one-object rows keep their form.
    make_dataset(tmp_path / "prefix", n=10, seed=4, progress=False, two_object_fraction=0.5)
    assert _rows(tmp_path / "prefix") == rows[:10]
    records = load_image_caption_records(str(tmp_path / "mixed"))
    assert len(records) == 400

    assert main(["--out", str(tmp_path / "held"), "--n", "40", "--seed", "5", "--two-object-fraction", "1",
                 "--held-out", "only", "--no-progress"]) == 0  # fmt: skip
    held = _rows(tmp_path / "held")
    assert all(r["objects"] == 2 and r["held_out"] for r in held)


def test_bad_two_object_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "a"), "--n", "4", "--two-object-fraction", "1.5"]) == 2
    assert "--two-object-fraction" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "b"), "--n", "4", "--held-out", "some"]) == 2
    assert "--held-out" in capsys.readouterr().err


def test_every_object_and_one_object_position_word_has_its_box(tmp_path):
    make_dataset(tmp_path / "data", n=60, seed=3, progress=False, two_object_fraction=0.5, short_caption_fraction=0.5)
    for row in _rows(tmp_path / "data"):
        phrases = [region["phrase"] for region in row["regions"]]
        assert all(phrase in row["text"] for phrase in phrases)
        if row.get("objects") == 2:
            assert phrases == [f"{row[k]['colour']} {row[k]['shape']}" for k in ("first", "second")]
            continue
        named_position = row["caption_form"] in ("full", "shape_position", "colour_position")
        assert phrases[1:] == ([row["position"]] if named_position else [])
        (x, y), half = row["centre"], row["size"] / 2
        for region in row["regions"]:  # the position word's box is the object's
            assert region["box"] == pytest.approx([x - half, y - half, x + half, y + half], abs=1e-5)
