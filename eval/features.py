"""Image feature extractors for FID, KID and CLIP scores, behind one small protocol, loaded from local weights only.

An extractor (:class:`FeatureExtractor`) has a ``name``, a feature size ``dim``, and is called on a list of PIL
images (any sizes and modes) or a float tensor ``(N, 3, H, W)`` in [0, 1]; it returns float32 features ``(N, dim)``
on the CPU. PIL images are converted to tensors first (``uint8 / 255``) and every resize is done on tensors, so an
image gives the same features whichever way it is passed. :func:`load_feature_extractor` parses a spec string:

- ``inception:FILE`` — Inception-v3 pool3 features (2048-d), the FID standard (:class:`InceptionV3Features`). FIDs
  are comparable to published ones only with pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TF FID
  graph's weights); any other Inception weights give a different, self-consistent metric.
- ``open_clip:NAME:FILE`` — an open_clip image tower, ``open_clip.create_model(NAME, pretrained=FILE)``
  (:class:`OpenCLIPFeatures`); ``open_clip:NAME`` alone is randomly initialised (for tests); ``open_clip:local-dir:
  FOLDER`` reads an open_clip folder (``open_clip_config.json`` + weights).
- ``clip:FOLDER`` — a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder, such as the
  ``OUT/clip`` folder :mod:`training.train_text_encoder` writes (:class:`TransformersCLIPFeatures`).

CLIP features are the projected image embeddings, L2-normalised by default (the unit sphere on which CLIP measures
similarity, so the metric does not depend on a model's arbitrary embedding scale); ``normalize=False`` keeps the raw
projections. The CLIP extractors also have ``encode_text``, which :mod:`eval.clip_score` uses. Any other torch module
can be wrapped with :class:`ModuleFeatures`. Nothing is ever downloaded: every spec names a local file or folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from torchvision.models import inception as tv_inception
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from training.data import to_rgb
from training.records import IMAGE_EXTENSIONS

__all__ = [
    "FID_WEIGHTS_NAME",
    "FID_WEIGHTS_URL",
    "FEATURE_KINDS",
    "FeatureExtractor",
    "FeatureSpec",
    "ImageBatch",
    "InceptionV3Features",
    "ModuleFeatures",
    "OpenCLIPFeatures",
    "TransformersCLIPFeatures",
    "extract_features",
    "list_image_files",
    "load_feature_extractor",
    "load_state_dict_file",
    "open_rgb",
    "parse_feature_spec",
]

logger = logging.getLogger(__name__)

ImageBatch = list[Image.Image] | Tensor

FEATURE_KINDS = ("inception", "open_clip", "clip")
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
_FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash prefix in the file name, as torch.hub's check_hash reads it
_TF_NUM_CLASSES = 1008  # the TF FID graph's classifier has 1008 outputs; torchvision's ImageNet weights have 1000
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}  # PIL codes in preprocessor configs


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images -> features: ``extractor(images)`` is ``(N, dim)`` float32 on the CPU, ``name`` says which model."""

    name: str
    dim: int

    def __call__(self, images: ImageBatch) -> Tensor: ...


# --------------------------------------------------------------------------------------------------------------------
# Images


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted; hidden files and folders skipped)."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(Path(root, name))
    return paths


def open_rgb(image: str | Path | Image.Image) -> Image.Image:
    """An RGB, EXIF-rotated, fully decoded copy of an image file or PIL image (transparency composited on white)."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    with Image.open(image) as opened:
        return to_rgb(ImageOps.exif_transpose(opened))


def _to_tensors(images: ImageBatch) -> list[Tensor] | Tensor:
    """A float batch ``(N, 3, H, W)`` in [0, 1] as given, or one ``(1, 3, H, W)`` tensor per PIL image."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"image tensors must be float (N, 3, H, W) in [0, 1]; got {tuple(images.shape)} {images.dtype}"
            )
        return images
    if not images:
        raise ValueError("no images to extract features from")
    return [TF.pil_to_tensor(open_rgb(image))[None].float() / 255 for image in images]


