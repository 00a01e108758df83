"""The synthetic "shapes" world: its vocabulary, random scenes, captions, a renderer and the prompt grammar.

A scene is one coloured shape on a plain background, described by a :class:`ShapeSpec`:

- colour: ``red``, ``orange``, ``yellow``, ``green``, ``blue``, ``purple``. Each has a base RGB
  (:data:`BASE_RGB`) and a hue band where a hue is called that colour (:data:`HUE_BANDS`, which tile the hue
  circle); a sample varies the shade in HSV: hue in a narrower band well inside the colour's (:data:`SHADE_HUES`,
  so a shade never crosses into a neighbouring colour), saturation and value in :data:`SATURATION_RANGE` and
  :data:`VALUE_RANGE`;
- shape: ``circle``, ``square`` (axis-aligned) or ``triangle`` (isosceles, pointing up, base = height); the
  bounding box is a square of side ``size`` (a fraction of the image side, in :data:`SIZE_RANGE`);
- position: ``left``, ``right``, ``top``, ``bottom``, ``center`` — the bounding-box centre lies within
  :data:`CENTRE_JITTER` of the position's anchor (:data:`ANCHORS`, ``(x, y)`` fractions, ``y`` down);
- background: a plain light or dark near-grey (saturation at most 0.08 light, 0.2 dark), never near an object
  colour.

Captions (:func:`caption_of`) come in four forms (:data:`CAPTION_FORMS`)::

    full              a red circle on the left
    colour_shape      a red circle
    shape_position    a circle on the left
    colour_position   a red shape on the left

("an orange ..." takes "an").
A partial form says nothing about the missing attribute, which the scene still has (drawn at random).
:func:`parse_prompt` reads the attributes a prompt names back, for scoring prompt adherence (``eval.adherence``).

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

import colorsys
import re
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

Colour = Literal["red", "orange", "yellow", "green", "blue", "purple"]
ShapeName = Literal["circle", "square", "triangle"]
Position = Literal["left", "right", "top", "bottom", "center"]
CaptionForm = Literal["full", "colour_shape", "shape_position", "colour_position"]
Attribute = Literal["colour", "shape", "position"]
Relation = Literal["left_of", "right_of", "above", "below"]
BackgroundKind = Literal["light", "dark"]
RGB = tuple[int, int, int]

COLOURS: tuple[str, ...] = get_args(Colour)
SHAPES: tuple[str, ...] = get_args(ShapeName)
POSITIONS: tuple[str, ...] = get_args(Position)
CAPTION_FORMS: tuple[str, ...] = get_args(CaptionForm)
PARTIAL_FORMS: tuple[str, ...] = CAPTION_FORMS[1:]
ATTRIBUTES: tuple[str, ...] = get_args(Attribute)
RELATIONS: tuple[str, ...] = get_args(Relation)

BASE_RGB: dict[str, RGB] = {
    "red": (215, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (240, 210, 40),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 200),
}
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
FORM_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "full": ("colour", "shape", "position"),
    "colour_shape": ("colour", "shape"),
    "shape_position": ("shape", "position"),
    "colour_position": ("colour", "position"),
}
# Hue bands in degrees, [low, high): where a hue is named this colour (they tile the circle; red wraps through 0).
HUE_BANDS: dict[str, tuple[float, float]] = {
    "red": (-15.0, 12.0),
    "orange": (12.0, 42.0),
    "yellow": (42.0, 70.0),
    "green": (70.0, 170.0),
    "blue": (170.0, 255.0),
    "purple": (255.0, 345.0),
}
# The hues a sampled shade takes: well inside each naming band, so no shade is near a neighbouring colour.
SHADE_HUES: dict[str, tuple[float, float]] = {
    "red": (-6.0, 6.0),
    "orange": (22.0, 34.0),
    "yellow": (47.0, 58.0),
    "green": (105.0, 150.0),
    "blue": (205.0, 235.0),
    "purple": (265.0, 292.0),
}
SIZE_RANGE = (0.30, 0.40)
CENTRE_JITTER = 0.03
SATURATION_RANGE = (0.70, 0.92)
VALUE_RANGE = (0.78, 0.95)
BACKGROUNDS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # kind: ((saturation range), (value range)), any hue
    "light": ((0.0, 0.08), (0.85, 0.97)),
    "dark": ((0.0, 0.20), (0.07, 0.20)),
}
SUPERSAMPLE = 4

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

# Words of the prompt grammar, with a few synonyms; a position is read from its key word ("left", "top", ...).
_COLOUR_WORDS = {**{name: name for name in COLOURS}, "violet": "purple"}
_SHAPE_WORDS = {**{name: name for name in SHAPES}, "disc": "circle", "disk": "circle"}
_POSITION_WORDS = {**{name: name for name in POSITIONS}, "centre": "center", "middle": "center"}
_WORD = re.compile(r"[a-z]+")


def rgb_to_hsv(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """``(hue in degrees [0, 360), saturation [0, 1], value [0, 1])`` of an RGB colour with channels in 0..255."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))
    return h * 360.0, s, v


