"""An offline CLIP tokenizer, built from the BPE vocabulary that open-clip-torch ships.

OpenAI's CLIP tokenizer (and so Stable Diffusion's) is a byte-level BPE whose 49,408-entry vocabulary is fully
determined by ``bpe_simple_vocab_16e6.txt.gz``: 256 byte symbols, the same with an end-of-word marker, one entry per
merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Rebuilding it here gives identical ids with no download.

A model trained from scratch on a small caption set needs only the tokens its captions use:
:func:`build_clip_tokenizer` with ``texts=`` keeps CLIP's byte symbols, the merges that CLIP's BPE applies to those
texts and the two specials, renumbered in CLIP's order. Those texts split into exactly CLIP's tokens; any other text
still tokenizes (into smaller pieces, never an unknown token). For a text encoder of width 256 this shrinks the
embedding table from 12.6M parameters to about 0.15M.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (so BPE never sees whitespace)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe_vocab_path() -> Path:
    import open_clip  # imported lazily: only the vocabulary file is needed

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and BPE merges, in OpenAI's order."""
    lines = gzip.open(_bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    # The first line is a header; CLIP keeps the first 49152 - 256 - 2 merges (OpenAI's choice, kept for equal ids).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"open_clip's BPE file gave {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _merges_applied(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges BPE applies to ``word`` (its symbols, the last one ending in ``</w>``), in the order applied."""
    applied = []
    while len(word) > 1:
        pairs = set(zip(word, word[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return applied


def _words(tokenizer: CLIPTokenizer, text: str) -> Iterable[tuple[str, ...]]:
    """The pre-tokenised words of ``text`` as BPE sees them: byte symbols, the last one with ``</w>``."""
    word = ""
    for token in tokenizer.tokenize(text):
        word += token
        if token.endswith("</w>"):
            symbols = list(word[: -len("</w>")])
            yield tuple(symbols[:-1]) + (symbols[-1] + "</w>",)
            word = ""


def build_clip_tokenizer(pad_token: str = EOS_TOKEN, texts: Iterable[str] | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` identical to OpenAI's ``openai/clip-vit-large-patch14`` one, built offline.

    Args:
        pad_token: ``"<|endoftext|>"`` as in Stable Diffusion 1.x (default), or ``"!"`` as in SD 2.x.
        texts: if given, a vocabulary reduced to what these texts need (see the module docstring): the 512 byte
            symbols, the merges CLIP's BPE applies to the texts and the specials, in CLIP's order. The texts
            tokenize to the same token strings as with the full vocabulary, under new ids.
    """
    vocab, merges = clip_vocab_and_merges()
    if texts is not None:
        full = build_clip_tokenizer(pad_token)
        ranks = {merge: i for i, merge in enumerate(merges)}
        used = {merge for text in texts for word in _words(full, text) for merge in _merges_applied(word, ranks)}
        merges = [merge for merge in merges if merge in used]  # CLIP's order, so BPE applies them as it would
        symbols = list(_bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )
