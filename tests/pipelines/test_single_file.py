"""Single-file checkpoints in the original SD 1.x layout, kohya LoRA files, and ``python -m pipelines.convert``.

The references are independent of our mapping: diffusers' own ldm -> diffusers converters must recover every weight
of the export, stock ``StableDiffusionPipeline.from_single_file`` must draw the same images from it, the key names
and shapes must be those of the released SD 1.5 checkpoint, and diffusers' ``load_lora_weights`` must read the kohya
file back to the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open

import pipelines.single_file as single_file
from ldm.presets import PRESETS, TextEncoderConfig, build_components, build_text_encoder, build_unet, build_vae
from pipelines import LatentDiffusionPipeline
from pipelines.convert import main
from pipelines.generation_defaults import GenerationDefaults
from pipelines.kohya_lora import export_kohya_lora
from pipelines.single_file import export_single_file, pipeline_to_original
from training.models import LoraSpec, add_lora, save_lora

from .test_pipeline import PARITY_TOLERANCE, generate, stock_pipeline
from .test_publish import one_line_error

SD15 = PRESETS["sd15"]
# SD 1.5's block structure (4 levels, layers_per_block 2, cross-attention in the first 3, 8 heads, 32 norm groups,
# a 4-level VAE with 2 resnets a level) at a width that samples in well under a second on a CPU.
SD15_SHAPED = dataclasses.replace(
    SD15,
    name="sd15-shaped",
    unet=dataclasses.replace(SD15.unet, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32),
    vae=dataclasses.replace(SD15.vae, block_out_channels=(32, 32, 64, 64), sample_size=64),
    text_encoder=TextEncoderConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
    ),
)
PRESETS_UNDER_TEST = {"tiny": PRESETS["tiny"], "sd15-shaped": SD15_SHAPED}

# Names and shapes of the released v1-5-pruned-emaonly.safetensors (what A1111 / ComfyUI read).
SD15_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.decoder.mid.block_1.norm1.weight": (512,),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
# The released file also has text_model.embeddings.position_ids, a buffer transformers no longer saves.
SD15_KEY_COUNT = 686 + 248 + 196


def ddim_pipeline(preset, seed: int = 0, cls=LatentDiffusionPipeline):
    """A pipeline of random components with a DDIM sampler (clip_sample off, as SD's loaders set it)."""
    components = build_components(preset, seed=seed)
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, clip_sample=False)
    return cls(**components) if cls is LatentDiffusionPipeline else stock_pipeline(components)


def preset_models(preset, device: str) -> SimpleNamespace:
    """The U-Net, VAE and text encoder of a preset on ``device`` (``meta``: names and shapes, no memory)."""
    with torch.device(device):
        return SimpleNamespace(unet=build_unet(preset), vae=build_vae(preset), text_encoder=build_text_encoder(preset))


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """``export_of(name)``: a preset's pipeline exported to one file (made once per module), and a config folder of
    the same architecture with *other* weights, so a loader that read the folder's weights would draw other images."""
    made: dict[str, dict] = {}

    def export(name: str) -> dict:
        if name not in made:
            preset, tmp = PRESETS_UNDER_TEST[name], tmp_path_factory.mktemp(f"single-file-{name}")
            pipe = ddim_pipeline(preset)
            path = export_single_file(pipe, tmp / "model.safetensors")
            ddim_pipeline(preset, seed=1).save_pretrained(tmp / "config")
            made[name] = {"preset": preset, "pipe": pipe, "path": path, "config": str(tmp / "config")}
            made[name]["images"] = generate(pipe)
        return made[name]

    return export


@pytest.fixture(params=list(PRESETS_UNDER_TEST))
def exported(request, export_of) -> dict:
    return export_of(request.param)


# ---------------------------------------------------------------------------------------------------- key layout


def test_sd15_export_has_the_released_checkpoints_names_and_shapes():
    state = pipeline_to_original(preset_models(SD15, "meta"))
    assert {key: tuple(state[key].shape) for key in SD15_KEYS if key in state} == SD15_KEYS
    assert len(state) == SD15_KEY_COUNT
    assert infer_diffusers_model_type(state) == "v1"  # how diffusers recognises an SD 1.x file


