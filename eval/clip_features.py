"""CLIP image towers as feature extractors, with the text tower that :mod:`eval.clip_score` needs.

- :class:`OpenCLIPFeatures`: an open_clip model (``open_clip:NAME:FILE``, ``open_clip:local-dir:FOLDER``);
- :class:`TransformersCLIPFeatures`: a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder
  (``clip:FOLDER``), such as the ``OUT/clip`` folder :mod:`training.train_text_encoder` writes.

Features are the projected image embeddings, L2-normalised by default (the unit sphere on which CLIP measures
similarity, so the metric does not depend on a model's arbitrary embedding scale); ``normalize=False`` keeps the raw
projections. Preprocessing runs on tensors (:class:`_CLIPPreprocess`), so PIL images and tensors give the same
features. :func:`eval.features.load_feature_extractor` builds both from a spec.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from eval.features import ImageBatch, prepare_batch
from ldm.errors import UserError

__all__ = ["OpenCLIPFeatures", "TransformersCLIPFeatures"]

logger = logging.getLogger(__name__)

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}  # PIL codes in preprocessor configs


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
            raise UserError(
                f"open_clip model {model_name} uses resize_mode {cfg['resize_mode']!r}; only "
                "'shortest' and 'squash' are supported here"
            )
        bilinear = cfg.get("interpolation") == "bilinear"
        interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        self.preprocess = _CLIPPreprocess(
            resize, (height, width), tuple(cfg["mean"]), tuple(cfg["std"]), interpolation
        )
        self.dim = int(getattr(model.visual, "output_dim", 0)) or int(self(torch.zeros(1, 3, height, width)).shape[1])
        self.name = f"open_clip:{model_name}" + ("" if normalize else " (unnormalised)")
        self._tokenizer: Callable[[list[str]], Tensor] | None = None

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        x = prepare_batch(images, self.preprocess, self.device)
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
            raise UserError(
                f"clip:{folder} is not a transformers model folder (no config.json); pass a CLIPModel folder such as "
                "the OUT/clip folder training.train_text_encoder writes, or a CLIPVisionModelWithProjection folder"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        model_class = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}.get(model_type)
        if model_class is None:
            raise UserError(
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
        return cls(
            model,
            tokenizer=tokenizer,
            preprocess=preprocess,
            name=f"clip:{folder.name}",
            normalize=normalize,
            device=device,
        )

    def _image_embeds(self, pixel_values: Tensor) -> Tensor:
        if hasattr(self.model, "visual_projection") and hasattr(self.model, "vision_model"):
            return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)
        return self.model(pixel_values=pixel_values).image_embeds

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        x = prepare_batch(images, self.preprocess, self.device).to(self.model.dtype)
        embeds = self._image_embeds(x).float()
        return (F.normalize(embeds, dim=-1) if self.normalize else embeds).cpu()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Text embeddings ``(N, dim)`` (projected, not normalised); texts are truncated at 77 tokens."""
        if self.tokenizer is None or not hasattr(self.model, "text_model"):
            raise UserError(f"{self.name} has no text tower or tokenizer; pass a CLIPModel folder for text scores")
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
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
