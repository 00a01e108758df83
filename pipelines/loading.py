"""Loading a model for generation: the device and precision, the family check, LoRAs and textual-inversion
embeddings, and a cache so one process loads a model once.

Every generation command, the studio behind the web app, and the evaluation commands that sample load through
:func:`load_model` (or :func:`load_pipeline` for a bare pipeline): the model is checked with
:func:`pipelines.families.require_supported_model` before any weights load, safetensors weights are preferred, and a
failed load is one :class:`~ldm.errors.UserError` that names the model and the fix.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import safetensors.torch
import torch
import transformers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.errors import UserError
from pipelines.families import ModelFamily, Task, pipelines_of, require_supported_model
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL: str = str(Path(__file__).resolve().parents[1] / "models" / "shapes")
"""The model used when ``--model`` is not given: the small shapes model that ships in the repository
(``models/shapes``, trained by ``recipes/shapes.sh``)."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_EMBEDDING_SUFFIXES = (".pt", ".bin")
KOHYA_EMBEDDING_KEY = "emb_params"


# ---------------------------------------------------------------------------------------------- device and dtype


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda, then mps, then cpu; otherwise the named device, which must be available.

    Raises:
        UserError: an unknown device name, or a CUDA / MPS device this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:<n> or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices; use cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> float16 on cuda and mps, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def loading_bars_hidden() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars, so stderr holds the sampling progress bar (and
    an error is one line); their global switches are restored afterwards."""
    switches = [diffusers.utils.logging, transformers.utils.logging]
    enabled = [switch.is_progress_bar_enabled() for switch in switches]
    for switch in switches:
        switch.disable_progress_bar()
    try:
        yield
    finally:
        for switch, was_enabled in zip(switches, enabled, strict=True):
            if was_enabled:
                switch.enable_progress_bar()


# -------------------------------------------------------------------------------------------------------- loading


def load_pipeline(model: str, dtype: torch.dtype = torch.float32) -> LatentDiffusionPipeline:
    """The text-to-image pipeline of the model's family (``LatentDiffusionPipeline``, ``LatentDiffusionXLPipeline``)
    loaded with ``from_pretrained``, with safetensors weights where the folder has them.

    Raises:
        UserError: the model is of an unsupported family, or could not be loaded (the message says which and why).
    """
    pipeline_class = pipelines_of(require_supported_model(model)).text_to_image
    path = Path(model).expanduser()
    has_safetensors = path.is_dir() and any(path.rglob(f"*{SAFETENSORS_SUFFIX}"))
    try:
        with loading_bars_hidden():
            return pipeline_class.from_pretrained(
                str(path) if path.is_dir() else model, use_safetensors=True if has_safetensors else None, dtype=dtype
            )
    except OSError as err:
        tried = "" if path.is_dir() else " (no such folder, so it was tried as a Hub id)"
        raise UserError(
            f"could not load --model {model}{tried}: {err}; pass a diffusers pipeline folder (with model_index.json) "
            "or a Hub id that is downloaded or reachable"
        ) from err


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA to apply: a ``.safetensors`` file (diffusers' or kohya's key layout) or a folder holding diffusers'
    ``pytorch_lora_weights.safetensors``, at ``scale`` (1: as trained)."""

    path: Path
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding file: diffusers' ``learned_embeds`` (``{token: vectors}``, ``.safetensors`` or
    ``.bin``) or AUTOMATIC1111's (``.pt`` with ``string_to_param``, or ``.safetensors`` with ``emb_params``), bound
    to ``token`` (default: the token a diffusers file names, else the file name without its suffix, as A1111 does).
    """

    path: Path
    token: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.token}" if self.token else str(self.path)


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load, where, and what to apply to it (the part of a request that costs a load)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "sdpa"
    loras: tuple[LoraWeights, ...] = ()
    embeddings: tuple[Embedding, ...] = ()


@dataclass
class LoadedModel:
    """A loaded text-to-image pipeline, its family, and the scheduler it came with (a request that names no sampler
    gets this one back)."""

    settings: ModelSettings
    pipe: LatentDiffusionPipeline
    family: ModelFamily
    scheduler: SchedulerMixin
    device: torch.device
    _views: dict[type, LatentDiffusionPipeline] = field(default_factory=dict, repr=False)

    def pipeline(self, task: Task) -> LatentDiffusionPipeline:
        """The pipeline of this model's family for ``task`` (``"text_to_image"``, ``"img2img"``, ``"inpaint"``),
        sharing this model's components.

        Raises:
            UserError: the family has no pipeline for ``task`` yet.
        """
        cls = getattr(pipelines_of(self.family), task)
        if cls is None:
            raise UserError(f"{task.replace('_', ' ')} is not available for {self.family} models yet; use txt2img")
        if cls is type(self.pipe):
            return self.pipe
        if cls not in self._views:
            # from_pipe casts to float32 unless told the dtype, and warns about the cast it makes either way.
            verbosity = diffusers.utils.logging.get_verbosity()
            diffusers.utils.logging.set_verbosity_error()
            try:
                self._views[cls] = cls.from_pipe(self.pipe, dtype=self.pipe.dtype)
            finally:
                diffusers.utils.logging.set_verbosity(verbosity)
        return self._views[cls]

    def set_scheduler(self, scheduler: SchedulerMixin) -> None:
        """Use ``scheduler`` in every pipeline of this model."""
        for pipe in (self.pipe, *self._views.values()):
            pipe.scheduler = scheduler


def apply_loras(pipe: LatentDiffusionPipeline, loras: tuple[LoraWeights, ...]) -> None:
    """Load each LoRA as its own adapter through diffusers' ``load_lora_weights`` (which reads kohya's layout too)
    and activate them all at their scales.

    Raises:
        UserError: a missing or non-safetensors file, or a LoRA that does not fit this model.
    """
    names = []
    for i, lora in enumerate(loras):
        path = lora.path.expanduser()
        if path.is_dir():
            source, options = str(path), {"use_safetensors": True}
        elif path.is_file() and path.suffix == SAFETENSORS_SUFFIX:
            source, options = str(path.parent), {"weight_name": path.name}
        else:
            raise UserError(
                f"--lora {lora.path}: no such .safetensors file or LoRA folder; pass a LoRA file (diffusers or kohya "
                "layout) or the folder training wrote it to"
            )
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(source, adapter_name=name, **options)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"could not load --lora {lora.path} into this model ({err}); pass a LoRA of it") from err
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])


SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
"""The keys of an SDXL textual-inversion embedding (AUTOMATIC1111, ComfyUI) by text encoder: the vectors of CLIP
ViT-L (``text_encoder``) and of OpenCLIP bigG (``text_encoder_2``)."""


def read_embedding(embedding: Embedding) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of an embedding file and the token to bind them to.

    Raises:
        UserError: a missing file or one of another format.
    """
    path = embedding.path.expanduser()
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            state = safetensors.torch.load_file(str(path))
        elif path.suffix in PICKLE_EMBEDDING_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"--embedding {embedding.path}: expected a .safetensors, .pt or .bin file")
    except FileNotFoundError:
        raise UserError(
            f"--embedding {embedding.path}: no such file; pass a textual-inversion embedding file"
        ) from None
    except (OSError, RuntimeError, safetensors.SafetensorError) as err:
        raise UserError(f"cannot read --embedding {embedding.path} ({err}); pass an embedding file") from None
    if not isinstance(state, dict):
        raise UserError(f"--embedding {embedding.path} holds no embedding (not a mapping of names to tensors)")
    diffusers_token = next(iter(state)) if len(state) == 1 and KOHYA_EMBEDDING_KEY not in state else None
    return state, embedding.token or diffusers_token or _trained_token(path) or path.stem


