"""Cached sampling of the tiny DiT on a TP x CP x CFG-parallel layout; rank 0 saves the latents and every rank's
cache report (what tests/test_step_cache.py compares with one process).

usage: torchrun --nproc_per_node N step_cache_check.py WEIGHTS INPUTS OUT THRESHOLD STEPS SHIFT
           [--tp N] [--cp N] [--cp-mode ulysses|ring] [--cfg-parallel N] [--sequence-parallel]
WEIGHTS: full release-layout state dict; INPUTS: {"noise", "branches"} (tests/test_step_cache.py `conditions`).
"""

import argparse

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    for name in ("weights", "inputs", "out"):
        p.add_argument(name)
    p.add_argument("threshold", type=float)
    p.add_argument("steps", type=int)
    p.add_argument("shift", type=float)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--cp-mode", default="ulysses")
    p.add_argument("--cfg-parallel", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    args = p.parse_args()

    from hcustom_mc.inference.cache import CacheSettings, StepCache
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.sharding import load_full_state_dict
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    cfg = get_model_config("tiny", "base")
    info = initialize_parallel(ParallelConfig(tensor_parallel=args.tp, context_parallel=args.cp, cp_mode=args.cp_mode,
                                              sequence_parallel=args.sequence_parallel), cfg)
    model = HunyuanCustomDiT(cfg, cp_mode=args.cp_mode, config_overrides={"sequence_parallel": args.sequence_parallel})
    load_full_state_dict(model, torch.load(args.weights, weights_only=True))
    model = model.to(info.device).eval().requires_grad_(False)
    inputs = torch.load(args.inputs, weights_only=True)
    sampler = ParallelSampler(model, SamplerLayout(args.tp, args.cp, args.cp_mode, args.cfg_parallel))
    cache = StepCache(CacheSettings(threshold=args.threshold))
    latents = sampler.sample(inputs["noise"], inputs["branches"], args.steps, args.shift, 7.5, cache=cache)
    reports = [None] * info.world_size
    dist.all_gather_object(reports, cache.report())
    if info.rank == 0:
        torch.save({"latents": latents.cpu(), "reports": reports}, args.out)
    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)
