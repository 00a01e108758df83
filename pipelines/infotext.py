"""The ``parameters`` PNG text chunk in AUTOMATIC1111's layout, so images read back in the tools people use (its
"PNG Info" tab and "read generation parameters", ComfyUI and model-site uploaders, ``exiftool``).

The layout (A1111 ``modules/processing.py``, ``create_infotext``): the prompt; then, when there is one, a line
``Negative prompt: ...``; then one line of ``Key: value`` pairs joined by ``", "``, where a value holding a comma, a
colon or a newline is written as a JSON string. Keys are A1111's where it has one (``Steps``, ``Sampler``,
``Schedule type``, ``CFG scale``, ``Seed``, ``Size`` as width x height, ``Model``, ``Denoising strength``, ``Clip
skip``, ``Mask blur``); the settings it has no key for follow under names of ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

PARAMETERS_KEY = "parameters"
"""The PNG text chunk A1111 writes and reads."""


def quote(value: str) -> str:
    """``value`` as A1111 writes a parameter value: as it is, or as a JSON string when it holds ``,``, ``:`` or a
    newline (which would end the pair)."""
    if not any(char in value for char in ",:\n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def a1111_clip_skip(clip_skip: int | None) -> int:
    """A1111's ``Clip skip`` for diffusers' ``clip_skip``: A1111 counts the last layer as 1 (no skip), diffusers
    counts the layers skipped (``None``: none)."""
    return 1 + (clip_skip or 0)


def format_parameters(prompt: str, negative_prompt: str | None, settings: Mapping[str, str | None]) -> str:
    """The ``parameters`` text: the prompt, the negative prompt line (left out when empty) and ``settings`` (in
    order; ``None`` values are left out) on the last line."""
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in settings.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}"
