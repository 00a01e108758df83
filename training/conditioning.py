"""How captions become the U-Net's conditioning in text-to-image training: the seam a model family plugs into.

A :class:`Conditioning` turns a batch and its captions (after caption dropout) into the U-Net's conditioning inputs,
:class:`UNetConditioning` (``encoder_hidden_states``, plus ``added_cond_kwargs`` for families that have them). It also
says which of its modules the optimizer trains (:class:`~training.models.TrainedModule`), what it caches, and which
components it gives the validation and saved pipelines. The trainer calls only this interface.

Every run's conditioning is :class:`TextEncoders`: the family's text encoders, each frozen or trained (all its
weights, or LoRA layers), and what the family computes from them (:class:`TextEncoding`). Stable Diffusion 1.x/2.x
cross-attend to the last hidden states of one CLIP text encoder, with long captions in 77-token chunks
(:class:`SDTextEncoding`); SDXL's two encoders, pooled embedding and size/crop ids are another encoding
(:mod:`training.conditioning_xl`). When every encoder is frozen, the captions' outputs can be read from the cache
instead (:class:`CachedTextEncoder`). :func:`training.methods.text_conditioning` builds it from the run's settings
and the family (one table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from diffusers import AutoencoderKL
from torch import Tensor

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
from training.models import TrainedModule, freeze, load_component, tokenizer_name

Batch = Mapping[str, Any]
"""A collated training batch: ``captions`` and ``pixel_values`` (or the cached ``latent_mean`` / ``latent_std``)."""

Device = torch.device | str


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


class TextEncoding(Protocol):
    """What a model family computes from its text encoders: a batch's conditioning, the cache's caption outputs, and
    the conditioning from those cached outputs. ``encoders`` are the family's ``(tokenizer, text encoder)`` pairs in
    the order of its components (:data:`training.models.TEXT_ENCODERS`)."""

    def encode(
        self, encoders: Sequence[tuple[Any, torch.nn.Module]], batch: Batch, captions: list[str], device: Device
    ) -> UNetConditioning:
        """The conditioning of ``captions`` (the batch's, after caption dropout)."""
        ...

    def caption_encoder(self, encoders: Sequence[tuple[Any, torch.nn.Module]], device: Device) -> CaptionEncoder:
        """What the cache stores of a caption (frozen encoders)."""
        ...

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning:
        """The conditioning from the cached caption outputs of the batch."""
        ...


class SDTextEncoding:
    """Stable Diffusion 1.x/2.x: the last hidden states of one CLIP text encoder, long captions in 77-token chunks
    (:func:`ldm.text.encode_prompts`)."""

    def encode(
        self, encoders: Sequence[tuple[Any, torch.nn.Module]], batch: Batch, captions: list[str], device: Device
    ) -> UNetConditioning:
        ((tokenizer, text_encoder),) = encoders
        return UNetConditioning(encode_prompts(text_encoder, tokenizer, captions, device=device))

    def caption_encoder(self, encoders: Sequence[tuple[Any, torch.nn.Module]], device: Device) -> CaptionEncoder:
        ((tokenizer, text_encoder),) = encoders
        return ClipCaptionEncoder(text_encoder, tokenizer, device)

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning:
        return UNetConditioning(outputs["prompt_embeds"])


@dataclass(eq=False)
class TextEncoder:
    """One text encoder of a run: its component name, model and tokenizer, and the :class:`TrainedModule` that
    trains it (all its weights, or its LoRA layers), or None when it is frozen."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    trained: TrainedModule | None = None

    @property
    def runner(self) -> torch.nn.Module:
        """The module a training step calls: the prepared (maybe DDP-wrapped) module when trained."""
        return self.model if self.trained is None else self.trained.runner


class TextEncoders:
    """A family's text encoders (:class:`TextEncoding`), each trained or frozen: the :class:`Conditioning` of every
    text-to-image run.

    Frozen encoders are cast to the mixed-precision dtype when ``source`` (where they were loaded from) can reload
    them for the final save; encoders initialised by the run (``source`` None) stay in full precision and are saved
    as they are. Trained encoders stay in full precision, like the U-Net (autocast runs them in mixed precision),
    and are saved as trained. With the cache, a run whose encoders are all frozen reads their outputs from it
    (:class:`CachedTextEncoder`); one that trains an encoder reads only the latents: its outputs change every step.
    ``expand`` rewrites each caption before it is encoded (textual inversion's multi-vector tokens).
    """

    def __init__(
        self,
        encoding: TextEncoding,
        encoders: Sequence[TextEncoder],
        *,
        source: str | None,
        device: Device,
        dtype: torch.dtype,
        expand: Callable[[str], str] | None = None,
    ) -> None:
        self.encoding, self.encoders, self.source, self.device = encoding, list(encoders), source, device
        self.expand = expand
        self.cast = source is not None and dtype != torch.float32
        for encoder in self.encoders:
            if encoder.trained is None:
                freeze(encoder.model, device, dtype if self.cast else torch.float32)
            else:
                encoder.model.train().to(device)

    @property
    def trained(self) -> tuple[TrainedModule, ...]:
        return tuple(encoder.trained for encoder in self.encoders if encoder.trained is not None)

    def _pairs(self, *, training: bool) -> list[tuple[Any, torch.nn.Module]]:
        return [(e.tokenizer, e.runner if training else e.model) for e in self.encoders]

    def _captions(self, captions: list[str]) -> list[str]:
        return captions if self.expand is None else [self.expand(caption) for caption in captions]

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        # frozen encoders' parameters require no gradients, so they record no graph
        return self.encoding.encode(self._pairs(training=True), batch, self._captions(captions), self.device)

    @torch.no_grad()
    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self.encoding.encode(self._pairs(training=False), batch, self._captions(captions), self.device)

    def from_outputs(self, batch: Batch, outputs: Mapping[str, Tensor]) -> UNetConditioning:
        return self.encoding.from_outputs(batch, outputs)

    def set_training(self, mode: bool) -> None:
        for encoder in self.encoders:
            if encoder.trained is not None:  # frozen ones stay in evaluation mode
                encoder.model.train(mode)

    def build_cache(self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int) -> Path:
        encoder = self.encoding.caption_encoder(self._pairs(training=False), self.device)
        return build_cache_with(encoder, dataset, vae, folder, batch_size=batch_size)

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        return self if self.trained else CachedTextEncoder(self, cache)

    def pipeline_components(self) -> dict[str, Any]:
        components: dict[str, Any] = {}
        for encoder in self.encoders:
            components[encoder.name] = encoder.model
            components[tokenizer_name(encoder.name)] = encoder.tokenizer
        return components

    def saved_components(self) -> dict[str, Any]:
        components = self.pipeline_components()
        if self.source is not None and self.cast:
            for encoder in self.encoders:
                if encoder.trained is None:  # the frozen encoder as it was, not its half-precision copy
                    components[encoder.name] = load_component(type(encoder.model), self.source, encoder.name)
        return components


def build_cache_with(
    encoder: CaptionEncoder, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int
) -> Path:
    """Write the cache of ``dataset`` with ``encoder``'s caption outputs unless a current one is in ``folder``."""
    if not cache_is_current(folder, cache_fingerprint(dataset, vae, encoder)):
        write_cache(dataset, vae, encoder, folder, batch_size=batch_size)
    return folder


class CachedTextEncoder:
    """Frozen text encoders whose outputs for the training captions are read from the cache
    (:meth:`CachedLatentDataset.text_outputs`: exactly what the encoders pad a batch to), turned into conditioning by
    the family's ``from_outputs``; evaluation, caching and saving go to the encoders."""

    trained: tuple[TrainedModule, ...] = ()

    def __init__(self, encoders: TextEncoders, cache: CachedLatentDataset) -> None:
        self.encoders, self.cache = encoders, cache

    def __call__(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self.encoders.from_outputs(batch, self.cache.text_outputs(captions))

    def evaluate(self, batch: Batch, captions: list[str]) -> UNetConditioning:
        return self.encoders.evaluate(batch, captions)

    def set_training(self, mode: bool) -> None:
        pass

    def build_cache(self, dataset: ImageCaptionDataset, vae: AutoencoderKL, folder: Path, *, batch_size: int) -> Path:
        return self.encoders.build_cache(dataset, vae, folder, batch_size=batch_size)

    def from_cache(self, cache: CachedLatentDataset) -> Conditioning:
        return CachedTextEncoder(self.encoders, cache)

    def pipeline_components(self) -> dict[str, Any]:
        return self.encoders.pipeline_components()

    def saved_components(self) -> dict[str, Any]:
        return self.encoders.saved_components()
