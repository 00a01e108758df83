"""Image feature extractors for FID, KID and CLIP scores, behind one small protocol, loaded from local weights only.

An extractor (:class:`FeatureExtractor`) has a ``name``, a feature size ``dim``, and is called on a list of PIL
images (any sizes and modes) or a float tensor ``(N, 3, H, W)`` in [0, 1]; it returns float32 features ``(N, dim)``
on the CPU. PIL images are converted to tensors first (``uint8 / 255``) and every resize is done on tensors, so an
image gives the same features whichever way it is passed. :func:`load_feature_extractor` parses a spec string:

- ``inception:FILE`` — Inception-v3 pool3 features (2048-d), the FID standard (:class:`InceptionV3Features`). FIDs
  are comparable to published ones only with pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TF FID
  graph's weights); any other Inception weights give a different, self-consistent metric (:mod:`eval.inception`).
- ``open_clip:NAME:FILE`` — an open_clip image tower, ``open_clip.create_model(NAME, pretrained=FILE)``
  (:class:`OpenCLIPFeatures`); ``open_clip:NAME`` alone is randomly initialised (for tests); ``open_clip:local-dir:
  FOLDER`` reads an open_clip folder (``open_clip_config.json`` + weights).
- ``clip:FOLDER`` — a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder, such as the
  ``OUT/clip`` folder :mod:`training.train_text_encoder` writes (:class:`TransformersCLIPFeatures`).

The extractors live in :mod:`eval.inception` and :mod:`eval.clip_features`.

CLIP features are the projected image embeddings, L2-normalised by default (the unit sphere on which CLIP measures
similarity, so the metric does not depend on a model's arbitrary embedding scale); ``normalize=False`` keeps the raw
projections. The CLIP extractors also have ``encode_text``, which :mod:`eval.clip_score` uses. Any other torch module
can be wrapped with :class:`ModuleFeatures`. Nothing is ever downloaded: every spec names a local file or folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from common.images import open_rgb
from ldm.errors import UserError

if TYPE_CHECKING:
    from eval.clip_features import OpenCLIPFeatures, TransformersCLIPFeatures
    from eval.inception import InceptionV3Features

__all__ = [
    "FEATURE_KINDS",
    "FeatureExtractor",
    "FeatureSpec",
    "ImageBatch",
    "ModuleFeatures",
    "extract_features",
    "load_feature_extractor",
    "parse_feature_spec",
    "prepare_batch",
]

logger = logging.getLogger(__name__)

ImageBatch = list[Image.Image] | Tensor

FEATURE_KINDS = ("inception", "open_clip", "clip")


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images -> features: ``extractor(images)`` is ``(N, dim)`` float32 on the CPU, ``name`` says which model."""

    name: str
    dim: int

    def __call__(self, images: ImageBatch) -> Tensor: ...


# --------------------------------------------------------------------------------------------------------------------
# Images