@pytest.mark.parametrize("name", ["tiny", "small", "sd15"])
def test_diffusers_converters_recover_every_weight(name):
    # tiny on the CPU, to compare values; the larger ones on the meta device, names and shapes only
    models = preset_models(PRESETS[name], "cpu" if name == "tiny" else "meta")
    state = pipeline_to_original(models)
    recovered = {
        "unet": convert_ldm_unet_checkpoint(state, models.unet.config),
        "vae": convert_ldm_vae_checkpoint(state, models.vae.config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()},
    }
    for component, weights in recovered.items():
        expected = getattr(models, component).state_dict()
        assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in expected.items()}
        if name == "tiny":
            assert all(torch.equal(weights[key], value) for key, value in expected.items()), component


# ------------------------------------------------------------------------------------------------- round trips


def test_from_single_file_reproduces_the_images(exported):
    loaded = LatentDiffusionPipeline.from_single_file(exported["path"], config=exported["config"])
    assert isinstance(loaded, LatentDiffusionPipeline)
    assert np.abs(generate(loaded) - exported["images"]).max() < PARITY_TOLERANCE
    # not vacuous: the config folder's own weights draw other images
    folder = LatentDiffusionPipeline.from_pretrained(exported["config"])
    assert np.abs(generate(folder) - exported["images"]).max() > 1e-3


def test_stock_from_single_file_reads_the_export(exported):
    stock = StableDiffusionPipeline.from_single_file(
        str(exported["path"]), config=exported["config"], safety_checker=None, requires_safety_checker=False
    )
    reference = ddim_pipeline(exported["preset"], cls=StableDiffusionPipeline)
    assert np.abs(generate(stock) - generate(reference)).max() < PARITY_TOLERANCE


def test_from_single_file_reads_the_configs_generation_defaults(export_of, tmp_path):
    config = ddim_pipeline("tiny", seed=1)
    config.generation_defaults = GenerationDefaults(num_inference_steps=7, guidance_scale=2.5)
    config.save_pretrained(tmp_path / "config")
    loaded = LatentDiffusionPipeline.from_single_file(export_of("tiny")["path"], config=str(tmp_path / "config"))
    assert loaded.generation_defaults == GenerationDefaults(num_inference_steps=7, guidance_scale=2.5)


def test_export_casts_to_dtype(tmp_path, tiny_components):
    pipe = LatentDiffusionPipeline(**tiny_components)
    path = export_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(path, "pt") as file:
        dtypes = {file.get_slice(key).get_dtype() for key in file.keys()}
        assert set(file.keys()) == set(pipeline_to_original(pipe))
    assert dtypes == {"F16"}


def test_pickle_checkpoints_need_allow_pickle(export_of, tmp_path):
    exported = export_of("tiny")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(exported["path"])}, ckpt)
    with pytest.raises(ValueError, match=r"pickle .*allow_pickle=True"):
        LatentDiffusionPipeline.from_single_file(ckpt, config=exported["config"])
    loaded = LatentDiffusionPipeline.from_single_file(ckpt, config=exported["config"], allow_pickle=True)
    assert np.abs(generate(loaded) - exported["images"]).max() < PARITY_TOLERANCE


