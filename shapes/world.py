"""The synthetic "shapes" world: its vocabulary, one-object scenes, captions, a renderer and the prompt grammar;
:mod:`shapes.pairs` builds its two-object scenes on the same vocabulary and renderer.

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
Everything here is deterministic: random draws take a ``numpy.random.Generator``.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
from PIL import Image, ImageDraw

Colour = Literal["red", "orange", "yellow", "green", "blue", "purple"]
ShapeName = Literal["circle", "square", "triangle"]
Position = Literal["left", "right", "top", "bottom", "center"]
CaptionForm = Literal["full", "colour_shape", "shape_position", "colour_position"]
Attribute = Literal["colour", "shape", "position"]
BackgroundKind = Literal["light", "dark"]
RGB = tuple[int, int, int]

COLOURS: tuple[str, ...] = get_args(Colour)
SHAPES: tuple[str, ...] = get_args(ShapeName)
POSITIONS: tuple[str, ...] = get_args(Position)
CAPTION_FORMS: tuple[str, ...] = get_args(CaptionForm)
PARTIAL_FORMS: tuple[str, ...] = CAPTION_FORMS[1:]
ATTRIBUTES: tuple[str, ...] = get_args(Attribute)

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

# Words of the prompt grammar, with a few synonyms; a position is read from its key word ("left", "top", ...).
COLOUR_WORDS = {**{name: name for name in COLOURS}, "violet": "purple"}
SHAPE_WORDS = {**{name: name for name in SHAPES}, "disc": "circle", "disk": "circle"}
_POSITION_WORDS = {**{name: name for name in POSITIONS}, "centre": "center", "middle": "center"}
WORD = re.compile(r"[a-z]+")


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


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)}; got {value!r}")


def check_rgb(field: str, rgb: tuple[int, ...]) -> None:
    if len(rgb) != 3 or not all(isinstance(c, int | np.integer) and 0 <= c <= 255 for c in rgb):
        raise ValueError(f"{field} must be three integers in 0..255; got {rgb!r}")


def check_fits(centre: tuple[float, float], size: float) -> None:
    if not 0.0 < size <= 1.0:
        raise ValueError(f"size is a fraction of the image side, in (0, 1]; got {size}")
    half = size / 2.0
    if not all(half <= c <= 1.0 - half for c in centre):
        raise ValueError(
            f"the shape must fit in the image: centre {centre} with size {size} puts part of it "
            "outside [0, 1]; move the centre inwards or shrink the size"
        )


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
        check_choice("colour", self.colour, COLOURS)
        check_choice("shape", self.shape, SHAPES)
        check_choice("position", self.position, POSITIONS)
        check_rgb("rgb", self.rgb)
        check_rgb("background", self.background)
        check_fits(self.centre, self.size)

    def attributes(self) -> dict[str, str]:
        """``{"colour": ..., "shape": ..., "position": ...}``."""
        return {"colour": self.colour, "shape": self.shape, "position": self.position}

    @property
    def objects(self) -> tuple[ShapeSpec]:
        """The objects :func:`render` draws: this one."""
        return (self,)


def sample_rgb(rng: np.random.Generator, colour: str) -> RGB:
    """A random shade of ``colour``: hue in its :data:`SHADE_HUES` band, saturation and value in their ranges."""
    check_choice("colour", colour, COLOURS)
    low, high = SHADE_HUES[colour]
    return hsv_to_rgb(rng.uniform(low, high), rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE))


def sample_background(rng: np.random.Generator, kind: str | None = None) -> RGB:
    """A random plain background of ``kind`` (``light`` or ``dark``; random when None), a near-grey of any hue."""
    if kind is None:
        kind = str(rng.choice(list(BACKGROUNDS)))
    check_choice("background kind", kind, tuple(BACKGROUNDS))
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
    check_choice("position", position, POSITIONS)  # before the anchor lookup, for a clear message
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
    check_choice("caption form", form, CAPTION_FORMS)
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
        check_choice("colour", attributes["colour"], COLOURS)
        words.append(attributes["colour"])
    shape = attributes.get("shape", "shape")
    if shape != "shape":
        check_choice("shape", shape, SHAPES)
    words.append(shape)
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    if "position" in attributes:
        check_choice("position", attributes["position"], POSITIONS)
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


class Drawable(Protocol):
    """What :func:`render` draws: a background and objects with ``shape``, ``rgb``, ``centre`` and ``size`` (a
    :class:`ShapeSpec`, or a ``shapes.pairs.PairSpec``)."""

    background: RGB

    @property
    def objects(self) -> tuple[ShapeSpec, ...]: ...


def render(spec: Drawable, size: int = 64) -> Image.Image:
    """Draw ``spec`` (one object or two) as a ``size`` x ``size`` RGB image, anti-aliased (drawn at 4x,
    downsampled with Lanczos)."""
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels for a recognisable shape; got {size}")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), tuple(spec.background))
    draw = ImageDraw.Draw(canvas)
    for obj in spec.objects:
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
    for word in WORD.findall(text.lower()):
        for attribute, words in (("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS), ("position", _POSITION_WORDS)):
            value = words.get(word)
            if value is None:
                continue
            if found.setdefault(attribute, value) != value:
                raise ValueError(
                    f"prompt {text!r} names two {attribute}s ({found[attribute]} and {value}); the shapes grammar "
                    "describes one object: 'a {colour} {shape} {position}'"
                )
    return found
