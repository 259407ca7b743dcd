"""Benchmark the parallel sampler: seconds per denoising step, and its scaling with the number of ranks.

    python bench/sampler.py                                    # tiny model on CPU: 1 rank vs TP2, CP2, CFG2
    python bench/sampler.py --model 13b --double-blocks 2 --single-blocks 4 --size 1280x720 --frames 129 \\
        --dtype bfloat16 --layouts 1 cfg=2 cp=2 tp=2 --out bench/results/sampler_h100.md   # GPUs

Each layout runs under torchrun (world = TP x CP x CFG) with a randomly initialised DiT of the given config
and depth, random conditions (identity image, CFG with two branches), --steps timed steps after --warmup.
A step = one guided Euler step: the branches' forward passes, the CP/CFG gathers and the update. Speedup
is against the first layout, measured in this run on this machine. Weights are random: this times the
sampler, not the model's output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.checkout import pythonpath, use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed

from bench.report import append_jsonl, write_report  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_layout(text: str) -> dict[str, int]:
    """'1' -> one rank; 'tp=2,cfg=2' -> TP 2 x CFG 2; also cp=N and cp_mode=ring."""
    layout = {"tp": 1, "cp": 1, "cfg": 1, "cp_mode": "ulysses"}
    if text != "1":
        for part in text.split(","):
            key, _, value = part.partition("=")
            if key not in layout:
                raise SystemExit(f"bad layout {text!r}: keys are tp, cp, cfg, cp_mode")
            layout[key] = value if key == "cp_mode" else int(value)
    return layout


def worker(args) -> None:
    import torch

    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    lay = parse_layout(args.layout)
    cfg = get_model_config(args.model, "base", num_double_blocks=args.double_blocks, num_single_blocks=args.single_blocks)
    info = initialize_parallel(ParallelConfig(tensor_parallel=lay["tp"], context_parallel=lay["cp"],
                                              cp_mode=lay["cp_mode"]), cfg)
    dtype = getattr(torch, args.dtype)
    model = HunyuanCustomDiT(cfg, params_dtype=dtype, cp_mode=lay["cp_mode"])
    initialize_weights(model, seed=0, zero_init=False)
    model = model.to(info.device).eval().requires_grad_(False)
    w, h = (int(v) for v in args.size.lower().split("x"))
    f, lh, lw = (args.frames - 1) // 4 + 1, h // 8, w // 8
    g = torch.Generator().manual_seed(0)

    def branch():
        L = args.text_len
        return {"text_states": torch.randn(1, L, cfg.text_dim, generator=g).to(dtype),
                "text_mask": torch.ones(1, L, dtype=torch.long), "text_pooled": torch.randn(1, cfg.pooled_text_dim, generator=g),
                "identity_latents": torch.randn(1, cfg.in_channels, 1, lh, lw, generator=g).to(dtype)}

    branches = {"uncond": branch(), "cond": branch()}
    sampler = ParallelSampler(model, SamplerLayout(lay["tp"], lay["cp"], lay["cp_mode"], lay["cfg"]))
    noise = torch.randn(1, cfg.in_channels, f, lh, lw, generator=g)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    sampler.sample(noise, branches, args.warmup, 7.0, cfg_scale=7.5)  # warm-up (allocations, kernels)
    sync()
    t0 = time.perf_counter()
    sampler.sample(noise, branches, args.steps, 7.0, cfg_scale=7.5)
    sync()
    per_step = (time.perf_counter() - t0) / args.steps
    if info.rank == 0:
        tokens = (1 + f) * (lh // 2) * (lw // 2)
        print("RESULT " + json.dumps({"layout": args.layout, "world": info.world_size, "s_per_step": per_step,
                                      "image_tokens": tokens, "device": str(info.device)}), flush=True)
    destroy_parallel()


def driver(args, argv) -> int:
    rows = []
    for text in args.layouts:
        lay = parse_layout(text)
        world = lay["tp"] * lay["cp"] * lay["cfg"]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", __file__, "--worker", "--layout", text,
               *[x for k in ("model", "double_blocks", "single_blocks", "size", "frames", "text_len", "dtype", "steps",
                             "warmup") for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]]
        # the checkout first, then what the caller had (e.g. bench/gpu_check.sh's wheel folder)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": pythonpath()}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"layout {text} failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        append_jsonl(args.jsonl, {"bench": "sampler", **rows[-1], "size": args.size, "frames": args.frames,
                                  "model": args.model, "dtype": args.dtype})
        print(f"{text}: {rows[-1]['s_per_step'] * 1e3:.1f} ms/step", flush=True)
    base = rows[0]["s_per_step"]
    lines = [f"model {args.model} ({args.double_blocks} double + {args.single_blocks} single blocks), {args.size} x "
             f"{args.frames} frames ({rows[0]['image_tokens']} image tokens), text {args.text_len}, {args.dtype}, "
             f"CFG 2 branches, {args.steps} timed steps after {args.warmup}; device {rows[0]['device']}",
             "", "| layout | ranks | s / step | speedup vs first |", "|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['world']} | {r['s_per_step']:.4f} | {base / r['s_per_step']:.2f}x |" for r in rows]
    write_report(args.out, "Sampler step time", "\n".join(lines), argv)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["1", "tp=2", "cp=2", "cp=2,cp_mode=ring", "cfg=2"])
    p.add_argument("--model", default="tiny", help="tiny | 13b | ModelConfig file (width, heads)")
    p.add_argument("--double-blocks", type=int, default=2)
    p.add_argument("--single-blocks", type=int, default=2)
    p.add_argument("--size", default="64x48", help="video WxH in pixels (latent /8)")
    p.add_argument("--frames", type=int, default=17, help="pixel frames, 4k+1")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--jsonl", type=Path, help="append each layout's result here as one JSON line, as it is measured")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
