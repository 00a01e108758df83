"""What a text-to-image run trains, settled once from its config: the seam training methods plug into.

:func:`build_method` reads the settings once and returns a :class:`Method`: how captions become conditioning
(:mod:`training.conditioning`), the modules the optimizer updates with their learning rates
(:class:`~training.models.TrainedModule`: the whole U-Net, or its LoRA layers; the text encoder when it is trained),
the EMA of the U-Net, what a checkpoint holds, whether batches come from the cache, and what the final save writes
(:class:`FinalModel`: a full pipeline, or LoRA weights). ``train()`` asks the method and checks no mode itself.

DreamBooth and textual inversion (the methods issue) are other ways to fill the same object: DreamBooth trains the
U-Net (full or LoRA) and maybe the text encoder as here, with a second, prior-preservation batch in the loss;
textual inversion trains no U-Net module at all and one :class:`~training.models.TrainedModule` for the new
token embeddings, and its :class:`FinalModel` saves the embeddings file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from common.files import atomic_folder
from ldm.errors import UserError
from pipelines import LatentDiffusionPipeline
from pipelines.families import STABLE_DIFFUSION, STABLE_DIFFUSION_XL, ModelFamily, pipelines_of
from pipelines.generation_defaults import GenerationDefaults
from pipelines.kohya_lora import export_kohya_lora
from training.cache import CachedLatentDataset, collate_cached
from training.checkpoint import Stateful
from training.conditioning import Conditioning, SDTextEncoding, TextEncoder, TextEncoders, TextEncoding
from training.conditioning_xl import SDXLTextEncoding
from training.data import ImageCaptionDataset, collate
from training.models import (
    LoraSpec,
    LoraState,
    TrainedModule,
    TrainingModels,
    add_lora,
    freeze,
    load_component,
    save_lora,
)
from training.textual_inversion import NewRowsState, NewTokens, add_tokens, save_embeddings

if TYPE_CHECKING:
    from training.train_text_to_image import TrainConfig

logger = logging.getLogger("training")

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""The dtype of the frozen models' copies under each ``mixed_precision`` setting (float32 otherwise)."""

KOHYA_LORA_FILE = "kohya_lora.safetensors"
"""The name of a LoRA run's weights in kohya's layout, next to diffusers' ``pytorch_lora_weights.safetensors``."""

_ENCODINGS: dict[ModelFamily, TextEncoding] = {
    STABLE_DIFFUSION: SDTextEncoding(),
    STABLE_DIFFUSION_XL: SDXLTextEncoding(),
}
"""What each model family computes from its text encoders."""


def text_conditioning(
    models: TrainingModels,
    *,
    train: Sequence[str] = (),
    lora: LoraSpec | None = None,
    new_tokens: NewTokens | None = None,
    learning_rate: float,
    device: torch.device | str,
    dtype: torch.dtype,
) -> TextEncoders:
    """The conditioning of a run of ``models.family`` (:data:`_ENCODINGS`): the text encoders named in ``train``
    trained at ``learning_rate`` (all their weights, or with ``lora`` its LoRA layers), the others
    frozen (cast to the mixed-precision ``dtype`` when they can be reloaded). With ``new_tokens`` (textual
    inversion), every encoder gets the new tokens' rows, and those rows alone are trained.

    Raises:
        UserError: a name in ``train`` that is not one of the family's text encoders, or new tokens that cannot be
            added (:func:`training.textual_inversion.add_tokens`).
    """
    encoders = models.text_encoders()
    names = [name for name, _, _ in encoders]
    unknown = [name for name in train if name not in names]
    if unknown:
        raise UserError(f"--trained-text-encoders: {unknown} are not text encoders of this model; choose from {names}")
    slots = []
    for name, model, tokenizer in encoders:
        trained = None
        if new_tokens is not None:
            rows = add_tokens(model, tokenizer, new_tokens)
            trained = TrainedModule(f"{name}_embeddings", model, learning_rate, state=NewRowsState(rows))
        elif name in train:
            if lora is not None:
                add_lora(model, lora)
                trained = TrainedModule(name, model, learning_rate, state=LoraState(model))
            else:
                trained = TrainedModule(name, model.requires_grad_(True), learning_rate, state=model)
        slots.append(TextEncoder(name, model, tokenizer, trained))
    expand = new_tokens.expand if new_tokens is not None else None
    return TextEncoders(
        _ENCODINGS[models.family], slots, source=models.text_encoder_source, device=device, dtype=dtype, expand=expand
    )


FinalKind = Literal["pipeline", "lora", "embedding"]


