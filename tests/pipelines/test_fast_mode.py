"""Fast mode (:mod:`pipelines.fast_mode`): the same images as the default mode within float rounding (compiled on the
tiny model; layout and fused projections on tiny SDXL and the shipped model), no graph break in the U-Net call of the
denoising loop nor in the VAE decode, bit-identical images after ``disable_fast_mode``, fusion skipped where it
would change the images (LoRA, sliced attention), and the ``--fast`` / ``--step-cache`` / ``--tome`` flags reaching
the pipeline and the PNG metadata.

Compiling with inductor on a 2-core CPU takes about a minute for the tiny U-Net (less with a warm
``~/.cache/ldm-toolkit/inductor``), so one test compiles, once; the graph-break checks trace with dynamo only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0, SlicedAttnProcessor
from peft import LoraConfig
from PIL import Image

from pipelines import LatentDiffusionPipeline
from pipelines.cli import model_settings
from pipelines.fast_mode import FastModeMixin
from pipelines.loading import DEFAULT_MODEL, load_model, load_pipeline
from pipelines.txt2img import build_parser, main

pytestmark = pytest.mark.slow

ATOL = 1e-4
"""Fast mode's images (and latents) agree with the default mode's to this absolute tolerance, on [0, 1] pixels:
fused matmuls and compiled kernels sum in another order (measured: ~3e-6 on the tiny models)."""
PROMPT = "a red circle on a blue square"


def call(pipe: LatentDiffusionPipeline, output_type: str = "np", **kwargs: Any) -> np.ndarray:
    """Two steps with guidance at a fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    options = {"num_inference_steps": 2, "guidance_scale": 5.0, **kwargs}
    result = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, **options).images
    return np.asarray(result.float() if isinstance(result, torch.Tensor) else result)


def unet_call_of_the_loop(pipe: LatentDiffusionPipeline) -> tuple[tuple, dict]:
    """The arguments the denoising loop passes to the U-Net at its first step (guided)."""
    captured: dict[str, Any] = {}

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.setdefault("call", (args, kwargs))

    handle = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        call(pipe, output_type="latent", num_inference_steps=1)
    finally:
        handle.remove()
    return captured["call"]


def graph_breaks(function: Any, *args: Any, **kwargs: Any) -> int:
    """``torch._dynamo.explain``'s graph break count of ``function(*args, **kwargs)``."""
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(function)(*args, **kwargs)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


# --------------------------------------------------------------------------------------------- compiled (tiny SD)


def test_compiled_fast_mode_matches_default_and_disable_restores_it(tiny_sd_dir: str) -> None:
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    default_latents, default_images = call(pipe, output_type="latent"), call(pipe)

    pipe.enable_fast_mode()
    assert pipe.fast_mode_enabled
    # The U-Net compiled as one graph (fullgraph=True: a break would be recorded and logged), for the guided batch.
    fast_latents = call(pipe, output_type="latent")
    stats = pipe.fast_mode_stats
    assert stats.compiled == ("U-Net", "VAE decoder") and stats.fused == ("U-Net", "VAE") and not stats.skipped
    assert stats.graph_breaks == [] and stats.compiles == 1 and stats.compile_seconds > 0
    np.testing.assert_allclose(fast_latents, default_latents, atol=ATOL, rtol=0)
    assert not np.array_equal(fast_latents, default_latents)  # the compiled, fused kernels did run
    call(pipe, output_type="latent")
    assert stats.compiles == 1  # the same shapes: no recompilation

    pipe.disable_fast_mode()
    assert not pipe.fast_mode_enabled and pipe.fast_mode_stats is None
    assert pipe.unet._compiled_call_impl is None and "_decode" not in pipe.vae.__dict__
    assert {type(p) for p in (*pipe.unet.attn_processors.values(), *pipe.vae.attn_processors.values())} == {
        AttnProcessor2_0
    }
    assert sorted(pipe.unet.state_dict()) == sorted(load_pipeline(tiny_sd_dir).unet.state_dict())
    assert all(p.is_contiguous() for p in pipe.unet.parameters())
    np.testing.assert_array_equal(call(pipe, output_type="latent"), default_latents)
    np.testing.assert_array_equal(call(pipe), default_images)


# ---------------------------------------------------------------------------------------------- no graph breaks


@pytest.mark.parametrize("which", ["tiny-sdxl", "shipped"])  # tiny SD: compiled with fullgraph=True above
def test_no_graph_break_in_the_unet_call_nor_the_vae_decode(which: str, tiny_sdxl_dir: str) -> None:
    pipe = load_pipeline(tiny_sdxl_dir if which == "tiny-sdxl" else DEFAULT_MODEL)
    pipe.enable_fast_mode(compile=False)  # the fused processors are what gets compiled
    args, kwargs = unet_call_of_the_loop(pipe)
    assert graph_breaks(pipe.unet, *args, **kwargs) == 0
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    assert graph_breaks(pipe.vae._decode, latents) == 0


