#!/usr/bin/env bash
# The real-data path on CPU: make a tiny dataset (+ tiny encoders), preprocess it into shards on 2 ranks,
# train the tiny DiT on the shards with TP2 x DP2 (4 processes). Everything under ROOT (about a minute on 2 cores).
#   bash examples/train_tiny_data.sh [ROOT] [extra pretrain_custom.py flags]
# ROOT (default: a new runs/tiny_data/<time> folder; runs/tiny_data/latest points at the newest) must be new or
# empty: nothing of an earlier run is touched.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
ROOT=$(new_root "$GIVEN" tiny_data)
cd "$HC_REPO"
ENC="data.encoders={llava: $ROOT/dataset/encoders/llava, clip: $ROOT/dataset/encoders/clip, whisper: $ROOT/dataset/encoders/whisper, vae: $ROOT/dataset/encoders/vae}"
python examples/make_tiny_dataset.py --out "$ROOT/dataset" --num-samples 24 --frames 17 --encoders
hc_torchrun 2 tools/preprocess.py --config examples/tiny_data.yaml \
    --set "$ENC" --data-path "$ROOT/dataset/manifest.jsonl" --out "$ROOT/shards" --shard-size 4 --no-progress
hc_torchrun 4 pretrain_custom.py --config examples/tiny_data.yaml \
    --set "$ENC" --tensor-model-parallel-size 2 --data-type shards --data-path "$ROOT/shards" \
    --save "$ROOT/checkpoints" --run-dir "$ROOT/train" "$@"
echo "dataset: $ROOT/dataset; shards: $ROOT/shards; sample from it: ROOT=$ROOT bash examples/infer_parallel.sh"
