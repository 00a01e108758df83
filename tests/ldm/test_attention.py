"""Attention backends: each must compute what diffusers' explicit-softmax ``AttnProcessor`` computes."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from ldm import attention
from ldm.attention import attention_backend_of, available_attention_backends, set_attention_backend
from ldm.presets import build_components

ATOL = 1e-5


@pytest.fixture(scope="module")
def models() -> dict:
    """The tiny U-Net, VAE and text encoder (shared: every test sets the processors it needs)."""
    components = build_components("tiny", seed=0)
    return {name: components[name] for name in ("unet", "vae", "text_encoder")}


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """Fixed random inputs for the U-Net (latents, timestep, text states) and the VAE (an image, latents)."""
    generator = torch.Generator().manual_seed(1234)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "text": torch.randn(2, 7, 32, generator=generator),
        "image": torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1,
    }


@torch.no_grad()
def unet_out(unet: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(inputs["latents"], inputs["timestep"], encoder_hidden_states=inputs["text"]).sample


@torch.no_grad()
def vae_out(vae: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Encoder mean and decoder output together, so both mid-block attention layers are exercised."""
    mean = vae.encode(inputs["image"]).latent_dist.mean
    decoded = vae.decode(inputs["latents"][:1]).sample
    return torch.cat([mean.flatten(), decoded.flatten()])


