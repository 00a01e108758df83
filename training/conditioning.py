"""How captions become the U-Net's conditioning in text-to-image training: the seam a model family plugs into.

A :class:`Conditioning` turns a batch and its captions (after caption dropout) into the U-Net's conditioning inputs,
:class:`UNetConditioning` (``encoder_hidden_states``, plus ``added_cond_kwargs`` for families that have them). It also
says which of its modules the optimizer trains (:class:`~training.models.TrainedModule`), what it caches, and which
components it gives the validation and saved pipelines. The trainer calls only this interface.

Stable Diffusion 1.x/2.x cross-attend to the last hidden states of one CLIP text encoder, with long captions
encoded in 77-token chunks (:func:`ldm.text.encode_prompts`). That encoder is either frozen
(:class:`FrozenTextEncoder`, whose outputs can be read from the cache instead, :class:`CachedTextEncoder`) or trained
with the U-Net (:class:`TrainedTextEncoder`).

SDXL's conditioning is another implementation of the same protocol (:mod:`training.conditioning_xl`), and
:func:`training.methods.text_conditioning` picks the implementation from the run's model family (one table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.text import encode_prompts
from training.cache import (
    CachedLatentDataset,
    CaptionEncoder,
    ClipCaptionEncoder,
    cache_fingerprint,
    cache_is_current,
    write_cache,
)
from training.data import ImageCaptionDataset
from training.models import TrainedModule, TrainingModels, freeze, load_component

Batch = Mapping[str, Any]
"""A collated training batch: ``captions`` and ``pixel_values`` (or the cached ``latent_mean`` / ``latent_std``)."""


@dataclass
class UNetConditioning:
    """The conditioning inputs of ``UNet2DConditionModel.forward`` for one batch.

    Attributes:
        encoder_hidden_states: the sequence the U-Net cross-attends to, ``(B, L, D)``.
        added_cond_kwargs: the extra embeddings of families that have them (SDXL: ``text_embeds`` ``(B, D')`` and
            ``time_ids`` ``(B, 6)``); None for Stable Diffusion 1.x/2.x.
    """

    encoder_hidden_states: Tensor
    added_cond_kwargs: dict[str, Tensor] | None = None

    KEPT_DTYPE: ClassVar[frozenset[str]] = frozenset({"time_ids"})
    """Added inputs that keep their dtype in :meth:`to`: ``time_ids`` are pixel sizes, which bfloat16 rounds above
    256 (the U-Net casts their sinusoidal embedding to its own dtype itself)."""

    def to(self, device: torch.device | str, dtype: torch.dtype) -> UNetConditioning:
        """The same inputs on ``device`` in ``dtype`` (``time_ids`` in their own dtype, :attr:`KEPT_DTYPE`)."""
        added = self.added_cond_kwargs
        if added is not None:
            added = {
                name: value.to(device, value.dtype if name in self.KEPT_DTYPE else dtype)
                for name, value in added.items()
            }
        return UNetConditioning(self.encoder_hidden_states.to(device, dtype), added)


class Conditioning(Protocol):
    """How a batch's captions become the U-Net's conditioning, and what of it is trained, cached and saved."""

    @property
    def trained(self) -> tuple[TrainedModule, ...]:
        """The modules of the conditioning that the optimizer updates (none when it is frozen)."""
        ...

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        """The conditioning of ``captions`` (the batch's, after caption dropout) for a training step: through the
        prepared (maybe DDP-wrapped) trained modules, with gradients into them."""
        ...

    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        """The same for evaluation: no gradients, the unwrapped modules, never the cache (held-out captions are not
        in it)."""
        ...

    def set_training(self, mode: bool) -> None:
        """Put the trained modules in training (``True``) or evaluation mode; frozen ones stay in evaluation mode."""
        ...

    def build_cache(self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int) -> Path:
        """Write the cache of ``dataset`` (latents and this conditioning's caption outputs) to ``folder`` unless a
        current one is there (same fingerprint); returns ``folder``."""
        ...

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        """The conditioning to train with when the batches come from ``cache``: one that reads the cached outputs
        when they cannot change (frozen encoders), else this one."""
        ...

    def pipeline_components(self) -> dict[str, Any]:
        """The pipeline components of the conditioning as they are now (``text_encoder``, ``tokenizer``), for
        validation samples."""
        ...

    def saved_components(self) -> dict[str, Any]:
        """The components to save with the final pipeline: trained ones as trained, frozen ones in the precision
        they were loaded in."""
        ...


class _TextEncoder:
    """What the frozen and the trained CLIP text encoder share: evaluation, the cache and the pipeline parts."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, device: torch.device | str) -> None:
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device

    @torch.no_grad()
    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return UNetConditioning(encode_prompts(self.text_encoder, self.tokenizer, captions, device=self.device))

    def build_cache(self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int) -> Path:
        return build_cache_with(
            ClipCaptionEncoder(self.text_encoder, self.tokenizer, self.device),
            dataset,
            vae,
            folder,
            batch_size=batch_size,
        )

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning:
        """The conditioning from the cached caption outputs of the batch (``prompt_embeds``)."""
        return UNetConditioning(outputs["prompt_embeds"])

    def pipeline_components(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer}


def build_cache_with(
    encoder: CaptionEncoder, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int
) -> Path:
    """Write the cache of ``dataset`` with ``encoder``'s caption outputs unless a current one is in ``folder``."""
    if not cache_is_current(folder, cache_fingerprint(dataset, vae, encoder)):
        write_cache(dataset, vae, encoder, folder, batch_size=batch_size)
    return folder


class FrozenTextEncoder(_TextEncoder):
    """One frozen CLIP text encoder's last hidden states (Stable Diffusion 1.x/2.x).

    ``source`` is where the encoder was loaded from: a mixed-precision run casts the frozen copy and saves the one
    reloaded from there. A text encoder initialised by the run (``source`` None) stays in full precision and is
    saved as it is: nothing could reload it.
    """

    trained: tuple[TrainedModule, ...] = ()

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        *,
        source: str | None,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(text_encoder, tokenizer, device)
        self.source = source
        self.cast = source is not None and dtype != torch.float32
        freeze(text_encoder, device, dtype if self.cast else torch.float32)

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        # no parameter requires gradients, so no graph is recorded
        return UNetConditioning(encode_prompts(self.text_encoder, self.tokenizer, captions, device=self.device))

    def set_training(self, mode: bool) -> None:
        pass  # frozen: always in evaluation mode

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        return CachedTextEncoder(self, cache)

    def saved_components(self) -> dict[str, Any]:
        if self.source is None or not self.cast:
            return self.pipeline_components()
        return {
            "text_encoder": load_component(CLIPTextModel, self.source, "text_encoder"),
            "tokenizer": self.tokenizer,
        }


class CachedEncoders(Protocol):
    """What :class:`CachedTextEncoder` needs of a frozen conditioning: the conditioning from cached outputs, and the
    rest of :class:`Conditioning` for evaluation, caching and saving."""

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning: ...

    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning: ...

    def build_cache(
        self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int
    ) -> Path: ...

    def pipeline_components(self) -> dict[str, Any]: ...

    def saved_components(self) -> dict[str, Any]: ...


class CachedTextEncoder:
    """Frozen text encoders whose outputs for the training captions are read from the cache
    (:meth:`CachedLatentDataset.text_outputs`: exactly what the encoders pad a batch to), turned into conditioning by
    the encoders' ``from_outputs``; evaluation, caching and saving go to the encoders."""

    trained: tuple[TrainedModule, ...] = ()

    def __init__(self, encoder: CachedEncoders, cache: CachedLatentDataset) -> None:
        self.encoder, self.cache = encoder, cache

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self.encoder.from_outputs(batch, self.cache.text_outputs(captions))

    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self.encoder.evaluate(batch, captions)

    def set_training(self, mode: bool) -> None:
        pass

    def build_cache(self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int) -> Path:
        return self.encoder.build_cache(dataset, vae, folder, batch_size=batch_size)

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        return CachedTextEncoder(self.encoder, cache)

    def pipeline_components(self) -> dict[str, Any]:
        return self.encoder.pipeline_components()

    def saved_components(self) -> dict[str, Any]:
        return self.encoder.saved_components()


class TrainedTextEncoder(_TextEncoder):
    """One CLIP text encoder trained with the U-Net (all its weights, at its own learning rate). It stays in full
    precision, like the U-Net (autocast runs it in mixed precision), and is saved as trained. With the cache, only
    the latents are read from it: the encoder's outputs change every step."""

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        *,
        learning_rate: float,
        device: torch.device | str,
    ) -> None:
        super().__init__(text_encoder, tokenizer, device)
        text_encoder.requires_grad_(True).train().to(device)
        self.module = TrainedModule("text_encoder", text_encoder, learning_rate, state=text_encoder)

    @property
    def trained(self) -> tuple[TrainedModule, ...]:
        return (self.module,)

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return UNetConditioning(encode_prompts(self.module.runner, self.tokenizer, captions, device=self.device))

    def set_training(self, mode: bool) -> None:
        self.text_encoder.train(mode)

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        return self

    def saved_components(self) -> dict[str, Any]:
        return self.pipeline_components()


def sd_conditioning(
    models: TrainingModels, *, train: bool, learning_rate: float, device: torch.device | str, dtype: torch.dtype
) -> Conditioning:
    """Stable Diffusion 1.x/2.x: its text encoder trained at ``learning_rate`` (``train``) or frozen (cast to the
    mixed-precision ``dtype`` when it can be reloaded for the final save)."""
    if train:
        return TrainedTextEncoder(models.text_encoder, models.tokenizer, learning_rate=learning_rate, device=device)
    return FrozenTextEncoder(
        models.text_encoder, models.tokenizer, source=models.text_encoder_source, device=device, dtype=dtype
    )
