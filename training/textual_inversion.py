"""Textual inversion (Gal et al. 2022): new tokens whose embedding vectors are the only weights a run trains.

A placeholder token (``<sks>``) with ``num_vectors`` vectors becomes the tokens ``<sks>``, ``<sks>_1``, ... in every
text encoder of the model (diffusers' multi-vector convention, which ``load_textual_inversion`` and the pipelines'
``maybe_convert_prompt`` share); a caption's ``<sks>`` is expanded to all of them before it is encoded. Each encoder's
token table is wrapped by :class:`ExtendedEmbedding`: the original rows stay in the frozen table, bit-identical by
construction (no optimizer, weight decay or mixed-precision cast ever touches them), and the new rows are one small
parameter, initialised from the embeddings of an initializer word. Checkpoints hold only the new rows.

The trained vectors are written twice (:func:`save_embeddings`): diffusers' ``learned_embeds.safetensors`` and an
AUTOMATIC1111 / ComfyUI embedding named after the token (``emb_params`` for one encoder; ``clip_l`` and ``clip_g``
for SDXL's two). Both load with stock ``load_textual_inversion``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.errors import UserError
from pipelines.loading import SDXL_EMBEDDING_KEYS
from pipelines.single_file import save_safetensors_atomically

DIFFUSERS_EMBEDDING_FILE = "learned_embeds.safetensors"
A1111_KEY = "emb_params"
"""The key of a one-encoder embedding in AUTOMATIC1111's safetensors format."""


@dataclass(frozen=True)
class NewTokens:
    """The tokens a textual-inversion run adds: ``placeholder`` with ``num_vectors`` vectors, initialised from the
    embeddings of ``initializer`` (its token ids used in turn when it has fewer tokens than vectors)."""

    placeholder: str
    initializer: str
    num_vectors: int = 1

    @property
    def tokens(self) -> list[str]:
        """The tokens added to each tokenizer: ``placeholder``, ``placeholder_1``, ... (diffusers' convention)."""
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.num_vectors)]

    def expand(self, caption: str) -> str:
        """``caption`` with the placeholder replaced by all its tokens, as the pipelines' ``maybe_convert_prompt``
        does at generation time."""
        if self.num_vectors == 1:
            return caption
        return re.sub(re.escape(self.placeholder), " ".join(self.tokens), caption)


class ExtendedEmbedding(nn.Module):
    """A token-embedding table extended by trainable rows: ids below the original vocabulary read the frozen
    ``base`` table, the ids after it read :attr:`new` (``(n, D)``)."""

    def __init__(self, base: nn.Embedding, new: Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(new.detach().clone().to(base.weight.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> Tensor:
        """The whole table, original rows then new ones (for code that reads ``get_input_embeddings().weight``)."""
        return torch.cat([self.base.weight, self.new])

    def forward(self, input_ids: Tensor) -> Tensor:
        size = self.base.num_embeddings
        is_new = (input_ids >= size).unsqueeze(-1)
        old = self.base(input_ids.clamp(max=size - 1))
        new = self.new[(input_ids - size).clamp(min=0, max=self.new.shape[0] - 1)]
        return torch.where(is_new, new.to(old.dtype), old)


class NewRowsState:
    """A checkpointable view of only the new rows of a text encoder's :class:`ExtendedEmbedding`."""

    def __init__(self, embedding: ExtendedEmbedding) -> None:
        self.embedding = embedding

    def state_dict(self) -> dict[str, Tensor]:
        return {"new": self.embedding.new.detach().clone()}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        new = state_dict["new"]
        if new.shape != self.embedding.new.shape:
            raise UserError(
                f"the checkpoint's token embeddings have shape {tuple(new.shape)}, this run's "
                f"{tuple(self.embedding.new.shape)}; resume with the same --num-vectors and model"
            )
        with torch.no_grad():
            self.embedding.new.copy_(new)


def add_tokens(text_encoder: nn.Module, tokenizer, new_tokens: NewTokens) -> ExtendedEmbedding:
    """Add ``new_tokens`` to ``tokenizer`` and their rows to ``text_encoder`` (a ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``), initialised from the initializer's embeddings; freeze every other weight.
    Returns the encoder's new token table.

    Raises:
        UserError: a token the tokenizer already has, or an initializer word with no tokens.
    """
    taken = [token for token in new_tokens.tokens if token in tokenizer.get_vocab()]
    if taken:
        raise UserError(
            f"--placeholder-token: {taken} are already tokens of this model's tokenizer; pick a token it does not "
            "have, such as '<my-concept>'"
        )
    init_ids = tokenizer.encode(new_tokens.initializer, add_special_tokens=False)
    if not init_ids:
        raise UserError(f"--initializer-token {new_tokens.initializer!r} has no tokens; pass a word such as 'dog'")
    embeddings = text_encoder.get_input_embeddings()
    if isinstance(embeddings, ExtendedEmbedding):
        raise UserError("this text encoder already has textual-inversion rows; add all new tokens at once")
    first = len(tokenizer)
    tokenizer.add_tokens(new_tokens.tokens)
    if len(tokenizer) != first + new_tokens.num_vectors or first != embeddings.num_embeddings:
        raise UserError(
            f"the tokenizer ({first} tokens) and the text encoder's table ({embeddings.num_embeddings} rows) "
            "disagree; train with the tokenizer saved with this text encoder"
        )
    text_encoder.requires_grad_(False)
    rows = embeddings.weight[[init_ids[i % len(init_ids)] for i in range(new_tokens.num_vectors)]]
    extended = ExtendedEmbedding(embeddings, rows)
    text_encoder.set_input_embeddings(extended)
    text_encoder.config.vocab_size = extended.num_embeddings
    return extended


def save_embeddings(folder: Path, new_tokens: NewTokens, rows: Sequence[tuple[str, ExtendedEmbedding]]) -> list[Path]:
    """Write the trained vectors of each encoder (``rows``: component name and its table) to ``folder``: diffusers'
    :data:`DIFFUSERS_EMBEDDING_FILE` and ``TOKEN.safetensors`` for AUTOMATIC1111 / ComfyUI. One encoder:
    ``{placeholder: (n, D)}`` and ``{"emb_params": (n, D)}``; SDXL: ``{"clip_l": ..., "clip_g": ...}`` in both (stock
    loads each key with ``load_textual_inversion(..., text_encoder=, tokenizer=)``). Returns the paths."""
    vectors = {name: table.new.detach().float().cpu().contiguous() for name, table in rows}
    if len(vectors) == 1:
        (embeds,) = vectors.values()
        files = {DIFFUSERS_EMBEDDING_FILE: {new_tokens.placeholder: embeds}, "a1111": {A1111_KEY: embeds}}
    else:
        keyed = {SDXL_EMBEDDING_KEYS[name]: embeds for name, embeds in vectors.items()}
        files = {DIFFUSERS_EMBEDDING_FILE: keyed, "a1111": keyed}
    a1111_name = re.sub(r"[^\w.-]+", "_", new_tokens.placeholder).strip("_") or "embedding"
    paths = []
    for name, tensors in files.items():
        path = folder / (name if name != "a1111" else f"{a1111_name}.safetensors")
        save_safetensors_atomically(tensors, path, metadata={"placeholder_token": new_tokens.placeholder})
        paths.append(path)
    return paths
