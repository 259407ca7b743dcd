#!/usr/bin/env bash
# Parallel sampling with the sharded training model: world = TP x CP x CFG-parallel processes.
#   bash examples/infer_parallel.sh [extra sampler flags]   # tiny demo on CPU: TP 2 x CFG-parallel 2 = 4 processes
#   TP=1 CP=2 CP_MODE=ring CFG=2 bash examples/infer_parallel.sh
# One process (one GPU), in one of the sampler's memory and speed modes (README "Sampling on one GPU"):
#   MODE=blocks bash examples/infer_parallel.sh     # --offload blocks: the DiT's blocks streamed from host memory
#   MODE=encoders | MODE=auto | MODE=none           # the encoders in turn / the planner's choice / all resident
#   MODE=fp8 bash examples/infer_parallel.sh        # --fp8-weights on (blocks' weights kept fp8)
#   MODE=cache bash examples/infer_parallel.sh      # --cache-threshold 0.05 (identity-aware step cache)
#   MODE=blocks bash examples/infer_parallel.sh --fp8-weights on --cache-threshold 0.05   # modes combine
# Without CHECKPOINT it samples the tiny real-data model under ROOT (default: the newest runs/tiny_data run),
# trained first with examples/train_tiny_data.sh when ROOT has none (about a minute on 2 cores), with the jobs
# of examples/tiny_jobs.yaml (text-to-video, identity, audio with the tone muxed into the mp4). Each invocation
# writes into a new folder OUT (default ROOT/samples/<time>); the sampler refuses to replace existing outputs.
# For the 13B model on 8 GPUs, see the README.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
TP=${TP:-2}
CP=${CP:-1}
CP_MODE=${CP_MODE:-ulysses}
CFG=${CFG:-2}
EXTRA=${EXTRA:---height 32 --width 48 --frames 9 --steps 8 --text-len 256}
MODE=${MODE:-}
MODE_FLAGS=()
case $MODE in
    "") ;;
    auto | none | encoders | blocks) MODE_FLAGS=(--offload "$MODE") ;;
    fp8) MODE_FLAGS=(--fp8-weights on) ;;
    cache) MODE_FLAGS=(--cache-threshold 0.05) ;;
    *) echo "error: MODE=$MODE: one of auto, none, encoders, blocks, fp8, cache" >&2; exit 2 ;;
esac
if [ -n "$MODE" ]; then TP=1; CP=1; CFG=1; fi  # the one-GPU modes run one process
GIVEN_OUT=${OUT:-}
if [ -z "${CHECKPOINT:-}" ]; then
    if [ -n "${ROOT:-}" ]; then
        ROOT=$(realpath -m "$ROOT")
        [ -e "$ROOT/checkpoints/latest" ] || bash "$HC_REPO/examples/train_tiny_data.sh" "$ROOT"
    else
        [ -e "$HC_RUNS/tiny_data/latest/checkpoints/latest" ] || bash "$HC_REPO/examples/train_tiny_data.sh"
        ROOT=$(realpath "$HC_RUNS/tiny_data/latest")
    fi
    [ -e "$ROOT/checkpoints/latest" ] || { echo "error: $ROOT has no trained checkpoint (checkpoints/latest)" >&2; exit 2; }
    CHECKPOINT=$ROOT/checkpoints
    ENCODERS=$ROOT/dataset/encoders
    OUT=$(new_root "$GIVEN_OUT" "$ROOT/samples")
    sed "s#runs/tiny_data#$ROOT#g" "$HC_REPO/examples/tiny_jobs.yaml" > "$OUT/jobs.yaml"  # the jobs' paths, under ROOT
    JOBS=${JOBS:-$OUT/jobs.yaml}
else
    OUT=$(new_root "$GIVEN_OUT" samples)
fi
: "${ENCODERS:?set ENCODERS (folder with llava/ clip/ whisper/ vae/) with CHECKPOINT}"
: "${JOBS:?set JOBS (a YAML list of jobs) with CHECKPOINT}"
cd "$HC_REPO"
# shellcheck disable=SC2086  # EXTRA is a list of flags
hc_torchrun $((TP * CP * CFG)) -m hcustom_mc.sample \
    --checkpoint "$CHECKPOINT" --encoders-dir "$ENCODERS" --jobs "$JOBS" --out "$OUT" \
    --tp "$TP" --cp "$CP" --cp-mode "$CP_MODE" --cfg-parallel "$CFG" $EXTRA ${MODE_FLAGS[@]+"${MODE_FLAGS[@]}"} "$@"
echo "samples: $OUT (per job NAME.mp4, NAME.png contact sheet, NAME.json settings)"
echo "note: the tiny demo's encoders and DiT are random and trained for seconds, so the pictures are meaningless;"
echo "      the demo shows the parallel pipeline end to end, not image quality"
