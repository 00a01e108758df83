"""SDXL single-file checkpoints: export to the original SDXL key layout and read back.

The references are independent of our mapping: diffusers' own ldm -> diffusers converters (including
``convert_open_clip_checkpoint`` for the fused OpenCLIP tower) must recover every weight of the export, stock
``StableDiffusionXLPipeline.from_single_file`` must draw the same images from it, and the key names and shapes must be
those of the released ``sd_xl_base_1.0.safetensors`` (which diffusers recognises as ``"xl_base"``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open

from ldm.errors import UserError
from ldm.presets import PRESETS, build_components, build_text_encoder, build_unet, build_vae
from pipelines import LatentDiffusionXLPipeline
from pipelines.convert import main
from pipelines.families import STABLE_DIFFUSION_XL, single_file_family
from pipelines.single_file import SDXL_LAYOUT, export_single_file, layout_of, pipeline_to_original

from .test_pipeline import PARITY_TOLERANCE
from .test_publish import one_line_error

TINY_SDXL = PRESETS["tiny-sdxl"]
SDXL_PREFIX_2 = "conditioner.embedders.1.model."

# Names and shapes of the released sd_xl_base_1.0.safetensors (what A1111 / ComfyUI read).
SDXL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.ln_final.bias": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (3840,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight": (1280, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.ln_2.weight": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias": (1280,),
}
# The released file has 2515 tensors: U-Net 1680, VAE 248, CLIP ViT-L 197, OpenCLIP bigG 390. Two of them hold no
# weight of the diffusers models: embedders.0's text_model.embeddings.position_ids (a buffer transformers no longer
# saves) and embedders.1's logit_scale (CLIP's contrastive temperature, unused by SDXL).
SDXL_KEY_COUNT = 2515 - 2


def preset_models(preset, device: str) -> SimpleNamespace:
    """An SDXL preset's U-Net, VAE and both text encoders on ``device`` (``meta``: names and shapes, no memory)."""
    with torch.device(device):
        return SimpleNamespace(
            unet=build_unet(preset),
            vae=build_vae(preset),
            text_encoder=build_text_encoder(preset),
            text_encoder_2=build_text_encoder(preset, name="text_encoder_2"),
        )


def generate(pipe, seed: int = 0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, output_type="np", generator=generator).images


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """The tiny SDXL pipeline exported to one file, its images, and a config folder of the same architecture with
    *other* weights (seed 1), so a loader that read the folder's weights would draw other images."""
    tmp = tmp_path_factory.mktemp("single-file-xl")
    pipe = StableDiffusionXLPipeline(**build_components(TINY_SDXL, seed=0))
    path = export_single_file(pipe, tmp / "model.safetensors")
    StableDiffusionXLPipeline(**build_components(TINY_SDXL, seed=1)).save_pretrained(tmp / "config")
    return {"pipe": pipe, "path": path, "config": str(tmp / "config"), "images": generate(pipe)}


# ---------------------------------------------------------------------------------------------------- key layout


def test_sdxl_export_has_the_released_checkpoints_names_and_shapes():
    state = pipeline_to_original(preset_models(PRESETS["sdxl"], "meta"))
    assert {key: tuple(state[key].shape) for key in SDXL_KEYS if key in state} == SDXL_KEYS
    assert len(state) == SDXL_KEY_COUNT
    assert infer_diffusers_model_type(state) == "xl_base"  # how diffusers recognises an SDXL base file


@pytest.mark.parametrize("name", ["tiny", "sdxl"])
def test_diffusers_converters_recover_every_weight(name):
    # the tiny model on the CPU, to compare values; the real size on the meta device, names and shapes only
    preset = TINY_SDXL if name == "tiny" else PRESETS["sdxl"]
    models = preset_models(preset, "cpu" if name == "tiny" else "meta")
    state = pipeline_to_original(models)
    recovered = {
        "unet": convert_ldm_unet_checkpoint(state, models.unet.config),
        "vae": convert_ldm_vae_checkpoint(state, models.vae.config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()},
        "text_encoder_2": convert_open_clip_checkpoint(models.text_encoder_2, state, prefix=SDXL_PREFIX_2),
    }
    for component, weights in recovered.items():
        expected = getattr(models, component).state_dict()
        assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in expected.items()}
        if name == "tiny":
            assert all(torch.equal(weights[key], value) for key, value in expected.items()), component


