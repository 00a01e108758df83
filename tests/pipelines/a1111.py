"""A reader of AUTOMATIC1111's ``parameters`` text, written from its documented layout (the prompt; a
``Negative prompt:`` line; a last line of ``Key: value`` pairs separated by ``", "``, values holding ``,`` ``:`` or a
newline written as JSON strings), independent of :mod:`pipelines.infotext`, so tests can check what we write."""

from __future__ import annotations

import json
import re

PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """``(prompt, negative prompt, {key: value})`` of a ``parameters`` text."""
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:  # no settings line: all of it is prompt
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith(NEGATIVE):
            negative.append(line[len(NEGATIVE) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    settings = {}
    for key, value in PAIR.findall(last):
        settings[key] = json.loads(value) if value.startswith('"') and value.endswith('"') else value
    return "\n".join(prompt), "\n".join(negative), settings
