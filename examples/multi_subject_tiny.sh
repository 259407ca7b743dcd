#!/usr/bin/env bash
# Multi-subject customisation end to end on CPU, the whole path a user walks (about a minute on 2 cores):
#   1. a tiny random *base* DiT written as a released checkpoint (the stand-in for hunyuancustom_720P)
#   2. a tiny raw dataset: clips of two coloured shapes, the caption naming both ("a red square ... and a blue
#      circle ..."), each subject given as its box in a frame of the clip's later part (no identity images yet)
#   3. subject extraction (tools/extract_subjects.py, 2 ranks): identity crops from the crop segment, the clip's
#      first part re-encoded as the training video, the two never overlapping (the paper's split, scaled to the
#      0.68 s clips: train 0-0.36 s, crops 0.36-0.68 s)
#   4. preprocessing into shards in paper mode with up to 3 identity images (2 ranks)
#   5. fine-tuning from the release checkpoint (--pretrained) at TP 2: image k at RoPE t=-k, h=i+H', w=j+W' (pass
#      --identity-rope release_spatial for the released spatial offsets), each subject's image dropped to the null
#      (white) image on its own draw
#   6. sampling a two-subject job (both phrases and their extracted images) with the fine-tuned checkpoint at TP 2
#   7. scoring it: DINO-Sim per subject (each reference at its best-matching region) and the minimum over subjects
#   bash examples/multi_subject_tiny.sh [ROOT] [extra pretrain_custom.py flags]
# ROOT (default: a new runs/multi_subject_tiny/<time>; runs/multi_subject_tiny/latest points at the newest) must be
# new or empty. The encoders, the DiT and the metrics' models are tiny and random: the pictures and the scores mean
# nothing; the demo shows the path end to end.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GIVEN=""
if [ $# -gt 0 ] && [[ $1 != -* ]]; then GIVEN=$1; shift; fi
ROOT=$(new_root "$GIVEN" multi_subject_tiny)
cd "$HC_REPO"
E=$ROOT/raw/encoders
# the run's data and model settings, shared by preprocessing and training (the shards must match the model)
RUN=(--config examples/tiny_data.yaml --variant base --mode paper --max-identity-images 3
     --set "data.encoders={llava: $E/llava, clip: $E/clip, whisper: $E/whisper, vae: $E/vae}"
     --set "data.task_weights={multi_identity: 1.0}" --set data.text_len=128)

echo "== 1. release checkpoint, raw dataset"
python examples/make_tiny_release.py "$ROOT/release" --variant base
python examples/make_tiny_dataset.py --out "$ROOT/raw" --num-samples 8 --frames 17 --encoders \
    --tasks multi_identity --multi-subjects 2 --boxes-from-frame 9
echo "== 2. subject extraction"
hc_torchrun 2 tools/extract_subjects.py --manifest "$ROOT/raw/manifest.jsonl" --out "$ROOT/extracted" \
    --train-end 0.36 --crop-start 0.36 --crop-end 0.68 --no-progress
echo "== 3. preprocessing (paper mode)"
hc_torchrun 2 tools/preprocess.py "${RUN[@]}" --data-path "$ROOT/extracted/manifest.jsonl" --out "$ROOT/shards" \
    --shard-size 4 --no-progress
echo "== 4. fine-tuning from the release checkpoint"
hc_torchrun 2 pretrain_custom.py "${RUN[@]}" --data-type shards --data-path "$ROOT/shards" \
    --tensor-model-parallel-size 2 --pretrained "$ROOT/release" --set data.identity_drop=0.2 --train-iters 10 \
    --lr-warmup-iters 1 --save "$ROOT/checkpoints" --run-dir "$ROOT/train" "$@"
echo "== 5. sampling a two-subject job"
# the job: the last clip's caption and its two extracted subjects (phrase + image)
python - "$ROOT" <<'PY'
import json, sys
root = sys.argv[1]
last = [json.loads(line) for line in open(f"{root}/extracted/manifest.jsonl")][-1]
subjects = "".join(f"\n    - [{s['name']}, {root}/extracted/{s['image']}]" for s in last["subjects"])
with open(f"{root}/jobs.yaml", "w") as f:
    f.write(f"- task: multi_identity\n  prompt: {last['caption']}\n  subjects:{subjects}\n  seed: 1\n")
PY
hc_torchrun 2 -m hcustom_mc.sample --checkpoint "$ROOT/checkpoints" --encoders-dir "$E" --jobs "$ROOT/jobs.yaml" \
    --out "$ROOT/samples" --tp 2 --height 32 --width 48 --frames 9 --steps 8 --text-len 256
echo "== 6. per-subject scores"
python examples/make_tiny_eval_models.py "$ROOT/eval_models" >/dev/null
python -m hcustom_mc.eval "$ROOT/samples" --models "$ROOT/eval_models" >/dev/null
python - "$ROOT/samples/eval/scores.json" <<'PY'
import json, sys
for job in json.load(open(sys.argv[1]))["jobs"]:
    per = {k.split("/", 1)[1]: v for k, v in job.items() if k.startswith("dino_sim/")}
    print(f"{job['name']}: DINO-Sim " + ", ".join(f"{name} {v:.4f}" for name, v in per.items())
          + f"; mean {job['dino_sim']:.4f}, min over subjects {job['dino_sim_min']:.4f} ({job['dino_sim_region']})")
    face = "n/a" if job["face_sim"] is None else f"{job['face_sim']:.4f}, min over subjects {job['face_sim_min']:.4f}"
    print(f"{job['name']}: Face-Sim {face}" + (f" ({job['face_sim_note']})" if job.get("face_sim_note") else ""))
PY
echo "extracted subjects: $ROOT/extracted (images/, report.json); fine-tuned checkpoint: $ROOT/checkpoints"
echo "two-subject sample: $ROOT/samples (000_multi_identity.mp4, .png contact sheet led by the references, .json)"
echo "scores: $ROOT/samples/eval/scores.md and scores.json (dino_sim/<subject>, dino_sim_min, face_sim_min)"