def _batch(images: ImageBatch, transform: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
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
# Weights files


def load_state_dict_file(path: str | Path, *, what: str = "weights") -> dict[str, Tensor]:
    """A state dict from a local file the user named: ``.safetensors``, or a ``.pth``/``.pt``/``.bin``/``.ckpt``
    pickle read with ``torch.load(weights_only=True)``. A ``state_dict`` entry and ``module.`` prefixes are
    unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} file {path} not found; pass the path of a local .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(f"{what} file {path} must be .safetensors or a PyTorch .pth/.pt/.bin file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} file {path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Inception-v3


# The TF FID graph pools differently from torchvision's Inception-v3 in four kinds of block: its average pools
# exclude the padding, and the last block max-pools. These subclasses change only that line of torchvision's
# ``_forward`` (as pytorch-fid's FIDInceptionA/C/E_1/E_2 do); instances are switched to them by ``__class__``.
def _avg_pool_excluding_padding(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(tv_inception.InceptionA):
    def _forward(self, x: Tensor) -> list[Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_excluding_padding(x))]


class _FIDInceptionC(tv_inception.InceptionC):
    def _forward(self, x: Tensor) -> list[Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_excluding_padding(x))]


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FIDInceptionE(tv_inception.InceptionE):
    pool = staticmethod(_avg_pool_excluding_padding)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(type(self).pool(x))]


class _FIDInceptionEMaxPool(_FIDInceptionE):
    pool = staticmethod(_max_pool)


_FID_BLOCKS = {"Mixed_5b": _FIDInceptionA, "Mixed_5c": _FIDInceptionA, "Mixed_5d": _FIDInceptionA,
               "Mixed_6b": _FIDInceptionC, "Mixed_6c": _FIDInceptionC, "Mixed_6d": _FIDInceptionC,
               "Mixed_6e": _FIDInceptionC, "Mixed_7b": _FIDInceptionE, "Mixed_7c": _FIDInceptionEMaxPool}  # fmt: skip
_INCEPTION_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                    "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")  # fmt: skip


class InceptionV3Features:
    """Inception-v3 pool3 features (2048-d, before the classifier), the features of FID and KID.

    Preprocessing follows pytorch-fid: pixels in [0, 1] are resized to 299 x 299 with bilinear interpolation
    (``align_corners=False``, no antialiasing, aspect ratio not kept) and scaled to [-1, 1]. The network is
    torchvision's ``inception_v3(weights=None, aux_logits=True, init_weights=False)`` with ``state_dict`` loaded
    (the classifier and auxiliary head are dropped, only the trunk is needed). ``tf_pooling`` switches the pooling
    of the mixed blocks to the TF FID graph's (see ``_FID_BLOCKS``); ``None`` turns it on for 1008-class weights,
    the layout of pytorch-fid's ``pt_inception-2015-12-05`` file, and off for torchvision's 1000-class ImageNet
    weights.
    """

    dim = INCEPTION_DIM

    def __init__(
        self,
        state_dict: Mapping[str, Tensor],
        *,
        tf_pooling: bool | None = None,
        source: str = "state dict",
        device: torch.device | str = "cpu",
    ) -> None:
        fc = state_dict.get("fc.weight")
        if tf_pooling is None:
            tf_pooling = fc is not None and fc.shape[0] == _TF_NUM_CLASSES
        model = tv_inception.inception_v3(weights=None, aux_logits=True, init_weights=False)
        if tf_pooling:
            for block_name, block_class in _FID_BLOCKS.items():
                getattr(model, block_name).__class__ = block_class
        heads = ("fc.", "AuxLogits.")
        trunk = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        missing = [k for k in missing if not k.startswith(heads) and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{source} is not an Inception-v3 state dict ({len(missing)} trunk weights missing, e.g. "
                f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); pass pytorch-fid's "
                f"{FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}) or torchvision's inception_v3 ImageNet weights"
            )
        self.trunk = nn.Sequential(*(getattr(model, name) for name in _INCEPTION_TRUNK)).to(device).eval()
        self.device = torch.device(device)
        self.tf_pooling = tf_pooling
        self.standard_weights = False  # verified to be pytorch-fid's FID weights (set by from_file)
        self.name = "inception-v3 pool3" + (" (TF FID pooling)" if tf_pooling else " (torchvision pooling)")

    @classmethod
    def from_file(cls, path: str | Path, *, device: torch.device | str = "cpu") -> InceptionV3Features:
        """Load from a local weights file, logging whether FIDs from it compare with published ones."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"Inception weights file {path} not found; download pytorch-fid's {FID_WEIGHTS_NAME} from "
                f"{FID_WEIGHTS_URL} (or convert it to .safetensors) and pass --features inception:/path/to/it"
            )
        extractor = cls(load_state_dict_file(path, what="Inception weights"), source=str(path), device=device)
        standard = path.suffix != ".safetensors" and _sha256(path).startswith(_FID_WEIGHTS_SHA256_PREFIX)
        extractor.standard_weights = standard
        if standard:
            logger.info("%s: pytorch-fid's standard FID Inception weights (sha256 verified)", path)
        elif extractor.tf_pooling:
            logger.warning(
                "FID NOTE: %s has the TF FID graph's layout but its hash cannot be checked against %s (a converted "
                "or other file); FIDs are comparable to published ones only if these are exactly those weights",
                path, FID_WEIGHTS_NAME,
            )  # fmt: skip
        else:
            logger.warning(
                "FID WARNING: %s are not the standard FID Inception weights (%s); FIDs computed with them are "
                "self-consistent but NOT comparable to published FIDs",
                path, FID_WEIGHTS_NAME,
            )  # fmt: skip
        return extractor

    @staticmethod
    def _resize(x: Tensor) -> Tensor:
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        x = _batch(images, self._resize, self.device)
        return self.trunk(x).flatten(1).float().cpu()


