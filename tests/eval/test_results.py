"""eval.results: the analyzer self-check and the headline table built from the commands' own JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval.results as results


def test_analyzer_self_check_reads_ground_truth():
    check = results.analyzer_self_check(n=60, seed=7)
    assert check["images"] == 60 and check["all_correct"] >= 0.99


def test_results_table_quotes_the_commands_figures(tmp_path, monkeypatch):
    def fake_benchmark(argv: list[str]) -> int:
        out = Path(argv[argv.index("--out") + 1])
        if "--task" in argv:
            out.write_text(json.dumps({"runs": {"uncached": {"steps_per_s": 1.25}, "cached": {"steps_per_s": 9.5}}}))
        else:
            out.write_text(
                json.dumps(
                    {
                        "ours": {"seconds_per_call": 0.5},
                        "stock": {"seconds_per_call": 0.625},
                        "speed_ratio_ours_over_stock": 1.25,
                    }
                )
            )
        return 0

    monkeypatch.setattr(results.benchmark, "main", fake_benchmark)
    monkeypatch.setattr(
        results, "analyzer_self_check", lambda: {"all_correct": 1.0, "colour": 1.0, "shape": 0.99, "position": 1.0}
    )
    assert results.main(["--out", str(tmp_path)]) == 0
    table = (tmp_path / "README.md").read_text()
    assert "0.500 / 0.625 s (ratio 1.25)" in table and "1.25 / 9.50" in table and "1.000 / 1.000 / 0.990" in table
    assert table.count("| `python -m eval.benchmark") == 3


def test_a_failing_part_stops_with_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(results.benchmark, "main", lambda argv: 2)
    with pytest.raises(SystemExit, match=r"python -m eval.benchmark .* failed with status 2"):
        results.main(["--out", str(tmp_path)])
