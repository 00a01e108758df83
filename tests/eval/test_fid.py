"""Tests for eval.fid: the Fréchet distance against closed forms, KID against explicit loops over the kernel, and the
command line on drawn images (the feature extractors: test_features, test_inception and test_clip_features)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.fid import fid_from_features, frechet_distance, image_statistics, kid, main, mmd2_unbiased, reader_fid
from tests.training.conftest import draw_shapes_folder


def _random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T + dim * np.eye(dim)


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q


# ------------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_identical_gaussians_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(6), _random_spd(6, rng)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_one_dimension_by_hand() -> None:
    # N(1, 2^2) vs N(3, 3^2): (1 - 3)^2 + (2 - 3)^2 = 5
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(5)


def test_frechet_distance_commuting_covariances_closed_form() -> None:
    # Covariances with a common eigenbasis Q: d^2 = |mu1 - mu2|^2 + sum(l1 + l2 - 2 sqrt(l1 l2)) over eigenvalues.
    rng = np.random.default_rng(1)
    q = _random_rotation(5, rng)
    l1, l2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    got = frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_non_commuting_2x2_closed_form() -> None:
    # For 2x2 M = S1 S2 (positive eigenvalues): Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rank_deficient_covariances_stay_finite() -> None:
    features = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = image_statistics(features)  # rank 3 of 10: a singular product
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-3)


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(d,\) and \(d, d\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_fid_of_gaussian_samples_converges_to_closed_form() -> None:
    rng = np.random.default_rng(2)
    q = _random_rotation(3, rng)
    l1, l2 = np.array([1.0, 0.5, 2.0]), np.array([0.3, 1.5, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, -0.5]), np.array([0.5, 0.5, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    n = 40_000
    x = mu1 + (rng.standard_normal((n, 3)) * np.sqrt(l1)) @ q.T
    y = mu2 + (rng.standard_normal((n, 3)) * np.sqrt(l2)) @ q.T
    assert fid_from_features(x, y) == pytest.approx(expected, abs=0.02)


def test_image_statistics_needs_two_rows() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        image_statistics(np.zeros((1, 4)))


# ------------------------------------------------------------------------------------------------------------ KID


def _mmd2_by_loops(x: list[list[float]], y: list[list[float]]) -> float:
    d, m = len(x[0]), len(x)

    def k(a: list[float], b: list[float]) -> float:
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_explicit_loops_over_the_kernel() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) + 0.7
    expected = _mmd2_by_loops(x.tolist(), y.tolist())
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    # Subsets of the full size are permutations of the sets: every subset gives the same value.
    result = kid(x, y, subsets=4, subset_size=6)
    assert result.mean == pytest.approx(expected, rel=1e-10) and result.std == pytest.approx(0, abs=1e-12)


def test_kid_subsets_average_loop_values_of_the_drawn_subsets() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 2, generator=g), torch.randn(7, 2, generator=g)
    result = kid(x, y, subsets=3, subset_size=5, generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)  # kid draws x's subset, then y's, for each subset
    values = []
    for _ in range(3):
        xi, yi = torch.randperm(9, generator=draws)[:5], torch.randperm(7, generator=draws)[:5]
        values.append(_mmd2_by_loops(x[xi].tolist(), y[yi].tolist()))
    assert result.mean == pytest.approx(float(np.mean(values)), rel=1e-10)
    assert result.std == pytest.approx(float(np.std(values)), rel=1e-8)


def test_kid_of_one_distribution_is_near_zero_and_of_two_is_not() -> None:
    g = torch.Generator().manual_seed(6)
    x, x_again = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    shifted = torch.randn(1000, 8, generator=g) + 0.5
    different = kid(x, shifted, subsets=20, subset_size=200)
    assert different.mean > 3 * different.std > 0
    for same in (kid(x, x, subsets=20, subset_size=200), kid(x, x_again, subsets=20, subset_size=200)):
        assert abs(same.mean) < 0.05 * different.mean


def test_kid_lowers_the_subset_size_to_the_smaller_set(caplog) -> None:
    g = torch.Generator().manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="eval.fid"):
        result = kid(torch.randn(10, 4, generator=g), torch.randn(30, 4, generator=g), subsets=2)
    assert result.subset_size == 10 and "lowered from 1000 to 10" in caplog.text
    with pytest.raises(ValueError, match="at least 2 images"):
        kid(torch.randn(1, 4), torch.randn(5, 4))


# ---------------------------------------------------------------------------------------------------- command line


def test_fid_command_line_writes_json(tiny_open_clip: str, tmp_path: Path, capsys) -> None:
    real = draw_shapes_folder(tmp_path / "real", n=8, size=64)
    fake = tmp_path / "fake" / "nested"
    fake.mkdir(parents=True)
    for i in range(6):
        Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB").save(fake / f"{i}.jpg")
    (fake / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "fid.json"
    argv = [
        "--real",
        str(real),
        "--fake",
        str(tmp_path / "fake"),
        "--features",
        f"open_clip:{tiny_open_clip}",
        "--kid-subset-size",
        "5",
        "--kid-subsets",
        "10",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["real"]["count"] == 8 and result["fake"] == {
        "source": str(tmp_path / "fake"),
        "count": 6,
        "unreadable": 1,
    }
    assert result["features"] == f"open_clip:{tiny_open_clip}" and result["feature_dim"] == 16
    assert result["comparable_to_published"] is False  # only Inception with pytorch-fid's weights is
    assert result["fid"] > 0 and result["kid"]["subset_size"] == 5 and result["kid"]["subsets"] == 10
    printed = capsys.readouterr().out
    assert f"FID {result['fid']:.4f}" in printed and "KID " in printed and " ± " in printed
    assert "fake: 6 images" in printed and "(1 unreadable)" in printed and printed.strip().endswith(str(out))
    # The same images as both sets: FID 0 (up to the singular-covariance offset).
    assert main(argv[:2] + ["--fake", str(real)] + argv[4:]) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(0, abs=1e-3)


def test_fid_command_line_errors_are_one_line(tmp_path: Path, capsys) -> None:
    folder = draw_shapes_folder(tmp_path / "real", n=2, size=32)
    argv = ["--real", str(folder), "--fake", str(folder), "--out", str(tmp_path / "x.json")]
    assert main(argv + ["--features", f"inception:{tmp_path / 'none.pth'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Inception weights file") and err.count("\n") == 1
    assert main(argv + ["--features", "vgg:/x"]) == 2
    assert "unknown feature extractor spec" in capsys.readouterr().err
    # an --out that cannot be written is named before the features are computed (the bad spec is never reached)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "fid.json"
    assert main([*argv[:4], "--out", str(out), "--features", "vgg:/x"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {out}: its folder {tmp_path / 'a-file'} is a file")


# ------------------------------------------------------------------------------------------------------ for readers


def _result(fid: float, features: str, real: int, fake: int, comparable: bool = False) -> dict:
    """The part of eval.fid's JSON that reader_fid reads."""
    counts = {"real": {"count": real}, "fake": {"count": fake}}
    return {"fid": fid, "features": features, "comparable_to_published": comparable, **counts}


