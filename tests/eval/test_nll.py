"""Tests for eval.nll: a denoiser that predicts the true noise has zero denoising terms and a decoder term and prior
known in closed form; the strided estimate averages to the exact bound over its offsets; the pipeline bound equals
the bound computed by hand from the VAE, text encoder and U-Net; and the command line writes its JSON and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from torch import Tensor, nn

from eval.nll import (
    conditioned_unet,
    main,
    pipeline_bound,
    plot_terms_png,
    strided_timesteps,
    strided_variational_bound_bpd,
)
from ldm.likelihood import variational_bound_bpd
from pipelines import LatentDiffusionPipeline
from tests.training.conftest import draw_shapes_folder

LN2 = math.log(2.0)


def _sd_schedule(num_timesteps: int) -> np.ndarray:
    """Stable Diffusion's scaled-linear alpha_bar, in numpy float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, num_timesteps) ** 2
    return np.cumprod(1 - betas)


class ExactNoiseUNet(nn.Module):
    """A U-Net stand-in that knows x0: from x_t it returns the exact noise (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)."""

    def __init__(self, x0: Tensor, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.x0, self.alphas_cumprod = x0, alphas_cumprod

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None
    ) -> SimpleNamespace:
        ab = self.alphas_cumprod[timestep].to(sample.dtype).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(sample - ab.sqrt() * self.x0) / (1 - ab).sqrt())


