"""kohya LoRA files of a whole pipeline (U-Net and text encoders), SDXL's above all.

The references are stock diffusers': ``load_lora_weights`` of ``StableDiffusionXLPipeline`` (and
``StableDiffusionPipeline``) must read the exported file back to the images of the pipeline that carried the peft
adapters; on the real SDXL architecture (built on the meta device), diffusers' kohya readers
(``_maybe_map_sgm_blocks_to_diffusers``, ``_convert_non_diffusers_lora_to_diffusers``) must turn every name back
into the module it came from, and the attention modules must be the 722 that kohya's SDXL LoRA has, under its names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from ldm.presets import PRESETS, build_components, build_unet
from pipelines.convert import main
from pipelines.kohya_lora import DYNAMIC, export_kohya_lora, kohya_metadata, original_unet_names
from training.models import LORA_TARGET_MODULES

from .test_pipeline import PARITY_TOLERANCE, generate

# Every kind of U-Net layer a kohya file can hold: attention (kohya's default), feed-forward, the transformer's
# projections, the resnets' convolutions and time projections, the samplers, conv_in / conv_out and the time and
# SDXL's added embeddings.
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
    "conv_shortcut",
    "conv",
    "conv_in",
    "conv_out",
    "linear_1",
    "linear_2",
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA = 4, 8.0
SMALL = {"num_inference_steps": 2, "height": 32, "width": 32}

CASES = {
    # preset: (stock pipeline class, text encoders, their key prefixes, ss_base_model_version)
    "tiny": (StableDiffusionPipeline, ("text_encoder",), ("lora_te_",), "sd_v1"),
    "tiny-sdxl": (StableDiffusionXLPipeline, ("text_encoder", "text_encoder_2"), ("lora_te1_", "lora_te2_"), "sdxl"),
}


def stock(preset: str):
    """The stock pipeline of ``preset``'s random components (seed 0)."""
    cls = CASES[preset][0]
    extra = {"safety_checker": None, "feature_extractor": None} if cls is StableDiffusionPipeline else {}
    return cls(**build_components(preset, seed=0), **extra)


def with_lora(preset: str, unet_targets: list[str] = UNET_TARGETS):
    """The stock pipeline with a peft LoRA on its U-Net and text encoders, whose up-projections are non-zero (peft
    starts them at 0)."""
    pipe = stock(preset)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=unet_targets))
    for name in CASES[preset][1]:
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_TARGETS), getattr(pipe, name))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in [pipe.unet, *(getattr(pipe, name) for name in CASES[preset][1])]:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return pipe


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny"])
def test_pipeline_lora_loads_in_stock_to_the_same_images(preset: str, tmp_path: Path) -> None:
    pipe = with_lora(preset)
    path = export_kohya_lora(pipe, tmp_path / "lora.safetensors")

    state = safetensors.torch.load_file(path)
    modules = {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in state}
    for prefix in ("lora_unet_", *CASES[preset][2]):
        of_prefix = {module for module in modules if module.startswith(prefix)}
        assert of_prefix, prefix
        for module in of_prefix:
            assert state[f"{module}.lora_down.weight"].shape[0] == RANK
            assert state[f"{module}.lora_up.weight"].shape[1] == RANK
            assert state[f"{module}.alpha"].item() == ALPHA
    assert len(state) == 3 * len(modules)
    for prefix in CASES[preset][2]:  # transformers 4's CLIP paths, which kohya's names are made of
        assert f"{prefix}text_model_encoder_layers_0_self_attn_q_proj" in modules
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert metadata["ss_base_model_version"].startswith(CASES[preset][3])

    fresh = stock(preset)
    base = generate(fresh, **SMALL)
    fresh.load_lora_weights(str(tmp_path), weight_name=path.name)
    loaded = generate(fresh, **SMALL)
    assert np.abs(loaded - base).max() > 1e-2
    assert np.abs(loaded - generate(pipe, **SMALL)).max() < PARITY_TOLERANCE


def test_convert_writes_a_diffusers_sdxl_lora_in_kohyas_layout(tmp_path: Path, capsys) -> None:
    pipe = with_lora("tiny-sdxl", LORA_TARGET_MODULES)  # what training writes in diffusers' format
    model = tmp_path / "model"
    stock("tiny-sdxl").save_pretrained(model)
    names = ("unet", "text_encoder", "text_encoder_2")
    StableDiffusionXLPipeline.save_lora_weights(  # diffusers' format, rank and alpha in the metadata
        tmp_path / "lora",
        **{
            f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, name)))
            for name in names
        },
        **{f"{name}_lora_adapter_metadata": getattr(pipe, name).peft_config["default"].to_dict() for name in names},
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    out = tmp_path / "kohya.safetensors"
    assert main(["--model", str(model), "--lora", str(lora), "--to-kohya-lora", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    state = safetensors.torch.load_file(out)
    assert {key.split("_")[1] for key in state} == {"unet", "te1", "te2"}
    fresh = stock("tiny-sdxl")
    fresh.load_lora_weights(str(tmp_path), weight_name=out.name)
    assert np.abs(generate(fresh, **SMALL) - generate(pipe, **SMALL)).max() < PARITY_TOLERANCE


def test_sdxl_names_are_kohyas_and_diffusers_reads_each_back_to_its_module() -> None:
    with torch.device("meta"):  # the real SDXL base U-Net's modules, without its 2.6B weights
        unet = build_unet(PRESETS["sdxl"])
    kohya_name = original_unet_names(unet)
    paths = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    names = {path: "lora_unet_" + kohya_name(path).replace(".", "_") for path in paths}

    # kohya's default SDXL LoRA: the linear layers of the 11 transformers (70 blocks), "722 modules" in its log
    attention = {names[path] for path in paths if ".attentions." in path}
    assert len(attention) == 722
    assert {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "lora_unet_input_blocks_7_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
        "lora_unet_output_blocks_2_1_proj_out",
    } <= attention
    assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_label_emb_0_0"} <= set(names.values())
    assert {"lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv"} <= set(names.values())

    # diffusers' kohya reader maps every name back to the module it came from
    state = {}
    for name in names.values():
        state |= {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1)}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, unet.config))
    peft = convert_unet_state_dict_to_peft({key.removeprefix("unet."): value for key, value in converted.items()})
    assert {key.rsplit(".lora_", 1)[0] for key in peft} == set(paths)


def test_metadata_says_dynamic_when_ranks_or_alphas_differ() -> None:
    state = {
        "lora_unet_a.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_a.alpha": torch.tensor(4.0),
        "lora_te1_b.lora_down.weight": torch.zeros(2, 8),
        "lora_te1_b.alpha": torch.tensor(4.0),
    }
    metadata = kohya_metadata(state, {"addition_embed_type": "text_time"})
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (DYNAMIC, "4.0")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    sd2 = kohya_metadata(state, {"addition_embed_type": None, "cross_attention_dim": 1024})
    assert (sd2["ss_base_model_version"], sd2["ss_v2"]) == ("sd_v2", "True")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"addition_embed_type": "text"}, "has no kohya LoRA layout"),
        ({}, "has no LoRA adapter"),
    ],
)
def test_errors_name_the_fix(change: dict, message: str, tmp_path: Path) -> None:
    pipe = stock("tiny-sdxl")
    pipe.unet.register_to_config(**change)
    with pytest.raises(ValueError, match=message):
        export_kohya_lora(pipe, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()
