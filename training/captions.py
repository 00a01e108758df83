"""Caption tools of kohya-ss sd-scripts: prefix and suffix, caption dropout, tag shuffling and tag dropout.

A tagged caption is comma-separated tags (``"sks dog, sitting, grass, sunny"``). kohya's options, per subset:

- ``caption_prefix`` / ``caption_suffix``: joined to the caption with a space, before anything else (so a prefix
  becomes part of the first tag, as in kohya); fixed text, applied when the records are loaded (:func:`add_affixes`);
- ``caption_dropout``: the whole caption becomes the empty one with this probability (on top of the trainer's global
  ``--caption-dropout``, which the loss draws);
- ``shuffle_caption``: the tags after the first ``keep_tokens`` are shuffled;
- ``caption_tag_dropout``: each tag after the first ``keep_tokens`` is dropped with this probability.

:func:`process_caption` makes the random ones from a generator the caller seeds; :class:`training.data.
ImageCaptionDataset` seeds it from ``(seed, epoch, sample index)``, so a resumed run sees the same captions. With
every option off a caption is returned untouched and no draw is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CaptionOptions", "add_affixes", "process_caption", "split_tags"]

TAG_SEPARATOR = ","


@dataclass(frozen=True)
class CaptionOptions:
    """The per-sample random caption changes of one subset (kohya-ss ``shuffle_caption``, ``keep_tokens``,
    ``caption_tag_dropout_rate``, ``caption_dropout_rate``)."""

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0; got {self.keep_tokens}")
        for name in ("tag_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"caption {name} must be in [0, 1); got {getattr(self, name)}")

    @property
    def makes_new_captions(self) -> bool:
        """Whether captions come out that are in no record (shuffled or with tags dropped): a text-embedding cache,
        which holds the records' captions, cannot serve them."""
        return self.shuffle or self.tag_dropout > 0

    @property
    def active(self) -> bool:
        """Whether :func:`process_caption` changes anything (and draws from its generator)."""
        return self.makes_new_captions or self.dropout > 0


def add_affixes(caption: str, prefix: str = "", suffix: str = "") -> str:
    """``prefix + " " + caption + " " + suffix``, each part only when given (kohya-ss joins them with a space)."""
    return " ".join(part for part in (prefix, caption, suffix) if part)


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of ``caption``, stripped; empty ones (``"a,, b"``) are left out."""
    return [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]


def process_caption(caption: str, options: CaptionOptions, generator: torch.Generator) -> str:
    """``caption`` after ``options``' random changes, drawn from ``generator``.

    In order: one uniform for caption dropout (the empty caption when below ``options.dropout``); then, if the
    caption is kept and tags are shuffled or dropped, its tags are split (:func:`split_tags`): the first
    ``keep_tokens`` stay in place, the rest are permuted (``torch.randperm``) when shuffling, then each is dropped
    when its uniform is below ``tag_dropout``; the tags are joined with ``", "``. With no option active the caption
    is returned as it is, with no draw.
    """
    if not options.active:
        return caption
    if options.dropout > 0 and float(torch.rand((), generator=generator)) < options.dropout:
        return ""
    if not options.makes_new_captions:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.shuffle:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    if options.tag_dropout > 0:
        draws = torch.rand(len(rest), generator=generator).tolist()
        rest = [tag for tag, u in zip(rest, draws) if u >= options.tag_dropout]
    return ", ".join(kept + rest)