def test_reader_fid_puts_only_standard_inception_fid_on_the_published_scale() -> None:
    inception = "inception-v3 pool3 (TF FID pooling)"
    shown = reader_fid(_result(12.3456, inception, 50000, 10000, comparable=True))
    assert shown.comparable_to_published and shown.value == "12.35"
    assert "Inception-v3, pytorch-fid's standard weights; comparable to published FIDs" in shown.label
    assert "10000 generated vs 50000 real images" in shown.label
    floor = _result(2.0, inception, 50000, 50000, comparable=True)
    assert reader_fid(_result(12.3456, inception, 50000, 10000, True), floor).value.startswith("12.35 (real-vs-real")


def test_reader_fid_names_other_features_and_reports_the_ratio_to_the_real_floor() -> None:
    fid, floor = _result(0.0312, "clip:clip", 300, 300), _result(0.0104, "clip:clip", 300, 300)
    shown = reader_fid(fid, floor, features_name="the recipe's CLIP image tower")
    assert not shown.comparable_to_published
    assert shown.label.startswith("FID in the recipe's CLIP image tower (clip:clip) features, not Inception FID")
    assert "not comparable to published FIDs" in shown.label
    assert shown.value == "3.0x the real-vs-real floor (FID 0.0312; floor 0.0104, 300 vs 300 real images)"
    # Inception with other weights is not on the published scale either
    other = reader_fid(_result(8.0, "inception-v3 pool3", 10, 10), _result(4.0, "inception-v3 pool3", 10, 10))
    assert not other.comparable_to_published and other.value.startswith("2.0x the real-vs-real floor")
    with pytest.raises(ValueError, match="no published scale; report it with its real-vs-real floor"):
        reader_fid(fid)
    with pytest.raises(ValueError, match="floor was measured in 'open_clip:x' features, the FID in 'clip:clip'"):
        reader_fid(fid, _result(0.01, "open_clip:x", 300, 300))
