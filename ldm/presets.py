"""Named model sizes: typed configs that build a U-Net, VAE, text encoder(s), tokenizer(s) and scheduler.

``tiny`` is for tests (a pipeline that runs a 64x64 generation in well under a second on a CPU); ``small`` is a
CPU-trainable model of 64x64 images with 16x16 latents (a VAE factor of 4, so corners survive); ``sd15`` is the
exact Stable Diffusion 1.5 architecture (random weights), for training from scratch and GPU benchmarks.
``tiny-sdxl`` and ``sdxl`` are the same for Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP
bigG with its projection), a U-Net with size/crop micro-conditioning (``addition_embed_type="text_time"``) and the
Euler sampler SDXL ships with; ``sdxl`` is the exact SDXL 1.0 base architecture (2.6B U-Net parameters: build it on
the meta device in tests). Presets are data: add one by adding an entry to :data:`PRESETS`; what differs between
families (a second encoder, the sampler) is a field of :class:`ModelPreset`, not a branch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, EOS_TOKEN, build_clip_tokenizer

TextEncoderName = Literal["text_encoder", "text_encoder_2"]


@dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' ``UNet2DConditionModel`` that a preset sets (the rest keep diffusers' defaults)."""

    sample_size: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    in_channels: int = 4
    out_channels: int = 4
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    # SDXL's micro-conditioning: "text_time" adds the embedding of the pooled text embedding and the six size/crop
    # numbers (each embedded to addition_time_embed_dim), so projection_class_embeddings_input_dim is
    # 6 * addition_time_embed_dim + the pooled embedding's size.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``AutoencoderKL`` that a preset sets. Downsampling factor: 2 ** (levels - 1)."""

    block_out_channels: tuple[int, ...]
    sample_size: int
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True  # decode in float32 when the pipeline runs in float16 (stock SDXL reads it)

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return ("DownEncoderBlock2D",) * len(self.block_out_channels)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return ("UpDecoderBlock2D",) * len(self.block_out_channels)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The fields of transformers' ``CLIPTextConfig`` that a preset sets (the vocabulary is always CLIP's), whether
    the model carries its text projection (``CLIPTextModelWithProjection``, SDXL's second encoder, whose projected
    pooled output conditions the U-Net) and the padding token of its tokenizer (SDXL's second one pads with ``!``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    with_projection: bool = False
    pad_token: str = EOS_TOKEN

    def clip_config(self, vocab_size: int) -> CLIPTextConfig:
        """transformers' config: 77 positions, ``vocab_size`` tokens whose last two are BOS and EOS (CLIP's order)."""
        own = {"with_projection", "pad_token"}
        clip_fields = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in own}
        return CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            **clip_fields,
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule (Stable Diffusion's by default: scaled_linear, 0.00085..0.012, T=1000)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class SamplerConfig:
    """The inference scheduler a saved pipeline of the family ships with: its class and the options it sets on top
    of the training schedule (:class:`SchedulerConfig`)."""

    scheduler_class: type[SchedulerMixin]
    options: tuple[tuple[str, Any], ...] = ()


SD_SAMPLER = SamplerConfig(PNDMScheduler, (("steps_offset", 1), ("skip_prk_steps", True), ("set_alpha_to_one", False)))
"""Stable Diffusion 1.x's shipped sampler: PNDM (PLMS steps)."""

SDXL_SAMPLER = SamplerConfig(EulerDiscreteScheduler, (("steps_offset", 1), ("timestep_spacing", "leading")))
"""SDXL 1.0's shipped sampler: Euler with leading timestep spacing."""


@dataclass(frozen=True)
class ModelPreset:
    """A complete latent-diffusion model size. ``text_encoder_2`` (SDXL's second encoder) None: one encoder."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    text_encoder_2: TextEncoderConfig | None = None
    sampler: SamplerConfig = SD_SAMPLER

    @property
    def text_encoders(self) -> dict[TextEncoderName, TextEncoderConfig]:
        """The text encoders by component name (``text_encoder`` and, for SDXL, ``text_encoder_2``)."""
        encoders: dict[TextEncoderName, TextEncoderConfig | None] = {
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }
        return {name: config for name, config in encoders.items() if config is not None}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The image side the U-Net was built for (latent side times the VAE factor)."""
        return self.unet.sample_size * self.vae_scale_factor


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        vae=VAEConfig(block_out_channels=(8, 16, 32, 32), sample_size=64, layers_per_block=1, norm_num_groups=8),
        text_encoder=TextEncoderConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
        ),
    ),
    "small": ModelPreset(
        name="small",
        unet=UNetConfig(
            sample_size=16,
            block_out_channels=(32, 64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            attention_head_dim=4,
            cross_attention_dim=256,
            norm_num_groups=8,
        ),
        # 8 groups, not Stable Diffusion's 32: with 32 channels a group of one is instance normalisation, which
        # erases each feature map's mean, so colours drift and blob artifacts appear (StyleGAN2's "droplets").
        vae=VAEConfig(block_out_channels=(32, 64, 64), sample_size=64, layers_per_block=1, norm_num_groups=8),
        text_encoder=TextEncoderConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, projection_dim=256
        ),
    ),
    "sd15": ModelPreset(
        name="sd15",
        unet=UNetConfig(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        vae=VAEConfig(block_out_channels=(128, 256, 512, 512), sample_size=512),
        text_encoder=TextEncoderConfig(),
    ),
    "tiny-sdxl": ModelPreset(
        name="tiny-sdxl",
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),  # a varying depth, as SDXL's (1, 2, 10)
            cross_attention_dim=32 + 48,  # both encoders' hidden states, concatenated
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        vae=VAEConfig(
            block_out_channels=(8, 16, 32, 32),
            sample_size=64,
            layers_per_block=1,
            norm_num_groups=8,
            scaling_factor=0.13025,
        ),
        text_encoder=TextEncoderConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32
        ),
        # Different widths for the two encoders, so a swapped or mis-concatenated pair cannot pass a shape check.
        # Ten layers: diffusers tells an SDXL single file by its second encoder's tenth layer (resblocks.9), so an
        # exported tiny model is recognised as SDXL by its keys alone.
        text_encoder_2=TextEncoderConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=10,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="gelu",
            with_projection=True,
            pad_token="!",
        ),
        sampler=SDXL_SAMPLER,
    ),
    "sdxl": ModelPreset(
        name="sdxl",
        unet=UNetConfig(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=768 + 1280,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280,
        ),
        vae=VAEConfig(block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025),
        text_encoder=TextEncoderConfig(),  # CLIP ViT-L/14's text tower
        text_encoder_2=TextEncoderConfig(  # OpenCLIP ViT-bigG/14's text tower with its projection
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
            with_projection=True,
            pad_token="!",
        ),
        sampler=SDXL_SAMPLER,
    ),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; a ``ValueError`` lists the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_unet(preset: ModelPreset) -> UNet2DConditionModel:
    """A randomly initialised U-Net of the preset's size (initialisation uses the global RNG; see ``seed`` below)."""
    return UNet2DConditionModel(**asdict(preset.unet))


