#!/usr/bin/env bash
# Multi-subject fine-tuning from a released single-subject checkpoint, end to end on CPU (about a minute on 2 cores):
#   1. a tiny random *base* DiT written as a released checkpoint (the stand-in for hunyuancustom_720P)
#   2. a small real dataset with 1, 2 and 3 subjects per clip (manifest tasks identity and multi_identity) + tiny
#      encoders -> preprocessing into shards in paper mode (2 ranks)
#   3. --pretrained: the release weights loaded into a paper-mode model taking up to 3 identity images (image k at
#      RoPE t=-k, h=i+H', w=j+W'; pass --identity-rope release_spatial for t=-k, h=i, w=j+W'), trained at TP 2 on
#      batches of one K each, with each subject's image dropped to the null (white) image on its own draw
#   bash examples/finetune_multi_subject_tiny.sh [ROOT] [extra pretrain_custom.py flags]
# ROOT (default: a new runs/finetune_multi_subject_tiny/<time> folder) must be new or empty: nothing of an earlier
# run is touched.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
ROOT=$(new_root "$GIVEN" finetune_multi_subject_tiny)
cd "$HC_REPO"
ENC="data.encoders={llava: $ROOT/dataset/encoders/llava, clip: $ROOT/dataset/encoders/clip, vae: $ROOT/dataset/encoders/vae}"
# the run's data and model settings, shared by preprocessing and training (the shards must match the model)
RUN=(--config examples/tiny_data.yaml --set "$ENC" --variant base --mode paper --max-identity-images 3
     --set "data.task_weights={identity: 1.0, multi_identity: 1.0}" --set data.text_len=128)

python examples/make_tiny_release.py "$ROOT/release" --variant base
python examples/make_tiny_dataset.py --out "$ROOT/dataset" --num-samples 12 --frames 17 --encoders \
    --tasks identity multi_identity --multi-subjects 2 3
hc_torchrun 2 tools/preprocess.py "${RUN[@]}" --data-path "$ROOT/dataset/manifest.jsonl" --out "$ROOT/shards" \
    --shard-size 4 --no-progress
hc_torchrun 2 pretrain_custom.py "${RUN[@]}" --data-type shards --data-path "$ROOT/shards" \
    --tensor-model-parallel-size 2 --pretrained "$ROOT/release" --set data.identity_drop=0.2 --train-iters 6 \
    --lr-warmup-iters 1 --save "$ROOT/checkpoints" --run-dir "$ROOT/train" "$@"
LAST="$ROOT/checkpoints/$(cat "$ROOT/checkpoints/latest")"
python - "$LAST/hcustom_model.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
print(f"model config saved with the checkpoint: mode {cfg['mode']}, max_identity_images {cfg['max_identity_images']}, "
      f"identity_rope {cfg['identity_rope']} (the sampler reads it back)")
EOF
echo "fine-tuned checkpoint: $LAST"
echo "shards (one K per batch): $ROOT/shards; training log and history.json: $ROOT/train"