def hsv_to_rgb(hue: float, saturation: float, value: float) -> RGB:
    """The 8-bit RGB colour of ``hue`` (degrees, any real number) and ``saturation``, ``value`` in [0, 1]."""
    r, g, b = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def colour_of_hue(hue: float) -> str:
    """The named colour whose :data:`HUE_BANDS` band holds ``hue`` (degrees, any real number)."""
    hue = hue % 360.0
    for name, (low, high) in HUE_BANDS.items():
        if low <= hue < high or low <= hue - 360.0 < high:
            return name
    raise AssertionError(f"HUE_BANDS must tile the hue circle; {hue} is in no band")  # unreachable


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)}; got {value!r}")


def _check_rgb(field: str, rgb: tuple[int, ...]) -> None:
    if len(rgb) != 3 or not all(isinstance(c, int | np.integer) and 0 <= c <= 255 for c in rgb):
        raise ValueError(f"{field} must be three integers in 0..255; got {rgb!r}")


@dataclass(frozen=True)
class ShapeSpec:
    """One scene: a ``colour`` ``shape`` at ``position``, drawn in ``rgb`` on a plain ``background``.

    ``centre`` is the bounding-box centre as ``(x, y)`` fractions of the image side (``y`` down) and ``size`` the
    side of the (square) bounding box as a fraction of the image side. ``rgb`` should be a shade of ``colour``
    (:func:`sample_rgb`); the renderer draws whatever it is given.
    """

    colour: str
    shape: str
    position: str
    rgb: RGB
    centre: tuple[float, float]
    size: float
    background: RGB

    def __post_init__(self) -> None:
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("position", self.position, POSITIONS)
        _check_rgb("rgb", self.rgb)
        _check_rgb("background", self.background)
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"size is a fraction of the image side, in (0, 1]; got {self.size}")
        half = self.size / 2.0
        if not all(half <= c <= 1.0 - half for c in self.centre):
            raise ValueError(
                f"the shape must fit in the image: centre {self.centre} with size {self.size} puts part of it "
                "outside [0, 1]; move the centre inwards or shrink the size"
            )

    def attributes(self) -> dict[str, str]:
        """``{"colour": ..., "shape": ..., "position": ...}``."""
        return {"colour": self.colour, "shape": self.shape, "position": self.position}


def sample_rgb(rng: np.random.Generator, colour: str) -> RGB:
    """A random shade of ``colour``: hue in its :data:`SHADE_HUES` band, saturation and value in their ranges."""
    _check_choice("colour", colour, COLOURS)
    low, high = SHADE_HUES[colour]
    return hsv_to_rgb(rng.uniform(low, high), rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE))


def sample_background(rng: np.random.Generator, kind: str | None = None) -> RGB:
    """A random plain background of ``kind`` (``light`` or ``dark``; random when None), a near-grey of any hue."""
    if kind is None:
        kind = str(rng.choice(list(BACKGROUNDS)))
    _check_choice("background kind", kind, tuple(BACKGROUNDS))
    saturation, value = BACKGROUNDS[kind]
    return hsv_to_rgb(rng.uniform(0.0, 360.0), rng.uniform(*saturation), rng.uniform(*value))


def sample_spec(
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    position: str | None = None,
    background: str | None = None,
) -> ShapeSpec:
    """A random scene; the attributes given are kept, the others drawn uniformly (``background``: a kind)."""
    colour = colour if colour is not None else str(rng.choice(COLOURS))
    shape = shape if shape is not None else str(rng.choice(SHAPES))
    position = position if position is not None else str(rng.choice(POSITIONS))
    _check_choice("position", position, POSITIONS)  # before the anchor lookup, for a clear message
    anchor_x, anchor_y = ANCHORS[position]
    centre = (
        anchor_x + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
        anchor_y + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
    )
    return ShapeSpec(
        colour=colour,
        shape=shape,
        position=position,
        rgb=sample_rgb(rng, colour),
        centre=centre,
        size=float(rng.uniform(*SIZE_RANGE)),
        background=sample_background(rng, background),
    )


def caption_of(spec: ShapeSpec, form: str = "full") -> str:
    """The caption of ``spec`` in ``form`` (one of :data:`CAPTION_FORMS`), e.g. ``"a red circle on the left"``."""
    _check_choice("caption form", form, CAPTION_FORMS)
    return caption_from_attributes({name: getattr(spec, name) for name in FORM_ATTRIBUTES[form]})


def caption_from_attributes(attributes: dict[str, str]) -> str:
    """The caption naming exactly ``attributes`` (a non-empty subset of colour, shape, position).

    A missing shape reads ``shape`` (``"a red shape on the left"``); a lone colour or position is not a form of
    the grammar and is refused.
    """
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown or not attributes:
        raise ValueError(f"attributes must be a non-empty subset of {', '.join(ATTRIBUTES)}; got {sorted(attributes)}")
    if "shape" not in attributes and len(attributes) < 2:
        raise ValueError(f"a caption needs a shape, or a colour and a position; got only {sorted(attributes)}")
    words = []
    if "colour" in attributes:
        _check_choice("colour", attributes["colour"], COLOURS)
        words.append(attributes["colour"])
    shape = attributes.get("shape", "shape")
    if shape != "shape":
        _check_choice("shape", shape, SHAPES)
    words.append(shape)
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    if "position" in attributes:
        _check_choice("position", attributes["position"], POSITIONS)
        words.append(POSITION_PHRASES[attributes["position"]])
    return " ".join(words)


