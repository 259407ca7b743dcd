"""The process groups a model is built with: megatron-core's `ProcessGroupCollection`, made once per layout.

The model never looks groups up: its constructor takes a collection and hands `tp` to every parallel
linear, LoRA adapter and sequence-parallel mapping, `cp` / `hcp` to the context-parallel attention
(parallel/context.py) and `pp` to the pipeline stage choice. Two ways to get one:

- `layout_process_groups()`: the groups of the layout `initialize_parallel` (parallel/state.py) set up in
  megatron's parallel_state: what training and the sampler build their model with, so megatron's own
  schedules, optimizer and checkpointing (which read parallel_state) use the very same groups.
- `new_process_groups(...)`: fresh groups for another layout over the same processes, from megatron's
  `HyperCommGrid` (rank order tp-cp-dp-pp, as initialize_model_parallel's default): a second model beside
  the first (a validation sampler next to training, tests) that shares no group with it.

Fields used here (megatron's names): tp, cp, hcp (usp: [Ulysses sub-group, ring sub-group]), pp, dp, dp_cp.
"""

from __future__ import annotations

from megatron.core.process_groups_config import ProcessGroupCollection

MODEL_GROUPS = ("tp", "cp", "hcp", "pp", "dp", "dp_cp")


def layout_process_groups() -> ProcessGroupCollection:
    """The collection of megatron parallel_state's groups (after `initialize_parallel`)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("no parallel layout: call hcustom_mc.parallel.state.initialize_parallel first, "
                           "or pass the model a ProcessGroupCollection (hcustom_mc.parallel.groups)")
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(MODEL_GROUPS))


def layout_virtual_pipeline() -> int | None:
    """Model chunks per pipeline rank of the parallel_state layout (None: no interleaving)."""
    from megatron.core import parallel_state as ps

    return ps.get_virtual_pipeline_model_parallel_world_size()


def new_process_groups(tensor_parallel: int = 1, context_parallel: int = 1, pipeline_parallel: int = 1,
                       cp_sub_sizes: list[int] | None = None) -> ProcessGroupCollection:
    """New groups for a TP x CP x DP x PP layout over the whole world (collective: every rank calls it with
    the same arguments). `cp_sub_sizes` = [ulysses, ring] (ParallelConfig.cp_sub_sizes()) also makes the usp
    sub-groups: Ulysses over consecutive CP ranks, ring across them, as megatron's hierarchical CP groups."""
    import torch.distributed as dist
    from megatron.core.hyper_comm_grid import HyperCommGrid

    world = dist.get_world_size()
    model_parallel = tensor_parallel * context_parallel * pipeline_parallel
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by TP x CP x PP = {model_parallel}")
    data_parallel = world // model_parallel
    cp_dims = ["cp_ulysses", "cp_ring"] if cp_sub_sizes else ["cp"]
    grid = HyperCommGrid([tensor_parallel, *(cp_sub_sizes or [context_parallel]), data_parallel, pipeline_parallel],
                         ["tp", *cp_dims, "dp", "pp"])
    groups = ProcessGroupCollection(tp=grid.create_pg("tp"), cp=grid.create_pg(cp_dims), dp=grid.create_pg("dp"),
                                    dp_cp=grid.create_pg([*cp_dims, "dp"]), pp=grid.create_pg("pp"))
    groups.hcp = [grid.create_pg(d) for d in cp_dims] if cp_sub_sizes else None
    return groups


def process_groups_of(module) -> ProcessGroupCollection:
    """The groups `module` runs on: the collection it was built with (HunyuanCustomDiT's `pg_collection`),
    or, for a module without one (a plain torch module standing in for the model), the layout's."""
    groups = getattr(module, "pg_collection", None)
    return groups if groups is not None else layout_process_groups()


def tensor_parallel_group(module):
    """The TP group `module` runs on (process_groups_of)."""
    return process_groups_of(module).tp


def group_size(group) -> int:
    """Ranks in `group`; 1 where torch.distributed is not running (a build without a world, e.g. on meta)."""
    import torch.distributed as dist

    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def group_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0
