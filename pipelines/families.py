"""Which model families the project runs, and the one check every command makes before loading a model.

A model is recognised by what its files say, before any weights load: a diffusers folder or Hub repository by the
``_class_name`` of its ``model_index.json`` (and its U-Net's ``addition_embed_type``), a one-file checkpoint by its
keys (diffusers' ``infer_diffusers_model_type``). :data:`FAMILIES` is the table of the families we run (Stable
Diffusion 1.x/2.x and SDXL); a model of any other kind (SD3, Flux, PixArt, Kandinsky, ...) is refused up front with
one line naming what is supported, instead of failing deep inside diffusers. Adding a family is adding a row (and its
pipelines in :func:`pipelines_of`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ldm.errors import UserError

if TYPE_CHECKING:
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
UNET_CONFIG = "unet/config.json"


@dataclass(frozen=True)
class ModelFamily:
    """A model family the project runs, and how its files are recognised.

    Attributes:
        name: what users call it ("Stable Diffusion 1.x/2.x").
        examples: the pipeline classes to name in an error message.
        pipeline_classes: the ``_class_name`` values of ``model_index.json`` that mark a folder of this family
            (stock diffusers' pipelines and ours).
        single_file_types: diffusers' ``infer_diffusers_model_type`` names of one-file checkpoints of this family.
        unet_addition_embed_type: the U-Net config's ``addition_embed_type`` (SDXL's is ``"text_time"``).
    """

    name: str
    examples: str
    pipeline_classes: frozenset[str]
    single_file_types: frozenset[str]
    unet_addition_embed_type: str | None = None

    def __str__(self) -> str:
        return self.name


STABLE_DIFFUSION = ModelFamily(
    name="Stable Diffusion 1.x/2.x",
    examples="StableDiffusionPipeline, LatentDiffusionPipeline and their img2img/inpaint pipelines",
    pipeline_classes=frozenset(
        {
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
            "LatentDiffusionPipeline",
            "LatentDiffusionImg2ImgPipeline",
            "LatentDiffusionInpaintPipeline",
        }
    ),
    single_file_types=frozenset({"v1", "v2", "inpainting", "inpainting_v2"}),
)

STABLE_DIFFUSION_XL = ModelFamily(
    name="Stable Diffusion XL",
    examples="StableDiffusionXLPipeline, LatentDiffusionXLPipeline, their img2img/inpaint pipelines and the refiner",
    pipeline_classes=frozenset(
        {
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",  # the refiner's folders too
            "StableDiffusionXLInpaintPipeline",
            "LatentDiffusionXLPipeline",
            "LatentDiffusionXLImg2ImgPipeline",
            "LatentDiffusionXLInpaintPipeline",
        }
    ),
    single_file_types=frozenset({"xl_base", "xl_refiner", "xl_inpaint"}),
    unet_addition_embed_type="text_time",
)

FAMILIES: tuple[ModelFamily, ...] = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL)
"""The families the commands run, in the order they are tried."""


Task = Literal["text_to_image", "img2img", "inpaint"]
"""What a generation does; each names a field of :class:`FamilyPipelines`."""


@dataclass(frozen=True)
class FamilyPipelines:
    """Our pipeline classes of a family, by what they do (``inpaint`` None: the family has none yet)."""

    text_to_image: type[LatentDiffusionPipeline]
    img2img: type[LatentDiffusionPipeline]
    inpaint: type[LatentDiffusionPipeline] | None


def pipelines_of(family: ModelFamily) -> FamilyPipelines:
    """The pipeline classes that run ``family`` (the loader loads a folder with ``text_to_image`` and reaches the
    others with ``from_pipe``). Imported here, not at the top, so that recognising a model stays free of torch."""
    from pipelines.pipeline_img2img import LatentDiffusionImg2ImgPipeline
    from pipelines.pipeline_img2img_xl import LatentDiffusionXLImg2ImgPipeline
    from pipelines.pipeline_inpaint import LatentDiffusionInpaintPipeline
    from pipelines.pipeline_inpaint_xl import LatentDiffusionXLInpaintPipeline
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
    from pipelines.pipeline_latent_diffusion_xl import LatentDiffusionXLPipeline

    table = {
        STABLE_DIFFUSION: FamilyPipelines(
            LatentDiffusionPipeline, LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
        ),
        STABLE_DIFFUSION_XL: FamilyPipelines(
            LatentDiffusionXLPipeline, LatentDiffusionXLImg2ImgPipeline, LatentDiffusionXLInpaintPipeline
        ),
    }
    return table[family]


def text_to_image_pipeline(family: ModelFamily) -> type[LatentDiffusionPipeline]:
    """The class that loads a folder of ``family`` (``pipelines_of(family).text_to_image``)."""
    return pipelines_of(family).text_to_image


def family_of_unet(unet_config: Mapping[str, Any]) -> ModelFamily:
    """The family of loaded components, known by their U-Net's ``addition_embed_type`` (SDXL's ``"text_time"``).

    Raises:
        UserError: a U-Net of no family in :data:`FAMILIES`.
    """
    embed_type = unet_config.get("addition_embed_type")
    for family in FAMILIES:
        if family.unet_addition_embed_type == embed_type:
            return family
    raise _refusal("the U-Net", f"one with addition_embed_type {embed_type!r}")


def supported_text() -> str:
    """One phrase naming what is supported, for error messages."""
    return "; ".join(f"{family.name} models ({family.examples})" for family in FAMILIES)


def _refusal(what: str, found: str) -> UserError:
    return UserError(
        f"{what} is {found}, which this version does not run; pass one of the families it runs: {supported_text()}"
    )


def family_of_index(
    index: Mapping[str, Any], unet_config: Mapping[str, Any] | None = None, what: str = "the model"
) -> ModelFamily:
    """The family of a pipeline from its ``model_index.json`` (and its U-Net config, when known).

    Raises:
        UserError: a pipeline class (or U-Net) of no supported family.
    """
    class_name = index.get("_class_name")
    for family in FAMILIES:
        if class_name not in family.pipeline_classes:
            continue
        embed_type = (unet_config or {}).get("addition_embed_type")
        if unet_config is not None and embed_type != family.unet_addition_embed_type:
            raise _refusal(what, f"a {class_name} whose U-Net has addition_embed_type {embed_type!r}")
        return family
    raise _refusal(what, f"a {class_name} model" if class_name else "a pipeline with no _class_name")


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {what} {path} ({err}); pass a diffusers pipeline folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object; pass a diffusers pipeline folder")
    return data


def _hub_file(repo_id: str, filename: str) -> str:
    """``filename`` of the Hub repository ``repo_id``, from the cache or the network (``HF_HUB_OFFLINE`` aware).

    Raises:
        OSError, ValueError: huggingface_hub's errors (not cached offline, no such repository or file, bad id).
    """
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename)


def model_files(name_or_path: str, flag: str = "--model") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``model_index.json`` and (when present) U-Net config of a pipeline folder or Hub id.

    Raises:
        UserError: a missing folder, a folder without ``model_index.json``, or a Hub id whose index cannot be read.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / MODEL_INDEX).is_file():
            raise UserError(
                f"{flag} {name_or_path} is not a diffusers pipeline folder (no {MODEL_INDEX}); pass a folder saved "
                "with save_pretrained, or a Hub id (a one-file checkpoint: python -m pipelines.convert "
                "--from-single-file)"
            )
        unet_path = path / UNET_CONFIG
        unet = _read_json(unet_path, "U-Net config") if unet_path.is_file() else None
        return _read_json(path / MODEL_INDEX, MODEL_INDEX), unet
    if name_or_path.startswith((".", "~", "/")) or ".." in name_or_path or name_or_path.count("/") > 1:
        raise UserError(f"{flag} {name_or_path}: no such folder; pass a diffusers pipeline folder or a Hub id")
    try:
        index = _read_json(_hub_file(name_or_path, MODEL_INDEX), MODEL_INDEX)
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(
            f"could not load {flag} {name_or_path} (no such folder, so it was tried as a Hub id): {err}; pass a "
            f"diffusers pipeline folder (with {MODEL_INDEX}) or a Hub id that is downloaded or reachable"
        ) from err
    try:
        unet = _read_json(_hub_file(name_or_path, UNET_CONFIG), "U-Net config")
    except (OSError, ValueError):
        logger.debug("no U-Net config for %s", name_or_path, exc_info=True)
        unet = None
    return index, unet


def require_supported_model(name_or_path: str, flag: str = "--model") -> ModelFamily:
    """The family of the pipeline folder or Hub id ``name_or_path``, read from its config files (no weights load);
    ``flag`` names the argument in messages.

    Raises:
        UserError: no such folder or reachable Hub id, or a model of a family this version does not run (the
            message names what is supported).
    """
    index, unet = model_files(name_or_path, flag)
    return family_of_index(index, unet, what=f"{flag} {name_or_path}")


class _ShapeOnly:
    """A tensor stand-in with only ``shape``, so checkpoint keys can be classified without reading weights."""

    def __init__(self, shape: list[int]):
        import torch

        self.shape = torch.Size(shape)


class _LazyCheckpoint(Mapping[str, _ShapeOnly]):
    """The keys and shapes of a ``.safetensors`` file, read from its header."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> _ShapeOnly:
        if key not in self._keys:
            raise KeyError(key)
        return _ShapeOnly(self._handle.get_slice(key).get_shape())

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def single_file_family(path: str | Path) -> ModelFamily:
    """The family of a one-file ``.safetensors`` checkpoint, from its keys and shapes (its header only).

    Raises:
        UserError: the file cannot be read, or holds a model of a family this version does not run.
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            model_type = infer_diffusers_model_type(_LazyCheckpoint(handle))
    except (OSError, KeyError, SafetensorError) as err:
        raise UserError(f"cannot read the checkpoint {path} ({err}); pass a .safetensors checkpoint") from None
    for family in FAMILIES:
        if model_type in family.single_file_types:
            return family
    raise _refusal(f"the checkpoint {path}", f"a {model_type!r} checkpoint (by its keys)")
