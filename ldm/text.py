"""Prompt encoding for CLIP text encoders: attention weights, prompts longer than 75 tokens, clip skip, OpenCLIP.

``encode_prompts`` turns prompts into the U-Net's ``encoder_hidden_states``. A prompt is split into chunks of 75
tokens; each chunk is encoded on its own as ``BOS + tokens + EOS + pad`` (77 positions) and the chunk outputs are
concatenated along the sequence axis, as AUTOMATIC1111's web UI, kohya's scripts and compel do, so nothing is silently
truncated. With ``weighting=True``, A1111-style ``(word:1.3)`` weights scale token embeddings; by default brackets are
literal text (training captions such as "a car (red)" mean what they say). A prompt of at most 75 tokens (without
weight syntax, or with ``weighting`` off) gives bitwise the embeddings of diffusers'
``StableDiffusionPipeline.encode_prompt``.

:func:`encode_prompts_pooled` is the same for SDXL's encoders: it also returns the pooled (projected) embedding of
each prompt's first chunk (as A1111 and ComfyUI pool a long prompt) and, with ``layer="penultimate"``, takes the
penultimate layer's hidden states without the final layer norm, as ``StableDiffusionXLPipeline.encode_prompt`` does.

``OpenCLIPTextEncoder`` lets an ``open_clip`` text tower stand in for transformers' ``CLIPTextModel``, as Stable
Diffusion 2 does with the penultimate layer of OpenCLIP ViT-H/14.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .tokenizer import CLIP_MAX_LENGTH

logger = logging.getLogger(__name__)

CHUNK_TOKENS = CLIP_MAX_LENGTH - 2
"""Prompt tokens per chunk: 77 positions less BOS and EOS."""

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1

# A1111's ``re_attention`` (modules/prompt_parser.py), BREAK left out: escapes, brackets, ":weight)", plain text.
_ATTENTION_RE = re.compile(
    r"""
    \\[()\[\]\\]        # an escaped bracket or backslash
    | \(
    | \[
    | :\s*([+-]?[.\d]+)\s*\)
    | \)
    | ]
    | [^\\()\[\]:]+
    | [:\\]
    """,
    re.X,
)


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` fragments using AUTOMATIC1111's attention syntax.

    ``(text)`` multiplies the weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3, and
    nested brackets multiply. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters. Unbalanced
    brackets are treated leniently, as A1111 does: a bracket left open applies to the end of the prompt, a closing
    bracket with no opener is kept as text. A ``:`` not followed by a number and ``)`` is text, and so is a weight
    that is not a number, like ``(a:1.2.3)`` (A1111 raises), and a lone ``\\`` (A1111 drops it). Adjacent
    fragments of equal weight are merged; a prompt without syntax gives ``[(prompt, 1.0)]``, the empty prompt
    ``[("", 1.0)]``. A1111's ``BREAK`` keyword is not supported (it stays text).
    """
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    for match in _ATTENTION_RE.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if len(text) == 2 and text[0] == "\\":
            fragments.append([text[1], 1.0])
        elif text == "(":
            round_open.append(len(fragments))
        elif text == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open and _is_float(weight):
            multiply_from(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND_MULTIPLIER)
        elif text == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE_MULTIPLIER)
        else:
            fragments.append([text, 1.0])
    for start in round_open:
        multiply_from(start, _ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, _SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, weighting: bool = False
) -> tuple[list[int], list[float]]:
    """Token ids of ``prompt`` without BOS/EOS, and one weight per token.

    Without ``weighting``, or for a prompt without weight syntax, the prompt is tokenized in one call, so its ids are
    exactly the tokenizer's and all weights are 1; with it, each fragment of :func:`parse_prompt_weights` is tokenized
    separately (as A1111 does) and its tokens get its weight.
    """
    fragments = parse_prompt_weights(prompt) if weighting else [(prompt, 1.0)]
    if fragments == [(prompt, 1.0)]:
        ids = _token_ids(tokenizer, prompt)
        return ids, [1.0] * len(ids)
    ids, weights = [], []
    for text, weight in fragments:
        fragment_ids = _token_ids(tokenizer, text)
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
    return ids, weights


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # verbose=False: prompts longer than 77 tokens are expected here (they are chunked), so no length warning.
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def prompt_chunk_count(
    tokenizer: PreTrainedTokenizerBase, prompt: str, weighting: bool = False, truncate: bool = False
) -> int:
    """How many 75-token chunks ``prompt`` needs (at least 1: the empty prompt needs one; always 1 with
    ``truncate``); ``weighting`` as in :func:`tokenize_prompt` (weight syntax is not tokenized when it is on)."""
    if truncate:
        return 1
    return _chunks_needed(len(tokenize_prompt(tokenizer, prompt, weighting)[0]))


