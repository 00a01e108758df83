"""Shared fixtures: tiny components built offline (no downloads), and saved pipeline folders built from them."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.presets import build_components  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_components() -> dict:
    """Fresh tiny components (vae, text_encoder, tokenizer, unet, scheduler) with fixed random weights."""
    return build_components("tiny", seed=0)


@pytest.fixture
def tiny_sdxl_components() -> dict:
    """Fresh tiny SDXL components (vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, unet, scheduler) with
    fixed random weights, as ``StableDiffusionXLPipeline(**components)`` takes them."""
    return build_components("tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    """A folder saved by stock ``StableDiffusionPipeline.save_pretrained`` from the tiny components."""
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    pipe = StableDiffusionPipeline(
        **build_components("tiny", seed=0), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """A folder saved by stock ``StableDiffusionXLPipeline.save_pretrained`` from the tiny SDXL components."""
    from diffusers import StableDiffusionXLPipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**build_components("tiny-sdxl", seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _sigint_reaches_python():
    """Ctrl-C as a terminal delivers it: a test suite started as a background job (``cmd &`` in a script) inherits
    SIGINT ignored, and the stop-signal handling rightly leaves an ignored signal ignored; the tests that send SIGINT
    need the interactive default."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield
