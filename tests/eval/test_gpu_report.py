"""eval.gpu_report runs end to end on CPU at tiny sizes, writes its JSON and markdown after every section, records a
failing section and goes on, and starts no section once its time budget is spent."""

from __future__ import annotations

import json

import pytest

from eval import gpu_report


@pytest.mark.slow
def test_tiny_report_measures_every_section(tmp_path):
    assert gpu_report.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert data["errors"] == {} and data["skipped"] == []
    sections = data["sections"]
    for name in ("sd15 float32", "sdxl float32", "sd15 bfloat16", "sdxl bfloat16"):
        result = sections[name]
        assert "fast_error" not in result, result.get("fast_error")
        fast = [] if name == "sdxl bfloat16" else ["ours-fast"]  # SDXL's fast mode is measured once
        assert result["variants"] == ["stock", "ours", *fast, "ours-cached"]
        for variant in result["variants"]:
            assert result[variant]["seconds_per_call"] > 0 and result[variant]["share_of_dense_peak"] > 0
    assert sections["sdxl float32"]["pipelines"] == ["LatentDiffusionXLPipeline", "StableDiffusionXLPipeline"]
    training = sections["training sd15 bf16"]
    assert training["runs"]["cached"]["steps_per_s"] > 0 and 0 < training["mfu"]
    assert sections["memory vae-tiling"]["memory"] == "vae-tiling"
    assert sections["memory cpu-offload"]["note"] == "needs CUDA"
    table = (tmp_path / "gpu_report.md").read_text()
    assert table.count("| ours-fast |") == 3 and "Training (tiny U-Net" in table


def test_a_failing_section_is_recorded_and_the_report_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gpu_report, "generation_section", broken)
    training = {"preset": "tiny", "size": 64, "batch_size": 2, "mfu": 0.1}
    training["runs"] = {"cached": {"steps_per_s": 1.0, "images_per_s": 2.0}}
    monkeypatch.setattr(gpu_report, "training_section", lambda *a: training)
    monkeypatch.setattr(gpu_report, "memory_section", lambda *a: {"memory": a[-1], "note": "stub"})
    assert gpu_report.main(["--tiny", "--out", str(tmp_path), "--device", "cpu"]) == 0
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert data["errors"]["sd15 float32"] == "RuntimeError: CUDA out of memory"
    assert "memory vae-tiling" in data["sections"]  # later sections still ran
    assert "Failed: sdxl bfloat16: RuntimeError: CUDA out of memory" in (tmp_path / "gpu_report.md").read_text()


def test_no_section_starts_after_the_budget(tmp_path):
    assert gpu_report.main(["--tiny", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert data["sections"] == {} and "device" in data["skipped"] and "memory cpu-offload" in data["skipped"]
