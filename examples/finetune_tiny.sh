#!/usr/bin/env bash
# Fine-tuning a released checkpoint, end to end on CPU (about a minute on 2 cores):
#   1. a tiny random *base* DiT written as a released checkpoint (the stand-in for HunyuanVideo / HunyuanCustom)
#   2. a small real dataset + tiny encoders -> preprocessing into shards (2 ranks)
#   3. --pretrained: the audio variant initialised from the base weights, AudioNet initialised fresh
#      (--pretrained-allow-missing audio_), trained at TP 2 with an EMA of the weights
#   4. one sample from the EMA weights (--load-key ema)
#   bash examples/finetune_tiny.sh [ROOT] [extra pretrain_custom.py flags]
# ROOT (default: a new runs/finetune_tiny/<time> folder) must be new or empty: nothing of an earlier run is touched.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
ROOT=$(new_root "$GIVEN" finetune_tiny)
cd "$HC_REPO"
ENC="data.encoders={llava: $ROOT/dataset/encoders/llava, clip: $ROOT/dataset/encoders/clip, whisper: $ROOT/dataset/encoders/whisper, vae: $ROOT/dataset/encoders/vae}"

python examples/make_tiny_release.py "$ROOT/release" --variant base
python examples/make_tiny_dataset.py --out "$ROOT/dataset" --num-samples 12 --frames 17 --encoders
hc_torchrun 2 tools/preprocess.py --config examples/tiny_data.yaml \
    --set "$ENC" --data-path "$ROOT/dataset/manifest.jsonl" --out "$ROOT/shards" --shard-size 4 --no-progress
hc_torchrun 2 pretrain_custom.py --config examples/tiny_data.yaml \
    --set "$ENC" --data-type shards --data-path "$ROOT/shards" --variant audio --tensor-model-parallel-size 2 \
    --pretrained "$ROOT/release" --pretrained-allow-missing audio_ --ema-decay 0.9 --train-iters 6 \
    --lr-warmup-iters 1 --save "$ROOT/checkpoints" --run-dir "$ROOT/train" "$@"
mkdir -p "$ROOT/samples"
sed "s#runs/tiny_data#$ROOT#g" examples/tiny_jobs.yaml > "$ROOT/samples/jobs.yaml"
python -m hcustom_mc.sample --checkpoint "$ROOT/checkpoints" --load-key ema --encoders-dir "$ROOT/dataset/encoders" \
    --jobs "$ROOT/samples/jobs.yaml" --out "$ROOT/samples" --height 32 --width 48 --frames 9 --steps 4 --text-len 256 \
    --no-progress
echo "fine-tuned checkpoint: $ROOT/checkpoints/$(cat "$ROOT/checkpoints/latest")"
echo "samples: $ROOT/samples (NAME.mp4, NAME.png contact sheets); tiny random encoders: the pictures are meaningless"
