#!/usr/bin/env bash
# The main-job demo: train the tiny HunyuanCustom DiT on synthetic latents on CPU with a real 3D
# layout (8 processes = TP 2 x PP 2 x DP 2, distributed optimizer), log to MLflow, save a checkpoint.
#   bash examples/train_tiny_3d.sh [RUN_DIR] [extra pretrain_custom.py flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/tiny_3d}; shift || true
NPROC=${NPROC:-8}
export OMP_NUM_THREADS=1
rm -rf "$RUN_DIR"
python -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
  pretrain_custom.py --config examples/tiny_3d.yaml \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --micro-batch-size 1 --global-batch-size 4 \
  --run-dir "$RUN_DIR" --save "$RUN_DIR/checkpoints" --save-interval 20 "$@"
python - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient

run_dir = Path(sys.argv[1]).resolve()
client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
run = client.search_runs([client.get_experiment_by_name("hcustom-mc").experiment_id])[0]
loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
print(f"MLflow run {run.info.run_id}: {len(loss)} steps, mean loss first 5 {first:.4f} -> last 5 {last:.4f}")
print("checkpoint:", (run_dir / "checkpoints" / "latest").read_text().strip())
PY
