"""Benchmark training steps of the DiT through the project's own training loop (hcustom_mc.training.loop).

    python bench/train_step.py                                  # tiny model, CPU: proves the path (seconds)
    python bench/train_step.py --model 13b --double-blocks 2 --single-blocks 4 --size 1280x720 --frames 129 \\
        --text-len 256 --bf16 --recompute full --steps 3 --out bench/results/train_step_h200.md   # one GPU

The model is the preset (`--model tiny | 13b | ModelConfig file`) at its full width with the depth given
by --double-blocks / --single-blocks, trained on synthetic latents of the given video size (latent
/8 in space, /4 in time, plus --identity images) by `loop.train`: megatron DDP, the distributed
optimizer, megatron's schedule, the configured recompute and kernels; nothing is re-implemented here.
The loop's own per-step metrics are recorded (its Tracker replaced by a recorder, so no MLflow store
is written and mlflow need not be installed): step time, model TFLOP/s per device and MFU from
`tracking.model_flops_per_sample` (each stream's linears for its own tokens, attention 12*H*S^2 per
block, recomputation not counted), peak memory (allocator). The first step is warm-up (allocation,
autotuning); the report gives the median of the rest. A step with a non-finite loss or gradient norm is
skipped and reported (the loop's --skip-nonfinite-steps covers every step here), not a crash; with --jsonl
each step (and each skipped one) is appended as one JSON line the moment the loop reports it.

With `python -m hcustom_mc.plan` present, its prediction for the same run is printed beside it
(flags as documented in issue 11: --model FILE --variant --size --frames --tp 1 --pp 1 --cp 1 --dp 1
--micro-batch-size 1 --recompute MODE [--bf16], plus this run's --text-len, --identity-images and --target);
its predicted peak is shown beside the measured one. On CPU the loop's peak is the process RSS, not
tensor bytes (no allocator statistics there), so only the GPU comparison is like for like.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.checkout import pythonpath, use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed

from bench.report import append_jsonl, write_report  # noqa: E402


def latent_shape(size: str, frames: int) -> tuple[int, int, int]:
    """'WxH' pixels and 4k+1 frames -> latent (frames, height, width)."""
    w, h = (int(v) for v in size.lower().split("x"))
    if (frames - 1) % 4 or w % 16 or h % 16:
        raise SystemExit(f"--frames must be 4k+1 and --size multiples of 16 (the VAE's /8 and the /2 patch): "
                         f"got {frames} frames, {size}")
    return (frames - 1) // 4 + 1, h // 8, w // 8


def model_config_file(args, folder: Path) -> tuple[Path, object]:
    from hcustom_mc.model.config import get_model_config, save_model_config

    cfg = get_model_config(args.model, args.variant, num_double_blocks=args.double_blocks,
                           num_single_blocks=args.single_blocks)
    path = folder / "model.json"
    save_model_config(cfg, path)
    return path, cfg


def train_argv(args, model_file: Path, run_dir: Path) -> list[str]:
    f, lh, lw = latent_shape(args.size, args.frames)
    task = "identity" if args.identity else "t2v"
    argv = ["--model", str(model_file), "--variant", args.variant, "--train-iters", str(args.warmup + args.steps),
            "--micro-batch-size", "1", "--global-batch-size", "1", "--lr-warmup-iters", "1",
            "--kernels", args.kernels, "--run-dir", str(run_dir), "--log-interval", "1",
            "--set", f"data.frames={args.frames}", "--set", f"data.latent_height={lh}",
            "--set", f"data.latent_width={lw}", "--set", f"data.text_len={args.text_len}",
            "--set", "data.num_samples=8", "--set", f"data.task_weights={{{task}: 1.0}}", "--set", "zero_init=false",
            # a NaN or inf step (bf16 at 13B width, say) is skipped and reported, never the end of the benchmark
            "--skip-nonfinite-steps", str(args.warmup + args.steps)]
    if args.bf16:
        argv.append("--bf16")
    if args.recompute != "none":
        argv += ["--recompute-granularity", args.recompute]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def run_steps(args, model_file: Path, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Train through loop.train; return the loop's metrics of every step, and the steps it skipped as non-finite."""
    from hcustom_mc.training import loop
    from hcustom_mc.training.config import build_config

    steps: list[dict] = []
    skipped: list[dict] = []

    class RecordingTracker:
        """The loop's Tracker interface: keeps each step's metrics and prints them as the loop would."""

        def __init__(self, enabled, *a, **k):
            self.enabled, self.run_id = enabled, None

        def log_params(self, params):
            pass

        def log_step(self, step, total, task, metrics):
            steps.append({"step": step, **metrics})
            print("STEP " + json.dumps(steps[-1]), flush=True)
            append_jsonl(args.jsonl, {"bench": "train_step", **steps[-1]})

        def log_metrics(self, step, metrics):
            """The loop's report of a step it skipped (non-finite loss or gradient norm), or more of a step's metrics
            (the loss under its task's name), which join that step's record."""
            if "skipped_nonfinite_steps" not in metrics:
                if steps and steps[-1]["step"] == step:
                    steps[-1].update(metrics)
                return
            skipped.append({"step": step, **metrics})
            print("SKIPPED " + json.dumps(skipped[-1]), flush=True)
            append_jsonl(args.jsonl, {"bench": "train_step", "skipped": True, **skipped[-1]})

        def finish(self):
            pass

    loop.Tracker = RecordingTracker
    loop.run(build_config(train_argv(args, model_file, run_dir)))
    return steps, skipped


