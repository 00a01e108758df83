"""Tests for ``ldm.text`` (and the offline tokenizer it relies on), against independent references.

References: open_clip's own tokenizer (a different BPE implementation), stock diffusers ``encode_prompt``, the text
encoder run by hand on hand-built ids, and open_clip's ``forward_intermediates`` for the OpenCLIP wrapper.
"""

from __future__ import annotations

import types

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPTokenizer

from ldm.presets import build_components
from ldm.text import (
    OpenCLIPTextEncoder,
    encode_prompts,
    parse_prompt_weights,
    prompt_chunk_count,
    tokenize_prompt,
)
from ldm.tokenizer import build_clip_tokenizer

BOS, EOS = 49406, 49407
WORDS = ["red", "blue", "green", "cat", "dog", "tree", "house", "sky"]  # one CLIP token each


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def text_encoder() -> torch.nn.Module:
    return build_components("tiny", seed=0)["text_encoder"]


@pytest.fixture(scope="module")
def biased_text_encoder() -> torch.nn.Module:
    """The tiny text encoder with a random final layer norm bias, so its outputs have a nonzero mean.

    Freshly initialised, the final layer norm has zero bias: every output row has mean 0 and A1111's mean rescale is
    0/0. Trained CLIP encoders have a bias, as here.
    """
    text_encoder = build_components("tiny", seed=0)["text_encoder"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.copy_(0.1 + 0.1 * torch.randn(32, generator=generator))
    return text_encoder


def make_open_clip_model() -> CLIP:
    """A tiny randomly initialised open_clip CLIP (3 text blocks, width 32), built offline with fixed weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
        text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=3)
        return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@pytest.fixture(scope="module")
def open_clip_model() -> CLIP:
    return make_open_clip_model()


def word_ids(tokenizer: CLIPTokenizer, words: list[str]) -> list[int]:
    """Ids looked up in the vocabulary directly (no BPE): each word is a single end-of-word token."""
    return tokenizer.convert_tokens_to_ids([w + "</w>" for w in words])


def encode_by_hand(text_encoder: torch.nn.Module, chunks: list[list[int]], pad: int = EOS) -> torch.Tensor:
    """The text encoder's last hidden states of ``BOS + chunk + EOS + pad`` per chunk: ``(len(chunks), 77, h)``."""
    rows = [[BOS, *c, EOS] + [pad] * (75 - len(c)) for c in chunks]
    with torch.no_grad():
        return text_encoder(torch.tensor(rows))[0]


# --- the offline tokenizer against open_clip's ------------------------------------------------------------------

TOKENIZER_PROMPTS = [
    "",
    "A photo of a cat",
    "Hello, world! How are you?",
    "don't stop; it's 3.14159 o'clock",
    "café naïve résumé",
    "東京の夜景, 4k",
    "emoji 🐱🔥 test",
    "multiple   spaces\tand\nnewlines",
    "(masterpiece:1.2), [blurry], \\(escaped\\)",
    "UPPER lower MiXeD",
    "numbers 1234567890 and 1st 2nd",
    "hyphen-ated under_score slash/path back\\slash",
    "  leading and trailing  ",
    " ".join(f"word{i}" for i in range(100)),  # far over 77 tokens: both truncate to BOS + 75 + EOS
]


@pytest.mark.parametrize("prompt", TOKENIZER_PROMPTS)
def test_tokenizer_matches_open_clip(tokenizer: CLIPTokenizer, prompt: str) -> None:
    ours = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    for reference_tokenizer in (open_clip.tokenizer.SimpleTokenizer(), open_clip.get_tokenizer("ViT-L-14")):
        reference = reference_tokenizer([prompt])[0].tolist()
        length = reference.index(EOS) + 1
        assert len(ours) == len(reference) == 77
        assert ours[:length] == reference[:length]
        assert ours[length:] == [tokenizer.pad_token_id] * (77 - length)  # SD 1.x pads with EOS, open_clip with 0
        assert reference[length:] == [0] * (77 - length)


@pytest.mark.parametrize("prompt", ["a &amp; b &lt;tag&gt;", "ﬁne ligature"])
def test_tokenizer_differs_from_open_clip_only_by_its_text_cleaning(tokenizer: CLIPTokenizer, prompt: str) -> None:
    # Known difference, shared with Hugging Face's hub CLIP tokenizer: no ftfy fix_text / html.unescape pass.
    reference = open_clip.tokenizer.SimpleTokenizer()([prompt])[0].tolist()
    reference = reference[: reference.index(EOS) + 1]
    assert tokenizer(prompt).input_ids != reference
    assert tokenizer(open_clip.tokenizer.basic_clean(prompt)).input_ids == reference


@pytest.mark.xfail(strict=True, reason="pad_token='!' is a special token, so every '!' becomes id 0 (diffusers#4153)")
def test_sd2_tokenizer_keeps_exclamation_marks() -> None:
    # Same as Hugging Face's SD 2 / SDXL tokenizer_2; open_clip (what SD 2 was trained with) gives "!</w>" = 256.
    prompt = "a horse! wow!!"
    reference = open_clip.tokenizer.SimpleTokenizer()([prompt])[0].tolist()
    reference = reference[: reference.index(EOS) + 1]
    assert build_clip_tokenizer(pad_token="!")(prompt).input_ids == reference


def test_tokenizer_vocabulary_and_special_tokens(tokenizer: CLIPTokenizer) -> None:
    assert len(tokenizer) == tokenizer.vocab_size == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert build_clip_tokenizer(pad_token="!").pad_token_id == 0  # SD 2.x / open_clip padding


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_round_trips_through_save_pretrained(tmp_path, pad_token: str) -> None:
    tokenizer = build_clip_tokenizer(pad_token=pad_token)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
    assert loaded(TOKENIZER_PROMPTS, **kwargs).input_ids == tokenizer(TOKENIZER_PROMPTS, **kwargs).input_ids
    assert loaded.pad_token_id == tokenizer.pad_token_id


CAPTIONS = ["a red circle on the left", "an orange triangle at the top", "a purple shape in the center"]


def test_reduced_vocabulary_splits_its_texts_exactly_as_clip(tokenizer: CLIPTokenizer) -> None:
    reduced = build_clip_tokenizer(texts=CAPTIONS)
    # 512 byte symbols + the merges these words need (each merge one token) + BOS, EOS
    words = {token for text in CAPTIONS for token in tokenizer.tokenize(text)}
    assert 512 + len(words) < len(reduced) < 600
    assert (reduced.bos_token_id, reduced.eos_token_id, reduced.pad_token_id) == (len(reduced) - 2,) + (
        len(reduced) - 1,
    ) * 2
    for text in CAPTIONS + ["A Red CIRCLE, on the left!"]:
        assert reduced.tokenize(text) == tokenizer.tokenize(text)
        full_ids, ids = tokenizer(text).input_ids, reduced(text).input_ids
        # the same tokens, renumbered: every id maps back to CLIP's token string
        assert reduced.convert_ids_to_tokens(ids) == tokenizer.convert_ids_to_tokens(full_ids)
    # byte symbols keep CLIP's ids (they come first in both)
    assert reduced("a").input_ids[1] == tokenizer("a").input_ids[1] == 320


@pytest.mark.parametrize("prompt", TOKENIZER_PROMPTS)
def test_reduced_vocabulary_tokenizes_any_text_without_unknown_tokens(prompt: str) -> None:
    reduced = build_clip_tokenizer(texts=CAPTIONS)
    tokens = reduced.tokenize(prompt)
    assert "".join(tokens).replace("</w>", "") == "".join(build_clip_tokenizer().tokenize(prompt)).replace("</w>", "")
    assert reduced.unk_token_id not in reduced(prompt).input_ids[1:-1] or not prompt.strip()


def test_reduced_vocabulary_round_trips_through_save_pretrained(tmp_path) -> None:
    reduced = build_clip_tokenizer(texts=CAPTIONS)
    reduced.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = CAPTIONS + TOKENIZER_PROMPTS
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
    assert len(loaded) == len(reduced)
    assert loaded(prompts, **kwargs).input_ids == reduced(prompts, **kwargs).input_ids


# --- parity with stock diffusers --------------------------------------------------------------------------------

PARITY_PROMPTS = ["a photo of an astronaut riding a horse", "", "Hello, world! It's 3.14: no weights; café 東京"]


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_matches_stock_encode_prompt_bitwise(tiny_components: dict, clip_skip: int | None) -> None:
    text_encoder = tiny_components["text_encoder"]
    # transformers 5 flattened CLIPTextModel (no .text_model), which diffusers' clip_skip branch still reads.
    text_encoder.text_model = types.SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    pipe = StableDiffusionPipeline(
        **tiny_components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with torch.no_grad():
        stock = pipe.encode_prompt(PARITY_PROMPTS, "cpu", 1, False, clip_skip=clip_skip)[0]
        ours = encode_prompts(text_encoder, tiny_components["tokenizer"], PARITY_PROMPTS, clip_skip=clip_skip)
        unskipped = encode_prompts(text_encoder, tiny_components["tokenizer"], PARITY_PROMPTS)
    assert ours.shape == (3, 77, 32)
    assert torch.equal(ours, stock)
    assert clip_skip is None or not torch.allclose(ours, unskipped)


def test_passes_attention_mask_only_when_the_config_asks(tiny_components: dict) -> None:
    text_encoder, tokenizer = tiny_components["text_encoder"], tiny_components["tokenizer"]
    pipe = StableDiffusionPipeline(
        **tiny_components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with torch.no_grad():
        unmasked = encode_prompts(text_encoder, tokenizer, PARITY_PROMPTS)
        text_encoder.config.use_attention_mask = True
        stock = pipe.encode_prompt(PARITY_PROMPTS, "cpu", 1, False)[0]
        masked = encode_prompts(text_encoder, tokenizer, PARITY_PROMPTS)
    assert torch.equal(masked, stock)
    assert not torch.equal(masked, unmasked)  # the mask changes the padding positions' states


def test_dtype_and_device_arguments(text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer) -> None:
    with torch.no_grad():
        out = encode_prompts(text_encoder, tokenizer, ["a cat"], dtype=torch.float64, device="cpu")
        reference = encode_prompts(text_encoder, tokenizer, ["a cat"])
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert reference.dtype == text_encoder.dtype
    assert torch.equal(out, reference.double())


# --- long prompts and padding chunks ----------------------------------------------------------------------------


def long_words(n: int, offset: int = 0) -> list[str]:
    return [WORDS[(i + offset) % len(WORDS)] for i in range(n)]


def test_long_prompt_is_encoded_in_chunks(text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer) -> None:
    words = long_words(200)
    ids = word_ids(tokenizer, words)
    prompt = " ".join(words)
    assert tokenize_prompt(tokenizer, prompt) == (ids, [1.0] * 200)
    assert prompt_chunk_count(tokenizer, prompt) == 3
    with torch.no_grad():
        out = encode_prompts(text_encoder, tokenizer, [prompt])
    assert out.shape == (1, 3 * 77, 32)
    by_hand = encode_by_hand(text_encoder, [ids[0:75], ids[75:150], ids[150:200]])
    torch.testing.assert_close(out[0].reshape(3, 77, 32), by_hand)


def test_tokens_beyond_75_are_not_lost(text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer) -> None:
    words = long_words(200)
    changed = words[:160] + long_words(40, offset=3)
    with torch.no_grad():
        a, b = encode_prompts(text_encoder, tokenizer, [" ".join(words), " ".join(changed)]).reshape(2, 3, 77, 32)
    assert torch.equal(a[:2], b[:2])
    assert not torch.allclose(a[2], b[2])


@pytest.mark.parametrize(("num_tokens", "chunks"), [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_prompt_chunk_count_boundaries(tokenizer: CLIPTokenizer, num_tokens: int, chunks: int) -> None:
    assert prompt_chunk_count(tokenizer, " ".join(long_words(num_tokens))) == chunks


def test_num_chunks_pads_with_empty_prompt_chunks(text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer) -> None:
    with torch.no_grad():
        padded = encode_prompts(text_encoder, tokenizer, ["a red cat"], num_chunks=3)
        alone = encode_prompts(text_encoder, tokenizer, ["a red cat"])
        by_hand = encode_by_hand(text_encoder, [word_ids(tokenizer, ["a", "red", "cat"]), []])
    assert padded.shape == (1, 3 * 77, 32)
    chunks = padded[0].reshape(3, 77, 32)
    torch.testing.assert_close(chunks[0], alone[0])
    torch.testing.assert_close(chunks[0], by_hand[0])
    torch.testing.assert_close(chunks[1], by_hand[1])  # a padding chunk is BOS + EOS + pad: the empty prompt
    torch.testing.assert_close(chunks[2], by_hand[1])


def test_batch_of_mixed_lengths_pads_the_short_prompts(
    text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer
) -> None:
    long_prompt = " ".join(long_words(100))
    with torch.no_grad():
        batch = encode_prompts(text_encoder, tokenizer, [long_prompt, ""])
        empty = encode_prompts(text_encoder, tokenizer, [""])
        long_alone = encode_prompts(text_encoder, tokenizer, [long_prompt])
    assert batch.shape == (2, 2 * 77, 32)
    torch.testing.assert_close(batch[0], long_alone[0])
    torch.testing.assert_close(batch[1], empty[0].repeat(2, 1))


# --- prompt weights ---------------------------------------------------------------------------------------------

PARSE_CASES = [
    ("a photo of a cat", [("a photo of a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("(a:1.5) b [c]", [("a", 1.5), (" b ", 1.0), ("c", 1 / 1.1)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[[cat]]", [("cat", 1 / 1.1 / 1.1)]),
    ("((cat:1.5) dog)", [("cat", 1.5 * 1.1), (" dog", 1.1)]),
    ("[a (b:2)]", [("a ", 1 / 1.1), ("b", 2 / 1.1)]),
    ("(cat: 0.5 )", [("cat", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("\\(literal\\) \\[too\\]", [("(literal) [too]", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("C:\\dir", [("C:\\dir", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),  # an open bracket runs to the end of the prompt
    ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),
    ("stray) bracket]", [("stray) bracket]", 1.0)]),
    ("time: 5pm", [("time: 5pm", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: kept as text (A1111 would raise)
    ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ("(a)(b)", [("ab", 1.1)]),  # adjacent fragments of equal weight merge
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSE_CASES)
def test_parse_prompt_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_weights(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_tokenize_prompt_weights_tokens(tokenizer: CLIPTokenizer) -> None:
    ids, weights = tokenize_prompt(tokenizer, "a (red cat:1.3) in [the] sky", weighting=True)
    assert ids == word_ids(tokenizer, ["a", "red", "cat", "in", "the", "sky"])
    assert weights == pytest.approx([1.0, 1.3, 1.3, 1.0, 1 / 1.1, 1.0])


def test_weighting_off_reads_brackets_as_text_like_stock(tiny_components: dict) -> None:
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder = tiny_components["tokenizer"], tiny_components["text_encoder"]
    stock = StableDiffusionPipeline(
        **tiny_components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    prompt = "a (red:1.3) car [in] the (sky)"
    ids, weights = tokenize_prompt(tokenizer, prompt)
    assert ids == tokenizer(prompt, add_special_tokens=False).input_ids and set(weights) == {1.0}
    with torch.no_grad():
        literal = encode_prompts(text_encoder, tokenizer, [prompt])
        weighted = encode_prompts(text_encoder, tokenizer, [prompt], weighting=True)
        expected = stock.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(literal, expected)
    assert not torch.allclose(weighted, expected)


def test_unit_weights_reproduce_the_unweighted_embedding(
    biased_text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer
) -> None:
    with torch.no_grad():
        plain = encode_prompts(biased_text_encoder, tokenizer, ["a red cat in the sky"])
        unit = encode_prompts(biased_text_encoder, tokenizer, ["a (red cat:1.0) in the (sky:1)"], weighting=True)
    assert torch.equal(unit, plain)


def a1111_emphasis(z: torch.Tensor, rows: dict[int, float]) -> torch.Tensor:
    """A1111's ``process_tokens`` on one chunk: multiply the given rows, then restore the chunk's mean."""
    weighted = z.clone()
    for row, weight in rows.items():
        weighted[row] *= weight
    return weighted * (z.mean() / weighted.mean())


def test_weight_scales_the_word_rows_then_restores_the_mean(
    biased_text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer
) -> None:
    with torch.no_grad():
        weighted = encode_prompts(
            biased_text_encoder, tokenizer, ["a (cat:1.3) in the sky", "a cat in the sky"], weighting=True
        )
    z = encode_by_hand(biased_text_encoder, [word_ids(tokenizer, ["a", "cat", "in", "the", "sky"])])[0]
    assert z.mean().abs() > 0.05  # so the rescale is well defined
    expected = a1111_emphasis(z, {2: 1.3})  # row 0 is BOS, row 1 "a", row 2 "cat"
    torch.testing.assert_close(weighted[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(weighted[0].mean(), z.mean())
    torch.testing.assert_close(weighted[1], z, atol=1e-6, rtol=0)  # the batch neighbour is untouched
    assert not torch.allclose(weighted[0], weighted[1])


def test_weights_apply_in_later_chunks(biased_text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer) -> None:
    words = long_words(80)
    ids = word_ids(tokenizer, words)
    prompt = " ".join(words[:78]) + f" ({words[78]}:0.5) {words[79]}"
    with torch.no_grad():
        chunks = encode_prompts(biased_text_encoder, tokenizer, [prompt], weighting=True)[0].reshape(2, 77, 32)
    by_hand = encode_by_hand(biased_text_encoder, [ids[:75], ids[75:]])
    torch.testing.assert_close(chunks[0], by_hand[0])
    expected = a1111_emphasis(by_hand[1], {1 + 3: 0.5})  # token 78 is the 4th of chunk 1, after BOS
    torch.testing.assert_close(chunks[1], expected, atol=1e-6, rtol=0)


def test_weights_skip_the_rescale_when_the_mean_is_zero(
    text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer
) -> None:
    # Zero layer-norm bias: every output row has mean ~0, so A1111's ratio of means would be noise (here NaN).
    with torch.no_grad():
        weighted = encode_prompts(text_encoder, tokenizer, ["a (cat:1.3) in the sky"], weighting=True)[0]
    z = encode_by_hand(text_encoder, [word_ids(tokenizer, ["a", "cat", "in", "the", "sky"])])[0]
    assert z.mean().abs() < 1e-6
    expected = z.clone()
    expected[2] *= 1.3
    torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [0.0, 0.1])
def test_weighted_embeddings_have_finite_gradients(tokenizer: CLIPTokenizer, bias: float) -> None:
    text_encoder = build_components("tiny", seed=0)["text_encoder"]
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.fill_(bias)  # 0.0: the zero-mean branch of the rescale
    encode_prompts(
        text_encoder, tokenizer, ["a (cat:1.3) in [the] sky", "plain"], weighting=True
    ).square().sum().backward()
    grads = [p.grad for p in text_encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert text_encoder.final_layer_norm.weight.grad.abs().sum() > 0


# --- the OpenCLIP wrapper ---------------------------------------------------------------------------------------

OPEN_CLIP_PROMPTS = ["a photo of a cat", "an astronaut, riding a horse; 4k.", ""]  # no "!": see above


def open_clip_reference(model: CLIP, ids: torch.Tensor) -> list[torch.Tensor]:
    """open_clip's own per-block text states with ``ln_final`` applied (last entry: ``encode_text`` before pooling)."""
    with torch.no_grad():
        out = model.forward_intermediates(text=ids, normalize_intermediates=True, intermediates_only=True)
    return out["text_intermediates"]


@pytest.mark.parametrize(("layer", "index"), [("last", -1), ("penultimate", -2)])
def test_open_clip_wrapper_matches_open_clip(open_clip_model: CLIP, layer: str, index: int) -> None:
    ids = open_clip.get_tokenizer("ViT-L-14")(OPEN_CLIP_PROMPTS)
    wrapper = OpenCLIPTextEncoder(open_clip_model, layer=layer)
    with torch.no_grad():
        out = wrapper(ids, output_hidden_states=True)
    reference = open_clip_reference(open_clip_model, ids)
    torch.testing.assert_close(out[0], reference[index], atol=0, rtol=0)
    assert len(out.hidden_states) == wrapper.config.num_hidden_layers + 1 == len(reference) + 2 + index
    torch.testing.assert_close(wrapper.final_layer_norm(out.hidden_states[-1]), out[0])
    assert wrapper.config.use_attention_mask is False and wrapper.config.hidden_size == 32
    assert wrapper.dtype == torch.float32 and wrapper.device.type == "cpu"


def test_open_clip_wrapper_pools_like_encode_text(open_clip_model: CLIP) -> None:
    ids = open_clip.get_tokenizer("ViT-L-14")(OPEN_CLIP_PROMPTS)
    with torch.no_grad():
        pooled = OpenCLIPTextEncoder(open_clip_model, layer="last")(ids).pooler_output
        torch.testing.assert_close(pooled @ open_clip_model.text_projection, open_clip_model.encode_text(ids))


def test_open_clip_wrapper_handles_sequence_first_transformers(open_clip_model: CLIP) -> None:
    ids = open_clip.get_tokenizer("ViT-L-14")(OPEN_CLIP_PROMPTS)
    expected = OpenCLIPTextEncoder(open_clip_model, layer="penultimate")(ids)[0].detach()
    model = make_open_clip_model()
    model.transformer.batch_first = False  # older open_clip ran its text transformer (seq, batch, width)
    for block in model.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad():
        out = OpenCLIPTextEncoder(model, layer="penultimate")(ids)[0]
    torch.testing.assert_close(out, open_clip_reference(model, ids)[-2])
    torch.testing.assert_close(out, expected)


def test_encode_prompts_with_open_clip_wrapper(open_clip_model: CLIP) -> None:
    tokenizer = build_clip_tokenizer(pad_token="!")
    ids = open_clip.get_tokenizer("ViT-L-14")(OPEN_CLIP_PROMPTS)
    penultimate = OpenCLIPTextEncoder(open_clip_model, layer="penultimate")
    last = OpenCLIPTextEncoder(open_clip_model, layer="last")
    with torch.no_grad():
        out = encode_prompts(penultimate, tokenizer, OPEN_CLIP_PROMPTS)
        skipped = encode_prompts(last, tokenizer, OPEN_CLIP_PROMPTS, clip_skip=1)
        long = encode_prompts(penultimate, tokenizer, [" ".join(long_words(100))])
    assert out.shape == (3, 77, 32) and long.shape == (1, 154, 32)
    torch.testing.assert_close(out, open_clip_reference(open_clip_model, ids)[-2], atol=0, rtol=0)
    torch.testing.assert_close(skipped, out)


def test_stock_pipeline_accepts_open_clip_wrapper(tiny_components: dict, open_clip_model: CLIP) -> None:
    wrapper = OpenCLIPTextEncoder(open_clip_model, layer="last")
    tokenizer = build_clip_tokenizer(pad_token="!")
    components = {**tiny_components, "text_encoder": wrapper, "tokenizer": tokenizer}
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with torch.no_grad():
        for clip_skip in (None, 1):
            stock = pipe.encode_prompt(OPEN_CLIP_PROMPTS, "cpu", 1, False, clip_skip=clip_skip)[0]
            ours = encode_prompts(wrapper, tokenizer, OPEN_CLIP_PROMPTS, clip_skip=clip_skip)
            assert torch.equal(stock, ours)


def test_open_clip_wrapper_attention_mask(open_clip_model: CLIP) -> None:
    ids = open_clip.get_tokenizer("ViT-L-14")(OPEN_CLIP_PROMPTS)
    mask = (ids != 0).long()
    mask[:, 0] = 1  # the empty prompt's BOS
    wrapper = OpenCLIPTextEncoder(open_clip_model, layer="last")
    with torch.no_grad():
        plain = wrapper(ids)[0]
        ones = wrapper(ids, attention_mask=torch.ones_like(ids))[0]
        masked = wrapper(ids, attention_mask=mask)[0]
    torch.testing.assert_close(ones, plain)
    keep = mask.bool()
    torch.testing.assert_close(masked[keep], plain[keep])  # causal attention never sees later padding
    assert not torch.allclose(masked[~keep], plain[~keep])


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_skip": 2}, "clip_skip must be between 0 and"),
        ({"clip_skip": -1}, "clip_skip must be between 0 and"),
        ({"num_chunks": 0}, "num_chunks must be at least 1"),
        ({"prompts": "a cat"}, "prompts must be a list of strings"),
        ({"prompts": ["a", 3]}, "prompts must be a list of strings"),
        ({"prompts": []}, "prompts is empty"),
    ],
)
def test_encode_prompts_rejects_bad_arguments(
    text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer, kwargs: dict, message: str
) -> None:
    arguments = {"prompts": ["a cat"], **kwargs}
    with pytest.raises(ValueError, match=message):
        encode_prompts(text_encoder, tokenizer, **arguments)


def test_clip_skip_needs_a_final_layer_norm(tokenizer: CLIPTokenizer) -> None:
    class Bare(torch.nn.Module):
        config = types.SimpleNamespace(num_hidden_layers=2, use_attention_mask=False)
        dtype = torch.float32
        device = torch.device("cpu")

    with pytest.raises(ValueError, match="final_layer_norm"):
        encode_prompts(Bare(), tokenizer, ["a cat"], clip_skip=1)


def test_open_clip_wrapper_rejects_bad_inputs(open_clip_model: CLIP) -> None:
    with pytest.raises(ValueError, match="layer must be 'last' or 'penultimate'"):
        OpenCLIPTextEncoder(open_clip_model, layer="first")
    with pytest.raises(ValueError, match="not an open_clip CLIP"):
        OpenCLIPTextEncoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="split longer prompts into chunks"):
        OpenCLIPTextEncoder(open_clip_model)(torch.zeros(1, 78, dtype=torch.long))
