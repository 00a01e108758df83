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

``--real`` and ``--fake`` are folders of images (any of PNG, JPEG, WebP, ..., searched recursively) or, for
``--real``, any dataset :func:`training.records.load_image_caption_records` reads (parquet, ``save_to_disk``, Hub).
Unreadable images are skipped and counted. The command prints FID, KID and the counts, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import Tensor

from eval.cli import configure_logging, run_evaluation
from eval.features import extract_features, list_image_files, load_feature_extractor, open_rgb
from eval.inception import FID_WEIGHTS_NAME, InceptionV3Features
from pipelines.cli import resolve_device
from training.records import detect_format, load_image_caption_records

__all__ = ["KID", "ImageSet", "fid_from_features", "frechet_distance", "image_statistics", "kid", "mmd2_unbiased",
           "open_image_set", "polynomial_kernel"]  # fmt: skip

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# The metrics


def frechet_distance(
    mu1: np.ndarray | Tensor, sigma1: np.ndarray | Tensor, mu2: np.ndarray | Tensor, sigma2: np.ndarray | Tensor,
    eps: float = 1e-6,
) -> float:  # fmt: skip
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
        raise ValueError(f"means and covariances must be (d,) and (d, d) alike; got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")  # fmt: skip
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("the covariance product is singular (fewer images than feature dimensions?); adding %g to "
                       "the diagonals", eps)  # fmt: skip
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
        raise ValueError(f"subsets must be >= 1; got {subsets}")
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images in each set; got {len(features1)} and {len(features2)}")
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
            raise ValueError(f"no image files under {source}; pass a folder of images (png, jpg, webp, ...) or a "
                             "dataset (parquet, save_to_disk folder, Hub id)")  # fmt: skip
        return ImageSet(source, [str(p) for p in files], lambda i: Image.open(files[i]))
    records = load_image_caption_records(source, split=split, image_column=image_column, scan=False)
    count = len(records) if max_images is None else min(max_images, len(records))
    return ImageSet(source, [records.image_name(i) for i in range(count)], records.open_image)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.fid``."""
    parser = argparse.ArgumentParser(prog="python -m eval.fid", description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--raw-clip-features", action="store_true",
                        help="CLIP features without L2 normalisation (default: normalised)")  # fmt: skip
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """Compute FID and KID as ``args`` says; returns the JSON-able result."""
    if args.batch_size < 1 or args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise ValueError("--batch-size and --kid-subsets must be >= 1 and --kid-subset-size >= 2")
    if args.max_images is not None and args.max_images < 2:
        raise ValueError(f"--max-images must be >= 2 (FID needs a covariance); got {args.max_images}")
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
            raise ValueError(f"only {len(values)} readable images in --{role} {sets[role].source}; FID needs >= 2")
        if not torch.isfinite(values).all():
            raise ValueError(f"the {role} features are not all finite; check the --features weights")
    fid = fid_from_features(features["real"], features["fake"])
    kid_result = kid(features["real"], features["fake"], subsets=args.kid_subsets, subset_size=args.kid_subset_size,
                     generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    counts = {role: len(values) for role, values in features.items()}
    notes = ["FID is biased by the number of images: compare FIDs computed on equally many images; KID is unbiased",
             f"comparable only with results from the same feature extractor ({extractor.name})"]  # fmt: skip
    if isinstance(extractor, InceptionV3Features):
        notes.append(
            "Inception weights verified as pytorch-fid's standard FID weights: FID comparable to published FIDs"
            if extractor.standard_weights
            else f"Inception weights NOT verified as {FID_WEIGHTS_NAME}: FID NOT comparable to published FIDs"
        )
    if min(counts.values()) < extractor.dim:
        notes.append(f"fewer images ({min(counts.values())}) than feature dimensions ({extractor.dim}): the "
                     "covariances are rank-deficient and FID is strongly biased; prefer KID here")  # fmt: skip
    return {
        "fid": fid,
        "kid": asdict(kid_result) | {"seed": args.seed},
        "features": extractor.name,
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
    lines = [f"FID {result['fid']:.4f}", f"KID {kid_result['mean']:.6f} ± {kid_result['std']:.6f} "
             f"({kid_result['subsets']} subsets of {kid_result['subset_size']})",
             f"features: {result['features']} ({result['feature_dim']}-d)"]  # fmt: skip
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