# --------------------------------------------------------------------------------------------------------------------
# CLIP image towers


@dataclass(frozen=True)
class _CLIPPreprocess:
    """Resize (shortest side, or both sides with ``squash``), centre-crop and normalise, on tensors in [0, 1]."""

    size: int | tuple[int, int]  # an int: the shortest side; (height, width): squash to it
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: InterpolationMode = InterpolationMode.BICUBIC

    def __call__(self, x: Tensor) -> Tensor:
        size = [self.size] if isinstance(self.size, int) else list(self.size)
        x = TF.resize(x, size, interpolation=self.interpolation, antialias=True).clamp(0, 1)
        x = TF.center_crop(x, list(self.crop))
        return TF.normalize(x, list(self.mean), list(self.std))


class OpenCLIPFeatures:
    """The image embeddings of an open_clip model (``encode_image``), normalised unless ``normalize=False``.

    Preprocessing uses the model's own preprocess config (size, mean, std, interpolation; ``shortest`` or
    ``squash`` resize), applied to tensors: it matches open_clip's PIL transform up to resampling rounding.
    """

    def __init__(
        self, model: nn.Module, model_name: str, *, normalize: bool = True, device: torch.device | str = "cpu"
    ) -> None:
        import open_clip

        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.model_name = model_name
        self.normalize = normalize
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if cfg.get("resize_mode", "shortest") == "shortest":
            resize: int | tuple[int, int] = min(height, width)
        elif cfg["resize_mode"] == "squash":
            resize = (height, width)
        else:
            raise ValueError(f"open_clip model {model_name} uses resize_mode {cfg['resize_mode']!r}; only "
                             "'shortest' and 'squash' are supported here")  # fmt: skip
        bilinear = cfg.get("interpolation") == "bilinear"
        interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        self.preprocess = _CLIPPreprocess(resize, (height, width), tuple(cfg["mean"]), tuple(cfg["std"]),
                                          interpolation)  # fmt: skip
        self.dim = int(getattr(model.visual, "output_dim", 0)) or int(self(torch.zeros(1, 3, height, width)).shape[1])
        self.name = f"open_clip:{model_name}" + ("" if normalize else " (unnormalised)")
        self._tokenizer: Callable[[list[str]], Tensor] | None = None

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        x = _batch(images, self.preprocess, self.device)
        return self.model.encode_image(x, normalize=self.normalize).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Text embeddings ``(N, dim)`` (projected, not normalised); texts are truncated at the context length."""
        import open_clip

        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        tokens = self._tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float().cpu()


class TransformersCLIPFeatures:
    """The image embeddings (``visual_projection`` of the pooled output) of a transformers ``CLIPModel`` or
    ``CLIPVisionModelWithProjection``, normalised unless ``normalize=False``.

    ``preprocess`` defaults to OpenAI CLIP's (bicubic shortest side and centre crop to the vision tower's size,
    OpenAI's mean and std); :meth:`from_folder` reads the folder's ``preprocessor_config.json`` when it has one.
    ``encode_text`` needs a ``CLIPModel`` and a tokenizer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Callable[..., object] | None = None,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        name: str = "clip",
        normalize: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.normalize = normalize
        vision_config = getattr(model.config, "vision_config", model.config)
        size = int(vision_config.image_size)
        self.preprocess = preprocess or _CLIPPreprocess(size, (size, size), _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD)
        self.dim = int(model.config.projection_dim)
        self.name = name + ("" if normalize else " (unnormalised)")

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, normalize: bool = True, device: torch.device | str = "cpu"
    ) -> TransformersCLIPFeatures:
        """Load a ``CLIPModel`` / ``CLIPVisionModelWithProjection`` folder, its image preprocessing and (for a
        ``CLIPModel``) its tokenizer, or :func:`ldm.tokenizer.build_clip_tokenizer` when it has none."""
        from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

        folder = Path(folder).expanduser()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"clip:{folder} is not a transformers model folder (no config.json); pass a CLIPModel folder such as "
                "the OUT/clip folder training.train_text_encoder writes, or a CLIPVisionModelWithProjection folder"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        model_class = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}.get(model_type)
        if model_class is None:
            raise ValueError(
                f"clip:{folder} holds a {model_type!r} model; pass a folder of a CLIPModel (model_type 'clip') or "
                "a CLIPVisionModelWithProjection (model_type 'clip_vision_model')"
            )
        model = model_class.from_pretrained(folder)
        tokenizer = None
        if model_class is CLIPModel:
            if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
                tokenizer = CLIPTokenizer.from_pretrained(folder)
            else:
                from ldm.tokenizer import build_clip_tokenizer

                logger.info("clip:%s has no tokenizer files; using the standard CLIP tokenizer", folder)
                tokenizer = build_clip_tokenizer()
        preprocess = _preprocess_from_config(folder / "preprocessor_config.json")
        if preprocess is None:
            logger.warning("clip:%s has no preprocessor_config.json; using OpenAI CLIP's mean and std", folder)
        return cls(model, tokenizer=tokenizer, preprocess=preprocess, name=f"clip:{folder.name}",
                   normalize=normalize, device=device)  # fmt: skip

    def _image_embeds(self, pixel_values: Tensor) -> Tensor:
        if hasattr(self.model, "visual_projection") and hasattr(self.model, "vision_model"):
            return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)
        return self.model(pixel_values=pixel_values).image_embeds

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        x = _batch(images, self.preprocess, self.device).to(self.model.dtype)
        embeds = self._image_embeds(x).float()
        return (F.normalize(embeds, dim=-1) if self.normalize else embeds).cpu()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Text embeddings ``(N, dim)`` (projected, not normalised); texts are truncated at 77 tokens."""
        if self.tokenizer is None or not hasattr(self.model, "text_model"):
            raise ValueError(f"{self.name} has no text tower or tokenizer; pass a CLIPModel folder for text scores")
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")  # fmt: skip
        pooled = self.model.text_model(input_ids=tokens.input_ids.to(self.device)).pooler_output
        return self.model.text_projection(pooled).float().cpu()


def _preprocess_from_config(path: Path) -> _CLIPPreprocess | None:
    """The image preprocessing a ``preprocessor_config.json`` (CLIPImageProcessor) describes, or None without one."""
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    size = cfg.get("size", 224)
    if isinstance(size, dict):
        size = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
    crop = cfg.get("crop_size", size) if cfg.get("do_center_crop", True) else size
    if isinstance(crop, dict):
        crop = (crop["height"], crop["width"])
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    return _CLIPPreprocess(
        size if isinstance(size, int) else tuple(size),
        crop,
        tuple(cfg.get("image_mean", _OPENAI_CLIP_MEAN)),
        tuple(cfg.get("image_std", _OPENAI_CLIP_STD)),
        _PIL_RESAMPLE.get(cfg.get("resample", 3), InterpolationMode.BICUBIC),
    )


# --------------------------------------------------------------------------------------------------------------------
# Any module (tests, custom features)


class ModuleFeatures:
    """Any module as an extractor: images in [0, 1] (resized bilinearly to ``size`` if given, else all one size)
    go through ``module`` and are flattened to ``(N, dim)``."""

    def __init__(
        self, module: nn.Module, *, dim: int, name: str = "module", size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        self.module = module.to(device).eval()
        self.dim, self.name, self.size, self.device = dim, name, size, torch.device(device)

    def _resize(self, x: Tensor) -> Tensor:
        if self.size is None or tuple(x.shape[-2:]) == tuple(self.size):
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        features = self.module(_batch(images, self._resize, self.device)).flatten(1).float().cpu()
        if features.shape[1] != self.dim:
            raise ValueError(f"{self.name} returned {features.shape[1]} features per image; expected dim={self.dim}")
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


_SPEC_HELP = ("inception:/path/pt_inception-2015-12-05-6726825d.pth, open_clip:ViT-B-32:/path/weights.safetensors, "
              "open_clip:local-dir:/path/folder or clip:/path/clip_folder")  # fmt: skip


def parse_feature_spec(spec: str) -> FeatureSpec:
    """Split a spec string (see the module docstring) into a :class:`FeatureSpec`; a malformed one raises a
    ``ValueError`` with examples. Files are not checked here (see :func:`load_feature_extractor`)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature extractor spec {spec!r}; use one of {', '.join(FEATURE_KINDS)}, e.g. "
                         f"{_SPEC_HELP}")  # fmt: skip
    if not rest:
        raise ValueError(f"feature spec {spec!r} names no model; e.g. {_SPEC_HELP}")
    if kind == "open_clip":
        if rest.startswith("local-dir:"):
            return FeatureSpec(kind, rest, None)
        name, _, path = rest.partition(":")
        if not name:
            raise ValueError(f"feature spec {spec!r} names no open_clip model; use open_clip:NAME:/path/weights")
        return FeatureSpec(kind, name, path or None)
    return FeatureSpec(kind, None, rest)


