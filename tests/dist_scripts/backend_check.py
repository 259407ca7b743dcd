"""What a multi-process run computes on: the process-group backend, the compute device, and where every
tensor of two real training steps (the project's loop: DDP, distributed optimizer, megatron schedule) lives.

usage: torchrun --nproc_per_node N backend_check.py RUN_DIR
Each rank writes RUN_DIR/backend_rank<r>.json: backend, device, whether megatron's CPU layer is active,
whether this process ever initialised CUDA, the devices of the model's parameters and of an all-reduced
tensor, and the losses. With HCUSTOM_DIST_BACKEND=gloo on a CUDA host, CUDA must stay uninitialised.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    run_dir = sys.argv[1]
    from hcustom_mc.device import compute_device, dist_backend
    from hcustom_mc.parallel import cpu_compat
    from hcustom_mc.training import loop
    from hcustom_mc.training.config import build_config

    seen = {}
    build = loop.build_model_chunks

    def build_and_record(*args, **kwargs):  # the chunks the loop trains, to report their devices
        chunks = build(*args, **kwargs)
        seen["chunks"] = chunks
        return chunks

    loop.build_model_chunks = build_and_record

    class ConsoleTracker(loop.Tracker):  # the loop's tracker without MLflow (not installed on a bare GPU image)
        def __init__(self, enabled, *args, **kwargs):
            super().__init__(False, *args, **kwargs)

    loop.Tracker = ConsoleTracker
    cfg = build_config(["--config", "examples/tiny_3d.yaml", "--train-iters", "2", "--global-batch-size", "2",
                        "--lr-warmup-iters", "1", "--run-dir", run_dir, "--set", "model=tiny",
                        "--set", "data.task_weights={t2v: 1.0}", "--set", "variant=base"])
    history = loop.train(cfg)
    flag = torch.ones(1, device=compute_device()) * (dist.get_rank() + 1)
    dist.all_reduce(flag)
    report = {
        "rank": dist.get_rank(), "world": dist.get_world_size(), "backend": dist.get_backend(),
        "dist_backend": dist_backend(), "device": str(compute_device()),
        "cpu_compat": cpu_compat.cpu_compat_active(),
        "cuda_initialized": torch.cuda.is_initialized(),
        "param_devices": sorted({str(p.device) for c in seen["chunks"] for p in c.parameters()}),
        "allreduce": [flag.item(), str(flag.device)],
        "losses": history["losses"],
    }
    (Path(run_dir) / f"backend_rank{dist.get_rank()}.json").write_text(json.dumps(report) + "\n")
    from hcustom_mc.parallel.state import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)
