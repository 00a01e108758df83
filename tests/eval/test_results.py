"""eval.results: the analyzer self-check and the headline table built from the commands' own JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval.results as results


def test_analyzer_self_check_reads_ground_truth():
    check = results.analyzer_self_check(n=60, seed=7)
    assert check["images"] == 60 and check["all_correct"] >= 0.99
    pairs = results.analyzer_self_check(n=60, seed=7, objects=2)
    assert pairs["images"] == 60 and pairs["all_correct"] >= 0.99 and pairs["relation"] >= 0.99


def test_results_table_quotes_the_commands_figures(tmp_path, monkeypatch):
    def fake_benchmark(argv: list[str]) -> int:
        out = Path(argv[argv.index("--out") + 1])
        if "--task" in argv:
            out.write_text(json.dumps({"runs": {"uncached": {"steps_per_s": 1.25}, "cached": {"steps_per_s": 9.5}}}))
        else:
            row = {"seconds_per_call": 0.5, "speed_vs_stock": 1.25, "gflops_per_s": 3.0, "share_of_matmul_rate": 0.3}
            variants = ["stock", "ours", "ours-fast", "ours-cached"]
            result = {name: row for name in variants}
            result["stock"] = {"seconds_per_call": 0.625}
            out.write_text(json.dumps({**result, "variants": variants, "matmul_gflops_per_s": 10.0}))
        return 0

    monkeypatch.setattr(results.benchmark, "main", fake_benchmark)

    def fake_memory_check(argv: list[str]) -> int:
        row = {"case": "tiny-b8", "estimate": 100 * 2**20, "measured": 125 * 2**20, "ratio": 0.8}
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps([row]))
        return 0

    monkeypatch.setattr(results.memory_check, "main", fake_memory_check)

    def fake_check(objects: int = 1) -> dict:
        parts = {"position": 1.0} if objects == 1 else {"count": 0.98, "relation": 0.97}
        return {"all_correct": 1.0, "colour": 1.0, "shape": 0.99, **parts}

    monkeypatch.setattr(results, "analyzer_self_check", fake_check)
    assert results.main(["--out", str(tmp_path)]) == 0
    table = (tmp_path / "README.md").read_text()
    speed = "stock 0.625 s; ours 0.500 s (1.25x); ours-fast 0.500 s (1.25x); ours-cached 0.500 s (1.25x); "
    assert speed + "ours 3.0 GFLOP/s = 30% of the 10 GFLOP/s matmul rate" in table
    assert "1.25 / 9.50" in table and "1.000 / 1.000 / 0.990 / 1.000" in table
    assert "1.000 / 0.980 / 1.000 / 0.990 / 0.970" in table  # two objects: all / count / colour / shape / relation
    assert "tiny-b8 100 / 125 MiB (0.80)" in table
    assert table.count("| `python -m eval.benchmark") == 4  # two speed rows, two training rows
    assert f"--model {results.DEFAULT_MODEL} --batch-size 4" in table and "--variants default,fast,cached" in table


def test_a_failing_part_stops_with_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(results.benchmark, "main", lambda argv: 2)
    with pytest.raises(SystemExit, match=r"python -m eval.benchmark .* failed with status 2"):
        results.main(["--out", str(tmp_path)])
