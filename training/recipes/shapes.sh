#!/usr/bin/env bash
# Train the shapes text-to-image model from nothing with the project's own commands: the data, the autoencoder,
# the CLIP text encoder (contrastive), then the U-Net (v-prediction, zero terminal SNR, caption dropout for
# classifier-free guidance). Every stage checkpoints and resumes: run the script again to continue where it stopped.
#
#   bash training/recipes/shapes.sh [OUT]             # the full recipe (about 70 minutes on 2 idle CPU cores)
#   SCALE=toy bash training/recipes/shapes.sh OUT      # the same chain at a toy size, in minutes
#
# Sizing (2 idle CPU cores, small preset, 64 px; measured with a 12-20 step run of each stage): autoencoder 0.76
# steps/s at batch 32, CLIP 0.70 steps/s at batch 64, U-Net 1.61 steps/s at batch 32 with cached latents; so about
# 13 + 12 + 41 minutes for the steps below, plus data and evaluation.
set -euo pipefail
OUT=${1:-runs/shapes}
SCALE=${SCALE:-full}
if [ "$SCALE" = toy ]; then
  N=256 N_TEST=64 VAE_STEPS=20 CLIP_STEPS=20 UNET_STEPS=30 BATCH=16 EVERY=10
elif [ "$SCALE" = full ]; then
  N=20000 N_TEST=1000 VAE_STEPS=600 CLIP_STEPS=500 UNET_STEPS=4000 BATCH=32 EVERY=200
else
  echo "error: SCALE must be toy or full; got $SCALE" >&2; exit 2
fi
COMMON=(--resolution 64 --train-batch-size "$BATCH" --checkpointing-steps "$EVERY" --checkpoints-total-limit 2
        --resume latest --log-steps "$EVERY")
mkdir -p "$OUT"
SECONDS=0

stage() { echo "== $1 ($SECONDS s so far)"; }

stage "data"
[ -f "$OUT/data/train/metadata.jsonl" ] || python -m training.make_shapes_dataset --out "$OUT/data/train" \
  --n "$N" --size 64 --seed 0 --overwrite --no-progress
[ -f "$OUT/data/test/metadata.jsonl" ] || python -m training.make_shapes_dataset --out "$OUT/data/test" \
  --n "$N_TEST" --size 64 --seed 1 --split-name test --overwrite --no-progress

stage "autoencoder"
[ -d "$OUT/vae/vae" ] || python -m training.train_autoencoder --dataset "$OUT/data/train" --preset small \
  --validation-dataset "$OUT/data/test" --validation-steps "$EVERY" --max-validation-images 64 \
  --max-train-steps "$VAE_STEPS" --learning-rate 5e-4 --lr-warmup-steps 100 --report-to none \
  --output-dir "$OUT/vae" "${COMMON[@]}"

stage "text encoder"
[ -d "$OUT/clip/text_encoder" ] || python -m training.train_text_encoder --dataset "$OUT/data/train" --preset small \
  --validation-dataset "$OUT/data/test" --validation-steps "$EVERY" --max-validation-images 256 \
  --max-train-steps "$CLIP_STEPS" --learning-rate 5e-4 --lr-warmup-steps 100 --report-to none \
  --output-dir "$OUT/clip" "${COMMON[@]}" --train-batch-size "$((BATCH * 2))"

stage "U-Net"
[ -d "$OUT/unet/pipeline" ] || python -m training.train_text_to_image --preset small --vae "$OUT/vae" \
  --text-encoder "$OUT/clip" --dataset "$OUT/data/train" --validation-dataset "$OUT/data/test" \
  --max-validation-images 64 --prediction-type v_prediction --zero-terminal-snr --snr-gamma 5 \
  --caption-dropout 0.1 --cache --learning-rate 5e-4 --lr-scheduler cosine --lr-warmup-steps 200 \
  --ema-decay 0.999 --max-train-steps "$UNET_STEPS" --validation-steps "$((EVERY * 2))" \
  --validation-prompts "a red circle on the left" "a blue square at the top" "a green triangle in the center" \
  "a purple circle at the bottom" --validation-inference-steps 25 --validation-guidance-scale 3 \
  --output-dir "$OUT/unet" "${COMMON[@]}"

stage "done"
echo "$OUT/unet/pipeline"
