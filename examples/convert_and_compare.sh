#!/usr/bin/env bash
# Tiny end-to-end check of the checkpoint tools on CPU (a minute on 2 cores):
# diffusers folder -> release file -> megatron-core checkpoint written at TP=2 -> compared with
# diffusers at TP=2 and TP=1 -> back to release, bit-exact with the first release file.
#   bash examples/convert_and_compare.sh [OUT]
# OUT (default: a new runs/convert_and_compare/<time> folder) must be new or empty: nothing earlier is touched.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUT=$(new_root "${1:-${OUT:-}}" convert_and_compare)
cd "$HC_REPO"
python examples/make_tiny_diffusers.py "$OUT/diffusers"
python -m hcustom_mc.checkpoint.convert --src "$OUT/diffusers" --src-format diffusers \
    --dst "$OUT/release" --dst-format release --model-config tiny
hc_torchrun 2 -m hcustom_mc.checkpoint.convert --src "$OUT/release" --src-format release \
    --dst "$OUT/mcore_tp2" --dst-format mcore --model-config tiny --tp 2
hc_torchrun 2 -m hcustom_mc.checkpoint.compare --reference-diffusers "$OUT/diffusers" \
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
echo "outputs: $OUT (diffusers/, release/, mcore_tp2/, release_back/)"