@pytest.mark.parametrize("stride", [1, 7])
def test_exact_noise_prediction_has_zero_kl_terms_and_closed_form_ends(stride: int) -> None:
    ab = _sd_schedule(100)
    alphas_cumprod = torch.tensor(ab, dtype=torch.float32)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    unet = ExactNoiseUNet(x0, alphas_cumprod)
    bound = strided_variational_bound_bpd(
        conditioned_unet(unet, None),
        x0,
        alphas_cumprod,
        torch.Generator().manual_seed(1),
        stride=stride,
        offset=3 % stride,
    )
    torch.testing.assert_close(bound.terms_bpd, torch.zeros_like(bound.terms_bpd), atol=1e-5, rtol=0)
    # L_0 = -log N(x0; x0, tilde_beta_1) per dim (the clipped posterior variance at t = 0), in bits.
    beta_1 = 1 - ab[1] / ab[0]
    tilde_beta_1 = beta_1 * (1 - ab[0]) / (1 - ab[1])
    expected_decoder = 0.5 * math.log(2 * math.pi * tilde_beta_1) / LN2
    torch.testing.assert_close(bound.decoder_bpd, torch.full((3,), expected_decoder), atol=1e-5, rtol=1e-5)
    # L_T = KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) per dim, in bits.
    a = ab[-1]
    kl = 0.5 * (-math.log(1 - a) + (1 - a) + a * x0.double() ** 2 - 1)
    torch.testing.assert_close(bound.prior_bpd.double(), kl.mean(dim=(1, 2, 3)) / LN2, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(bound.total_bpd, bound.prior_bpd + bound.decoder_bpd, atol=1e-4, rtol=0)
    assert bound.timesteps.tolist() == list(range(1 + 3 % stride, 100, stride))


def _toy_model(x_t: Tensor, t: Tensor) -> Tensor:
    """A deterministic, imperfect eps-prediction whose terms vary with t."""
    return 0.8 * x_t + 0.01 * t.float().view(-1, 1, 1, 1).sin()


def test_strided_estimate_averages_to_the_exact_bound_over_offsets() -> None:
    alphas_cumprod = torch.tensor(_sd_schedule(41), dtype=torch.float32)
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    exact = variational_bound_bpd(
        _toy_model, x0, alphas_cumprod, torch.Generator().manual_seed(3), decoder_nll="continuous"
    )
    stride_1 = strided_variational_bound_bpd(_toy_model, x0, alphas_cumprod, torch.Generator().manual_seed(3))
    torch.testing.assert_close(stride_1.total_bpd, exact.total_bpd, rtol=1e-6, atol=1e-6)
    stride = 3  # 40 denoising terms: 14, 13, 13 per offset, so the residue classes are not all the same size
    estimates = []
    for offset in range(stride):
        bound = strided_variational_bound_bpd(
            _toy_model, x0, alphas_cumprod, torch.Generator().manual_seed(3), stride=stride, offset=offset
        )
        # Same seed: every x_t is drawn as in the exact run, so the evaluated terms are the exact run's.
        torch.testing.assert_close(bound.terms_bpd, exact.terms_bpd[:, bound.timesteps])
        estimates.append(bound.total_bpd)
    torch.testing.assert_close(torch.stack(estimates).mean(0), exact.total_bpd, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(estimates[0], exact.total_bpd, rtol=1e-3)  # one offset alone is an estimate


def test_strided_timesteps_and_their_errors() -> None:
    assert strided_timesteps(10, 1).tolist() == list(range(1, 10))
    assert strided_timesteps(10, 4, 2).tolist() == [3, 7]
    with pytest.raises(ValueError, match="0 <= offset < stride"):
        strided_timesteps(10, 4, 4)


def test_pipeline_bound_equals_the_bound_computed_by_hand(tiny_components: dict) -> None:
    tiny_components["scheduler"] = DDPMScheduler(
        num_train_timesteps=12, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    pipe = LatentDiffusionPipeline(**tiny_components)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    captions = ["a red circle on the left", ""]
    bound = pipeline_bound(pipe, pixels, captions, torch.Generator().manual_seed(5))
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
        expected = variational_bound_bpd(
            lambda x_t, t: pipe.unet(x_t, t, encoder_hidden_states=embeds).sample,
            latents,
            pipe.scheduler.alphas_cumprod,
            torch.Generator().manual_seed(5),
            decoder_nll="continuous",
        )
    torch.testing.assert_close(bound.total_bpd, expected.total_bpd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bound.terms_bpd, expected.terms_bpd[:, 1:], rtol=1e-5, atol=1e-6)


def test_plot_draws_the_terms(tmp_path: Path) -> None:
    path = plot_terms_png([1, 2, 3, 500], [1.0, 0.1, 0.01, 0.0], tmp_path / "terms.png", title="t")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    # common.plots.line_chart's 6.4 x 4 in figure at 100 dpi; the line in matplotlib's first colour, C0 (#1f77b4).
    assert pixels.shape == (400, 640, 3) and (pixels == [31, 119, 180]).all(axis=-1).sum() > 50


def test_nll_command_line_writes_json_and_plot(tiny_sd_dir: str, tmp_path: Path, capsys) -> None:
    data = draw_shapes_folder(tmp_path / "held_out", n=4, size=64)
    out = tmp_path / "results" / "nll.json"
    argv = [
        "--model",
        tiny_sd_dir,
        "--data",
        str(data),
        "--num-images",
        "3",
        "--batch-size",
        "2",
        "--timesteps-stride",
        "250",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    bpd = result["bpd"]
    assert result["images"] == 3 and result["num_train_timesteps"] == 1000 and result["timesteps_stride"] == 250
    assert result["latent_shape"] == [4, 8, 8] and result["conditioning"] == "captions"
    assert bpd["total"] == pytest.approx(bpd["prior"] + bpd["decoder"] + bpd["denoising"], rel=1e-6)
    assert bpd["total"] == pytest.approx(float(np.mean(result["per_image_total_bpd"])), rel=1e-6)
    timesteps = result["per_timestep"]["timesteps"]
    offset = result["timestep_offset"]
    assert timesteps == [0] + list(range(1 + offset, 1000, 250)) and result["model_calls_per_batch"] == 5
    assert len(result["per_timestep"]["mean_bpd"]) == len(timesteps)
    assert "compares only models that share this VAE" in result["note"] and "unbiased" in result["estimator"]
    assert Image.open(result["plot"]).size == (640, 400) and Path(result["plot"]) == out.with_suffix(".png")
    printed = capsys.readouterr().out
    assert "bits per latent dim over 3 images" in printed and str(out) in printed and result["plot"] in printed


def test_nll_command_line_unconditional_on_uncaptioned_images(tiny_sd_dir: str, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        Image.effect_noise((64, 64), 30 + 20 * i).convert("RGB").save(folder / f"{i}.png")
    out = tmp_path / "nll.json"
    argv = ["--model", tiny_sd_dir, "--data", str(folder), "--timesteps-stride", "500", "--out", str(out)]
    assert main(argv) == 2  # captions are needed for the conditional bound
    assert "have a caption" in capsys.readouterr().err
    assert main(argv + ["--unconditional"]) == 0
    assert json.loads(out.read_text())["conditioning"] == "unconditional (empty prompt)"
    assert main(["--model", str(tmp_path / "nowhere"), "--data", str(folder), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
