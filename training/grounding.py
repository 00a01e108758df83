"""Token grounding: a loss that teaches the U-Net's cross-attention where each named thing is.

A model that draws "a red circle to the left of a blue square" as two objects of blended colours reads both colour
words everywhere: its cross-attention spreads each word over both objects. Where the training data says where each
phrase's object is (a caption's ``regions``: ``[{"phrase": "red circle", "box": [x0, y0, x1, y1]}, ...]`` in fractions
of the image, ``training.record_formats``), the grounding loss of TokenCompose (Wang et al., CVPR 2024, "token
loss") pulls each of the phrase's tokens' attention into its box:

    L = mean over cross-attention layers and grounded tokens of (1 - A(box) / A(image))^2

with A the token's attention, averaged over heads, summed over the query positions of the box (a cell partly inside
counts with the part inside) or of the whole image. ``--grounding-loss-weight`` adds it to the diffusion loss.

:class:`AttentionRecorder` keeps the cross-attention probabilities of one U-Net call, computed by diffusers' own
``AttnProcessor`` (so the U-Net's output is the same as with any other processor, up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch import Tensor

from training.record_formats import Region


@dataclass
class Grounding:
    """A run's grounding loss: its ``weight``, the ``tokenizer`` that finds each phrase's tokens in the caption, and
    the ``last`` batch's loss (for the step logs)."""

    weight: float
    tokenizer: Any
    last: float | None = None


class _RecordingProcessor:
    """diffusers' ``AttnProcessor`` that appends each call's attention probabilities ``(B * heads, Q, L)`` to
    ``sink``, with the number of heads."""

    def __init__(self, sink: list[tuple[Tensor, int]]) -> None:
        self.sink, self.inner = sink, AttnProcessor()

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kwargs):
        scores = attn.get_attention_scores

        def recorded(query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            probs = scores(query, key, attention_mask)
            self.sink.append((probs, attn.heads))
            return probs

        attn.get_attention_scores = recorded  # an instance attribute over the class's method, removed below
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            del attn.get_attention_scores


class AttentionRecorder:
    """Within ``with AttentionRecorder(unet) as recorder:``, every cross-attention layer (``attn2``) of ``unet`` runs
    through :class:`_RecordingProcessor`, and ``recorder.maps`` collects ``(probabilities, heads)`` of each call in
    order; the U-Net's processors are restored on exit."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.maps: list[tuple[Tensor, int]] = []
        self._saved: dict[str, Any] | None = None

    def __enter__(self) -> AttentionRecorder:
        self._saved = dict(self.unet.attn_processors)
        recording = _RecordingProcessor(self.maps)
        self.unet.set_attn_processor(
            {name: recording if ".attn2." in name else proc for name, proc in self._saved.items()}
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        self.unet.set_attn_processor(self._saved)
        self._saved = None


def phrase_positions(caption_ids: Sequence[int], phrase_ids: Sequence[int]) -> list[int]:
    """The positions in ``caption_ids`` (a tokenized caption) of the first occurrence of ``phrase_ids`` (the
    phrase's tokens, no start or end token), or ``[]`` when the caption does not hold it."""
    n = len(phrase_ids)
    for start in range(len(caption_ids) - n + 1 if n else 0):
        if list(caption_ids[start : start + n]) == list(phrase_ids):
            return list(range(start, start + n))
    return []


def grounded_tokens(
    tokenizer: Any, captions: Sequence[str], regions: Sequence[Sequence[Region]]
) -> list[list[tuple[int, tuple[float, float, float, float]]]]:
    """Per caption, ``(token position, box)`` of every token of each region's phrase found in it (in the first
    ``tokenizer.model_max_length`` tokens, as the text encoder reads them). A phrase the caption does not hold (a
    dropped caption, a caption changed by shuffling or tag dropout) grounds nothing."""
    result = []
    for caption, caption_regions in zip(captions, regions):
        tokens: list[tuple[int, tuple[float, float, float, float]]] = []
        if caption_regions and caption:
            ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids
            for region in caption_regions:
                phrase = tokenizer(region.phrase, add_special_tokens=False).input_ids
                tokens += [(position, region.box) for position in phrase_positions(ids, phrase)]
        result.append(tokens)
    return result


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(N, height, width)``: for each box ``(x0, y0, x1, y1)`` of ``boxes`` ``(N, 4)``, the share of each cell of
    a ``height`` x ``width`` grid over the unit square that lies inside it."""

    def cover(low: Tensor, high: Tensor, cells: int) -> Tensor:
        edges = torch.arange(cells + 1, dtype=boxes.dtype) / cells
        overlap = torch.minimum(edges[1:], high[:, None]) - torch.maximum(edges[:-1], low[:, None])
        return (overlap.clamp(min=0) * cells).clamp(max=1)

    x0, y0, x1, y1 = boxes.unbind(-1)
    return cover(y0, y1, height)[:, :, None] * cover(x0, x1, width)[:, None, :]


def grounding_loss(
    maps: Sequence[tuple[Tensor, int]],
    tokens: Sequence[Sequence[tuple[int, tuple[float, float, float, float]]]],
    latent_size: tuple[int, int],
) -> Tensor:
    """The token grounding loss (module docstring) of the recorded ``maps`` (``(B * heads, Q, L)`` and heads, for a
    batch of ``B`` latents of ``latent_size`` ``(h, w)``) and each sample's grounded ``tokens``
    (:func:`grounded_tokens`). Zero (with a graph) when no sample has a grounded token."""
    pairs = [(sample, position, box) for sample, grounded in enumerate(tokens) for position, box in grounded]
    if not pairs:
        return sum(probs.sum() * 0 for probs, _ in maps) if maps else torch.zeros(())
    samples = torch.tensor([sample for sample, _, _ in pairs])
    positions = torch.tensor([position for _, position, _ in pairs])
    boxes = torch.tensor([box for _, _, box in pairs], dtype=torch.float32)
    height, width = latent_size
    batch, terms, masks = len(tokens), [], {}
    for probs, heads in maps:
        if probs.shape[0] != batch * heads:
            raise ValueError(f"{probs.shape[0]} attention maps for {batch} samples of {heads} heads")
        factor = math.isqrt(height * width // probs.shape[1])
        h, w = height // factor, width // factor
        if h * w != probs.shape[1]:
            raise ValueError(f"{probs.shape[1]} query positions are no downsampling of a {height}x{width} latent")
        if (h, w) not in masks:
            masks[h, w] = box_masks(boxes, h, w).flatten(1).to(probs)
        attention = probs.view(batch, heads, h * w, -1).mean(dim=1)[samples, :, positions]  # (N, Q)
        inside = (attention * masks[h, w]).sum(-1) / attention.sum(-1).clamp(min=1e-8)
        terms.append((1 - inside) ** 2)
    return torch.cat(terms).mean()
