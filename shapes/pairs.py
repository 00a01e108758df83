"""Two-object scenes of the shapes world (:mod:`shapes.world`): layout, captions, held-out pairings, the grammar.

A two-object scene (:class:`PairSpec`) holds two smaller objects (:data:`PAIR_SIZE_RANGE`) of different colours
in one of four relations (:data:`RELATION_PHRASES`), captioned ``a {colour} {shape} {relation} a {colour} {shape}``
(:func:`pair_caption`)::

    a red circle to the left of a blue square
    a green triangle above an orange triangle

The layout makes the relation unambiguous: the centres are at least :data:`MIN_PAIR_DISTANCE` of the side apart
along the relation's axis and farther apart along it than across it, so the boxes never overlap.
:func:`is_held_out` tells the pairings the training data leaves out (a purple object together with a triangle,
:data:`HELD_OUT_PAIRING`), and :func:`parse_pair_prompt` reads a two-object prompt back.
Everything here is deterministic: random draws take a ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from shapes.world import (
    BASE_RGB,
    COLOUR_WORDS,
    COLOURS,
    RGB,
    SHAPE_WORDS,
    SHAPES,
    WORD,
    check_choice,
    check_fits,
    check_rgb,
    render,
    sample_background,
    sample_rgb,
)

Relation = Literal["left_of", "right_of", "above", "below"]
RELATIONS: tuple[str, ...] = get_args(Relation)
RELATION_PHRASES: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
# Per relation: the axis it is read along (0: x, 1: y down) and the sign of (second - first) along it.
RELATION_AXES: dict[str, tuple[int, int]] = {"left_of": (0, 1), "right_of": (0, -1), "above": (1, 1), "below": (1, -1)}
PAIR_SIZE_RANGE = (0.20, 0.30)
MIN_PAIR_DISTANCE = 0.35  # along the relation's axis, between the two centres, as a fraction of the side
PAIR_CROSS_RANGE = (0.25, 0.75)  # where a centre lies across the relation's axis
PAIR_CROSS_SHARE = 0.7  # drawn scenes keep the centres' distance across the axis within this share of the along
# Two-object scenes with a purple object and a triangle together are never in the training data (either order,
# so no purple triangle beside anything either); evaluation reports them apart, as pairings the model never saw.
HELD_OUT_PAIRING = ("purple", "triangle")


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a two-object scene: a ``colour`` ``shape`` drawn in ``rgb``, its bounding box a square of side
    ``size`` centred at ``centre`` (fractions of the image side, ``y`` down)."""

    colour: str
    shape: str
    rgb: RGB
    centre: tuple[float, float]
    size: float

    def __post_init__(self) -> None:
        check_choice("colour", self.colour, COLOURS)
        check_choice("shape", self.shape, SHAPES)
        check_rgb("rgb", self.rgb)
        check_fits(self.centre, self.size)


@dataclass(frozen=True)
class PairSpec:
    """A two-object scene: ``first`` ``relation`` ``second`` (e.g. a red circle to the left of a blue square) on a
    plain ``background``. The colours differ; the layout must make the relation unambiguous (see
    :func:`relation_holds`)."""

    first: ObjectSpec
    relation: str
    second: ObjectSpec
    background: RGB

    def __post_init__(self) -> None:
        check_choice("relation", self.relation, RELATIONS)
        check_rgb("background", self.background)
        if self.first.colour == self.second.colour:
            raise ValueError(f"the two objects must differ in colour; both are {self.first.colour}")
        if not relation_holds(self.first.centre, self.second.centre, self.relation):
            raise ValueError(
                f"centres {self.first.centre} and {self.second.centre} do not put the first object "
                f"{RELATION_PHRASES[self.relation]} the second unambiguously: they must be at least "
                f"{MIN_PAIR_DISTANCE} apart along the relation's axis and farther apart along it than across it"
            )

    @property
    def objects(self) -> tuple[ObjectSpec, ObjectSpec]:
        """The objects :func:`shapes.world.render` draws: both."""
        return (self.first, self.second)

    def attributes(self) -> dict[str, Any]:
        """``{"first": {"colour", "shape"}, "relation": ..., "second": {"colour", "shape"}}``."""
        return {
            "first": {"colour": self.first.colour, "shape": self.first.shape},
            "relation": self.relation,
            "second": {"colour": self.second.colour, "shape": self.second.shape},
        }


