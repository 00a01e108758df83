"""FID and KID between a set of real and a set of generated images, on any extractor of :mod:`eval.features`.

    python -m eval.fid --real data/ --fake outputs/ --features inception:/path/pt_inception-2015-12-05-6726825d.pth
    python -m eval.fid --real user/dataset --fake outputs/ --features clip:runs/clip/clip --out results/fid_clip.json

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the two feature sets,
``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (:func:`frechet_distance`, as pytorch-fid computes it). It is
biased by the number of images: compare FIDs computed on equally many images only (published ones use 10k-50k).
KID (Bińkowski et al. 2018) is the unbiased estimate of the squared MMD with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets, with the standard deviation over subsets
(:func:`kid`, torch-fidelity's definition and defaults: 100 subsets of 1000 images); it is unbiased, so it is the
better number for small sets. Both are only comparable between runs that use the same feature extractor.
:func:`reader_fid` says how to put an FID in front of a reader: next to published figures only when it is Inception
FID with the standard weights, otherwise named by its features and as a multiple of its real-vs-real floor.

``--real`` and ``--fake`` are folders of images (any of PNG, JPEG, WebP, ..., searched recursively) or, for
``--real``, any dataset :func:`training.records.load_image_caption_records` reads (parquet, ``save_to_disk``, Hub).
Unreadable images are skipped and counted. The command prints FID, KID and the counts, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import Tensor

from common.images import list_image_files, open_rgb
from eval.cli import configure_logging, run_evaluation
from eval.features import extract_features, load_feature_extractor
from eval.inception import FID_WEIGHTS_NAME, InceptionV3Features
from ldm.errors import OneLineParser, UserError
from pipelines.loading import resolve_device
from training.records import detect_format, load_image_caption_records

__all__ = [
    "KID",
    "ImageSet",
    "ReaderFID",
    "fid_from_features",
    "frechet_distance",
    "image_statistics",
    "kid",
    "mmd2_unbiased",
    "open_image_set",
    "polynomial_kernel",
    "reader_fid",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# The metrics


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
    eps: float = 1e-6,
) -> float:
    """The Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))`` (Dowson & Landau 1982; FID).

    ``(sigma1 sigma2)^(1/2)`` is ``scipy.linalg.sqrtm``; when the product is singular and the root comes out
    non-finite, ``eps`` is added to both diagonals first, as pytorch-fid does. A complex root whose diagonal has an
    imaginary part above 1e-3 raises; a smaller one (rounding) is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"means and covariances must be (d,) and (d, d) alike; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning(
            "the covariance product is singular (fewer images than feature dimensions?); adding %g to the diagonals",
            eps,
        )
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(
                f"the square root of the covariance product has an imaginary part of {imaginary:.3g}; the "
                "covariances are ill-conditioned: use more images (at least as many as feature dimensions)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def image_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The mean ``(D,)`` and covariance ``(D, D)`` (unbiased, ``np.cov``) of features ``(N, D)``, in float64."""
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"statistics need features (N, D) with N >= 2; got shape {values.shape}")
    return values.mean(axis=0), np.cov(values, rowvar=False)


