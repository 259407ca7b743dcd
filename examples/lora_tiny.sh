#!/usr/bin/env bash
# LoRA fine-tuning on CPU (a few minutes on 2 cores), synthetic latents:
#   1. a tiny random audio DiT written as a released checkpoint (the stand-in for the release)
#   2. LoRA (rank 4) on the frozen base at TP 2 for 3 of 6 steps, saving an adapter-only checkpoint
#   3. resume: the base is rebuilt from --pretrained, the adapters and their optimizer state from the checkpoint
#   4. export the adapters and sample a t2v clip from the base with --lora (merged at load; tiny random encoders:
#      the pictures are meaningless)
#   bash examples/lora_tiny.sh [ROOT] [extra pretrain_custom.py flags, given to both training runs]
# ROOT (default: a new runs/lora_tiny/<time> folder) must be new or empty: nothing of an earlier run is touched.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
ROOT=$(new_root "$GIVEN" lora_tiny)
cd "$HC_REPO"
python examples/make_tiny_release.py "$ROOT/release" --variant audio
ARGS=(--config examples/tiny_3d.yaml --pretrained "$ROOT/release" --lora-rank 4 --lora-alpha 8 --train-iters 6
      --lr-warmup-iters 1 --tensor-model-parallel-size 2 --save "$ROOT/checkpoints")
hc_torchrun 2 pretrain_custom.py "${ARGS[@]}" --exit-after-iters 3 --run-dir "$ROOT/train" "$@"
hc_torchrun 2 pretrain_custom.py "${ARGS[@]}" --load "$ROOT/checkpoints" --run-dir "$ROOT/resume" "$@"
python -m hcustom_mc.checkpoint.lora export --ckpt "$ROOT/checkpoints" --format original --out "$ROOT/lora.safetensors"
# also: --format diffusers (for diffusers pipelines); python -m hcustom_mc.checkpoint.convert ... --merge-lora FILE:0.8
python -c "import sys; from hcustom_mc.encoders.tiny import save_tiny_encoders; from hcustom_mc.model import get_model_config
save_tiny_encoders(sys.argv[1], get_model_config('tiny', 'audio'))" "$ROOT/encoders"
python -m hcustom_mc.sample --checkpoint "$ROOT/release" --model-config tiny --variant audio --lora "$ROOT/lora.safetensors:0.8" \
    --encoders-dir "$ROOT/encoders" --task t2v --prompt "A red ball rolls." --height 32 --width 48 --frames 9 --steps 3 \
    --text-len 256 --out "$ROOT/samples" --no-progress
du -sh "$ROOT/release" "$ROOT/checkpoints/$(cat "$ROOT/checkpoints/latest")"
echo "adapter-only checkpoint: $ROOT/checkpoints/$(cat "$ROOT/checkpoints/latest") (base: $ROOT/release)"
echo "exported adapters: $ROOT/lora.safetensors; sample (contact sheet $ROOT/samples/*.png): $ROOT/samples"
