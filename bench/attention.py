"""Benchmark the joint-attention kernels at 13B head geometry, and the cost of a padded CFG batch.

    python bench/attention.py                                   # CPU: a small shape (proves the paths run)
    python bench/attention.py --seq 16384,65536 --dtype bf16 --out bench/results/attention_h100.md   # GPU
    python bench/attention.py --seq 122000 --heads 6 ...          # 720p x 129 frames, heads per rank at TP4

13B geometry: 24 heads x 128 (pass --heads 24/TP for one tensor-parallel rank); 720p x 129 frames is
about 119k image + 256 text tokens. For every kernel usable here (hcustom_mc/segments.py's dispatch order,
plus `blockwise`, the plain-torch tile kernel of ring attention, and on a GPU `blockwise-triton`, its fused
Triton tiles) the table gives the median forward and
forward + backward time and the achieved TFLOP/s, counted as
    forward  = 4 * B * H * S^2 * D          (two S x S x D matmuls, non-causal)
    backward = 2.5 x forward                (five matmuls; recomputation is not counted)
Padded CFG batch: batch 2 = [prompt with all text valid ; negative prompt with --neg-valid valid text
tokens] through the padded path (one call per segment kind), against one unpadded call of the same
batch and length (what padding would cost if it were free) and the per-sample loop it replaces.
Absolute numbers mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.checkout import use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed

from bench.report import append_jsonl, median_seconds, write_report  # noqa: E402
from hcustom_mc import segments as attention  # noqa: E402
from hcustom_mc.segments import Segments  # noqa: E402
from hcustom_mc.parallel import blockwise  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, warmup: int, iters: int) -> float:
    return median_seconds(fn, warmup, iters, torch.cuda.is_available())


def forward_flops(B: int, H: int, S: int, D: int) -> float:
    return 4.0 * B * H * S * S * D


def _blockwise(q, k, v, segments: Segments, backward: bool, tiles: str = "torch"):
    """The ring's tile kernel on one rank (all keys local), forward and optionally its flash-style backward
    (recomputed per tile from the log-sum-exp), exactly as ring attention runs them per chunk; `tiles`: the
    plain-torch tiles or the fused Triton kernels (kernels/hcustom_kernels/block_attention.py)."""
    os.environ["HCUSTOM_RING_TILES"] = tiles
    S, B, H, D = q.shape
    qb, kb, vb = (t.detach().permute(1, 2, 0, 3) for t in (q, k, v))
    pos = torch.arange(S, device=q.device)
    pad = pos[None, :] >= torch.tensor(segments.valid, device=q.device)[:, None]
    padding = blockwise.Padding(pad, min(segments.valid), pad, min(segments.valid))
    wd, scale = blockwise.work_dtype(q.dtype), 1 / math.sqrt(D)
    out = torch.zeros(B, H, S, D, dtype=wd, device=q.device)
    lse = torch.full((B, H, S), -math.inf, dtype=wd, device=q.device)
    blockwise.forward_into(qb, kb, vb, padding, scale, out, lse)
    if backward:
        dout = torch.ones_like(qb)
        delta = (dout.to(wd) * out).sum(-1)
        grads = [torch.zeros(B, H, S, D, dtype=wd, device=q.device) for _ in range(3)]
        blockwise.backward_into(qb, kb, vb, dout, lse, delta, padding, scale, *grads)
    return out


def run_backend(name: str, q, k, v, segments: Segments, fn_backward: bool):
    """A callable running `name` once (forward, or forward + backward)."""
    if name in ("blockwise", "blockwise-triton"):
        tiles = "triton" if name == "blockwise-triton" else "torch"
        return lambda: _blockwise(q, k, v, segments, fn_backward, tiles)

    def fwd():
        os.environ["HCUSTOM_ATTN_BACKEND"] = name
        return attention.segment_attention(q, k, v, segments)
    if not fn_backward:
        return fwd

    def step():
        out = fwd()
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None
    return step


def kernel_table(args, device, dtype) -> str:
    cap = torch.cuda.get_device_capability() if device.type == "cuda" else None
    available = attention.available_backends(args.heads, args.head_dim)
    names = [n for n in attention.backend_order(device.type, dtype, cap) if available.get(n)]
    names.append("blockwise")
    if device.type == "cuda":  # the fused ring tiles (on CPU they would run in the Triton interpreter)
        names.append("blockwise-triton")
    rows = ["| backend | seq | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|"]
    for S in args.seq:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(S, args.batch, args.heads, args.head_dim, generator=g, device=device, dtype=dtype)
                   .requires_grad_() for _ in range(3))
        seg = Segments(S, [S] * args.batch)
        flops = forward_flops(args.batch, args.heads, S, args.head_dim)
        for name in names:
            if name == "blockwise" and args.skip_blockwise_above and S > args.skip_blockwise_above:
                continue
            try:
                with torch.no_grad():
                    t_f = timed(run_backend(name, q, k, v, seg, False), args.warmup, args.iters)
                t_fb = timed(run_backend(name, q, k, v, seg, True), args.warmup, args.iters)
            except Exception as exc:  # a kernel that refuses this shape/dtype: say so, keep going
                rows.append(f"| {name} | {S} | failed: {type(exc).__name__}: {str(exc)[:60]} | | | |")
                record = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            else:
                rows.append(f"| {name} | {S} | {t_f * 1e3:.2f} | {flops / t_f / 1e12:.3g} | {t_fb * 1e3:.2f} | "
                            f"{3.5 * flops / t_fb / 1e12:.3g} |")
                record = {"fwd_s": t_f, "fwd_tflops": flops / t_f / 1e12, "fwd_bwd_s": t_fb,
                          "fwd_bwd_tflops": 3.5 * flops / t_fb / 1e12}
            append_jsonl(args.jsonl, {"bench": "attention", "backend": name, "seq": S, "batch": args.batch,
                                      "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
                                      "device": str(device), **record})
            print(rows[-1], flush=True)  # a run cut short by its time box still shows the rows it measured
        del q, k, v
    os.environ.pop("HCUSTOM_ATTN_BACKEND", None)
    os.environ.pop("HCUSTOM_RING_TILES", None)
    return "\n".join(rows)


def cfg_table(args, device, dtype) -> str:
    """Padded CFG batch vs one unpadded call at the same shape, plus the per-sample loop it replaced."""
    rows = ["| seq | text | neg valid | padded batch ms | unpadded call ms | padded / unpadded | per-sample loop ms |",
            "|---|---|---|---|---|---|---|"]
    for S in args.seq:
        L = min(args.text_len, S // 4)  # text is a small tail of a video sequence
        seg = Segments(S, [S, S - L + min(args.neg_valid, L)])
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(S, 2, args.heads, args.head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
        bh = [t.permute(1, 2, 0, 3) for t in (q, k, v)]
        with torch.no_grad():
            padded = timed(lambda: attention.segment_attention(q, k, v, seg), args.warmup, args.iters)
            plain = timed(lambda: F.scaled_dot_product_attention(*bh), args.warmup, args.iters)
            looped = timed(lambda: attention.sdpa_segment_attention_looped(q, k, v, seg), args.warmup, args.iters)
        rows.append(f"| {S} | {L} | {min(args.neg_valid, L)} | {padded * 1e3:.2f} | {plain * 1e3:.2f} | "
                    f"{padded / plain:.2f} | {looped * 1e3:.2f} |")
        append_jsonl(args.jsonl, {"bench": "attention_cfg", "seq": S, "text": L, "neg_valid": min(args.neg_valid, L),
                                  "padded_s": padded, "unpadded_s": plain, "looped_s": looped, "device": str(device)})
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--seq", default="16384,65536" if gpu else "1024", help="comma-separated sequence lengths")
    p.add_argument("--heads", type=int, default=24 if gpu else 2, help="heads (24 = 13B; 24/TP per rank)")
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if gpu else "fp32")
    p.add_argument("--text-len", type=int, default=256, help="text tokens of the CFG case")
    p.add_argument("--neg-valid", type=int, default=5, help="valid text tokens of the negative prompt")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-blockwise-above", type=int, default=32768,
                   help="skip the (slow, plain-torch) blockwise tiles above this length; 0 = never")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    p.add_argument("--jsonl", type=Path, help="append each measured row here as one JSON line, as it is measured")
    args = p.parse_args(argv)
    args.seq = [int(s) for s in args.seq.split(",")]
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if gpu else "CPU"
    text = (f"device: {name}; dtype {args.dtype}; batch {args.batch}; heads {args.heads} x {args.head_dim}; "
            f"torch {torch.__version__}\n\nTFLOP/s: forward = 4 B H S^2 D, backward = 2.5 x forward.\n\n"
            f"{kernel_table(args, device, dtype)}\n\nPadded CFG batch (2 samples, one with padded text), "
            f"dispatched path:\n\n{cfg_table(args, device, dtype)}")
    write_report(args.out, "Attention kernels", text, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