def relation_of(first: tuple[float, float], second: tuple[float, float]) -> str:
    """The relation the centres ``first`` and ``second`` show: along the axis where they are farther apart."""
    dx, dy = second[0] - first[0], second[1] - first[1]
    if abs(dx) >= abs(dy):
        return "left_of" if dx > 0 else "right_of"
    return "above" if dy > 0 else "below"


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    """Whether the centres put ``first`` ``relation`` ``second`` as the data draws it: at least
    :data:`MIN_PAIR_DISTANCE` apart along the relation's axis, in its direction, and farther apart along it than
    across it."""
    axis, sign = RELATION_AXES[relation]
    along = sign * (second[axis] - first[axis])
    across = abs(second[1 - axis] - first[1 - axis])
    return along >= MIN_PAIR_DISTANCE and along > across


def is_held_out(colours: tuple[str, str], shapes: tuple[str, str]) -> bool:
    """Whether two objects of ``colours`` and ``shapes`` form a pairing the training data leaves out: one of them
    purple and one of them (the same or the other) a triangle (:data:`HELD_OUT_PAIRING`)."""
    colour, shape = HELD_OUT_PAIRING
    return colour in colours and shape in shapes


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def pair_caption(spec: PairSpec | dict[str, Any]) -> str:
    """``a {colour} {shape} {relation} a {colour} {shape}`` of a :class:`PairSpec` or of its
    :meth:`PairSpec.attributes` ("an orange ..." takes "an")."""
    attributes = spec.attributes() if isinstance(spec, PairSpec) else spec
    first, second, relation = attributes["first"], attributes["second"], attributes["relation"]
    check_choice("relation", relation, RELATIONS)
    for obj in (first, second):
        check_choice("colour", obj["colour"], COLOURS)
        check_choice("shape", obj["shape"], SHAPES)
    return " ".join(
        [
            _article(first["colour"]),
            first["colour"],
            first["shape"],
            RELATION_PHRASES[relation],
            _article(second["colour"]),
            second["colour"],
            second["shape"],
        ]
    )