def target_kind() -> str:
    """The planner's target: gpu (Triton glue kernels, CUDA allocator) or cpu (the torch reference path)."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def planner_peak_gib(text: str) -> float | None:
    """The planner's `predicted peak (allocated by torch): X GiB` line, for the table beside the measured peak."""
    import re

    m = re.search(r"predicted peak \(allocated by torch\): ([0-9.]+) GiB", text)
    return float(m.group(1)) if m else None


def planner_prediction(args, model_file: Path) -> str:
    """The planner's text for this run, or why there is none."""
    if importlib.util.find_spec("hcustom_mc.plan") is None:
        return "not present (no hcustom_mc.plan module in this tree)"
    cmd = [sys.executable, "-m", "hcustom_mc.plan", "--model", str(model_file), "--variant", args.variant,
           "--size", args.size, "--frames", str(args.frames), "--tp", "1", "--pp", "1", "--cp", "1", "--dp", "1",
           "--micro-batch-size", "1", "--recompute", args.recompute, "--text-len", str(args.text_len),
           "--identity-images", str(args.identity), "--target", target_kind()] + (["--bf16"] if args.bf16 else [])
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": pythonpath()})  # the checkout, and the caller's entries
    except subprocess.TimeoutExpired:
        return "the planner did not answer within 60 s"
    text = (proc.stdout + ("\n" + proc.stderr if proc.returncode else "")).strip()
    return f"`{' '.join(cmd[1:])}` (exit {proc.returncode}):\n\n```\n{text[-4000:]}\n```"


def summarize(args, cfg, steps: list[dict], skipped: list[dict] = ()) -> dict:
    timed = steps[args.warmup:] or steps[-1:]

    def median(key):
        values = sorted(s[key] for s in timed if s.get(key) is not None)
        return values[len(values) // 2] if values else None

    f, lh, lw = latent_shape(args.size, args.frames)
    pt, ph, pw = cfg.patch_size
    image_tokens = (f + int(args.identity)) * (lh // ph) * (lw // pw)
    return {"model": args.model, "width": cfg.hidden_size, "heads": cfg.num_heads,
            "double_blocks": cfg.num_double_blocks, "single_blocks": cfg.num_single_blocks,
            "size": args.size, "frames": args.frames, "image_tokens": image_tokens, "text_tokens": args.text_len,
            "bf16": args.bf16, "recompute": args.recompute, "kernels": args.kernels, "steps": steps,
            "timed_steps": len(timed), "step_time_s": median("step_time_s"),
            "tflops_per_device": median("tflops_per_device"), "mfu": median("mfu"),
            "peak_mem_gib": max((s["peak_mem_gib"] for s in steps), default=None),
            "loss": [s["loss"] for s in steps], "skipped_steps": [s["step"] for s in skipped]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | 13b | ModelConfig file (its width and heads are kept)")
    p.add_argument("--variant", default="base", choices=("base", "audio", "editing"))
    p.add_argument("--double-blocks", type=int, default=2)
    p.add_argument("--single-blocks", type=int, default=2)
    p.add_argument("--size", default="64x48", help="video WxH in pixels (latent /8)")
    p.add_argument("--frames", type=int, default=5, help="pixel frames, 4k+1")
    p.add_argument("--identity", type=int, choices=(0, 1), default=1, help="one identity image (the identity task)")
    p.add_argument("--text-len", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--recompute", default="full", choices=("none", "full", "selective"))
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: known GPUs)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    p.add_argument("--json", type=Path, help="also write the numbers (JSON) here")
    p.add_argument("--jsonl", type=Path, help="append each step's metrics here as one JSON line, as it is measured")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_file, cfg = model_config_file(args, Path(tmp))
        steps, skipped = run_steps(args, model_file, Path(tmp) / "run")
        result = summarize(args, cfg, steps, skipped)
        result["planner"] = planner_prediction(args, model_file)
    from hcustom_mc.device import compute_device, uses_cuda

    import torch

    result["device"] = torch.cuda.get_device_name() if uses_cuda() else f"CPU ({compute_device()})"
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"model {args.model} width {cfg.hidden_size} ({cfg.num_heads} heads), {cfg.num_double_blocks} double + "
        f"{cfg.num_single_blocks} single blocks; {args.size} x {args.frames} frames = {result['image_tokens']} image "
        f"+ {args.text_len} text tokens; {'bf16' if args.bf16 else 'fp32'}, recompute {args.recompute}, kernels "
        f"{args.kernels}; micro batch 1 on one device ({result['device']}); median of {result['timed_steps']} steps "
        f"after {args.warmup} warm-up",
        "", "| step time s | model TFLOP/s | MFU | peak memory GiB | planner peak GiB |", "|---|---|---|---|---|",
        f"| {fmt(result['step_time_s'], '.4g')} | {fmt(result['tflops_per_device'], '.4g')} | "
        f"{fmt(result['mfu'] and 100 * result['mfu'], '.1f')}{'%' if result['mfu'] else ''} | "
        f"{fmt(result['peak_mem_gib'], '.2f')} | {fmt(planner_peak_gib(result['planner']), '.2f')} |",
        "", "FLOPs: hcustom_mc.training.tracking.model_flops_per_sample (linears of each stream for its own tokens, "
        "attention 12*H*S^2 per block, forward + backward, recomputation not counted).",
        "", f"planner prediction: {result['planner']}",
    ]
    if skipped:
        lines[1:1] = ["", f"**{len(skipped)} of {args.warmup + args.steps} steps skipped: non-finite loss or gradient "
                          f"norm** (steps {', '.join(str(s['step']) for s in skipped)}; the table holds the others)"]
    write_report(args.out, "Training step", "\n".join(lines), argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    exit_process(main())
