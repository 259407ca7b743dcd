#!/usr/bin/env bash
# Fine-tuning a released checkpoint, end to end on CPU (about a minute on 2 cores):
#   1. a tiny random *base* DiT written as a released checkpoint (the stand-in for HunyuanVideo / HunyuanCustom)
#   2. a small real dataset + tiny encoders -> preprocessing into shards (2 ranks)
#   3. --pretrained: the audio variant initialised from the base weights, AudioNet initialised fresh
#      (--pretrained-allow-missing audio_), trained at TP 2 with an EMA of the weights
#   4. one sample from the EMA weights (--load-key ema)
#   bash examples/finetune_tiny.sh [ROOT] [extra pretrain_custom.py flags]     (ROOT default runs/finetune_tiny)
# ROOT must not exist yet: nothing of an earlier run is overwritten.
set -euo pipefail
ROOT=$(realpath -m "${1:-runs/finetune_tiny}")
shift || true
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -e "$ROOT" ]; then
    echo "error: $ROOT exists; pass a new folder: bash examples/finetune_tiny.sh NEW_ROOT" >&2
    exit 2
fi
PORT=${MASTER_PORT:-29500}
ENC="data.encoders={llava: $ROOT/dataset/encoders/llava, clip: $ROOT/dataset/encoders/clip, whisper: $ROOT/dataset/encoders/whisper, vae: $ROOT/dataset/encoders/vae}"

python examples/make_tiny_release.py "$ROOT/release" --variant base
python examples/make_tiny_dataset.py --out "$ROOT/dataset" --num-samples 12 --frames 17 --encoders
torchrun --nproc-per-node 2 --master-port "$PORT" tools/preprocess.py --config examples/tiny_data.yaml \
    --set "$ENC" --data-path "$ROOT/dataset/manifest.jsonl" --out "$ROOT/shards" --shard-size 4 --no-progress
torchrun --nproc-per-node 2 --master-port "$PORT" pretrain_custom.py --config examples/tiny_data.yaml \
    --set "$ENC" --data-type shards --data-path "$ROOT/shards" --variant audio --tensor-model-parallel-size 2 \
    --pretrained "$ROOT/release" --pretrained-allow-missing audio_ --ema-decay 0.9 --train-iters 6 \
    --lr-warmup-iters 1 --save "$ROOT/checkpoints" --run-dir "$ROOT/train" "$@"
mkdir -p "$ROOT/samples"
sed "s#runs/tiny_data#$ROOT#g" examples/tiny_jobs.yaml > "$ROOT/samples/jobs.yaml"
python -m hcustom_mc.sample --checkpoint "$ROOT/checkpoints" --load-key ema --encoders-dir "$ROOT/dataset/encoders" \
    --jobs "$ROOT/samples/jobs.yaml" --out "$ROOT/samples" --height 32 --width 48 --frames 9 --steps 4 --text-len 256
echo "fine-tuned checkpoint: $ROOT/checkpoints/$(cat "$ROOT/checkpoints/latest"); samples (tiny random encoders: the pictures are meaningless): $ROOT/samples"
