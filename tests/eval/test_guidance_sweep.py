"""eval.guidance_sweep: the adherence (and FID) of each scale equal the metrics of images generated independently;
on an SDXL folder its grid holds stock ``StableDiffusionXLPipeline``'s images."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

import eval.guidance_sweep as sweep_module
from eval.adherence import adherence_prompts, score_images
from eval.features import ModuleFeatures, extract_features
from eval.fid import fid_from_features
from pipelines import LatentDiffusionPipeline


def pooled_colour_features() -> ModuleFeatures:
    """A fixed, independent feature map for FID in tests: 4x4 average colours (48 numbers)."""
    return ModuleFeatures(torch.nn.AdaptiveAvgPool2d(4), dim=48, name="avgpool4x4")


def test_sweep_matches_metrics_of_independently_generated_images(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(real / f"{i}.png")
    monkeypatch.setattr(sweep_module, "load_feature_extractor", lambda spec: pooled_colour_features())
    out = tmp_path / "sweep"
    args = ["--model", tiny_sd_dir, "--scales", "1", "4", "--num-prompts", "4", "--steps", "2", "--batch-size", "3"]
    code = sweep_module.main([*args, "--real", str(real), "--features", "test", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["guidance_scale"] for r in result["rows"]] == [1.0, 4.0]
    assert (out / "guidance_sweep.png").is_file() and (out / "guidance_grid.png").is_file()
    printed = capsys.readouterr().out
    assert "all_correct" in printed and str(out / "sweep.json") in printed

    # independent reference: the pipeline called directly, image i with seed i, then the metrics
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    prompts = adherence_prompts(4, 1)
    images = [
        pipe(p, guidance_scale=4.0, num_inference_steps=2, generator=torch.Generator().manual_seed(i)).images[0]
        for i, p in enumerate(prompts)
    ]
    report = score_images(images, prompts)
    row = result["rows"][1]
    assert row["all_correct"] == report.all_correct_rate() and row["colour"] == report.part_accuracy()["colour"]
    extractor = pooled_colour_features()
    real_features = extract_features(extractor, [Image.open(real / f"{i}.png").convert("RGB") for i in range(6)])
    expected_fid = fid_from_features(real_features, extract_features(extractor, images))
    assert abs(row["fid"] - expected_fid) < 1e-3 * max(1.0, expected_fid)
    assert result["rows"][0]["fid"] != row["fid"]  # the two scales gave different images


def test_sweep_argument_errors(tiny_sd_dir, capsys):
    assert sweep_module.main(["--model", tiny_sd_dir, "--real", "somewhere"]) == 2
    assert "needs both --real and --features" in capsys.readouterr().err
    assert sweep_module.main(["--model", tiny_sd_dir, "--scales", "-1"]) == 2


def test_sweep_on_an_sdxl_folder_draws_stocks_images(tiny_sdxl_dir, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "sweep"
    args = ["--model", tiny_sdxl_dir, "--scales", "1", "4", "--num-prompts", "2", "--steps", "2", "--batch-size", "2"]
    assert sweep_module.main([*args, "--out", str(out)]) == 0
    assert str(out / "sweep.json") in capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    prompts = adherence_prompts(2, 1)
    assert result["model"] == tiny_sdxl_dir and result["steps"] == 2 and result["num_prompts"] == 2
    assert result["scheduler"] == "EulerDiscreteScheduler"  # the folder's own
    assert result["guidance_interval"] == [0.0, 1.0] and result["features"] is None
    assert [r["guidance_scale"] for r in result["rows"]] == [1.0, 4.0]
    assert result["grid"] == {"file": "guidance_grid.png", "rows": "guidance scales, in order", "columns": prompts}
    with Image.open(out / "guidance_sweep.png") as curve:
        assert curve.format == "PNG" and min(curve.size) > 0

    # independent reference: stock SDXL on the same folder, prompt i with seed i, at each scale
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    stock.set_progress_bar_config(disable=True)
    grid = np.asarray(Image.open(out / "guidance_grid.png").convert("RGB")).astype(int)
    assert grid.shape == (2 * 64, 2 * 64, 3)  # a row per scale, a column per prompt, at the model's 64 px
    for row, scale in enumerate((1.0, 4.0)):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        images = stock(prompts, guidance_scale=scale, num_inference_steps=2, generator=generators).images
        for column, image in enumerate(images):
            cell = grid[row * 64 : (row + 1) * 64, column * 64 : (column + 1) * 64]
            assert np.abs(cell - np.asarray(image).astype(int)).max() <= 1
        report = score_images(images, prompts)
        assert result["rows"][row]["all_correct"] == report.all_correct_rate()
        assert {k: result["rows"][row][k] for k in report.part_accuracy()} == report.part_accuracy()
    assert not np.array_equal(grid[:64], grid[64:])  # the scale reached the pipeline


def test_pair_prompts_are_scored_apart_from_the_one_object_ones(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--model", tiny_sd_dir, "--scales", "2", "--num-prompts", "2", "--pair-prompts", "3", "--steps", "2"]
    assert sweep_module.main([*args, "--batch-size", "5", "--out", str(out)]) == 0
    assert "two_object" in capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert result["num_prompts"] == 5 and result["pair_prompts"] == 3
    prompts = adherence_prompts(2, 1) + adherence_prompts(3, 1, objects=2, pairings="seen")
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    images = pipe(
        prompts,
        guidance_scale=2.0,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(i) for i in range(5)],
    ).images
    summary = score_images(images, prompts).summary()
    row = result["rows"][0]
    assert row["one_object"] == summary["one_object"]["all_correct_rate"]
    assert row["two_object"] == summary["two_object_seen"]["all_correct_rate"]
    assert row["relation"] == summary["part_accuracy"]["relation"]
    assert sweep_module.main([*args, "--pair-prompts", "-1"]) == 2
    assert "--pair-prompts must be >= 0" in capsys.readouterr().err