def canonical_scene(colour: str, shape: str, position: str, size: int = 64) -> Image.Image:
    """The scene with no random draw: the colour's base RGB at the position's anchor, 0.36 of the side, on a light
    grey (fixed inputs for examples and editing tests)."""
    spec = ShapeSpec(
        colour=colour,
        shape=shape,
        position=position,
        rgb=BASE_RGB[colour],
        centre=ANCHORS[position],
        size=0.36,
        background=(225, 225, 220),
    )
    return render(spec, size)


def render(spec: ShapeSpec | PairSpec, size: int = 64) -> Image.Image:
    """Draw ``spec`` (one object or two) as a ``size`` x ``size`` RGB image, anti-aliased (drawn at 4x,
    downsampled with Lanczos)."""
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels for a recognisable shape; got {size}")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), tuple(spec.background))
    draw = ImageDraw.Draw(canvas)
    objects = (spec.first, spec.second) if isinstance(spec, PairSpec) else (spec,)
    for obj in objects:
        cx, cy = obj.centre[0] * big, obj.centre[1] * big
        half = obj.size * big / 2.0
        # Pixel i covers [i, i + 1); PIL's boxes include their far edge, hence the - 1.
        x0, y0 = round(cx - half), round(cy - half)
        x1, y1 = round(cx + half) - 1, round(cy + half) - 1
        fill = tuple(obj.rgb)
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2.0, y0), (x1, y1), (x0, y1)], fill=fill)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes ``text`` names, as ``{"colour": ..., "shape": ..., "position": ...}`` (only those named).

    Reads the words of the grammar anywhere in the text, case-insensitively, including inside prompt weights
    (``"a (red:1.3) circle"``), plus the synonyms ``violet``, ``disc``/``disk``, ``centre``/``middle``. ``"a red
    shape"`` names no shape. A prompt naming two different values of one attribute describes more than one object,
    which the grammar does not cover, and raises ``ValueError``.
    """
    found: dict[str, str] = {}
    for word in _WORD.findall(text.lower()):
        for attribute, words in (("colour", _COLOUR_WORDS), ("shape", _SHAPE_WORDS), ("position", _POSITION_WORDS)):
            value = words.get(word)
            if value is None:
                continue
            if found.setdefault(attribute, value) != value:
                raise ValueError(
                    f"prompt {text!r} names two {attribute}s ({found[attribute]} and {value}); the shapes grammar "
                    "describes one object: 'a {colour} {shape} {position}'"
                )
    return found


# ---------------------------------------------------------------------------------------------------------------
# Two-object scenes


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
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("shape", self.shape, SHAPES)
        _check_rgb("rgb", self.rgb)
        _check_fits(self.centre, self.size)


def _check_fits(centre: tuple[float, float], size: float) -> None:
    if not 0.0 < size <= 1.0:
        raise ValueError(f"size is a fraction of the image side, in (0, 1]; got {size}")
    half = size / 2.0
    if not all(half <= c <= 1.0 - half for c in centre):
        raise ValueError(
            f"the shape must fit in the image: centre {centre} with size {size} puts part of it "
            "outside [0, 1]; move the centre inwards or shrink the size"
        )


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
        _check_choice("relation", self.relation, RELATIONS)
        _check_rgb("background", self.background)
        if self.first.colour == self.second.colour:
            raise ValueError(f"the two objects must differ in colour; both are {self.first.colour}")
        if not relation_holds(self.first.centre, self.second.centre, self.relation):
            raise ValueError(
                f"centres {self.first.centre} and {self.second.centre} do not put the first object "
                f"{RELATION_PHRASES[self.relation]} the second unambiguously: they must be at least "
                f"{MIN_PAIR_DISTANCE} apart along the relation's axis and farther apart along it than across it"
            )

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
    _check_choice("relation", relation, RELATIONS)
    for obj in (first, second):
        _check_choice("colour", obj["colour"], COLOURS)
        _check_choice("shape", obj["shape"], SHAPES)
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
        _check_choice("relation", relation, RELATIONS)
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
    words = _WORD.findall(text.lower())
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
            for attribute, table in (("colour", _COLOUR_WORDS), ("shape", _SHAPE_WORDS)):
                value = table.get(word)
                if value is not None and obj.setdefault(attribute, value) != value:
                    raise ValueError(
                        f"prompt {text!r} names two {attribute}s for one object ({obj[attribute]} and {value})"
                    )
        sides.append(obj)
    return {"first": sides[0], "relation": relation, "second": sides[1]}