# ------------------------------------------------------------------------------ uncompiled parts: SDXL, shipped


@pytest.mark.parametrize("which", ["tiny-sdxl", "shipped"])
def test_layout_and_fused_projections_keep_the_images(which: str, tiny_sdxl_dir: str) -> None:
    pipe = load_pipeline(tiny_sdxl_dir if which == "tiny-sdxl" else DEFAULT_MODEL)
    kwargs = {"num_inference_steps": 3} if which == "shipped" else {}
    default = call(pipe, **kwargs)
    pipe.enable_fast_mode(compile=False)
    assert pipe.fast_mode_stats.fused == ("U-Net", "VAE")
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast = call(pipe, **kwargs)
    np.testing.assert_allclose(fast, default, atol=ATOL, rtol=0)
    pipe.disable_fast_mode()
    np.testing.assert_array_equal(call(pipe, **kwargs), default)


def test_lora_is_not_bypassed(tiny_sd_dir: str) -> None:
    pipe = load_pipeline(tiny_sd_dir)
    without_lora = call(pipe)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft starts the up-projections at 0: give the LoRA an effect
                param.copy_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    with_lora = call(pipe)
    assert np.abs(with_lora - without_lora).max() > 0.01

    pipe.enable_fast_mode(compile=False)
    assert "LoRA" in pipe.fast_mode_stats.skipped["U-Net"] and pipe.fast_mode_stats.fused == ("VAE",)
    np.testing.assert_allclose(call(pipe), with_lora, atol=ATOL, rtol=0)


def test_sliced_attention_is_not_replaced(tiny_sd_dir: str) -> None:
    pipe = load_pipeline(tiny_sd_dir)
    pipe.set_attention_backend("sliced")
    pipe.enable_fast_mode(compile=False)
    assert "SlicedAttnProcessor" in pipe.fast_mode_stats.skipped["U-Net"]
    assert all(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    pipe.disable_fast_mode()
    assert all(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_unknown_mode_is_refused(tiny_sd_dir: str) -> None:
    pipe = load_pipeline(tiny_sd_dir)
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'; choose one of default, reduce-overhead"):
        pipe.enable_fast_mode(mode="fastest")
    assert not pipe.fast_mode_enabled


# ------------------------------------------------------------------------------------------------------- the CLI


def test_speed_flags_reach_the_pipeline_and_the_metadata(
    capsys, monkeypatch, tiny_sd_dir: str, tmp_path: Path
) -> None:
    calls = []
    enable = FastModeMixin.enable_fast_mode

    def enable_without_compiling(self, **kwargs: Any) -> None:
        calls.append(kwargs)
        enable(self, compile=False)  # compiling is the test above's

    monkeypatch.setattr(FastModeMixin, "enable_fast_mode", enable_without_compiling)
    argv = ["--model", tiny_sd_dir, "--out", str(tmp_path), "--steps", "4", "--prompt", PROMPT, "--seed", "1"]
    argv += ["--fast", "--step-cache", "2"]
    assert main(argv) == 0
    path = Path(capsys.readouterr().out.strip())
    assert calls == [{}]
    pipe = load_model(model_settings(build_parser().parse_args(argv))).pipe  # the cached model the command used
    assert pipe.fast_mode_enabled and pipe.step_caching_interval == 2 and pipe.token_merging_ratio is None
    with Image.open(path) as image:
        assert image.text["fast_mode"] == "true" and image.text["step_cache"] == "2"
        assert "Step cache: 2" in image.text["parameters"] and "tome" not in image.text

    # The next request without the flags switches them off on the cached model.
    assert main(argv[:-3]) == 0
    with Image.open(Path(capsys.readouterr().out.strip())) as image:
        assert "fast_mode" not in image.text and "step_cache" not in image.text
    assert not pipe.fast_mode_enabled and pipe.step_caching_interval is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--step-cache", "0"], "--step-cache: must be an integer >= 1; got 0"),
        (["--tome", "0.9"], "--tome: must be a number in [0.0, 0.75]; got 0.9"),
    ],
)
def test_bad_speed_flags_fail_with_one_line(capsys, extra: list[str], expected: str) -> None:
    assert main(["--prompt", PROMPT, *extra]) == 2
    assert expected in capsys.readouterr().err


def test_app_has_the_speed_flags() -> None:
    from pipelines.app import build_parser as app_parser
    from pipelines.cli import speed_settings

    speed = speed_settings(app_parser().parse_args(["--fast", "--step-cache", "3", "--tome", "0.5"]))
    assert (speed.fast, speed.step_cache_interval, speed.tome) == (True, 3, 0.5)