def fid_from_features(features1: np.ndarray | Tensor, features2: np.ndarray | Tensor) -> float:
    """FID between two feature sets: :func:`frechet_distance` of their :func:`image_statistics`."""
    return frechet_distance(*image_statistics(features1), *image_statistics(features2))


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's kernel matrix ``k(x_i, y_j) = (x_i . y_j / d + 1)^3`` for ``x`` (N, d) and ``y`` (M, d)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """The unbiased estimate of MMD^2 between samples ``x`` and ``y`` of equal size m with :func:`polynomial_kernel`
    (Bińkowski et al. 2018, eq. 2; torch-fidelity's ``mmd2``): the means of k over pairs i != j within each set,
    minus twice the mean of k over all m^2 cross pairs. Computed in float64."""
    x, y = x.double(), y.double()
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"MMD needs two samples of the same size >= 2; got {x.shape[0]} and {y.shape[0]}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m**2)


@dataclass(frozen=True)
class KID:
    """KID: the mean and (population) standard deviation of :func:`mmd2_unbiased` over ``subsets`` random subsets
    of ``subset_size`` images from each set."""

    mean: float
    std: float
    subsets: int
    subset_size: int


def kid(
    features1: Tensor | np.ndarray,
    features2: Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> KID:
    """KID between two feature sets (Bińkowski et al. 2018, as torch-fidelity computes it).

    Each subset draws ``subset_size`` distinct images of each set (without replacement within the subset) with
    ``generator`` (default: seeded 0, so a call is reproducible); a ``subset_size`` above the smaller set's size is
    lowered to it, with a warning.
    """
    features1, features2 = torch.as_tensor(features1).double(), torch.as_tensor(features2).double()
    if subsets < 1:
        raise UserError(f"subsets must be >= 1; got {subsets}")
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise UserError(f"KID needs at least 2 images in each set; got {len(features1)} and {len(features2)}")
    if size < subset_size:
        logger.warning("KID subset size lowered from %d to %d, the size of the smaller set", subset_size, size)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(subsets):
        x = features1[torch.randperm(len(features1), generator=generator)[:size]]
        y = features2[torch.randperm(len(features2), generator=generator)[:size]]
        values.append(mmd2_unbiased(x, y))
    return KID(float(np.mean(values)), float(np.std(values)), subsets, size)


# --------------------------------------------------------------------------------------------------------------------
# Reporting


@dataclass(frozen=True)
class ReaderFID:
    """An FID as a model card shows it: ``label`` says what was measured (features, image counts, whether it may be
    set beside published FIDs), ``value`` the figure in a form a reader can compare."""

    label: str
    value: str
    comparable_to_published: bool


def reader_fid(
    result: Mapping[str, Any], floor: Mapping[str, Any] | None = None, *, features_name: str | None = None
) -> ReaderFID:
    """How to show an ``eval.fid`` result (its JSON) to a reader.

    Inception-v3 FID with pytorch-fid's standard weights (``comparable_to_published`` in the result) is on the scale
    of published FIDs: shown as is, with the real-vs-real ``floor`` beside it when given. Any other FID (CLIP or
    open_clip features, other Inception weights) is on a scale of its own: it is named by its features, marked as not
    comparable to published FIDs, and shown as a multiple of ``floor``, the FID between two real image sets in the
    same features (e.g. training vs held-out images), so ``1.0x`` means as close as real images are to each other.
    ``features_name`` names the features in words (default: the extractor's name in the result).

    Raises:
        ValueError: a non-standard FID without a floor, or a floor measured in other features.
    """
    fid, features = float(result["fid"]), str(result["features"])
    named = features if features_name is None else f"{features_name} ({features})"
    counts = f"{result['fake']['count']} generated vs {result['real']['count']} real images"
    if floor is not None and floor["features"] != features:
        raise UserError(
            f"the FID floor was measured in {floor['features']!r} features, the FID in {features!r}; "
            "run eval.fid on two real image sets with the same --features"
        )
    floor_counts = "" if floor is None else f"{floor['fake']['count']} vs {floor['real']['count']} real images"
    if result.get("comparable_to_published", False):
        label = f"FID (Inception-v3, pytorch-fid's standard weights; comparable to published FIDs), {counts}"
        beside = "" if floor is None else f" (real-vs-real floor {float(floor['fid']):.2f}, {floor_counts})"
        return ReaderFID(label, f"{fid:.2f}{beside}", True)
    if floor is None:
        raise UserError(
            f"an FID in {features!r} features has no published scale; report it with its real-vs-real floor: run "
            "eval.fid with the same --features on two real image sets (e.g. training vs held-out)"
        )
    floor_fid = float(floor["fid"])
    ratio = f"{fid / floor_fid:.1f}x" if floor_fid > 0 else "n/a (the floor is 0)"
    label = f"FID in {named} features, not Inception FID (not comparable to published FIDs), {counts}"
    value = f"{ratio} the real-vs-real floor (FID {fid:.3g}; floor {floor_fid:.3g}, {floor_counts})"
    return ReaderFID(label, value, False)


# --------------------------------------------------------------------------------------------------------------------
# Image sets


@dataclass
class ImageSet:
    """The images of a folder or dataset: a name for each and how to open it; :meth:`images` yields them as RGB,
    skipping (and recording in ``unreadable``) those that fail to decode."""

    source: str
    names: list[str]
    opener: Callable[[int], Image.Image]
    unreadable: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def images(self) -> Iterator[Image.Image]:
        """Each image as an RGB, EXIF-rotated PIL image, in order."""
        for index, name in enumerate(self.names):
            try:
                with self.opener(index) as opened:
                    image = open_rgb(opened)
            except Exception as err:  # PIL's decoders raise many types; one bad file must not stop an evaluation
                self.unreadable.append(name)
                logger.warning("skipping unreadable image %s (%s: %s)", name, type(err).__name__, err)
                continue
            yield image


def open_image_set(
    source: str, *, max_images: int | None = None, split: str = "train", image_column: str | None = None
) -> ImageSet:
    """The images of ``source``: a folder (every image file under it, sorted) or any dataset that
    :func:`training.records.load_image_caption_records` reads (``split``, ``image_column`` apply to those; images
    without a caption are not listed there). ``max_images`` keeps the first ones."""
    path = Path(source).expanduser()
    if path.is_dir() and detect_format(str(path)) in ("imagefolder", "captions"):
        files = list_image_files(path)[:max_images]
        if not files:
            raise UserError(
                f"no image files under {source}; pass a folder of images (png, jpg, webp, ...) or a "
                "dataset (parquet, save_to_disk folder, Hub id)"
            )
        return ImageSet(source, [str(p) for p in files], lambda i: Image.open(files[i]))
    records = load_image_caption_records(source, split=split, image_column=image_column, scan=False)
    count = len(records) if max_images is None else min(max_images, len(records))
    return ImageSet(source, [records.image_name(i) for i in range(count)], records.open_image)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.fid``."""
    parser = OneLineParser(prog="python -m eval.fid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, help="folder of reference images, or a dataset (parquet, Hub id)")
    parser.add_argument("--fake", required=True, help="folder of generated images")
    parser.add_argument(
        "--features", required=True, help="inception:FILE, open_clip:NAME:FILE, open_clip:local-dir:DIR or clip:DIR"
    )
    parser.add_argument("--out", type=Path, default=Path("results/fid.json"), help="the JSON result")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--max-images", type=int, default=None, help="use the first N images of each set")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seeds KID's subset draws")
    parser.add_argument("--split", default="train", help="the split of a dataset --real")
    parser.add_argument("--image-column", default=None, help="the image column of a dataset --real")
    parser.add_argument(
        "--raw-clip-features", action="store_true", help="CLIP features without L2 normalisation (default: normalised)"
    )
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """Compute FID and KID as ``args`` says; returns the JSON-able result."""
    if args.batch_size < 1 or args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise UserError("--batch-size and --kid-subsets must be >= 1 and --kid-subset-size >= 2")
    if args.max_images is not None and args.max_images < 2:
        raise UserError(f"--max-images must be >= 2 (FID needs a covariance); got {args.max_images}")
    device = resolve_device(args.device)
    extractor = load_feature_extractor(args.features, device=device, normalize=not args.raw_clip_features)
    real = open_image_set(args.real, max_images=args.max_images, split=args.split, image_column=args.image_column)
    sets = {"real": real, "fake": open_image_set(args.fake, max_images=args.max_images)}
    features = {}
    for role, image_set in sets.items():
        features[role] = extract_features(
            extractor, image_set.images(), batch_size=args.batch_size, total=len(image_set), desc=f"{role} features"
        )
    for role, values in features.items():
        if len(values) < 2:
            raise UserError(f"only {len(values)} readable images in --{role} {sets[role].source}; FID needs >= 2")
        if not torch.isfinite(values).all():
            raise UserError(f"the {role} features are not all finite; check the --features weights")
    fid = fid_from_features(features["real"], features["fake"])
    kid_result = kid(
        features["real"],
        features["fake"],
        subsets=args.kid_subsets,
        subset_size=args.kid_subset_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    counts = {role: len(values) for role, values in features.items()}
    notes = [
        "FID is biased by the number of images: compare FIDs computed on equally many images; KID is unbiased",
        f"comparable only with results from the same feature extractor ({extractor.name})",
    ]
    if isinstance(extractor, InceptionV3Features):
        notes.append(
            "Inception weights verified as pytorch-fid's standard FID weights: FID comparable to published FIDs"
            if extractor.standard_weights
            else f"Inception weights NOT verified as {FID_WEIGHTS_NAME}: FID NOT comparable to published FIDs"
        )
    if min(counts.values()) < extractor.dim:
        notes.append(
            f"fewer images ({min(counts.values())}) than feature dimensions ({extractor.dim}): the "
            "covariances are rank-deficient and FID is strongly biased; prefer KID here"
        )
    standard = isinstance(extractor, InceptionV3Features) and extractor.standard_weights
    return {
        "fid": fid,
        "kid": asdict(kid_result) | {"seed": args.seed},
        "features": extractor.name,
        "comparable_to_published": standard,
        "feature_dim": extractor.dim,
        **{
            role: {"source": s.source, "count": counts[role], "unreadable": len(s.unreadable)}
            for role, s in sets.items()
        },
        "notes": notes,
    }


def format_result(result: dict) -> str:
    """The result as a few lines of text."""
    kid_result = result["kid"]
    lines = [
        f"FID {result['fid']:.4f}",
        f"KID {kid_result['mean']:.6f} ± {kid_result['std']:.6f} "
        f"({kid_result['subsets']} subsets of {kid_result['subset_size']})",
        f"features: {result['features']} ({result['feature_dim']}-d)",
    ]
    for role in ("real", "fake"):
        entry = result[role]
        lines.append(f"{role}: {entry['count']} images from {entry['source']} ({entry['unreadable']} unreadable)")
    return "\n".join(lines + [f"note: {note}" for note in result["notes"]])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints one ``error: ...`` line and returns 2."""
    return run_evaluation(build_parser().parse_args(argv), evaluate, format_result)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
