#!/usr/bin/env bash
# Parallel sampling with the sharded training model: world = TP x CP x CFG processes.
#   bash examples/infer_parallel.sh                     # tiny demo on CPU: TP 2 x CFG 2 = 4 processes
#   TP=1 CP=2 CP_MODE=ring CFG=2 bash examples/infer_parallel.sh
# Without CHECKPOINT it first runs examples/train_tiny_data.sh (tiny dataset, encoders and a trained
# checkpoint, about 30 s on 2 cores), then samples examples/tiny_jobs.yaml (text-to-video, identity,
# audio with the tone muxed into the mp4) into $OUT. For the 13B model on 8 GPUs, see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TP=${TP:-2}
CP=${CP:-1}
CP_MODE=${CP_MODE:-ulysses}
CFG=${CFG:-2}
OUT=${OUT:-runs/tiny_data/samples}
CHECKPOINT=${CHECKPOINT:-runs/tiny_data/checkpoints}
ENCODERS=${ENCODERS:-runs/tiny_data/dataset/encoders}
JOBS=${JOBS:-examples/tiny_jobs.yaml}
EXTRA=${EXTRA:---height 32 --width 48 --frames 9 --steps 8 --text-len 256}

if [ ! -e "$CHECKPOINT" ] && [ "$CHECKPOINT" = runs/tiny_data/checkpoints ]; then
    bash examples/train_tiny_data.sh
fi
torchrun --nproc-per-node $((TP * CP * CFG)) -m hcustom_mc.sample \
    --checkpoint "$CHECKPOINT" --encoders-dir "$ENCODERS" --jobs "$JOBS" --out "$OUT" \
    --tp "$TP" --cp "$CP" --cp-mode "$CP_MODE" --cfg-parallel "$CFG" $EXTRA
ls -l "$OUT"