def _trained_token(path: Path) -> str | None:
    """The token an embedding file trained here was trained for (its ``placeholder_token`` metadata), if any."""
    if path.suffix != SAFETENSORS_SUFFIX:
        return None
    with safetensors.safe_open(str(path), framework="pt") as file:
        return (file.metadata() or {}).get("placeholder_token")


def apply_embeddings(pipe: LatentDiffusionPipeline, embeddings: tuple[Embedding, ...]) -> None:
    """Add each embedding's token(s) to the tokenizer and text encoder (diffusers' ``load_textual_inversion``).

    Raises:
        UserError: an unreadable file, a token already in the vocabulary, or vectors of another width.
    """
    for embedding in embeddings:
        state, token = read_embedding(embedding)
        try:
            if set(SDXL_EMBEDDING_KEYS.values()) <= state.keys():  # one set of vectors per text encoder (SDXL)
                if getattr(pipe, "text_encoder_2", None) is None:
                    raise UserError(
                        f"--embedding {embedding.path} is an SDXL embedding (clip_l, clip_g); use it with SDXL"
                    )
                for name, key in SDXL_EMBEDDING_KEYS.items():
                    encoder, tokenizer = getattr(pipe, name), getattr(pipe, name.replace("text_encoder", "tokenizer"))
                    pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
            else:
                pipe.load_textual_inversion(state, token=token)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(
                f"could not load --embedding {embedding} ({err}); pass an embedding trained for this model's text "
                "encoder, with a token not in its vocabulary (--embedding FILE:TOKEN)"
            ) from err


_cache: dict[tuple[ModelSettings, tuple[int, ...]], LoadedModel] = {}


def _fingerprint(model: str) -> tuple[int, ...]:
    """Modification times of a local model folder and its config files, so an edited folder is loaded again."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return ()
    files = [path, *sorted(path.glob("*.json")), *sorted(path.glob("*/config.json"))]
    return tuple(file.stat().st_mtime_ns for file in files)


def load_model(settings: ModelSettings) -> LoadedModel:
    """The model ``settings`` name, on its device with its attention backend, LoRAs and embeddings applied. The last
    model loaded is kept, so asking for it again (the web app, several commands in one process) does not reload it.

    Raises:
        UserError: a bad device, an unsupported or unloadable model, or a LoRA / embedding that does not load.
    """
    key = (settings, _fingerprint(settings.model))
    if key in _cache:
        return _cache[key]
    _cache.clear()
    device = resolve_device(settings.device)
    family = require_supported_model(settings.model)
    pipe = load_pipeline(settings.model, resolve_dtype(settings.dtype, device))
    apply_loras(pipe, settings.loras)
    apply_embeddings(pipe, settings.embeddings)
    pipe.set_attention_backend(settings.attention)
    pipe.to(device)
    loaded = LoadedModel(settings, pipe, family, pipe.scheduler, device)
    _cache[key] = loaded
    return loaded
