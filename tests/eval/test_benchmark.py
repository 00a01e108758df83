"""eval.benchmark runs both pipelines of the family (a preset's, or a model folder's: SD or SDXL) on the same
components and writes a JSON result (no timing is asserted)."""

from __future__ import annotations

import inspect
import json

import pytest

from eval.benchmark import main


@pytest.mark.parametrize(
    "preset, pipelines",
    [
        ("tiny", ["LatentDiffusionPipeline", "StableDiffusionPipeline"]),
        ("tiny-sdxl", ["LatentDiffusionXLPipeline", "StableDiffusionXLPipeline"]),
    ],
)
def test_benchmark_writes_json_for_both_pipelines(tmp_path, capsys, preset, pipelines):
    out = tmp_path / "bench.json"
    assert main(["--preset", preset, "--steps", "2", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for name in ("ours", "stock"):
        assert result[name]["seconds_per_call"] > 0
        assert result[name]["it_per_s"] == 2 / result[name]["seconds_per_call"]
    assert result["size"] == 64 and result["source"] == f"preset:{preset}"
    assert result["pipelines"] == pipelines  # the family's pipelines, ours and stock's
    printed = capsys.readouterr().out
    assert "speed ratio ours / stock" in printed and str(out) in printed


def test_benchmark_rejects_bad_counts(tmp_path, capsys):
    assert main(["--steps", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "folder, pipelines",
    [
        ("tiny_sd_dir", ["LatentDiffusionPipeline", "StableDiffusionPipeline"]),
        ("tiny_sdxl_dir", ["LatentDiffusionXLPipeline", "StableDiffusionXLPipeline"]),
    ],
)
def test_benchmark_of_a_model_folder_runs_its_familys_pipelines(request, tmp_path, folder, pipelines):
    from diffusers import DiffusionPipeline

    model = request.getfixturevalue(folder)
    out = tmp_path / "bench.json"
    assert main(["--model", model, "--steps", "2", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["source"] == model and result["pipelines"] == pipelines
    stock = DiffusionPipeline.from_pretrained(model)
    assert result["size"] == stock.unet.config.sample_size * stock.vae_scale_factor  # the model's own size
    # unset, the guidance scale is the model's (stock's default: 7.5 for SD, 5 for SDXL)
    assert result["guidance_scale"] == inspect.signature(type(stock).__call__).parameters["guidance_scale"].default


def test_benchmark_times_our_variants_against_stock_with_their_flop_rates(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--steps", "3", "--repeats", "1", "--variants", "default,cached", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["variants"] == ["stock", "ours", "ours-cached"] and result["step_cache_interval"] == 3
    stock, cached = result["stock"], result["ours-cached"]
    assert stock["speed_vs_stock"] == 1.0 and result["ours"]["gflop_per_call"] == stock["gflop_per_call"]
    assert 0 < cached["gflop_per_call"] < stock["gflop_per_call"]  # cached steps skip the deep blocks
    assert result["ours"]["max_abs_diff_vs_stock"] < 1e-4 and stock["max_abs_diff_vs_stock"] == 0  # the same images
    for row in (stock, cached):
        assert row["gflops_per_s"] == pytest.approx(row["gflop_per_call"] / row["seconds_per_call"])
        assert row["share_of_matmul_rate"] == pytest.approx(row["gflops_per_s"] / result["matmul_gflops_per_s"])
    assert "GFLOP/s" in capsys.readouterr().out


def test_benchmark_rejects_unknown_variants(tmp_path, capsys):
    assert main(["--variants", "default,turbo", "--out", str(tmp_path / "x.json")]) == 2
    assert "--variants: unknown ['turbo']" in capsys.readouterr().err


def test_benchmark_times_guidance_in_an_interval_against_stock_guiding_every_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--steps", "4", "--repeats", "1", "--variants", "default,interval", "--out", str(out)]
    # the tiny preset's defaults guide at every step: the variant needs an interval
    assert main(argv) == 2
    assert "give --guidance-interval LO,HI" in capsys.readouterr().err
    assert main([*argv, "--guidance-interval", "0.5,1"]) == 0
    result = json.loads(out.read_text())
    assert result["variants"] == ["stock", "ours", "ours-interval"] and result["guidance_interval"] == [0.5, 1.0]
    stock, ours, interval = result["stock"], result["ours"], result["ours-interval"]
    # half the steps run the U-Net on the conditional rows only, so fewer products, and other images than stock's
    assert 0 < interval["gflop_per_call"] < ours["gflop_per_call"] == stock["gflop_per_call"]
    assert interval["max_abs_diff_vs_stock"] > 1e-3 > ours["max_abs_diff_vs_stock"]