def _pair_centres(
    rng: np.random.Generator, relation: str, sizes: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    axis, sign = RELATION_AXES[relation]
    # Along the axis: the object that comes first in reading order (left or top) is "low", the other "high".
    low_size, high_size = sizes if sign > 0 else sizes[::-1]
    room = 1.0 - (low_size + high_size) / 2.0  # the largest distance that keeps both inside
    while True:
        distance = rng.uniform(MIN_PAIR_DISTANCE, room)
        low = rng.uniform(low_size / 2.0, 1.0 - high_size / 2.0 - distance)
        across = rng.uniform(*PAIR_CROSS_RANGE, size=2)
        if abs(across[1] - across[0]) <= PAIR_CROSS_SHARE * distance:
            break
    first_along, second_along = (low, low + distance) if sign > 0 else (low + distance, low)
    first = [0.0, 0.0]
    second = [0.0, 0.0]
    first[axis], second[axis] = first_along, second_along
    first[1 - axis], second[1 - axis] = float(across[0]), float(across[1])
    return (first[0], first[1]), (second[0], second[1])


def sample_pair(
    rng: np.random.Generator,
    first: tuple[str | None, str | None] = (None, None),
    relation: str | None = None,
    second: tuple[str | None, str | None] = (None, None),
    background: str | None = None,
    held_out: bool | None = False,
) -> PairSpec:
    """A random two-object scene; ``first`` and ``second`` are ``(colour, shape)`` with None for a random draw.

    ``held_out``: False draws only pairings the training data may hold (not :func:`is_held_out`), True only
    held-out ones, None either. Random attributes are redrawn until the pairing is of the kind asked; fixed ones
    that cannot be raise ``ValueError``.
    """
    if relation is not None:
        check_choice("relation", relation, RELATIONS)
    for _ in range(1000):
        colour1 = first[0] if first[0] is not None else str(rng.choice(COLOURS))
        colour2 = second[0] if second[0] is not None else str(rng.choice([c for c in COLOURS if c != colour1]))
        shape1 = first[1] if first[1] is not None else str(rng.choice(SHAPES))
        shape2 = second[1] if second[1] is not None else str(rng.choice(SHAPES))
        if colour1 == colour2:
            raise ValueError(f"the two objects must differ in colour; both are {colour1}")
        if held_out is None or is_held_out((colour1, colour2), (shape1, shape2)) == held_out:
            break
    else:
        kind = "a held-out" if held_out else "a seen"
        raise ValueError(f"{first} and {second} cannot form {kind} pairing ({HELD_OUT_PAIRING} together)")
    chosen = str(relation if relation is not None else rng.choice(RELATIONS))
    sizes = (float(rng.uniform(*PAIR_SIZE_RANGE)), float(rng.uniform(*PAIR_SIZE_RANGE)))
    centre1, centre2 = _pair_centres(rng, chosen, sizes)
    return PairSpec(
        first=ObjectSpec(colour1, shape1, sample_rgb(rng, colour1), centre1, sizes[0]),
        relation=chosen,
        second=ObjectSpec(colour2, shape2, sample_rgb(rng, colour2), centre2, sizes[1]),
        background=sample_background(rng, background),
    )


def canonical_pair(
    first: tuple[str, str], relation: str, second: tuple[str, str], size: int = 64, first_only: bool = False
) -> Image.Image:
    """The two-object scene with no random draw: base RGBs, 0.26 of the side each, centred across the axis and
    0.46 apart along it (at 0.27 and 0.73), on a light grey. For examples and editing tests; ``first_only`` draws
    the first object alone where the pair puts it (a scene to paint the second one into)."""
    axis, sign = RELATION_AXES[relation]
    near, far = (0.27, 0.73) if sign > 0 else (0.73, 0.27)
    centre1, centre2 = [0.5, 0.5], [0.5, 0.5]
    centre1[axis], centre2[axis] = near, far
    background = (225, 225, 220)
    spec = PairSpec(
        first=ObjectSpec(first[0], first[1], BASE_RGB[first[0]], (centre1[0], centre1[1]), 0.26),
        relation=relation,
        second=ObjectSpec(second[0], second[1], BASE_RGB[second[0]], (centre2[0], centre2[1]), 0.26),
        background=background,
    )
    if first_only:  # the second object drawn in the background's colour: not there
        spec = replace(spec, second=replace(spec.second, rgb=background))
    return render(spec, size)


_RELATION_WORDS: dict[tuple[str, ...], str] = {
    **{tuple(phrase.split()): name for name, phrase in RELATION_PHRASES.items()},
    ("left", "of"): "left_of",
    ("right", "of"): "right_of",
    ("on", "top", "of"): "above",
    ("under",): "below",
    ("beneath",): "below",
}


def parse_pair_prompt(text: str) -> dict[str, Any] | None:
    """The two objects and the relation a two-object prompt names, as :meth:`PairSpec.attributes` gives them
    (each object's ``colour`` and ``shape`` only where named), or None when ``text`` names no relation.

    Reads ``... {relation} ...`` with one relation phrase (``to the left of``, ``to the right of``, ``above``,
    ``below``, also ``left of``, ``right of``, ``on top of``, ``under``, ``beneath``) and each object's colour and
    shape words on either side of it (synonyms as :func:`parse_prompt`; prompt weights are read through). A side
    naming two colours or two shapes, or a prompt with two relation phrases, raises ``ValueError``.
    """
    words = WORD.findall(text.lower())
    found: list[tuple[int, int, str]] = []
    for start in range(len(words)):
        for phrase, name in _RELATION_WORDS.items():
            if tuple(words[start : start + len(phrase)]) == phrase:
                found.append((start, start + len(phrase), name))
    # A longer phrase contains a shorter one ("to the left of" holds "left of"): keep the outermost.
    found = [f for f in found if not any(o != f and o[0] <= f[0] and f[1] <= o[1] for o in found)]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(
            f"prompt {text!r} names {len(found)} relations; the grammar has one: 'a red circle above a blue square'"
        )
    start, end, relation = found[0]
    sides = []
    for side in (words[:start], words[end:]):
        obj: dict[str, str] = {}
        for word in side:
            for attribute, table in (("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS)):
                value = table.get(word)
                if value is not None and obj.setdefault(attribute, value) != value:
                    raise ValueError(
                        f"prompt {text!r} names two {attribute}s for one object ({obj[attribute]} and {value})"
                    )
        sides.append(obj)
    return {"first": sides[0], "relation": relation, "second": sides[1]}
