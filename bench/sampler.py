"""Benchmark the parallel sampler: seconds per denoising step, and its scaling with the number of ranks; or, with
--modes, the one-GPU modes side by side (time, memory and what each costs in quality).

    python bench/sampler.py                                    # tiny model on CPU: 1 rank vs TP2, CP2, CFG2
    python bench/sampler.py --model 13b --double-blocks 2 --single-blocks 4 --size 1280x720 --frames 129 \\
        --dtype bfloat16 --layouts 1 cfg=2 cp=2 tp=2 --out bench/results/sampler_h100.md   # GPUs
    python bench/sampler.py --modes                            # tiny model on CPU: every mode vs resident
    python bench/sampler.py --modes --model 13b --double-blocks 2 --single-blocks 4 --size 848x480 --frames 33 \\
        --steps 12 --dtype bfloat16 --out bench/results/sampler_modes_h100.md      # a GPU, 13B width

--modes runs the real sampler command (`python -m hcustom_mc.sample`, one process) once per mode on the same
identity job: a random DiT of the given config and depth saved as a release checkpoint, tiny random encoders shaped
for it, a random reference image. Modes (MODES below; `+` combines them, e.g. blocks+fp8): resident (--offload
none, the baseline), encoders, blocks, fp8, cache=T. For each: seconds per denoising step (the sidecar's step
times, the first step left out), the peak memory (the sidecar's: the GPU allocator's peak, or on the CPU the
process's peak RSS, which holds everything there), the steps computed, and `python -m hcustom_mc.eval compare
resident MODE` (PSNR and SSIM per frame, each metric's delta; tiny random metric models unless --eval-models).
Weights are random: the time and memory are the model's, the quality deltas show the path, not what the real
13B model loses (its caching decisions follow its own residuals).

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


# mode token -> the sampler's flags (resident is the baseline every other mode is compared with)
MODES = {"resident": ["--offload", "none"], "encoders": ["--offload", "encoders"], "blocks": ["--offload", "blocks"],
         "fp8": ["--fp8-weights", "on"]}
DEFAULT_MODES = ["resident", "encoders", "blocks", "fp8", "cache=0.05", "cache=0.1"]


def mode_flags(mode: str) -> list[str]:
    """'blocks+fp8+cache=0.1' -> the sampler's flags (--offload none unless a token says otherwise)."""
    flags: list[str] = []
    for token in mode.split("+"):
        if token.startswith("cache="):
            flags += ["--cache-threshold", str(float(token.split("=", 1)[1]))]
        elif token in MODES:
            flags += MODES[token]
        else:
            raise SystemExit(f"bad mode {mode!r}: tokens are {', '.join(MODES)} and cache=T, joined by +")
    return flags if "--offload" in flags else ["--offload", "none", *flags]


def _prepare(args, work: Path) -> dict[str, Path]:
    """The checkpoint, encoders, reference image, job file and metric models the modes share."""
    import numpy as np
    import torch
    from PIL import Image

    from hcustom_mc.checkpoint.release import save_release_state_dict
    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.eval.tiny import save_tiny_eval_models
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    cfg = get_model_config(args.model, "base", num_double_blocks=args.double_blocks, num_single_blocks=args.single_blocks)
    paths = {"ckpt": work / "ckpt", "enc": work / "encoders", "config": work / "model_config.json",
             "jobs": work / "jobs.json", "eval_models": args.eval_models or work / "eval_models"}
    paths["config"].write_text(json.dumps(cfg.to_dict()))
    initialize_parallel(ParallelConfig(), cfg)
    try:
        model = HunyuanCustomDiT(cfg, params_dtype=torch.float32, device="cpu")
        initialize_weights(model, seed=0, zero_init=False)
        save_release_state_dict({k: v.to(torch.bfloat16) for k, v in model.weight_state_dict().items()}, paths["ckpt"])
        del model
    finally:
        destroy_parallel()
    save_tiny_encoders(paths["enc"], cfg)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / "ref.png")
    w, h = (int(v) for v in args.size.lower().split("x"))
    paths["jobs"].write_text(json.dumps([{"task": "identity", "prompt": "A man walks along the beach.",
                                          "subjects": [["man", str(work / "ref.png")]], "width": w, "height": h,
                                          "frames": args.frames, "steps": args.steps, "seed": 1}]))
    if args.eval_models is None:
        save_tiny_eval_models(paths["eval_models"])
    return paths


