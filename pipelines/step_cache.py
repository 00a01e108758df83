"""Step caching (DeepCache, Ma et al. 2023, arXiv 2312.00858): reuse the U-Net's deep features for N-1 of N steps.

A U-Net's up path adds back, in reverse, the skip connections its down path produced: ``conv_in``'s output (skip 0),
then each down layer's output (a resnet with its attention) and each downsampler's output. High-level features change
slowly from one denoising step to the next, so DeepCache runs the whole U-Net at a *full* step and keeps the hidden
state that enters the up layer which consumes skip ``branch``; at the N-1 steps after it only the *shallow* branch
runs: the embeddings, ``conv_in`` and the down layers up to skip ``branch``, then that up layer and the ones after it
(fed with the cached deep features and the fresh skips), ``conv_norm_out`` and ``conv_out``. ``branch`` numbers the
skips as the paper's branch id does (for SD's 2 layers per block: block ``branch // 3``, layer ``branch % 3``);
``branch=0`` is the shallowest and fastest.

:class:`StepCachingMixin` gives the pipelines ``enable_step_caching`` / ``disable_step_caching``;
:meth:`StepCachingMixin.unet_runner` gives the denoising loop a :class:`UNetRunner` for one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UpBlock2D

from ldm.errors import UserError
from pipelines.token_merging import apply_token_merging, remove_token_merging


class UNetRunner:
    """Runs the U-Net at each step of one denoising loop; this base runs it whole (no caching)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.unet = unet

    def __call__(self, step_index: int, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The U-Net's prediction at step ``step_index`` (``kwargs`` as ``UNet2DConditionModel.forward`` takes them,
        without ``return_dict``)."""
        return self.unet(sample, timestep, **kwargs, return_dict=False)[0]


@dataclass(frozen=True)
class _Layer:
    """One resnet of a U-Net block with its attention (None in blocks without attention)."""

    resnet: torch.nn.Module
    attention: torch.nn.Module | None


@dataclass(frozen=True)
class ShallowBranch:
    """The modules of the shallow branch at ``branch``: the down layers and downsamplers that produce skips
    1..``branch`` (skip 0 is ``conv_in``'s output) and the up layers that consume skips ``branch``..0, in order.

    ``up`` holds ``(block_index, layer, upsamplers)``: the up block's index in ``unet.up_blocks`` and, at a block's
    last layer, its upsamplers (else None).
    """

    down: tuple[_Layer | torch.nn.Module, ...]
    up: tuple[tuple[int, _Layer, torch.nn.ModuleList | None], ...]

    @property
    def cached_resnet(self) -> torch.nn.Module:
        """The resnet whose input (the cached deep features, concatenated with skip ``branch``) a full step keeps."""
        return self.up[0][1].resnet


def _block_layers(block: torch.nn.Module) -> list[_Layer]:
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return [_Layer(resnet, attention) for resnet, attention in zip(block.resnets, attentions, strict=True)]


def count_skips(unet: UNet2DConditionModel) -> int:
    """The number of skip connections of ``unet`` (``conv_in``, each down layer, each downsampler): the valid
    ``branch`` values are 0 .. count - 1."""
    return 1 + sum(len(block.resnets) + (block.downsamplers is not None) for block in unet.down_blocks)


def shallow_branch(unet: UNet2DConditionModel, branch: int) -> ShallowBranch:
    """The modules that run at a cached step of ``unet`` at ``branch`` (see :class:`ShallowBranch`).

    Raises UserError for a U-Net whose blocks are not diffusers' (CrossAttn)DownBlock2D / (CrossAttn)UpBlock2D (the
    SD 1/2 and SDXL U-Nets are) or that uses features the shallow branch does not run (FreeU, an image hint), and
    ValueError for a ``branch`` out of range.
    """
    for block in unet.down_blocks:
        if not isinstance(block, CrossAttnDownBlock2D | DownBlock2D):
            raise UserError(f"step caching supports (CrossAttn)DownBlock2D down blocks; this U-Net has {type(block)}")
    for block in unet.up_blocks:
        if not isinstance(block, CrossAttnUpBlock2D | UpBlock2D):
            raise UserError(f"step caching supports (CrossAttn)UpBlock2D up blocks; this U-Net has {type(block)}")
        if getattr(block, "s1", None):
            raise UserError("step caching does not run FreeU's scaling; call pipe.disable_freeu() first")
    if unet.config.addition_embed_type == "image_hint":
        raise UserError("step caching does not support a U-Net with addition_embed_type='image_hint'")
    num_skips = count_skips(unet)
    if not 0 <= branch < num_skips:
        raise ValueError(
            f"branch must be in 0..{num_skips - 1} (this U-Net has {num_skips} skip connections); got {branch}"
        )

    down: list[_Layer | torch.nn.Module] = []
    for block in unet.down_blocks:
        down.extend(_block_layers(block))
        if block.downsamplers is not None:
            down.extend(block.downsamplers)
    up = []
    for index, block in enumerate(unet.up_blocks):
        layers = _block_layers(block)
        up.extend((index, layer, block.upsamplers if j == len(layers) - 1 else None) for j, layer in enumerate(layers))
    return ShallowBranch(down=tuple(down[:branch]), up=tuple(up[num_skips - 1 - branch :]))


def _embeddings(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timestep_cond: torch.Tensor | None,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    encoder_attention_mask: torch.Tensor | None,
    class_labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step 1 of ``UNet2DConditionModel.forward`` through its own methods: the (centred) sample, the time embedding
    with the class and added conditions (SDXL's pooled text and size ids), the processed encoder states and the
    encoder attention mask as an additive bias ``(B, 1, L)``."""
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    return sample, emb, encoder_hidden_states, encoder_attention_mask


