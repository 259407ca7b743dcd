#!/usr/bin/env bash
# Multi-node training: torchrun's agent and flags through hcustom_mc.launch (the same elastic agent; a failed
# rank prints one line instead of torchrun's traceback). Run the same command on every node (node ranks are assigned by
# the c10d rendezvous, so no NODE_RANK is needed):
#
#   NNODES=8 MASTER_ADDR=node0.cluster bash examples/13b/train_multinode.sh examples/13b/audio_720p_64gpu.yaml \
#       --pretrained models/hunyuancustom_720P/mp_rank_00_model_states.pt --data-path data/shards
#
# Environment: NNODES and MASTER_ADDR (a host every node reaches; node 0 is a good choice) are required;
# NPROC_PER_NODE (default 8), MASTER_PORT (29500), RDZV_ID (a job id shared by all nodes; default from the
# recipe name) are optional. Arguments after the recipe go to pretrain_custom.py and win over the recipe.
# Set DRY_RUN=1 to print the command instead of running it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage="usage: NNODES=N MASTER_ADDR=HOST bash $0 RECIPE.yaml [pretrain_custom.py flags...]"
RECIPE="${1:?$usage}"
shift
: "${NNODES:?$usage}" "${MASTER_ADDR:?$usage}"
[[ -f "$RECIPE" ]] || { echo "no recipe file $RECIPE" >&2; exit 2; }
RECIPE="$(cd "$(dirname "$RECIPE")" && pwd)/$(basename "$RECIPE")"  # the command may run from elsewhere

cmd=("${PYTHON:-python}" -m hcustom_mc.launch
  --nnodes "$NNODES" --nproc-per-node "${NPROC_PER_NODE:-8}"
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
  --rdzv-id "${RDZV_ID:-hcustom-$(basename "$RECIPE" .yaml)}"
  --max-restarts 0  # a failed rank ends the job; rerun the same command to resume from --load
  "$REPO/pretrain_custom.py" --config "$RECIPE" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