def _run(cmd: list, what: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": pythonpath()}
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return proc.stdout + proc.stderr


def modes(args, argv) -> int:
    """--modes: every mode's sampler run, then compare against resident; one table."""
    import tempfile

    from hcustom_mc import console

    console.setup()  # the known third-party warnings of the imports below
    if "resident" in args.modes:
        args.modes = ["resident"] + [m for m in args.modes if m != "resident"]
    else:
        args.modes = ["resident", *args.modes]
    for mode in args.modes:
        mode_flags(mode)  # a bad mode fails before anything runs
    work = Path(args.work or tempfile.mkdtemp(prefix="hc_sampler_modes_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = _prepare(args, work)
    rows = []
    for mode in args.modes:
        out = work / mode
        _run([sys.executable, "-m", "hcustom_mc.sample", "--checkpoint", paths["ckpt"], "--model-config",
              paths["config"], "--encoders-dir", paths["enc"], "--jobs", paths["jobs"], "--text-len", args.text_len,
              "--dtype", args.dtype, "--out", out, "--no-progress", *mode_flags(mode)], f"mode {mode}")
        (side,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
        steps = side["denoise"]["step_s"]
        timed = steps[1:] or steps  # the first step pays one-off costs (allocations, kernel selection)
        cache = side.get("cache") or {}
        row = {"mode": mode, "flags": " ".join(mode_flags(mode)), "s_per_step": sum(timed) / len(timed),
               "peak_gib": side["peak_memory"]["gib"], "peak_what": side["peak_memory"]["what"],
               "steps": len(steps), "skipped": len(cache.get("skipped_steps", [])), "offload": side["memory"]["offload"]}
        if mode != "resident":
            _run([sys.executable, "-m", "hcustom_mc.eval", "compare", work / "resident", out, "--models",
                  paths["eval_models"], "--out", work / f"compare_{mode}"], f"compare {mode}")
            from hcustom_mc.eval.score import reported

            report = json.loads((work / f"compare_{mode}" / "scores.json").read_text())
            (job,) = report["jobs"]
            shown = reported(report["info"]["metrics"])  # the metrics' values, not their frame counts or timings
            row.update({k: job.get(k) for k in ("psnr", "ssim")},
                       deltas={k: job[f"{k}_delta"] for k in shown if job.get(f"{k}_delta") is not None})
        rows.append(row)
        append_jsonl(args.jsonl, {"bench": "sampler_modes", **row, "size": args.size, "frames": args.frames,
                                  "model": args.model, "dtype": args.dtype})
        print(f"{mode}: {row['s_per_step'] * 1e3:.1f} ms/step, peak {row['peak_gib']:.2f} GiB", flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    base = rows[0]
    def fmt(v, spec: str) -> str:  # None: not compared; JSON has no infinity (PSNR of identical videos: "inf")
        return "-" if v is None else v if isinstance(v, str) else f"{v:{spec}}"

    lines = [f"model {args.model} ({args.double_blocks} double + {args.single_blocks} single blocks), one identity job "
             f"at {args.size} x {args.frames} frames, {args.steps} steps, CFG (2 branches), DiT {args.dtype}, one "
             f"process on {device}; peak memory: {base['peak_what']}; quality: `python -m hcustom_mc.eval compare` against "
             f"resident; work folder {work}",
             "", "| mode | sampler flags | s / step | speedup | peak GiB | steps skipped | PSNR dB | SSIM | metric deltas |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        deltas = ", ".join(f"{k} {v:+.4f}" for k, v in sorted(r.get("deltas", {}).items())) or "-"
        lines.append(f"| {r['mode']} | `{r['flags']}` | {r['s_per_step']:.4f} | {base['s_per_step'] / r['s_per_step']:.2f}x "
                     f"| {r['peak_gib']:.2f} | {r['skipped']} of {r['steps']} | {fmt(r.get('psnr'), '.1f')} | "
                     f"{fmt(r.get('ssim'), '.4f')} | {deltas} |")
    write_report(args.out, "Sampler modes side by side", "\n".join(lines), argv)
    return 0


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
    p.add_argument("--text-len", type=int, default=None, help="(default: 32; --modes: 256, the sampler's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3; --modes: the job's steps, 12)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--jsonl", type=Path, help="append each layout's result here as one JSON line, as it is measured")
    p.add_argument("--modes", nargs="*", default=None, metavar="MODE",
                   help=f"compare the one-GPU modes instead of layouts (no MODE: {' '.join(DEFAULT_MODES)}); "
                        "resident is always run first as the baseline")
    p.add_argument("--work", type=Path, help="--modes: folder for the checkpoint, samples and reports (default: a new "
                   "temporary folder)")
    p.add_argument("--eval-models", type=Path, help="--modes: the metrics' models (README \"Scoring videos\"; default: "
                   "tiny random stand-ins)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.modes is not None:
        args.modes = args.modes or list(DEFAULT_MODES)
        args.steps, args.text_len = args.steps or 12, args.text_len or 256
        return modes(args, argv)
    args.steps, args.text_len = args.steps or 3, args.text_len or 32
    return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
