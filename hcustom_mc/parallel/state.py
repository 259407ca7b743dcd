"""Initialise torch.distributed and megatron-core parallel_state from a ParallelConfig."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hcustom_mc.parallel.config import ParallelConfig
from hcustom_mc.device import compute_device, dist_backend, local_cuda_index

log = logging.getLogger("hcustom_mc")


@dataclass(frozen=True)
class ParallelInfo:
    world_size: int
    rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device


def _init_process_group(timeout_s: float) -> None:
    if dist.is_initialized():
        return
    # A plain `python script.py` is a world of one; torchrun provides the env for more.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    backend = dist_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_cuda_index())
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_PORT" not in os.environ and os.environ["WORLD_SIZE"] == "1":
        # A store on port 0 binds a free port itself: probing for one and binding it later races
        # with any other process on the machine. The port is not put into os.environ: every process
        # this one starts would inherit it and fail to bind it (EADDRINUSE).
        store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend=backend, timeout=timeout)


def initialize_parallel(
    pcfg: ParallelConfig, model=None, seed: int = 1234, timeout_s: float = 600,
    dp_name: str | None = "DP",
) -> ParallelInfo:
    """Validate `pcfg` (on every rank, before any collective; `model`: the model's sizes, a ModelConfig, see
    ParallelConfig.validate), then set up megatron parallel_state. The model takes its process groups from
    this layout through hcustom_mc.parallel.groups.layout_process_groups().

    `dp_name`: what the remaining (data-parallel) factor is called in the layout line, e.g. "CFG-parallel" for
    the sampler; None: no layout line (the caller logs its own)."""
    from hcustom_mc.parallel.orphans import install_orphan_guard

    install_orphan_guard()  # under torchrun: die with the agent (entry points also call it first thing)
    world_size = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    pcfg.validate(world_size, model)

    from hcustom_mc.parallel.cpu_compat import install_cpu_compat
    from hcustom_mc.parallel.megatron_fixes import apply_megatron_fixes

    install_cpu_compat()
    apply_megatron_fixes()
    _init_process_group(timeout_s)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=pcfg.tensor_parallel,
        pipeline_model_parallel_size=pcfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=pcfg.virtual_pipeline_parallel,
        context_parallel_size=pcfg.context_parallel,
        # usp: the Ulysses (consecutive CP ranks) and ring (strided) sub-groups, created once here
        hierarchical_context_parallel_sizes=pcfg.cp_sub_sizes(),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    info = current_parallel_info()
    if info.rank == 0 and dp_name is not None:
        log.info(
            "parallel layout: world %d = TP %d x PP %d x CP %d (%s%s) x %s %d on %s (%s)",
            info.world_size, info.tp_size, info.pp_size, info.cp_size, pcfg.cp_mode,
            f" {pcfg.cp_sub_sizes()[0]} x {pcfg.cp_sub_sizes()[1]}" if pcfg.cp_sub_sizes() else "", dp_name, info.dp_size,
            info.device.type, dist.get_backend(),
        )
    return info


def current_parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(), device=compute_device(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
