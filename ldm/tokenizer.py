"""An offline CLIP tokenizer, built from the BPE vocabulary that open-clip-torch ships.

OpenAI's CLIP tokenizer (and so Stable Diffusion's) is a byte-level BPE whose 49,408-entry vocabulary is fully
determined by ``bpe_simple_vocab_16e6.txt.gz``: 256 byte symbols, the same with an end-of-word marker, one entry per
merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Rebuilding it here gives identical ids with no download.
"""

from __future__ import annotations

import gzip
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


def build_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` identical to OpenAI's ``openai/clip-vit-large-patch14`` one, built offline.

    Args:
        pad_token: ``"<|endoftext|>"`` as in Stable Diffusion 1.x (default), or ``"!"`` as in SD 2.x.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )
