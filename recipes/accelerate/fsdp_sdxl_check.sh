#!/usr/bin/env bash
# The check of FSDP training that a CPU cannot make: NCCL, bf16 mixed precision, activation checkpointing and the
# SDXL-size U-Net (2.6 B parameters) on 2 or more GPUs of one machine, with recipes/accelerate/fsdp_sdxl.yaml.
#
#   bash recipes/accelerate/fsdp_sdxl_check.sh [OUT] [GPUS]     # about 5 minutes on 2 H100s; GPUS defaults to 2
#   PRESET=tiny-sdxl RES=64 bash recipes/accelerate/fsdp_sdxl_check.sh OUT   # the script itself, on 2 CPU processes
#
# It builds an SDXL-architecture pipeline with random weights (no download), trains its U-Net for 4 steps at 1024 px
# with a checkpoint every 2, resumes a copy from step 2, and prints: that the final pipeline/ loads with stock
# StableDiffusionXLPipeline on one GPU and generates, that checkpoint and pipeline hold the same full U-Net, and how far
# the resumed run is from the uninterrupted one (0.0 when every CUDA kernel is deterministic; cuDNN's convolution
# backward may not be, so a tiny difference there is not a resume bug). The same steps on 2 CPU processes are
# tests/training/test_fsdp.py, where the resume is bit-exact.
set -euo pipefail
OUT=${1:-runs/fsdp-check}
GPUS=${2:-2}
PRESET=${PRESET:-sdxl}
RES=${RES:-1024}
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-.} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
python - "$OUT" "$PRESET" "$RES" <<'PY'
import json
import sys
from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from ldm.presets import build_components

out, preset, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if not (out / preset / "model_index.json").is_file():
    StableDiffusionXLPipeline(**build_components(preset, seed=0)).save_pretrained(out / preset)
data = out / f"data-{size}"
data.mkdir(exist_ok=True)
lines = []
for i, colour in enumerate(["red", "green", "blue", "yellow"] * 2):
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size * i / 10, size / 3, size * i / 10 + size / 3, size * 2 / 3), fill=colour)
    image.save(data / f"{i}.png")
    lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} circle"}))
(data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
PY
TRAIN=(-m accelerate.commands.launch --config_file recipes/accelerate/fsdp_sdxl.yaml --num_processes "$GPUS"
  -m training.train_text_to_image --pretrained-model "$OUT/$PRESET" --dataset "$OUT/data-$RES" --resolution "$RES"
  --train-batch-size 1 --max-train-steps 4 --checkpointing-steps 2 --mixed-precision bf16 --lr-warmup-steps 0
  --report-to none)
rm -rf "$OUT/straight" "$OUT/resumed"
time python "${TRAIN[@]}" --output-dir "$OUT/straight"
mkdir -p "$OUT/resumed/checkpoints"
cp -r "$OUT/straight/checkpoints/step-000002" "$OUT/resumed/checkpoints/"
time python "${TRAIN[@]}" --output-dir "$OUT/resumed" --resume latest
python - "$OUT" "$RES" <<'PY'
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

out, size = Path(sys.argv[1]), int(sys.argv[2])
device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
pipe = StableDiffusionXLPipeline.from_pretrained(out / "straight" / "pipeline", torch_dtype=dtype).to(device)
image = pipe("a red circle", num_inference_steps=2, height=size, width=size, output_type="np").images[0]
print(f"stock StableDiffusionXLPipeline loads pipeline/ on one {device} and generates", image.shape)
final = StableDiffusionXLPipeline.from_pretrained(out / "straight" / "pipeline").unet.state_dict()
saved = load_file(out / "straight" / "checkpoints" / "step-000004" / "unet.safetensors")
same = saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
print(f"checkpoint and pipeline/ hold the same full U-Net: {same} ({sum(t.numel() for t in saved.values())} values)")
unet_file = "unet/diffusion_pytorch_model.safetensors"
a, b = load_file(out / "straight" / "pipeline" / unet_file), load_file(out / "resumed" / "pipeline" / unet_file)
gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
equal = sum(torch.equal(a[k], b[k]) for k in a)
print(f"resumed vs uninterrupted U-Net: max |difference| {gap:.3g} ({equal}/{len(a)} tensors equal)")
PY