class FinalModel(Protocol):
    """What the end of a run writes."""

    kind: FinalKind
    """What it is: the folder a run whose first final model it is writes to (``OUTPUT_DIR/pipeline``, ``lora`` or
    ``embedding``), and what the card says."""

    def save(self, folder: Path, method: Method, models: TrainingModels, defaults: GenerationDefaults) -> None:
        """Write the model to ``folder`` (which exists)."""
        ...


class FullPipeline:
    """The whole pipeline, saved by the family's pipeline class (:attr:`Method.pipeline_class`): the trained U-Net
    (with the EMA weights when there is an EMA), the conditioning's saved components (both text encoders for SDXL),
    the frozen VAE as loaded, and the sampler. The settings the validation grids were sampled at become the model's
    defaults (``generation_defaults.json``)."""

    kind: FinalKind = "pipeline"

    def save(self, folder: Path, method: Method, models: TrainingModels, defaults: GenerationDefaults) -> None:
        vae = method.vae
        if method.weight_dtype != torch.float32:  # the frozen VAE as it was, not its half-precision copy
            vae = load_component(AutoencoderKL, models.vae_source, "vae")
        pipe = method.pipeline_class(
            vae=vae, unet=method.unet, scheduler=models.sampler, **method.conditioning.saved_components()
        )
        pipe.generation_defaults = defaults
        pipe.save_pretrained(folder)


class LoraWeights:
    """The LoRA layers of the U-Net and of the text encoders trained with LoRA, twice: diffusers' format
    (``pytorch_lora_weights.safetensors``, :func:`training.models.save_lora`, which stock ``load_lora_weights``
    reads), and kohya's (:data:`KOHYA_LORA_FILE`, with per-module alpha and ``ss_*`` metadata, which A1111, ComfyUI
    and kohya's scripts read); kohya's plain LoRA layout has no place for DoRA's magnitudes, so a DoRA run writes
    diffusers' file only."""

    kind: FinalKind = "lora"

    def save(self, folder: Path, method: Method, models: TrainingModels, defaults: GenerationDefaults) -> None:
        trained = {part.name: part.module for part in method.trained}
        configs = [config for model in trained.values() for config in _peft_configs(model)]
        from peft.tuners.lycoris_utils import LycorisConfig

        if any(isinstance(config, LycorisConfig) for config in configs):
            # diffusers loads no LoHa / LoKr of SD or SDXL: LyCORIS's layout, which A1111 and ComfyUI read, only
            logger.warning("LoHa / LoKr: %s holds the LyCORIS file (A1111, ComfyUI) only", folder)
            export_kohya_lora(method.pipeline(models), folder / KOHYA_LORA_FILE)
            return
        save_lora(trained, folder, method.pipeline_class)
        if any(getattr(config, "use_dora", False) for config in configs):
            logger.warning("DoRA has no kohya LoRA layout: %s holds diffusers' file only", folder)
            return
        export_kohya_lora(method.pipeline(models), folder / KOHYA_LORA_FILE)


def _peft_configs(model: torch.nn.Module) -> list[Any]:
    return list(getattr(model, "peft_config", {}).values())


class EmbeddingFiles:
    """The new tokens' trained vectors (textual inversion) in diffusers' and AUTOMATIC1111's formats
    (:func:`training.textual_inversion.save_embeddings`)."""

    kind: FinalKind = "embedding"

    def __init__(self, new_tokens: NewTokens, conditioning: TextEncoders) -> None:
        self.new_tokens = new_tokens
        self.rows = [(e.name, e.model.get_input_embeddings()) for e in conditioning.encoders]

    def save(self, folder: Path, method: Method, models: TrainingModels, defaults: GenerationDefaults) -> None:
        save_embeddings(folder, self.new_tokens, self.rows)


class _EmaState:
    """The checkpoint view of an EMA: its state, moved back to the training device when a checkpoint is loaded."""

    def __init__(self, ema: EMAModel, device: torch.device | str) -> None:
        self.ema, self.device = ema, device

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)
        self.ema.to(self.device)