@pytest.fixture(scope="module")
def reference(models: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """U-Net and VAE outputs with diffusers' classic explicit-softmax ``AttnProcessor`` on every layer."""
    models["unet"].set_attn_processor(AttnProcessor())
    models["vae"].set_attn_processor(AttnProcessor())
    return {"unet": unet_out(models["unet"], inputs), "vae": vae_out(models["vae"], inputs)}


def outputs(models: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"unet": unet_out(models["unet"], inputs), "vae": vae_out(models["vae"], inputs)}


def processors(model: torch.nn.Module) -> list:
    return list(model.attn_processors.values())


class _SkipAttention:
    """A broken processor (attention output replaced by zeros) to show the tolerance can catch a wrong result."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        out = torch.zeros_like(hidden_states)
        return out + residual if attn.residual_connection else out


def test_reference_is_sensitive_to_attention(models: dict, inputs: dict, reference: dict) -> None:
    for name in ("unet", "vae"):
        models[name].set_attn_processor(_SkipAttention())
    broken = outputs(models, inputs)
    for name in ("unet", "vae"):
        assert (broken[name] - reference[name]).abs().max() > 100 * ATOL, name


def test_sdpa_matches_classic_attention(models: dict, inputs: dict, reference: dict) -> None:
    models["unet"].set_attn_processor(AttnProcessor())
    models["vae"].set_attn_processor(AttnProcessor())
    assert attention_backend_of(models["unet"]) == "AttnProcessor"

    set_attention_backend(models["unet"], "sdpa")
    set_attention_backend(models["vae"])  # sdpa is the default
    for name in ("unet", "vae"):
        assert processors(models[name]) and all(type(p) is AttnProcessor2_0 for p in processors(models[name]))
        assert attention_backend_of(models[name]) == "sdpa"
    got = outputs(models, inputs)
    torch.testing.assert_close(got["unet"], reference["unet"], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["vae"], reference["vae"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("slice_size", "unet_slice", "vae_slice"),
    [("auto", 4, 1), ("max", 1, 1), (3, 3, 1), (None, 4, 1), (64, 8, 1)],
)
def test_sliced_matches_classic_attention(
    models: dict, inputs: dict, reference: dict, slice_size: object, unet_slice: int, vae_slice: int
) -> None:
    # The tiny U-Net's layers have 8 heads and the VAE's one: "auto" halves, ints are capped at the head count.
    set_attention_backend([models["unet"], models["vae"]], "sliced", slice_size=slice_size)
    for name, expected in (("unet", unet_slice), ("vae", vae_slice)):
        procs = processors(models[name])
        assert procs and all(type(p) is SlicedAttnProcessor for p in procs)
        assert {p.slice_size for p in procs} == {expected}
        assert attention_backend_of(models[name]) == "sliced"
    got = outputs(models, inputs)
    torch.testing.assert_close(got["unet"], reference["unet"], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["vae"], reference["vae"], atol=ATOL, rtol=0)


def test_switching_back_from_sliced_restores_sdpa(models: dict, inputs: dict, reference: dict) -> None:
    pair = [models["unet"], models["vae"]]
    set_attention_backend(pair, "sliced", slice_size="max")
    assert attention_backend_of(pair) == "sliced"
    set_attention_backend(pair, "sdpa")
    assert attention_backend_of(pair) == "sdpa"
    assert all(type(p) is AttnProcessor2_0 for model in pair for p in processors(model))
    got = outputs(models, inputs)
    torch.testing.assert_close(got["unet"], reference["unet"], atol=ATOL, rtol=0)


def test_models_without_attention_layers_are_skipped(models: dict) -> None:
    text_encoder = models["text_encoder"]
    before = {name: type(module) for name, module in text_encoder.named_modules()}
    set_attention_backend([text_encoder, models["unet"]], "sliced")
    assert {name: type(module) for name, module in text_encoder.named_modules()} == before
    assert attention_backend_of(text_encoder) == "none"
    assert attention_backend_of(models["unet"]) == "sliced"
    # Even xformers: a text encoder alone needs neither the package nor CUDA.
    set_attention_backend(text_encoder, "xformers")


def test_mixed_processors_are_reported(models: dict) -> None:
    set_attention_backend(models["unet"], "sdpa")
    first = next(iter(models["unet"].attn_processors))
    processors_by_name = dict(models["unet"].attn_processors)
    processors_by_name[first] = SlicedAttnProcessor(2)
    models["unet"].set_attn_processor(processors_by_name)
    assert attention_backend_of(models["unet"]) == "mixed"
    set_attention_backend(models["vae"], "sdpa")
    assert attention_backend_of([models["vae"], models["text_encoder"]]) == "sdpa"


def test_unknown_backend_lists_the_allowed_names(models: dict) -> None:
    set_attention_backend(models["unet"], "sdpa")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'") as info:
        set_attention_backend(models["unet"], "flash")
    for name in ("sdpa", "xformers", "sliced"):
        assert f"'{name}'" in str(info.value)
    assert attention_backend_of(models["unet"]) == "sdpa"


@pytest.mark.parametrize("slice_size", [0, -2, "half", 2.5, True])
def test_bad_slice_size_lists_the_allowed_values(models: dict, slice_size: object) -> None:
    set_attention_backend(models["unet"], "sdpa")
    with pytest.raises(ValueError, match=r"slice_size must be 'auto', 'max' or an int >= 1") as info:
        set_attention_backend(models["unet"], "sliced", slice_size=slice_size)
    assert repr(slice_size) in str(info.value)
    assert attention_backend_of(models["unet"]) == "sdpa"


def test_xformers_not_installed_names_the_fix(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "is_xformers_available", lambda: False)
    set_attention_backend(models["unet"], "sdpa")
    with pytest.raises(ValueError, match="not installed") as info:
        set_attention_backend([models["unet"], models["vae"]], "xformers")
    assert "pip install xformers" in str(info.value)
    assert "attention='sdpa'" in str(info.value)
    assert attention_backend_of(models["unet"]) == "sdpa"


def test_xformers_on_cpu_names_the_fix(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "is_xformers_available", lambda: True)
    set_attention_backend(models["unet"], "sdpa")
    with pytest.raises(ValueError, match="xformers has no CPU kernels") as info:
        set_attention_backend(models["unet"], "xformers")
    assert "move the model to CUDA" in str(info.value)
    assert "'sdpa'" in str(info.value)
    assert attention_backend_of(models["unet"]) == "sdpa"


def test_xformers_mismatch_is_reraised_with_the_fix(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Our checks see xformers "installed" and the models "on CUDA", so the switch reaches diffusers: the VAE switches
    # (simulated), then the U-Net fails the way a wheel built for another torch does. Both must be left as they were.
    monkeypatch.setattr(attention, "is_xformers_available", lambda: True)
    monkeypatch.setattr(attention, "_execution_device_types", lambda model: {"cuda"})

    def switch(self, attention_op=None) -> None:
        self.set_attn_processor(XFormersAttnProcessor())

    def fail(self, attention_op=None) -> None:
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(type(models["vae"]), "enable_xformers_memory_efficient_attention", switch)
    monkeypatch.setattr(type(models["unet"]), "enable_xformers_memory_efficient_attention", fail)
    pair = [models["vae"], models["unet"]]
    set_attention_backend(pair, "sliced")
    with pytest.raises(ValueError, match="xformers is installed but could not run") as info:
        set_attention_backend(pair, "xformers")
    message = str(info.value)
    assert "NotImplementedError" in message and "pip install xformers" in message and "'sdpa'" in message
    assert attention_backend_of(models["vae"]) == "sliced"
    assert attention_backend_of(models["unet"]) == "sliced"

    # The switch itself, when diffusers succeeds, is reported as xformers.
    set_attention_backend(models["vae"], "xformers")
    assert attention_backend_of(models["vae"]) == "xformers"
    set_attention_backend(models["vae"], "sdpa")
    assert attention_backend_of(models["vae"]) == "sdpa"


def test_available_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "is_xformers_available", lambda: True)
    assert available_attention_backends("cpu") == ["sdpa", "sliced"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_attention_backends(torch.device("cuda", 0)) == ["sdpa", "xformers", "sliced"]
    monkeypatch.setattr(attention, "is_xformers_available", lambda: False)
    assert available_attention_backends("cuda") == ["sdpa", "sliced"]


def test_ip_adapter_weights_are_kept_by_sdpa_and_refused_by_sliced(models: dict) -> None:
    unet = models["unet"]
    set_attention_backend(unet, "sdpa")
    layers = {name: module for name, module in unet.named_modules() if hasattr(module, "get_processor")}
    cross_name, cross = next((name, layer) for name, layer in layers.items() if layer.is_cross_attention)
    adapter = IPAdapterAttnProcessor(hidden_size=cross.inner_dim, cross_attention_dim=32, num_tokens=(4,))
    cross.set_processor(adapter)
    try:
        with pytest.raises(ValueError, match="has no sliced variant") as info:
            set_attention_backend(unet, "sliced")
        assert cross_name in str(info.value) and "'sdpa'" in str(info.value)
        assert cross.get_processor() is adapter
        assert all(
            type(p) is AttnProcessor2_0 for n, p in unet.attn_processors.items() if n != f"{cross_name}.processor"
        )

        set_attention_backend(unet, "sdpa")
        converted = cross.get_processor()
        assert type(converted) is IPAdapterAttnProcessor2_0
        torch.testing.assert_close(converted.to_k_ip[0].weight, adapter.to_k_ip[0].weight, atol=0, rtol=0)
        torch.testing.assert_close(converted.to_v_ip[0].weight, adapter.to_v_ip[0].weight, atol=0, rtol=0)
        assert attention_backend_of(unet) == "sdpa"
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