def load_feature_extractor(
    spec: str | FeatureSpec, *, device: torch.device | str = "cpu", normalize: bool = True
) -> InceptionV3Features | OpenCLIPFeatures | TransformersCLIPFeatures:
    """Build the extractor a spec names (module docstring), from local files only. ``normalize`` applies to CLIP
    features. Raises ``ValueError`` naming the fix when a file is missing or of the wrong kind."""
    spec = parse_feature_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "inception":
        assert spec.path is not None
        return InceptionV3Features.from_file(spec.path, device=device)
    if spec.kind == "clip":
        assert spec.path is not None
        if not Path(spec.path).expanduser().is_dir():
            raise ValueError(f"clip:{spec.path}: no such folder; pass a CLIPModel folder (training.train_text_encoder "
                             "writes OUT/clip) or a CLIPVisionModelWithProjection folder")  # fmt: skip
        return TransformersCLIPFeatures.from_folder(spec.path, normalize=normalize, device=device)
    import open_clip

    assert spec.name is not None
    if spec.name.startswith("local-dir:") and not Path(spec.name.removeprefix("local-dir:")).expanduser().is_dir():
        raise ValueError(f"open_clip:{spec.name}: no such folder; pass an open_clip folder with open_clip_config.json")
    if spec.name.startswith("local-dir:"):
        model = open_clip.create_model(spec.name)
    elif spec.name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {spec.name!r}; open_clip.list_models() lists the names (e.g. "
                         "ViT-B-32, ViT-B-32-quickgelu for OpenAI's weights, ViT-H-14)")  # fmt: skip
    elif spec.path is None:
        logger.warning("open_clip:%s has no weights file: RANDOM weights, features are meaningless outside tests; "
                       "pass open_clip:%s:/path/to/weights", spec.name, spec.name)  # fmt: skip
        model = open_clip.create_model(spec.name)
    else:
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"open_clip weights file {path} not found; download the weights of {spec.name} (e.g. "
                f"open_clip_model.safetensors) and pass open_clip:{spec.name}:/path/to/it"
            )
        model = open_clip.create_model(spec.name, pretrained=str(path))
    return OpenCLIPFeatures(model, spec.name, normalize=normalize, device=device)
