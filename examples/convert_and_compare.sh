#!/usr/bin/env bash
# Tiny end-to-end check of the checkpoint tools on CPU (a minute on 2 cores):
# diffusers folder -> release file -> megatron-core checkpoint written at TP=2 -> compared with
# diffusers at TP=2 and TP=1 -> back to release, bit-exact with the first release file.
set -euo pipefail
OUT=${OUT:-/tmp/hcustom_mc_demo}
rm -rf "$OUT" && mkdir -p "$OUT"
export OMP_NUM_THREADS=1
python examples/make_tiny_diffusers.py "$OUT/diffusers"
python -m hcustom_mc.checkpoint.convert --src "$OUT/diffusers" --src-format diffusers \
    --dst "$OUT/release" --dst-format release --model-config tiny
torchrun --nproc-per-node 2 -m hcustom_mc.checkpoint.convert --src "$OUT/release" --src-format release \
    --dst "$OUT/mcore_tp2" --dst-format mcore --model-config tiny --tp 2
torchrun --nproc-per-node 2 -m hcustom_mc.checkpoint.compare --reference-diffusers "$OUT/diffusers" \
    --ckpt "$OUT/mcore_tp2" --ckpt-format mcore --tp 2
python -m hcustom_mc.checkpoint.compare --reference-diffusers "$OUT/diffusers" \
    --ckpt "$OUT/mcore_tp2" --ckpt-format mcore --tp 1
python -m hcustom_mc.checkpoint.convert --src "$OUT/mcore_tp2" --src-format mcore \
    --dst "$OUT/release_back" --dst-format release --model-config tiny
python - "$OUT" <<'PY'
import sys, torch
out = sys.argv[1]
a = torch.load(f"{out}/release/mp_rank_00_model_states.pt", weights_only=True)["module"]
b = torch.load(f"{out}/release_back/mp_rank_00_model_states.pt", weights_only=True)["module"]
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "round trip is not bit-exact"
print(f"release -> mcore (TP=2) -> release: {len(a)} tensors bit-exact")
PY
