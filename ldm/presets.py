"""Named model sizes: typed configs that build a U-Net, VAE, text encoder, tokenizer and scheduler.

``tiny`` is for tests (a pipeline that runs a 64x64 generation in well under a second on a CPU); ``small`` is a
CPU-trainable model of 64x64 images with 16x16 latents (a VAE factor of 4, so corners survive); ``sd15`` is the
exact Stable Diffusion 1.5 architecture (random weights), for training from scratch and GPU benchmarks.
Presets are data: add one by adding an entry to :data:`PRESETS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer


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


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``AutoencoderKL`` that a preset sets. Downsampling factor: 2 ** (levels - 1)."""

    block_out_channels: tuple[int, ...]
    sample_size: int
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return ("DownEncoderBlock2D",) * len(self.block_out_channels)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return ("UpDecoderBlock2D",) * len(self.block_out_channels)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The fields of transformers' ``CLIPTextConfig`` that a preset sets; the vocabulary is always CLIP's."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule (Stable Diffusion's by default: scaled_linear, 0.00085..0.012, T=1000)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class ModelPreset:
    """A complete latent-diffusion model size."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

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
    )


def build_text_encoder(preset: ModelPreset, vocab_size: int = CLIP_VOCAB_SIZE) -> CLIPTextModel:
    """A randomly initialised CLIP text transformer with 77 positions and CLIP's vocabulary, or a reduced one of
    ``vocab_size`` tokens (``ldm.tokenizer.build_clip_tokenizer(texts=...)``: the specials are its last two ids)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **asdict(preset.text_encoder),
    )
    return CLIPTextModel(config)


def build_scheduler(preset: ModelPreset) -> PNDMScheduler:
    """Stable Diffusion 1.x's default sampler configuration with the preset's training schedule."""
    return PNDMScheduler(**asdict(preset.scheduler), steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)


def build_components(preset: ModelPreset | str, seed: int = 0) -> dict:
    """All five pipeline components (``vae, text_encoder, tokenizer, unet, scheduler``), random weights.

    The weights depend only on ``seed``; the caller's global RNG state is left untouched.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(preset)
        vae = build_vae(preset)
        text_encoder = build_text_encoder(preset)
    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_clip_tokenizer(),
        "unet": unet.eval(),
        "scheduler": build_scheduler(preset),
    }