def shallow_forward(
    unet: UNet2DConditionModel,
    modules: ShallowBranch,
    cached: torch.Tensor,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    timestep_cond: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepCache's cached step: the U-Net's prediction ``(B, C_out, H, W)`` from the shallow branch ``modules`` and
    ``cached``, the input of ``modules.cached_resnet`` at the last full step (``[deep features; skip]`` on channels).

    The layers run as in diffusers' ``UNet2DConditionModel.forward`` and its blocks, so with ``cached`` from the same
    inputs the result equals the full U-Net's exactly.
    """
    sample, emb, encoder_hidden_states, encoder_attention_mask = _embeddings(
        unet,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond,
        added_cond_kwargs,
        encoder_attention_mask,
        class_labels,
    )
    attention_kwargs = {
        "encoder_hidden_states": encoder_hidden_states,
        "cross_attention_kwargs": cross_attention_kwargs,
        "attention_mask": None,
        "encoder_attention_mask": encoder_attention_mask,
        "return_dict": False,
    }

    def run(layer: _Layer, hidden: torch.Tensor) -> torch.Tensor:
        hidden = layer.resnet(hidden, emb)
        return hidden if layer.attention is None else layer.attention(hidden, **attention_kwargs)[0]

    hidden = unet.conv_in(sample)
    skips = [hidden]
    for module in modules.down:
        hidden = run(module, hidden) if isinstance(module, _Layer) else module(hidden)
        skips.append(hidden)

    # the sample's size is not a multiple of the U-Net's total upsampling: upsample to the skips' sizes (as stock)
    forward_upsample_size = any(dim % 2**unet.num_upsamplers != 0 for dim in sample.shape[-2:])
    last_block = len(unet.up_blocks) - 1
    skip = skips.pop()
    hidden = cached[:, : cached.shape[1] - skip.shape[1]]
    for block_index, layer, upsamplers in modules.up:
        hidden = run(layer, torch.cat([hidden, skip], dim=1))
        if upsamplers is not None:
            size = skips[-1].shape[2:] if forward_upsample_size and block_index != last_block else None
            for upsampler in upsamplers:
                hidden = upsampler(hidden, size)
        skip = skips.pop() if skips else None

    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class DeepCacheRunner(UNetRunner):
    """Runs the U-Net for one denoising loop with DeepCache: a full step every ``interval`` steps (and whenever the
    input's shape changes, e.g. when a guidance interval switches between the doubled and the single batch), the
    shallow branch at ``branch`` with the cached deep features at the others. Resampled passes of one step (RePaint)
    count as that step."""

    def __init__(self, unet: UNet2DConditionModel, interval: int, branch: int) -> None:
        super().__init__(unet)
        self.interval = interval
        self.modules = shallow_branch(unet, branch)
        self.cached: torch.Tensor | None = None
        self.cached_shape: torch.Size | None = None
        self.last_full_step = 0

    def _keep(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.cached = args[0]

    def __call__(self, step_index: int, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The U-Net's prediction at step ``step_index``: full (keeping the deep features) or from the cache."""
        cached_step = (
            self.cached is not None
            and sample.shape == self.cached_shape
            and 0 < step_index - self.last_full_step < self.interval
        )
        if cached_step:
            return shallow_forward(self.unet, self.modules, self.cached, sample, timestep, **kwargs)
        handle = self.modules.cached_resnet.register_forward_pre_hook(self._keep)
        try:
            noise_pred = super().__call__(step_index, sample, timestep, **kwargs)
        finally:
            handle.remove()
        self.cached_shape = sample.shape
        self.last_full_step = step_index
        return noise_pred


class StepCachingMixin:
    """``enable_step_caching`` / ``disable_step_caching`` (DeepCache) and ``enable_token_merging`` /
    ``disable_token_merging`` (ToMe, :mod:`pipelines.token_merging`) for every pipeline of ours; reads ``unet``."""

    _step_caching: tuple[int, int] | None = None  # (interval, branch)
    token_merging_ratio: float | None = None
    """The share of tokens merged before self-attention (:meth:`enable_token_merging`); None when it is off."""

    def enable_step_caching(self, interval: int = 3, branch: int = 0) -> None:
        """From the next call on, run the whole U-Net every ``interval`` steps and at the steps between only its
        shallow branch at skip connection ``branch`` (0 = shallowest, fastest) with the cached deep features.

        ``interval=1`` runs the whole U-Net at every step (images identical to no caching). Raises ValueError for an
        interval below 1 or a branch this U-Net does not have, UserError for a U-Net the shallow branch cannot run.
        """
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"interval must be an integer >= 1 (the full U-Net runs every interval steps); got {interval!r}"
            )
        shallow_branch(self.unet, branch)  # check the U-Net and the branch now, not at the first call
        self._step_caching = (interval, branch)

    def disable_step_caching(self) -> None:
        """Run the whole U-Net at every step again."""
        self._step_caching = None

    @property
    def step_caching_interval(self) -> int | None:
        """The interval of step caching (the full U-Net runs every this many steps); None when it is off."""
        return None if self._step_caching is None else self._step_caching[0]

    def unet_runner(self) -> UNetRunner:
        """A fresh :class:`UNetRunner` for one denoising loop (an empty cache when step caching is on)."""
        if self._step_caching is None:
            return UNetRunner(self.unet)
        interval, branch = self._step_caching
        return DeepCacheRunner(self.unet, interval, branch)

    def enable_token_merging(self, ratio: float = 0.5) -> None:
        """Merge ``ratio`` of the image tokens before each full-resolution self-attention of the U-Net (ToMe for SD,
        through the optional ``tomesd`` package; UserError naming ``pip install tomesd`` when it is missing)."""
        apply_token_merging(self.unet, ratio)
        self.token_merging_ratio = ratio

    def disable_token_merging(self) -> None:
        """Attend over all tokens again."""
        remove_token_merging(self.unet)
        self.token_merging_ratio = None