# ------------------------------------------------------------------------------------------------------ writing


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, tiny_components, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def fail_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(single_file.safetensors.torch, "save_file", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        export_single_file(LatentDiffusionPipeline(**tiny_components), path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_export_refuses_what_the_layout_cannot_hold(tmp_path, tiny_components):
    pipe = LatentDiffusionPipeline(**tiny_components)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_single_file(pipe, tmp_path / "model.ckpt")
    add_lora(pipe.unet, LoraSpec(rank=2))
    with pytest.raises(ValueError, match="fuse_lora"):
        export_single_file(pipe, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------- kohya LoRA


def lora_pipeline(rank: int = 4, alpha: float = 8.0) -> LatentDiffusionPipeline:
    """The tiny DDIM pipeline with a peft LoRA whose up-projections are non-zero (peft starts them at 0)."""
    pipe = ddim_pipeline("tiny")
    add_lora(pipe.unet, LoraSpec(rank=rank, alpha=alpha))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return pipe


def test_kohya_lora_loads_back_to_the_same_images(tmp_path):
    pipe = lora_pipeline(rank=4, alpha=8.0)
    path = export_kohya_lora(pipe.unet, tmp_path / "lora.safetensors")
    state = safetensors.torch.load_file(path)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{name}.lora_down.weight"].shape == (4, 64)
    assert state[f"{name}.lora_up.weight"].shape == (64, 4)
    assert state[f"{name}.alpha"].item() == 8.0
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.alpha" in state

    fresh = ddim_pipeline("tiny")
    base = generate(fresh)
    fresh.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    with_lora = generate(fresh)
    assert np.abs(with_lora - base).max() > 1e-3
    assert np.abs(with_lora - generate(pipe)).max() < PARITY_TOLERANCE


# ------------------------------------------------------------------------------------------------- command line


def test_cli_round_trip(tmp_path, tiny_sd_dir, capsys):
    single = tmp_path / "model.safetensors"
    assert main(["--model", tiny_sd_dir, "--to-single-file", str(single)]) == 0
    assert capsys.readouterr().out.strip() == str(single)
    out = tmp_path / "folder"
    assert main(["--from-single-file", str(single), "--config", tiny_sd_dir, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    weights = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    original = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    assert np.abs(generate(StableDiffusionPipeline.from_pretrained(out)) - generate(original)).max() < PARITY_TOLERANCE


def test_cli_to_kohya_lora(tmp_path, tiny_sd_dir, capsys):
    # alpha = rank: training.models.save_lora writes no alpha, and diffusers then loads any LoRA at scale 1
    pipe = lora_pipeline(rank=4, alpha=4.0)
    lora = save_lora(pipe.unet, tmp_path / "lora")
    out = tmp_path / "kohya.safetensors"
    assert main(["--model", tiny_sd_dir, "--lora", str(lora), "--to-kohya-lora", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    fresh = ddim_pipeline("tiny")
    fresh.load_lora_weights(str(tmp_path), weight_name=out.name)
    assert np.abs(generate(fresh) - generate(pipe)).max() < PARITY_TOLERANCE


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "pass one of --to-single-file"),
        (["--to-single-file", "{tmp}/a.safetensors"], "--to-single-file needs --model"),
        (["--from-single-file", "{file}", "--out", "{tmp}/o"], "--from-single-file needs --config"),
        (["--model", "{sd}", "--to-single-file", "{tmp}/a.safetensors", "--out", "{tmp}/o"], "--out does not apply"),
        (["--model", "{sd}", "--to-single-file", "{tmp}/a.ckpt"], "must end in .safetensors"),
        (["--model", "{sd}", "--to-single-file", "{file}"], "exists; pass a new file name"),
        (["--model", "{sd}", "--to-single-file", "{tmp}/m.ckpt/a.safetensors"], "m.ckpt is a file, not a folder"),
        (["--model", "{tmp}/missing", "--to-single-file", "{tmp}/a.safetensors"], "no such folder"),
        (["--from-single-file", "{tmp}/m.ckpt", "--config", "{sd}", "--out", "{tmp}/o"], "(--allow-pickle)"),
        (["--from-single-file", "{file}", "--config", "{tmp}", "--out", "{tmp}/o"], "not a diffusers pipeline"),
        (["--from-single-file", "{file}", "--config", "{sd}", "--out", "{tmp}"], "not an empty folder"),
        (["--from-single-file", "{file}", "--config", "{sd15}", "--out", "{tmp}/o"], "could not load"),
        (
            ["--model", "{sd}", "--lora", "{tmp}/none.safetensors", "--to-kohya-lora", "{tmp}/k.safetensors"],
            "no such file",
        ),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, tiny_sd_dir, export_of, capsys):
    (tmp_path / "m.ckpt").write_bytes(b"not read")
    fill = {"tmp": tmp_path, "sd": tiny_sd_dir, "file": export_of("tiny")["path"]}
    fill["sd15"] = export_of("sd15-shaped")["config"]  # another architecture
    assert main([arg.format(**fill) for arg in argv]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
