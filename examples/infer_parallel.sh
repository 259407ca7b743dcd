#!/usr/bin/env bash
# Parallel sampling with the sharded training model: world = TP x CP x CFG processes.
#   bash examples/infer_parallel.sh                     # tiny demo on CPU: TP 2 x CFG 2 = 4 processes
#   TP=1 CP=2 CP_MODE=ring CFG=2 bash examples/infer_parallel.sh
# Without CHECKPOINT it samples the tiny real-data model under ROOT (default runs/tiny_data), training it
# first with examples/train_tiny_data.sh when missing (about 30 s on 2 cores), with the jobs of
# examples/tiny_jobs.yaml (text-to-video, identity, audio with the tone muxed into the mp4) into $OUT.
# For the 13B model on 8 GPUs, see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TP=${TP:-2}
CP=${CP:-1}
CP_MODE=${CP_MODE:-ulysses}
CFG=${CFG:-2}
ROOT=${ROOT:-runs/tiny_data}
OUT=${OUT:-$ROOT/samples}
EXTRA=${EXTRA:---height 32 --width 48 --frames 9 --steps 8 --text-len 256}

if [ -z "${CHECKPOINT:-}" ]; then
    CHECKPOINT=$ROOT/checkpoints
    ENCODERS=$ROOT/dataset/encoders
    [ -e "$CHECKPOINT/latest" ] || bash examples/train_tiny_data.sh "$ROOT"
    mkdir -p "$OUT"
    sed "s#runs/tiny_data#$ROOT#g" examples/tiny_jobs.yaml > "$OUT/jobs.yaml"  # the jobs' paths, under ROOT
    JOBS=${JOBS:-$OUT/jobs.yaml}
fi
: "${ENCODERS:?set ENCODERS (folder with llava/ clip/ whisper/ vae/) with CHECKPOINT}"
: "${JOBS:?set JOBS (a YAML list of jobs) with CHECKPOINT}"
torchrun --nproc-per-node $((TP * CP * CFG)) --master-port ${MASTER_PORT:-29500} -m hcustom_mc.sample \
    --checkpoint "$CHECKPOINT" --encoders-dir "$ENCODERS" --jobs "$JOBS" --out "$OUT" \
    --tp "$TP" --cp "$CP" --cp-mode "$CP_MODE" --cfg-parallel "$CFG" $EXTRA
ls -l "$OUT"
