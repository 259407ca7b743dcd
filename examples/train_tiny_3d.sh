#!/usr/bin/env bash
# The main-job demo: train the tiny HunyuanCustom DiT on synthetic latents on CPU with a real 3D
# layout (8 processes = TP 2 x PP 2 x DP 2, distributed optimizer), log to MLflow, save a checkpoint
# (about a minute on 2 cores). It ends with a summary: run folder, checkpoint, MLflow run and the
# `mlflow ui` command that shows it.
#   bash examples/train_tiny_3d.sh [RUN_DIR] [extra pretrain_custom.py flags...]
# RUN_DIR (default: a new runs/tiny_3d/<time> folder) must be new or empty: nothing of an earlier run is touched,
# so resuming one is `bash examples/train_tiny_3d.sh --load runs/tiny_3d/<time>/checkpoints`.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
RUN_DIR=$(new_root "$GIVEN" tiny_3d)
cd "$HC_REPO"
MASTER_PORT=${MASTER_PORT:-29511} hc_torchrun "${NPROC:-8}" pretrain_custom.py --config examples/tiny_3d.yaml \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --micro-batch-size 1 --global-batch-size 4 \
  --run-dir "$RUN_DIR" --save "$RUN_DIR/checkpoints" --save-interval 20 "$@"
