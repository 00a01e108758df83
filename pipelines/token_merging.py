"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023, arXiv 2303.17604) through ``tomesd``.

Before each self-attention of the full-resolution transformer blocks, ``ratio`` of the image tokens are merged into
their most similar tokens (bipartite soft matching with 2x2 strides) and unmerged after it, so the attention runs on
fewer tokens. ``tomesd`` is optional (``pip install tomesd``); it patches diffusers' ``BasicTransformerBlock``.
"""

from __future__ import annotations

import importlib.util

from diffusers import UNet2DConditionModel

from ldm.errors import UserError

MAX_RATIO = 0.75  # tomesd's limit with its 2x2 strides: at most 3 of every 4 tokens merge (1 - 1 / (sx * sy))


def apply_token_merging(unet: UNet2DConditionModel, ratio: float) -> None:
    """Patch ``unet``'s transformer blocks in place to merge ``ratio`` of the tokens before self-attention.

    The destination tokens are picked without tomesd's random jitter (``use_rand=False``): tomesd draws it from a
    fork of the global RNG, which would make images depend on unrelated random calls. Raises UserError when
    ``tomesd`` is not installed, ValueError for a ratio outside [0, 0.75].
    """
    if not 0 <= ratio <= MAX_RATIO:
        raise ValueError(f"token merging ratio must be in [0, {MAX_RATIO}] (the share of tokens merged); got {ratio}")
    if importlib.util.find_spec("tomesd") is None:
        raise UserError("token merging needs the tomesd package: pip install tomesd")
    import tomesd

    tomesd.apply_patch(unet, ratio=ratio, use_rand=False)


def remove_token_merging(unet: UNet2DConditionModel) -> None:
    """Undo :func:`apply_token_merging` (nothing to do when ``unet`` is not patched or tomesd is missing)."""
    if importlib.util.find_spec("tomesd") is None:
        return
    import tomesd

    tomesd.remove_patch(unet)