def test_text_projection_is_stored_transposed_and_qkv_fused():
    models = preset_models(TINY_SDXL, "cpu")
    state = pipeline_to_original(models)
    encoder = models.text_encoder_2
    projection = encoder.text_projection.weight  # (projection_dim 32, width 48): the shape tells the transpose
    assert torch.equal(state[f"{SDXL_PREFIX_2}text_projection"], projection.T)
    attention = encoder.text_model.encoder.layers[3].self_attn
    fused = state[f"{SDXL_PREFIX_2}transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))


# ------------------------------------------------------------------------------------------------- round trips


def test_stock_from_single_file_reproduces_the_images(exported):
    stock = StableDiffusionXLPipeline.from_single_file(str(exported["path"]), config=exported["config"])
    assert np.abs(generate(stock) - exported["images"]).max() < PARITY_TOLERANCE
    # not vacuous: the config folder's own weights draw other images
    folder = StableDiffusionXLPipeline.from_pretrained(exported["config"])
    assert np.abs(generate(folder) - exported["images"]).max() > 1e-3


def test_ours_from_single_file_reproduces_the_images(exported):
    loaded = LatentDiffusionXLPipeline.from_single_file(exported["path"], config=exported["config"])
    assert isinstance(loaded, LatentDiffusionXLPipeline)
    # stock's images of the exported components: the round trip through ours loses nothing
    assert np.abs(generate(loaded) - exported["images"]).max() < PARITY_TOLERANCE


def test_the_family_check_accepts_the_export(exported):
    # read from the file's keys alone, as the commands check a checkpoint before loading it
    assert single_file_family(exported["path"]) is STABLE_DIFFUSION_XL


def test_export_casts_to_dtype(exported, tmp_path):
    path = export_single_file(exported["pipe"], tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(path, "pt") as file:
        dtypes = {file.get_slice(key).get_dtype() for key in file.keys()}
        assert set(file.keys()) == set(pipeline_to_original(exported["pipe"]))
    assert dtypes == {"F16"}


# ------------------------------------------------------------------------------------------------------ refusals


def test_the_layout_follows_the_components(tiny_sdxl_components):
    assert layout_of(SimpleNamespace(**tiny_sdxl_components)) is SDXL_LAYOUT
    refiner = {**tiny_sdxl_components, "text_encoder": None}  # an SDXL refiner has only the second encoder
    with pytest.raises(UserError, match=r"SDXL base: unet, vae, text_encoder, text_encoder_2\); this one has"):
        layout_of(SimpleNamespace(**refiner))
    swapped = {**tiny_sdxl_components, "text_encoder_2": tiny_sdxl_components["text_encoder"]}
    with pytest.raises(UserError, match="second text encoder as a CLIPTextModelWithProjection"):
        pipeline_to_original(SimpleNamespace(**swapped))


def test_export_refuses_a_loaded_lora_on_the_second_encoder(tmp_path, tiny_sdxl_components):
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), pipe.text_encoder_2)
    with pytest.raises(UserError, match="second text encoder has LoRA layers loaded; fuse them first"):
        export_single_file(pipe, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------- command line


def test_cli_round_trip(exported, tmp_path, capsys):
    config = exported["config"]  # an SDXL folder (seed 1 weights)
    single = tmp_path / "model.safetensors"
    assert main(["--model", config, "--to-single-file", str(single)]) == 0
    assert capsys.readouterr().out.strip() == str(single)
    expected = pipeline_to_original(StableDiffusionXLPipeline.from_pretrained(config))
    written = safetensors.torch.load_file(single)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())

    out = tmp_path / "folder"
    argv = ["--from-single-file", str(exported["path"]), "--config", config, "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # the file's weights (seed 0), not the config folder's (seed 1)
    folder = StableDiffusionXLPipeline.from_pretrained(out)
    assert np.abs(generate(folder) - exported["images"]).max() < PARITY_TOLERANCE


def test_cli_refuses_an_sdxl_file_with_an_sd_config(exported, tmp_path, tiny_sd_dir, capsys):
    argv = ["--from-single-file", str(exported["path"]), "--config", tiny_sd_dir, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "could not load --from-single-file" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
