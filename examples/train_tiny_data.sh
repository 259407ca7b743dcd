#!/usr/bin/env bash
# The real-data path on CPU: make a tiny dataset (+ tiny encoders), preprocess it into shards on 2 ranks,
# train the tiny DiT on the shards with TP2 x DP2 (4 processes). Everything under runs/tiny_data/.
#   bash examples/train_tiny_data.sh            (about a minute on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=runs/tiny_data
python examples/make_tiny_dataset.py --out $OUT/dataset --num-samples 24 --frames 17 --encoders
torchrun --nproc-per-node 2 tools/preprocess.py --config examples/tiny_data.yaml \
    --data-path $OUT/dataset/manifest.jsonl --out $OUT/shards --shard-size 4
torchrun --nproc-per-node 4 pretrain_custom.py --config examples/tiny_data.yaml \
    --tensor-model-parallel-size 2 --data-type shards --data-path $OUT/shards --save $OUT/checkpoints
