#!/usr/bin/env bash
# Validation during training on CPU: the tiny DiT trains 6 steps with TP 2 (2 processes) and EMA, and every 2 steps
# samples the jobs of examples/tiny_eval_jobs.yaml with the weights being trained (the EMA), writes the videos and
# contact sheets to ROOT/train/validation/step_N/, scores them and logs everything to MLflow (about a minute).
#   bash examples/train_tiny_validation.sh [ROOT] [extra pretrain_custom.py flags]
# ROOT (default: a new runs/tiny_validation/<time>; runs/tiny_validation/latest points at the newest) must be new
# or empty. It gets the tiny dataset (identity images, tones) with its tiny encoders, and tiny random stand-ins for
# the metrics' models: the pictures and the scores are meaningless; the demo shows the path end to end.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
ROOT=$(new_root "$GIVEN" tiny_validation)
cd "$HC_REPO"
python examples/make_tiny_dataset.py --out "$ROOT/dataset" --num-samples 4 --frames 9 --encoders >/dev/null
python examples/make_tiny_eval_models.py "$ROOT/eval_models" >/dev/null
sed "s#runs/tiny_data#$ROOT#g" examples/tiny_eval_jobs.yaml > "$ROOT/eval_jobs.yaml"
ENC="data.encoders={llava: $ROOT/dataset/encoders/llava, clip: $ROOT/dataset/encoders/clip, whisper: $ROOT/dataset/encoders/whisper, vae: $ROOT/dataset/encoders/vae}"
hc_torchrun 2 pretrain_custom.py --config examples/tiny_3d.yaml --set "$ENC" --tensor-model-parallel-size 2 \
    --train-iters 6 --ema-decay 0.9 --eval-jobs "$ROOT/eval_jobs.yaml" --eval-interval 2 \
    --eval-models "$ROOT/eval_models" --save "$ROOT/checkpoints" --run-dir "$ROOT/train" "$@"
echo "validation videos and scores: $ROOT/train/validation/step_*/ (NAME.mp4, NAME.png, scores.md, scores.json)"
echo "in MLflow: metrics val/* and loss/<task>, artifacts validation/step_*: mlflow ui --backend-store-uri sqlite:///$ROOT/train/mlflow.db"