@dataclass(eq=False)
class Method:
    """What a text-to-image run trains and how captions become conditioning; built once by :func:`build_method`.

    Attributes:
        conditioning: how captions become the U-Net's conditioning (and the text modules trained, if any).
        unet: the (unwrapped) U-Net: what the loss, validation and the final save use.
        vae: the frozen VAE (encodes the images when they are not cached).
        unet_part: the U-Net as the optimizer trains it (the whole U-Net, or its LoRA layers), or None when it is
            frozen (textual inversion).
        ema: the exponential moving average of the U-Net's trained weights (all of them, or its LoRA layers), or
            None.
        finals: what the end of the run writes, into the folder of the first's kind (a pivotal-tuning run writes
            its LoRA and its embeddings side by side).
        cache_dir: where the cache of latents and caption outputs goes, or None to encode every step.
        weight_dtype: the dtype of the frozen models' copies (mixed precision).
        device: the device the models train on.
        pipeline_class: the model family's text-to-image pipeline (validation samples and the saved model).
        new_tokens: the tokens a textual-inversion run adds, or None.
    """

    conditioning: Conditioning
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    unet_part: TrainedModule | None
    ema: EMAModel | None
    finals: tuple[FinalModel, ...]
    cache_dir: Path | None
    weight_dtype: torch.dtype
    device: torch.device | str
    pipeline_class: type[LatentDiffusionPipeline] = LatentDiffusionPipeline
    new_tokens: NewTokens | None = None

    def check_dataset(self, dataset: ImageCaptionDataset) -> None:
        """Stop before training when the data cannot teach what is trained: a textual-inversion token that no
        caption contains (its rows would never get a gradient); a warning when only some captions contain it.

        Raises:
            UserError: no caption contains the new token.
        """
        if self.new_tokens is None:
            return
        token = self.new_tokens.placeholder
        captions = [caption for record in dataset.records.records for caption in record.captions]
        with_token = sum(token in caption for caption in captions)
        if not with_token:
            raise UserError(
                f"no caption of the training data contains --placeholder-token {token!r}, so its embedding would "
                f"never be trained; write it into the captions (e.g. 'a photo of {token}')"
            )
        if with_token < len(captions):
            logger.warning("%d of %d captions do not contain %r", len(captions) - with_token, len(captions), token)

    # ------------------------------------------------------------------------------------------- the optimizer
    @property
    def trained(self) -> tuple[TrainedModule, ...]:
        """Every module the optimizer updates, in the order of its parameter groups."""
        unet = () if self.unet_part is None else (self.unet_part,)
        return (*unet, *self.conditioning.trained)

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer parameter group per trained module, each at its own learning rate."""
        return [{"params": part.parameters, "lr": part.learning_rate} for part in self.trained]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """All parameters the optimizer updates (what gradient clipping sees)."""
        return [p for part in self.trained for p in part.parameters]

    def prepare(self, accelerator: Accelerator, *objects: Any) -> list[Any]:
        """``accelerator.prepare`` the trained modules together with ``objects`` (optimizer, data loader, LR
        schedule); each trained module's ``runner`` becomes its prepared (maybe DDP-wrapped) module. Returns the
        prepared ``objects``."""
        trained = self.trained
        prepared = accelerator.prepare(*(part.module for part in trained), *objects)
        for part, runner in zip(trained, prepared):
            part.runner = runner
        if self.ema is not None:
            self.ema.to(self.device)
        return list(prepared[len(trained) :])

    @property
    def runners(self) -> tuple[torch.nn.Module, ...]:
        """The prepared trained modules (for ``accelerator.accumulate``)."""
        return tuple(part.runner for part in self.trained)

    @property
    def unet_runner(self) -> torch.nn.Module:
        """The U-Net to call in the training forward pass (prepared by :meth:`prepare` when it is trained)."""
        return self.unet if self.unet_part is None else self.unet_part.runner

    def stateful(self) -> dict[str, Stateful]:
        """What a checkpoint holds of the models: each trained module's state (by its name) and the EMA."""
        states: dict[str, Stateful] = {part.name: part.state for part in self.trained}
        if self.ema is not None:
            states["ema"] = _EmaState(self.ema, self.device)
        return states

    def after_update(self) -> None:
        """After an applied optimizer step: move the EMA towards the new weights."""
        if self.ema is not None:
            self.ema.step(self.ema_params)

    # ------------------------------------------------------------------------------------------- the data
    def training_data(
        self, dataset: ImageCaptionDataset, accelerator: Accelerator, *, batch_size: int
    ) -> tuple[Any, Callable[[list[dict[str, Any]]], dict[str, Any]]]:
        """The dataset the loop reads and its collate function: ``dataset`` itself, or with a cache, the cached
        latents (the main process builds the cache once, the others wait and read it), and then the conditioning
        reads the cached caption outputs where they cannot change."""
        if self.cache_dir is None:
            return dataset, collate
        with accelerator.main_process_first():
            self.conditioning.build_cache(dataset, self.vae, self.cache_dir, batch_size=batch_size)
        cached = CachedLatentDataset(dataset, self.cache_dir)
        self.conditioning = self.conditioning.from_cache(cached)
        return cached, collate_cached

    # ------------------------------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The trained modules in evaluation mode for the block, in training mode again after it."""
        self.unet.eval()
        self.conditioning.set_training(False)
        try:
            yield
        finally:
            self.unet.train(self.unet_part is not None)  # a frozen U-Net stays in evaluation mode
            self.conditioning.set_training(True)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The U-Net holds the EMA weights for the block (when there is an EMA), its own weights again after it."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.ema_params)
        self.ema.copy_to(self.ema_params)
        try:
            yield
        finally:
            self.ema.restore(self.ema_params)

    def pipeline(self, models: TrainingModels) -> LatentDiffusionPipeline:
        """A pipeline of the models as they are now (for validation samples)."""
        return self.pipeline_class(
            vae=self.vae, unet=self.unet, scheduler=models.sampler, **self.conditioning.pipeline_components()
        )

    # ------------------------------------------------------------------------------------------- the end
    @property
    def ema_params(self) -> list[torch.nn.Parameter]:
        """The parameters the EMA follows: the U-Net's trained ones."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    @property
    def final_kind(self) -> FinalKind:
        """What the run's final folder holds, and its name: the first final model's kind."""
        return self.finals[0].kind

    def save_final(
        self, output_dir: Path, models: TrainingModels, defaults: GenerationDefaults, folder: Path | None = None
    ) -> Path:
        """Write the final models (:attr:`finals`) to ``folder`` (default ``output_dir/pipeline``, ``lora`` or
        ``embedding``: :attr:`final_kind`) and return it. With an EMA, the U-Net's own weights go to
        ``output_dir/unet-raw`` (for further training; a LoRA run's as LoRA weights; written whole or not at all)
        and the U-Net keeps the EMA weights from here on."""
        folder = folder or output_dir / self.final_kind
        folder.mkdir(parents=True, exist_ok=True)
        if self.ema is not None:
            with atomic_folder(output_dir / "unet-raw") as raw:
                if getattr(self.unet, "peft_config", None):
                    save_lora({"unet": self.unet}, raw, self.pipeline_class)
                else:
                    self.unet.save_pretrained(raw)
            self.ema.copy_to(self.ema_params)
        for final in self.finals:
            final.save(folder, self, models, defaults)
        return folder


def build_method(config: TrainConfig, models: TrainingModels, device: torch.device | str) -> Method:
    """Settle what the run described by ``config`` trains, once: freeze the VAE (and the text encoders unless they
    are trained) on ``device``, in the mixed-precision dtype where they can be reloaded for the final save; the
    family's conditioning and pipeline class; add LoRA layers or train the whole U-Net (or, for textual inversion
    without LoRA, freeze it); the EMA; the cache folder."""
    weight_dtype = WEIGHT_DTYPES.get(config.mixed_precision, torch.float32)
    freeze(models.vae, device, weight_dtype)
    lora = None
    if config.lora_rank is not None:
        lora = LoraSpec(
            config.lora_rank,
            config.lora_alpha,
            dora=config.lora_type == "dora",
            algo="lora" if config.lora_type == "dora" else config.lora_type,
            conv_rank=config.lora_conv_rank,
            conv_alpha=config.lora_conv_alpha,
        )
    trained_encoders: Sequence[str] = ()
    if config.train_text_encoder:
        trained_encoders = config.trained_text_encoders or [name for name, _, _ in models.text_encoders()]
    new_tokens = None
    if config.placeholder_token is not None:
        new_tokens = NewTokens(config.placeholder_token, config.initializer_token or "", config.num_vectors)
    unet = models.unet
    unet_part: TrainedModule | None
    finals: tuple[FinalModel, ...]
    # LoRA layers start from random weights: draw them from the run's seed, so that a run and its resumed copy (or
    # two runs of one config) agree whatever drew from the global generator before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        conditioning = text_conditioning(
            models,
            train=trained_encoders,
            lora=lora,
            new_tokens=new_tokens,
            learning_rate=config.text_encoder_lr or config.learning_rate,
            device=device,
            dtype=weight_dtype,
        )
        if lora is not None:
            add_lora(unet, lora)
            unet_part = TrainedModule("unet", unet, config.learning_rate, state=LoraState(unet))
            finals = (LoraWeights(),)
        elif new_tokens is None:
            unet_part, finals = TrainedModule("unet", unet, config.learning_rate, state=unet), (FullPipeline(),)
        else:  # textual inversion alone: the U-Net is frozen, in the mixed-precision dtype
            unet_part, finals = None, ()
            freeze(unet, device, weight_dtype)
    if new_tokens is not None:
        finals += (EmbeddingFiles(new_tokens, conditioning),)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(unet_part is not None)
    ema = None
    if config.ema_decay is not None:
        ema = EMAModel([p for p in unet.parameters() if p.requires_grad], decay=config.ema_decay)
    cache_dir = None
    if config.cache:
        cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "cache"
    pipeline_class = pipelines_of(models.family).text_to_image
    return Method(
        conditioning,
        unet,
        models.vae,
        unet_part,
        ema,
        finals,
        cache_dir,
        weight_dtype,
        device,
        pipeline_class,
        new_tokens,
    )
