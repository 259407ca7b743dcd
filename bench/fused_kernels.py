"""Benchmark the fused glue kernels against eager PyTorch and torch.compile of the same reference.

    python bench/fused_kernels.py                       # CPU: a tiny shape in Triton's interpreter (proves it runs)
    python bench/fused_kernels.py --shape 720p --dtype bf16 --out bench/results/kernels_h100.md   # on a GPU

Shapes (13B: 24 heads x 128, hidden 3072, audio head 1024, 16 audio tokens per frame):
  720p: 33 latent frames x 45 x 80 = 118,800 video + 3,600 identity tokens (+256 text)
  544p: 33 latent frames x 34 x 60 =  67,320 video + 2,040 identity tokens (+256 text)
For every kernel: forward time and forward+backward time of ours, eager, and torch.compile(eager),
measured side by side in one run; achieved GB/s of our forward (bytes each kernel must move, from
the kernel module) and the percent of the device's HBM peak; speed-up ratios. Absolute figures are
only meaningful on a GPU; on CPU the interpreter runs (far slower than eager) only to prove the path.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.checkout import use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed
from hcustom_mc.device import uses_cuda  # noqa: E402  (imports only torch: triton is not loaded yet)

CUDA = uses_cuda()  # False on a CPU host and under HCUSTOM_DIST_BACKEND=gloo: then the interpreter runs
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bench.report import append_jsonl, median_seconds, write_report  # noqa: E402

# HBM bandwidth per card, TB/s (data sheets), by the exact torch.cuda.get_device_name(): an H100 PCIe has 2.0,
# an H100 NVL 3.9, an H100 SXM 3.35, so a name containing "H100" is not enough
HBM_TBPS = {"NVIDIA H100 80GB HBM3": 3.35, "NVIDIA H100 NVL": 3.9, "NVIDIA H100 PCIe": 2.0, "NVIDIA H200": 4.8,
            "NVIDIA H200 NVL": 4.8, "NVIDIA A100-SXM4-80GB": 2.039, "NVIDIA A100-SXM4-40GB": 1.555,
            "NVIDIA A100 80GB PCIe": 1.935, "NVIDIA A100-PCIE-40GB": 1.555}
SHAPES = {  # frames, H', W', identity images, text tokens
    "tiny": dict(f=2, hp=3, wp=4, K=1, L=8, heads=2, head_dim=16, rope_dims=(4, 6, 6), hidden=64, audio_dim=32),
    "544p": dict(f=33, hp=34, wp=60, K=1, L=256, heads=24, head_dim=128, rope_dims=(16, 56, 56), hidden=3072, audio_dim=1024),
    "720p": dict(f=33, hp=45, wp=80, K=1, L=256, heads=24, head_dim=128, rope_dims=(16, 56, 56), hidden=3072, audio_dim=1024),
}


def timed(fn, warmup: int, iters: int) -> float:
    return median_seconds(fn, warmup, iters, CUDA)


def make_cases(shape: dict, device, dtype):
    """name -> (ours(*inputs), reference(*inputs), make_inputs(), bytes_moved(inputs))."""
    from hcustom_kernels import adaln, frame_attention, rope

    S_img = (shape["K"] + shape["f"]) * shape["hp"] * shape["wp"]
    S = S_img + shape["L"]
    H, D, C, A = shape["heads"], shape["head_dim"], shape["hidden"], shape["audio_dim"]
    grid = (shape["f"], shape["hp"], shape["wp"])

    def rand(*size):
        return torch.randn(*size, device=device, dtype=dtype, requires_grad=True)

    rope_kw = dict(grid=grid, num_identity=shape["K"], mode="release", rope_dims=shape["rope_dims"], theta=256.0,
                   eps=1e-6, image_len=S_img, frame_offset=0)
    return {
        "qk_norm_rope": (
            lambda q, k, wq, wk: rope.qk_norm_rope(q, k, wq, wk, **rope_kw),
            lambda q, k, wq, wk: rope.qk_norm_rope_reference(q, k, wq, wk, **rope_kw),
            lambda: (rand(S, 1, H, D), rand(S, 1, H, D), rand(D), rand(D)),
            lambda q, k, wq, wk: rope.rope_bytes_moved(q, k),
        ),
        "frame_cross_attention": (
            frame_attention.frame_cross_attention,
            frame_attention.frame_cross_attention_reference,
            lambda: (rand(1, shape["f"], shape["hp"] * shape["wp"], A), rand(1, shape["f"], 16, A), rand(1, shape["f"], 16, A)),
            lambda q, k, v: frame_attention.frame_attention_bytes_moved(q, k, v),
        ),
        "frame_cross_attention_vs_sdpa": (
            frame_attention.frame_cross_attention,
            frame_attention.frame_cross_attention_sdpa,
            lambda: (rand(1, shape["f"], shape["hp"] * shape["wp"], A), rand(1, shape["f"], 16, A), rand(1, shape["f"], 16, A)),
            lambda q, k, v: frame_attention.frame_attention_bytes_moved(q, k, v),
        ),
        "layernorm_modulate": (
            lambda x, s, c: adaln.layernorm_modulate(x, s, c, eps=1e-6),
            lambda x, s, c: adaln.layernorm_modulate_reference(x, s, c, eps=1e-6),
            lambda: (rand(S, 1, C), rand(1, C), rand(1, C)),
            lambda x, s, c: adaln.adaln_bytes_moved(x),
        ),
        "gated_residual": (
            adaln.gated_residual,
            adaln.gated_residual_reference,
            lambda: (rand(S, 1, C), rand(1, C), rand(S, 1, C)),
            lambda x, g, y: adaln.gated_residual_bytes_moved(x),
        ),
    }


def fwd_bwd(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default=None, help="default: 720p on GPU, tiny on CPU")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--kernels", default=None, help="comma list (default all): qk_norm_rope, frame_cross_attention, "
                   "frame_cross_attention_vs_sdpa, layernorm_modulate, gated_residual")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    p.add_argument("--jsonl", type=Path, help="append each kernel's row here as one JSON line, as it is measured")
    args = p.parse_args(argv)

    cuda = CUDA
    device = torch.device("cuda" if cuda else "cpu")
    shape_name = args.shape or ("720p" if cuda else "tiny")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    warmup, iters = args.warmup or (5 if cuda else 1), args.iters or (20 if cuda else 2)
    use_compile = cuda and not args.no_compile  # inductor on CPU needs a compiler toolchain; GPU is what counts
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    peak = HBM_TBPS.get(name) if cuda else None  # unknown card: no "% of peak" rather than another card's
    cases = make_cases(SHAPES[shape_name], device, dtype)
    wanted = args.kernels.split(",") if args.kernels else list(cases)

    header = ("| kernel | ours fwd ms | eager fwd ms | compile fwd ms | ours fwd+bwd ms | eager fwd+bwd ms | "
              "compile fwd+bwd ms | ours GB/s | % HBM peak | fwd x eager | fwd x compile | fwd+bwd x eager |")
    lines = [f"device: {name}; shape {shape_name}; dtype {str(dtype).split('.')[-1]}; median of {iters} after {warmup} warmup",
             "", header, "|" + "---|" * 12]
    for kname in wanted:
        ours, ref, make, nbytes = cases[kname]
        inputs = make()
        compiled = torch.compile(ref) if use_compile else None
        with torch.no_grad():
            t_ours = timed(lambda: ours(*inputs), warmup, iters)
            t_ref = timed(lambda: ref(*inputs), warmup, iters)
            t_cmp = timed(lambda: compiled(*inputs), warmup, iters) if compiled else None
        b_ours = timed(fwd_bwd(ours, inputs), warmup, iters)
        b_ref = timed(fwd_bwd(ref, inputs), warmup, iters)
        b_cmp = timed(fwd_bwd(compiled, inputs), warmup, iters) if compiled else None
        gbs = nbytes(*inputs) / t_ours / 1e9
        pct = f"{100 * gbs / (peak * 1000):.0f}%" if peak else "n/a"
        ms = lambda t: f"{t * 1e3:.3f}" if t is not None else "n/a"  # noqa: E731
        ratio = lambda a, b: f"{b / a:.2f}x" if b is not None else "n/a"  # noqa: E731
        lines.append(f"| {kname} | {ms(t_ours)} | {ms(t_ref)} | {ms(t_cmp)} | {ms(b_ours)} | {ms(b_ref)} | {ms(b_cmp)} | "
                     f"{gbs:.1f} | {pct} | {ratio(t_ours, t_ref)} | {ratio(t_ours, t_cmp)} | {ratio(b_ours, b_ref)} |")
        print(lines[-1], flush=True)  # row by row: a time-boxed run still shows the kernels it finished
        append_jsonl(args.jsonl, {"bench": "kernels", "kernel": kname, "device": name, "shape": shape_name,
                                  "dtype": str(dtype).split(".")[-1], "ours_fwd_s": t_ours, "eager_fwd_s": t_ref,
                                  "compile_fwd_s": t_cmp, "ours_fwd_bwd_s": b_ours, "eager_fwd_bwd_s": b_ref,
                                  "compile_fwd_bwd_s": b_cmp, "ours_gb_per_s": gbs})
    write_report(args.out, "Kernel benchmark", "\n".join(lines), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