def build_vae(preset: ModelPreset) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` of the preset's size."""
    cfg = preset.vae
    return AutoencoderKL(
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor,
        force_upcast=cfg.force_upcast,
    )


def build_text_encoder(
    preset: ModelPreset, vocab_size: int = CLIP_VOCAB_SIZE, name: TextEncoderName = "text_encoder"
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """The preset's text encoder ``name``, randomly initialised: a CLIP text transformer (with its text projection
    for SDXL's ``text_encoder_2``) with 77 positions and CLIP's vocabulary, or a reduced one of ``vocab_size``
    tokens (``ldm.tokenizer.build_clip_tokenizer(texts=...)``: the specials are its last two ids).

    Raises:
        ValueError: the preset has no encoder of that name (only SDXL presets have ``text_encoder_2``).
    """
    if name not in preset.text_encoders:
        raise ValueError(f"preset {preset.name!r} has no {name}; it has {sorted(preset.text_encoders)}")
    config = preset.text_encoders[name]
    model_class = CLIPTextModelWithProjection if config.with_projection else CLIPTextModel
    return model_class(config.clip_config(vocab_size))


def build_scheduler(preset: ModelPreset) -> SchedulerMixin:
    """The sampler the preset's family ships with (PNDM for SD 1.x, Euler for SDXL) on its training schedule."""
    sampler = preset.sampler
    return sampler.scheduler_class(**asdict(preset.scheduler), **dict(sampler.options))


def build_components(preset: ModelPreset | str, seed: int = 0) -> dict:
    """All pipeline components, random weights: ``vae, text_encoder, tokenizer, unet, scheduler``, and for an SDXL
    preset ``text_encoder_2, tokenizer_2`` too (so ``StableDiffusionXLPipeline(**components)`` works).

    The weights depend only on ``seed``; the caller's global RNG state is left untouched.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(preset)
        vae = build_vae(preset)
        text_encoders = {name: build_text_encoder(preset, name=name) for name in preset.text_encoders}
    components: dict[str, Any] = {"vae": vae.eval()}
    for name, config in preset.text_encoders.items():
        components[name] = text_encoders[name].eval()
        components[name.replace("text_encoder", "tokenizer")] = build_clip_tokenizer(config.pad_token)
    return {**components, "unet": unet.eval(), "scheduler": build_scheduler(preset)}