def _truncated(
    tokenizer: PreTrainedTokenizerBase, tokenized: tuple[list[int], list[float]]
) -> tuple[list[int], list[float]]:
    """A prompt's ids and weights cut to one chunk, with stock diffusers' warning naming the text dropped."""
    ids, weights = tokenized
    if len(ids) > CHUNK_TOKENS:
        logger.warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to %d tokens: "
            "%s (pass long_prompts=True to encode it in chunks instead)",
            CLIP_MAX_LENGTH,
            tokenizer.decode(ids[CHUNK_TOKENS:]),
        )
    return ids[:CHUNK_TOKENS], weights[:CHUNK_TOKENS]


def _chunks_needed(num_tokens: int) -> int:
    return max(1, -(-num_tokens // CHUNK_TOKENS))


def encode_prompts(
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    num_chunks: int | None = None,
    clip_skip: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weighting: bool = False,
    truncate: bool = False,
) -> Tensor:
    """Encode prompts to ``(batch, 77 * n, hidden)`` text embeddings, ``n = max(num_chunks or 1, chunks needed)``.

    Each prompt's tokens are cut into chunks of 75; chunk ``k`` is ``BOS + tokens[75k : 75k + 75] + EOS``, padded to
    77 with ``tokenizer.pad_token_id``, encoded on its own, and the chunk outputs are concatenated. A prompt needing
    fewer than ``n`` chunks gets padding chunks ``BOS + EOS + pad`` (the encoding of the empty prompt, as A1111 pads),
    so a prompt and a negative prompt encoded with the same ``num_chunks`` can be concatenated for guidance. All
    chunks of the batch go through the text encoder in one call. An attention mask (0 on padding) is passed only if
    ``text_encoder.config.use_attention_mask`` is true, as diffusers does.

    ``clip_skip`` follows diffusers: the hidden states ``clip_skip`` layers before the last, then the final layer
    norm (``clip_skip=1`` is the penultimate layer). With ``weighting`` (off by default: brackets are then literal
    text, as stock diffusers reads them), token weights from :func:`parse_prompt_weights` scale each
    token's embedding, then the (prompt, chunk) is rescaled so its mean over positions and channels is unchanged
    (A1111's method, but per prompt rather than over the batch; no rescale where the weighted mean is ~0, which
    would divide by noise); chunks whose weights are all 1 are left untouched, so a prompt of at most 75 tokens
    without weights equals ``StableDiffusionPipeline.encode_prompt`` bitwise.

    With ``truncate``, each prompt keeps only its first 75 tokens (with a warning naming the rest), as stock
    diffusers' tokenizer call does: one chunk, the same ids as ``tokenizer(prompt, truncation=True, max_length=77)``.

    Gradients flow (no ``torch.no_grad`` here) so the text encoder can be trained. ``device`` is where the ids are
    sent and the embeddings returned (the text encoder's own device by default; like diffusers' ``device``, it must be
    where the encoder runs); ``dtype`` defaults to the text encoder's, as diffusers casts.
    """
    return encode_prompts_pooled(
        text_encoder,
        tokenizer,
        prompts,
        num_chunks=num_chunks,
        clip_skip=clip_skip,
        device=device,
        dtype=dtype,
        weighting=weighting,
        truncate=truncate,
    ).hidden_states


@dataclass
class PromptEncoding:
    """What :func:`encode_prompts_pooled` returns.

    Attributes:
        hidden_states: ``(batch, 77 * n, hidden)``, the U-Net's cross-attention context (one encoder's part of it).
        pooled: ``(batch, dim)``, the encoder's pooled output of each prompt's first chunk: the projected text
            embedding (``text_embeds``) of a ``CLIPTextModelWithProjection`` (SDXL's second encoder), None for an
            encoder without a projection (stock SDXL pools only from the projected one).
    """

    hidden_states: Tensor
    pooled: Tensor | None


def encode_prompts_pooled(
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    num_chunks: int | None = None,
    clip_skip: int | None = None,
    layer: Literal["last", "penultimate"] = "last",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weighting: bool = False,
    truncate: bool = False,
) -> PromptEncoding:
    """:func:`encode_prompts` (same chunks, weights, truncation, device and dtype), plus the pooled embedding.

    ``layer="last"`` (Stable Diffusion 1.x/2.x) takes the hidden states as :func:`encode_prompts` describes.
    ``layer="penultimate"`` (SDXL) takes ``hidden_states[-(clip_skip + 2)]`` (``clip_skip`` None: 0) *without* the
    final layer norm, exactly as ``StableDiffusionXLPipeline.encode_prompt`` does, so a prompt of at most 75 tokens
    gives stock's embeddings bitwise. The pooled output is never weighted and comes from each prompt's first chunk
    (A1111 and ComfyUI pool a long SDXL prompt the same way).
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings (wrap a single prompt as [prompt]); got {prompts!r}")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (use [''] for the unconditional embedding)")
    if num_chunks is not None and num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1 (or None for as many as the prompts need); got {num_chunks}")
    if layer not in ("last", "penultimate"):
        raise ValueError(f"layer must be 'last' or 'penultimate'; got {layer!r}")
    # A text encoder being trained may come wrapped (DistributedDataParallel): it runs wrapped, so gradients sync,
    # and its config and layers are read from the model inside.
    model = getattr(text_encoder, "module", text_encoder)
    num_layers = getattr(model.config, "num_hidden_layers", None)
    skipped = (clip_skip or 0) + (1 if layer == "penultimate" else 0)
    if clip_skip is not None and (clip_skip < 0 or (num_layers is not None and skipped >= num_layers)):
        minus = "one" if layer == "last" else "two"
        raise ValueError(
            f"clip_skip must be between 0 and the text encoder's number of layers minus {minus} ({num_layers} layers)"
            f" or None for the {layer} layer; got {clip_skip}"
        )
    final_layer_norm = _final_layer_norm(model) if clip_skip is not None and layer == "last" else None
    if tokenizer.pad_token_id is None or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs bos, eos and pad tokens (a CLIPTokenizer from ldm.tokenizer has them)")

    tokenized = [tokenize_prompt(tokenizer, prompt, weighting) for prompt in prompts]
    if truncate:
        tokenized = [_truncated(tokenizer, t) for t in tokenized]
    n = max([num_chunks or 1] + [_chunks_needed(len(ids)) for ids, _ in tokenized])
    input_ids, weights, attention_mask = _chunk_inputs(tokenizer, tokenized, n)
    run_device = torch.device(device) if device is not None else _module_device(text_encoder)
    input_ids = input_ids.to(run_device)
    use_mask = getattr(model.config, "use_attention_mask", False)
    mask = attention_mask.to(run_device) if use_mask else None

    if layer == "last" and clip_skip is None:
        output = text_encoder(input_ids, attention_mask=mask)
        embeds = output[0] if output[0].ndim == 3 else output.last_hidden_state
    else:
        output = text_encoder(input_ids, attention_mask=mask, output_hidden_states=True)
        embeds = output.hidden_states[-(skipped + 1)]
        if final_layer_norm is not None:
            embeds = final_layer_norm(embeds)

    embeds = _apply_weights(embeds, weights.to(embeds.device))
    out_dtype = dtype if dtype is not None else getattr(model, "dtype", embeds.dtype)
    embeds = embeds.to(dtype=out_dtype, device=run_device)
    pooled = output[0] if output[0].ndim == 2 else None  # text_embeds of a model with a projection
    if pooled is not None:
        pooled = pooled.reshape(len(prompts), n, -1)[:, 0].to(dtype=out_dtype, device=run_device)
    return PromptEncoding(embeds.reshape(len(prompts), n * CLIP_MAX_LENGTH, embeds.shape[-1]), pooled)


def encode_prompts_with_encoders(
    encoders: list[tuple[PreTrainedTokenizerBase, nn.Module]],
    texts: list[list[str]],
    *,
    num_chunks: int | None = None,
    clip_skip: int | None = None,
    device: torch.device | str | None = None,
    weighting: bool = False,
    truncate: bool = False,
) -> PromptEncoding:
    """SDXL's text conditioning: encoder ``k`` (a ``(tokenizer, text_encoder)`` pair) reads ``texts[k]``; their
    penultimate hidden states (:func:`encode_prompts_pooled` with ``layer="penultimate"``, each in its encoder's
    dtype) are concatenated along the features, ``(batch, 77 * n, D1 + D2)``, and the pooled embedding is the first
    encoder's that has one (the projected second: ``StableDiffusionXLPipeline.encode_prompt``'s rule). All encoders
    get the same chunk count ``n`` (``num_chunks``, or what the longest text needs), so the states line up."""
    if len(texts) != len(encoders):
        raise ValueError(f"got {len(texts)} lists of texts for {len(encoders)} text encoders; pass one per encoder")
    n = max(
        [num_chunks or 1]
        + [
            prompt_chunk_count(tokenizer, t, weighting, truncate)
            for (tokenizer, _), ts in zip(encoders, texts)
            for t in ts
        ]
    )
    hidden, pooled = [], None
    for (tokenizer, encoder), encoder_texts in zip(encoders, texts, strict=True):
        encoding = encode_prompts_pooled(
            encoder,
            tokenizer,
            encoder_texts,
            num_chunks=n,
            clip_skip=clip_skip,
            layer="penultimate",
            device=device,
            weighting=weighting,
            truncate=truncate,
        )
        hidden.append(encoding.hidden_states)
        pooled = encoding.pooled if pooled is None else pooled
    return PromptEncoding(torch.cat(hidden, dim=-1), pooled)


def _chunk_inputs(
    tokenizer: PreTrainedTokenizerBase, tokenized: list[tuple[list[int], list[float]]], n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Ids, weights and attention masks of shape ``(batch * n, 77)``, the ``n`` chunks of each prompt in order."""
    rows_ids, rows_weights, rows_mask = [], [], []
    for ids, token_weights in tokenized:
        for k in range(n):
            chunk = ids[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS]
            chunk_weights = token_weights[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS]
            num_pad = CLIP_MAX_LENGTH - 2 - len(chunk)
            rows_ids.append(
                [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * num_pad
            )
            rows_weights.append([1.0, *chunk_weights, 1.0] + [1.0] * num_pad)
            rows_mask.append([1] * (len(chunk) + 2) + [0] * num_pad)
    return torch.tensor(rows_ids), torch.tensor(rows_weights), torch.tensor(rows_mask)


def _apply_weights(embeds: Tensor, weights: Tensor) -> Tensor:
    """A1111's emphasis: ``z * w``, rescaled so each row's mean is unchanged; rows with all weights 1 untouched.

    ``embeds``: ``(rows, 77, hidden)``; ``weights``: ``(rows, 77)``. The means are taken in float32 (fp16-safe). Where
    the weighted mean is ~0 next to the values (below 1e-4 of their mean magnitude, e.g. an untrained final layer norm
    with zero bias) the ratio would be noise or inf, so that row is left unrescaled.
    """
    weighted_rows = (weights != 1.0).any(dim=1)
    if not weighted_rows.any():
        return embeds
    z = embeds[weighted_rows].float()
    z_weighted = z * weights[weighted_rows].float().unsqueeze(-1)
    old_mean, new_mean = z.mean(dim=(1, 2)), z_weighted.mean(dim=(1, 2))
    degenerate = new_mean.abs() <= 1e-4 * z_weighted.abs().mean(dim=(1, 2))
    # torch.where on a safe denominator so no inf/NaN (or NaN gradient) comes from the unused branch.
    factor = torch.where(degenerate, torch.ones_like(old_mean), old_mean / torch.where(degenerate, 1.0, new_mean))
    embeds = embeds.clone()
    embeds[weighted_rows] = (z_weighted * factor[:, None, None]).to(embeds.dtype)
    return embeds


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    text_model = getattr(text_encoder, "text_model", text_encoder)
    layer_norm = getattr(text_model, "final_layer_norm", None)
    if layer_norm is None:
        raise ValueError(
            f"clip_skip needs the final layer norm at text_encoder.text_model.final_layer_norm (as in transformers'"
            f" CLIPTextModel or OpenCLIPTextEncoder); {type(text_encoder).__name__} has none. Pass clip_skip=None."
        )
    return layer_norm


def _module_device(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    return device if isinstance(device, torch.device) else next(module.parameters()).device


@dataclass
class OpenCLIPTextConfig:
    """The few ``config`` fields that diffusers and :func:`encode_prompts` read from a text encoder."""

    hidden_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    vocab_size: int
    use_attention_mask: bool = False


class OpenCLIPTextEncoder(nn.Module):
    """An ``open_clip`` text tower with the call signature and outputs of transformers' ``CLIPTextModel``.

    Built from an ``open_clip.CLIP`` (or its ``TextTransformer``); only the text parts are kept (token and positional
    embeddings, transformer, ``ln_final``, causal mask), sharing their parameters with the source model.
    ``layer="penultimate"`` (Stable Diffusion 2's choice) runs all resblocks but the last, then ``ln_final``: the
    encoder then behaves like a model with one layer fewer, for ``hidden_states`` and ``clip_skip`` too.
    ``forward(input_ids)`` returns a ``BaseModelOutputWithPooling``: ``[0]`` is ``last_hidden_state``,
    ``pooler_output`` the state at the first highest id (EOS, as open_clip pools), ``hidden_states`` the embeddings
    then each block's output when ``output_hidden_states``. Tokenize with ``build_clip_tokenizer(pad_token="!")`` for
    SD 2's padding (id 0, as open_clip's tokenizer). Not a ``PreTrainedModel``: save the open_clip model itself.
    """

    def __init__(self, model: nn.Module, layer: Literal["last", "penultimate"] = "penultimate") -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate'; got {layer!r}")
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its TextTransformer at .text
        missing = [
            a for a in ("token_embedding", "positional_embedding", "transformer", "ln_final") if not hasattr(text, a)
        ]
        if missing:
            raise ValueError(
                f"{type(model).__name__} is not an open_clip CLIP or TextTransformer with its own text transformer"
                f" (missing {missing}); Hugging Face text towers (hf_model_name) are not supported"
            )
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError("text towers with a class token (CoCa, embed_cls=True) are not supported")
        num_blocks = len(text.transformer.resblocks)
        if layer == "penultimate" and num_blocks < 2:
            raise ValueError(f"layer='penultimate' needs at least 2 resblocks; this tower has {num_blocks}")
        self.layer = layer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.register_buffer("attn_mask", getattr(text, "attn_mask", None), persistent=False)
        self.num_layers = num_blocks - (1 if layer == "penultimate" else 0)
        self.config = OpenCLIPTextConfig(
            hidden_size=self.ln_final.normalized_shape[0],
            num_hidden_layers=self.num_layers,
            max_position_embeddings=self.positional_embedding.shape[0],
            vocab_size=self.token_embedding.num_embeddings,
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype open_clip computes in (its transformer's weight dtype)."""
        return self.transformer.get_cast_dtype()

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.token_embedding.weight.device

    @property
    def text_model(self) -> OpenCLIPTextEncoder:
        """Itself, so ``text_encoder.text_model.final_layer_norm`` works as with ``CLIPTextModel`` (diffusers)."""
        return self

    @property
    def final_layer_norm(self) -> nn.Module:
        """open_clip's ``ln_final`` under transformers' name (used for ``clip_skip``)."""
        return self.ln_final

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """Token states of ``input_ids`` ``(batch, seq)``, as open_clip's ``encode_text`` computes them before pooling.

        ``attention_mask`` (1 = token, 0 = padding), if given, also stops attention to padding keys; open_clip and
        SD 2 use only the causal mask, under which padding changes no state before it anyway.
        """
        batch, seq_len = input_ids.shape
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {seq_len} positions but the tower has {self.config.max_position_embeddings}; split"
                " longer prompts into chunks (encode_prompts does)"
            )
        cast_dtype = self.dtype
        x = self.token_embedding(input_ids).to(cast_dtype) + self.positional_embedding[:seq_len].to(cast_dtype)
        mask = self._attention_mask(attention_mask, seq_len, cast_dtype)
        batch_first = getattr(self.transformer, "batch_first", True)
        hidden_states = [x]
        if not batch_first:
            x = x.transpose(0, 1)
        for block in self.transformer.resblocks[: self.num_layers]:
            x = block(x, attn_mask=mask)
            if output_hidden_states:
                hidden_states.append(x if batch_first else x.transpose(0, 1))
        if not batch_first:
            x = x.transpose(0, 1)
        last_hidden_state = self.ln_final(x)
        pooled = last_hidden_state[torch.arange(batch, device=x.device), input_ids.argmax(dim=-1)]
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )

    def _attention_mask(self, attention_mask: Tensor | None, seq_len: int, dtype: torch.dtype) -> Tensor | None:
        """open_clip's additive causal mask, plus ``-inf`` on padding keys (one mask per batch row and head)."""
        causal = self.attn_mask[:seq_len, :seq_len].to(dtype) if self.attn_mask is not None else None
        if attention_mask is None:
            return causal
        padding = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        padding = padding.masked_fill(attention_mask == 0, float("-inf"))[:, None, :]  # (batch, query, key)
        mask = padding.expand(-1, seq_len, -1) + (causal if causal is not None else 0)
        return mask.repeat_interleave(self.transformer.resblocks[0].attn.num_heads, dim=0)