def _to_tensors(images: ImageBatch) -> list[Tensor] | Tensor:
    """A float batch ``(N, 3, H, W)`` in [0, 1] as given, or one ``(1, 3, H, W)`` tensor per PIL image."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"image tensors must be float (N, 3, H, W) in [0, 1]; got {tuple(images.shape)} {images.dtype}"
            )
        return images
    if not images:
        raise UserError("no images to extract features from")
    return [TF.pil_to_tensor(open_rgb(image))[None].float() / 255 for image in images]


def prepare_batch(images: ImageBatch, transform: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
    """Apply ``transform`` (a resize to the model's input size) to the batch, or to each PIL image, and stack."""
    tensors = _to_tensors(images)
    if isinstance(tensors, Tensor):
        return transform(tensors.to(device))
    return torch.cat([transform(t.to(device)) for t in tensors])


def extract_features(
    extractor: FeatureExtractor,
    images: Iterable[Image.Image],
    *,
    batch_size: int = 32,
    total: int | None = None,
    desc: str = "features",
) -> Tensor:
    """The features ``(N, dim)`` of every image of ``images`` (read lazily), ``batch_size`` images a call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    chunks, batch = [], []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                chunks.append(extractor(batch))
                bar.update(len(batch))
                batch = []
        if batch:
            chunks.append(extractor(batch))
            bar.update(len(batch))
    if not chunks:
        return torch.zeros(0, extractor.dim)
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------------------------------------
# Any module (tests, custom features)


class ModuleFeatures:
    """Any module as an extractor: images in [0, 1] (resized bilinearly to ``size`` if given, else all one size)
    go through ``module`` and are flattened to ``(N, dim)``."""

    def __init__(
        self,
        module: nn.Module,
        *,
        dim: int,
        name: str = "module",
        size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.module = module.to(device).eval()
        self.dim, self.name, self.size, self.device = dim, name, size, torch.device(device)

    def _resize(self, x: Tensor) -> Tensor:
        if self.size is None or tuple(x.shape[-2:]) == tuple(self.size):
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        features = self.module(prepare_batch(images, self._resize, self.device)).flatten(1).float().cpu()
        if features.shape[1] != self.dim:
            raise UserError(f"{self.name} returned {features.shape[1]} features per image; expected dim={self.dim}")
        return features


# --------------------------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class FeatureSpec:
    """A parsed ``--features`` spec: ``kind`` (``inception``, ``open_clip``, ``clip``), a model ``name`` (open_clip)
    and a local ``path`` (None for a randomly initialised open_clip model)."""

    kind: str
    name: str | None
    path: str | None


_SPEC_HELP = (
    "inception:/path/pt_inception-2015-12-05-6726825d.pth, open_clip:ViT-B-32:/path/weights.safetensors, "
    "open_clip:local-dir:/path/folder or clip:/path/clip_folder"
)


def parse_feature_spec(spec: str) -> FeatureSpec:
    """Split a spec string (see the module docstring) into a :class:`FeatureSpec`; a malformed one raises a
    ``ValueError`` with examples. Files are not checked here (see :func:`load_feature_extractor`)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in FEATURE_KINDS:
        raise UserError(
            f"unknown feature extractor spec {spec!r}; use one of {', '.join(FEATURE_KINDS)}, e.g. {_SPEC_HELP}"
        )
    if not rest:
        raise UserError(f"feature spec {spec!r} names no model; e.g. {_SPEC_HELP}")
    if kind == "open_clip":
        if rest.startswith("local-dir:"):
            return FeatureSpec(kind, rest, None)
        name, _, path = rest.partition(":")
        if not name:
            raise UserError(f"feature spec {spec!r} names no open_clip model; use open_clip:NAME:/path/weights")
        return FeatureSpec(kind, name, path or None)
    return FeatureSpec(kind, None, rest)


def load_feature_extractor(
    spec: str | FeatureSpec, *, device: torch.device | str = "cpu", normalize: bool = True
) -> InceptionV3Features | OpenCLIPFeatures | TransformersCLIPFeatures:
    """Build the extractor a spec names (module docstring), from local files only. ``normalize`` applies to CLIP
    features. Raises ``ValueError`` naming the fix when a file is missing or of the wrong kind."""
    from eval.clip_features import OpenCLIPFeatures, TransformersCLIPFeatures  # they import this module
    from eval.inception import InceptionV3Features

    spec = parse_feature_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "inception":
        assert spec.path is not None
        return InceptionV3Features.from_file(spec.path, device=device)
    if spec.kind == "clip":
        assert spec.path is not None
        if not Path(spec.path).expanduser().is_dir():
            raise UserError(
                f"clip:{spec.path}: no such folder; pass a CLIPModel folder (training.train_text_encoder "
                "writes OUT/clip) or a CLIPVisionModelWithProjection folder"
            )
        return TransformersCLIPFeatures.from_folder(spec.path, normalize=normalize, device=device)
    import open_clip

    assert spec.name is not None
    if spec.name.startswith("local-dir:") and not Path(spec.name.removeprefix("local-dir:")).expanduser().is_dir():
        raise UserError(f"open_clip:{spec.name}: no such folder; pass an open_clip folder with open_clip_config.json")
    if spec.name.startswith("local-dir:"):
        model = open_clip.create_model(spec.name)
    elif spec.name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model {spec.name!r}; open_clip.list_models() lists the names (e.g. "
            "ViT-B-32, ViT-B-32-quickgelu for OpenAI's weights, ViT-H-14)"
        )
    elif spec.path is None:
        logger.warning(
            "open_clip:%s has no weights file: RANDOM weights, features are meaningless outside tests; "
            "pass open_clip:%s:/path/to/weights",
            spec.name,
            spec.name,
        )
        model = open_clip.create_model(spec.name)
    else:
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise UserError(
                f"open_clip weights file {path} not found; download the weights of {spec.name} (e.g. "
                f"open_clip_model.safetensors) and pass open_clip:{spec.name}:/path/to/it"
            )
        model = open_clip.create_model(spec.name, pretrained=str(path))
    return OpenCLIPFeatures(model, spec.name, normalize=normalize, device=device)
