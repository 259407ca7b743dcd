"""Measured peak memory of real training steps through the training loop (bench/train_step.py's path:
loop.train with megatron DDP, the optimizer and the schedule), one process.

CPU: there are no allocator statistics, so the torch profiler records every allocation and free of
the CPU allocator (profile_memory) and the peak of the running sum of live bytes is taken. CUDA:
torch.cuda.max_memory_allocated, as the loop itself reports. Prints `RESULT {json}`.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench import train_step as bench  # noqa: E402


def peak_live_bytes(prof) -> int:
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--variant", default="base")
    p.add_argument("--double-blocks", type=int, default=2)
    p.add_argument("--single-blocks", type=int, default=2)
    p.add_argument("--size", default="64x48")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--identity", type=int, default=1)
    p.add_argument("--text-len", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--recompute", default="none")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--steps", type=int, default=2, help="2: the second step runs with the Adam state allocated")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (run under torchrun with as many ranks)")
    p.add_argument("--cp", type=int, default=1, help="context parallel ranks (torchrun)")
    p.add_argument("--cp-comm-type", default="ulysses")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (torchrun)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--global-batch-size", type=int, default=1)
    args = p.parse_args()
    if args.pp > 1 or args.cp > 1 or args.tp > 1 or args.global_batch_size > 1:  # after the bench's argv (later win)
        extra = ["--pipeline-model-parallel-size", str(args.pp), "--global-batch-size", str(args.global_batch_size),
                 "--context-parallel-size", str(args.cp), "--cp-comm-type", args.cp_comm_type,
                 "--tensor-model-parallel-size", str(args.tp)] + (["--sequence-parallel"] if args.sequence_parallel else [])
        base_argv = bench.train_argv
        bench.train_argv = lambda *a: base_argv(*a) + extra
    args.warmup, args.peak_tflops, args.jsonl = 0, None, None  # bench/train_step.py flags this script does not take
    with tempfile.TemporaryDirectory() as tmp:
        model_file, _ = bench.model_config_file(args, Path(tmp))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            bench.run_steps(args, model_file, Path(tmp) / "run")
            peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                bench.run_steps(args, model_file, Path(tmp) / "run")
            peak, how = peak_live_bytes(prof), "profiler live CPU bytes"

    rank = int(__import__("os").environ.get("RANK", "0"))
    print("RESULT " + json.dumps({"rank": rank, "peak_bytes": peak, "method": how}), flush=True)


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)
