"""Sharded (FSDP2) full fine-tunes through accelerate: the recipes parse, the gathering helpers on unsharded state,
and (slow) a two-process FSDP run of the tiny preset on the CPU under ``accelerate launch --config_file
recipes/accelerate/fsdp_sdxl.yaml``, whose checkpoint and final pipeline load on one process with stock diffusers and
whose resumed copy ends bit-identical."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from ldm.errors import UserError
from ldm.presets import build_components
from training import launch
from training.checkpoint import load_checkpoint, save_checkpoint
from training.state_io import full_tensors, is_sharded, shard_optimizer_state_like, shard_state_like

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "accelerate"


def test_recipes_parse_and_wrap_blocks_of_the_sdxl_unet():
    kinds = {path.name: yaml.safe_load(path.read_text())["distributed_type"] for path in RECIPES.glob("*.yaml")}
    assert kinds == {"fsdp_sdxl.yaml": "FSDP", "ddp.yaml": "MULTI_GPU", "single_gpu.yaml": "NO"}
    fsdp = yaml.safe_load((RECIPES / "fsdp_sdxl.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # every class to wrap is a block of the SDXL U-Net, so each block becomes one shard group
    unet = build_components("tiny-sdxl", seed=0)["unet"]
    blocks = {type(m).__name__ for m in unet.modules()}
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= blocks
    # accelerate's own plugin takes the file's settings, as `accelerate launch` exports them
    env = {
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": fsdp["fsdp_auto_wrap_policy"],
        "FSDP_TRANSFORMER_CLS_TO_WRAP": fsdp["fsdp_transformer_layer_cls_to_wrap"],
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing
    assert plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock", "ResnetBlock2D"]


def test_unsharded_state_passes_through_the_sharding_helpers(tmp_path):
    """Without DTensors, gathering and re-sharding change nothing, and a checkpoint round trip stays exact."""
    unet = build_components("tiny", seed=0)["unet"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 32)).sample.mean().backward()
    optimizer.step()
    state, optim_state = unet.state_dict(), optimizer.state_dict()
    assert not is_sharded(state) and not is_sharded(optim_state)
    assert full_tensors(state) is state
    resharded = shard_state_like(state, unet.state_dict())
    assert resharded.keys() == state.keys() and all(resharded[k] is v for k, v in state.items())
    assert shard_optimizer_state_like(optim_state, optimizer.param_groups) is optim_state
    assert launch.unsharded(unet, is_main_process=True) is unet

    saved = save_checkpoint(tmp_path, 1, {"unet": unet, "optimizer": optimizer})
    fresh = build_components("tiny", seed=1)["unet"]
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_checkpoint(saved, {"unet": fresh, "optimizer": fresh_optimizer})
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), fresh.state_dict().values()))
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(optimizer.state.values(), fresh_optimizer.state.values())]
    assert all(torch.equal(a, b) for a, b in moments)


def test_refusals_name_the_features_only_when_sharded(monkeypatch):
    accelerator = launch.make_accelerator(cpu=True)
    launch.check_sharded_run(accelerator, {"--ema-decay": True})  # not sharded: nothing to refuse
    monkeypatch.setattr(launch, "is_sharded_run", lambda _: True)
    launch.check_sharded_run(accelerator, {"--ema-decay": False})
    with pytest.raises(UserError, match="--ema-decay, --validation-prompts cannot run sharded"):
        features = {"--ema-decay": True, "--lora-rank": False, "--validation-prompts": True}
        launch.check_sharded_run(accelerator, features)


@pytest.mark.slow
def test_two_process_fsdp_run_loads_on_one_process_and_resumes_exactly(tiny_sd_dir, shapes_dir, tmp_path):
    settings = "--resolution 64 --train-batch-size 2 --max-train-steps 2 --checkpointing-steps 1 --report-to none"
    args = ["--pretrained-model", tiny_sd_dir, "--dataset", shapes_dir, *settings.split(), "--lr-warmup-steps", "0"]
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "fsdp_sdxl.yaml")]
    command = [sys.executable, *launcher, "--num_processes", "2", "-m", "training.train_text_to_image", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def launch_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        run = [*command, "--output-dir", str(out), *extra]
        return subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    straight = launch_run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "FSDP2: the trained modules are sharded across 2 processes" in straight.stderr
    pipeline_dir = tmp_path / "straight" / "pipeline"
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"

    # one process, stock diffusers: the final pipeline loads and its U-Net is the whole trained one
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    final = pipe.unet.state_dict()
    start = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    assert final.keys() == start.state_dict().keys()
    assert all(final[k].shape == v.shape and not torch.equal(final[k], v) for k, v in start.state_dict().items())
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)

    # ... and so does the last checkpoint: full U-Net and AdamW state, the U-Net equal to the final one
    optimizer = torch.optim.AdamW(start.parameters(), lr=1e-5)
    load_checkpoint(checkpoint, {"unet": start, "optimizer": optimizer}, strict_rng=False)
    assert all(torch.equal(final[k], v) for k, v in start.state_dict().items())
    assert len(optimizer.state) == len(final)
    assert all(s["exp_avg"].shape == p.shape for p, s in optimizer.state.items())

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000001", resumed / "checkpoints" / "step-000001")
    again = launch_run(resumed, "--resume", "latest")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("unet", "optimizer"):
        a = load_file(checkpoint / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "step-000002" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(pipeline_dir / unet_file), load_file(resumed / "pipeline" / unet_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
