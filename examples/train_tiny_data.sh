#!/usr/bin/env bash
# The real-data path on CPU: make a tiny dataset (+ tiny encoders), preprocess it into shards on 2 ranks,
# train the tiny DiT on the shards with TP2 x DP2 (4 processes). Everything under ROOT (default runs/tiny_data).
#   bash examples/train_tiny_data.sh [ROOT] [extra pretrain_custom.py flags]      (about 30 s on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ROOT=${1:-runs/tiny_data}
shift || true
ENC="data.encoders={llava: $ROOT/dataset/encoders/llava, clip: $ROOT/dataset/encoders/clip, whisper: $ROOT/dataset/encoders/whisper, vae: $ROOT/dataset/encoders/vae}"
python examples/make_tiny_dataset.py --out $ROOT/dataset --num-samples 24 --frames 17 --encoders
torchrun --nproc-per-node 2 --master-port ${MASTER_PORT:-29500} tools/preprocess.py --config examples/tiny_data.yaml \
    --set "$ENC" --data-path $ROOT/dataset/manifest.jsonl --out $ROOT/shards --shard-size 4
torchrun --nproc-per-node 4 --master-port ${MASTER_PORT:-29500} pretrain_custom.py --config examples/tiny_data.yaml \
    --set "$ENC" --tensor-model-parallel-size 2 --data-type shards --data-path $ROOT/shards \
    --save $ROOT/checkpoints --run-dir $ROOT/train "$@"
