"""Communication overlap and fusion defaults for a training run: one decision, read by the loop.

Everything turned on here is exact (the same sums, in the same buckets, only issued earlier):
  overlap_grad_reduce    gradients are reduced bucket by bucket during backward     (DP > 1, and every
                         trainable parameter used in every step: see every_parameter_used_every_step)
  overlap_param_gather   the distributed optimizer's parameter all-gather runs during the next
                         forward, bucket by bucket, instead of after the step      (distributed optimizer)
  distributed optimizer  off at DP = 1: with one replica its reduce-scatter / all-gather of the whole
                         buffers is pure overhead (measured +5.5% of a CPU step). A resumed run
                         keeps the optimizer-state format of its checkpoint (the two differ).
  gradient_accumulation_fusion
                         weight gradients accumulated into main_grad inside the GEMM; needs CUDA,
                         transformer-engine linears and apex's fused_weight_gradient_mlp_cuda (the
                         per-sample modulation projections are megatron's local linears)
  CUDA_DEVICE_MAX_CONNECTIONS=1
                         with TP > 1: one hardware queue, so a TP collective issued before a GEMM is
                         scheduled before it (what megatron's TP communication overlap relies on);
                         set by the entry point before CUDA is initialised (`set_cuda_connections`).

With overlap_param_gather the model's parameters are only complete after the next forward has
gathered them: anything that reads them between steps (checkpoint saving, weight averaging) first
calls `params_ready(model_chunks)` (training/param_sync.py), which forces the gather (a no-op otherwise).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger("hcustom_mc")


@dataclass(frozen=True)
class Overlap:
    ddp: dict = field(default_factory=dict)  # DistributedDataParallelConfig kwargs
    optimizer: dict = field(default_factory=dict)  # OptimizerConfig kwargs
    model: dict = field(default_factory=dict)  # megatron TransformerConfig overrides for the model build


def _grad_accum_fusion_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    from hcustom_mc.model.spec import transformer_engine_usable

    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return transformer_engine_usable()


def every_parameter_used_every_step(cfg) -> bool:
    """Whether every trainable parameter gets a gradient in every step: megatron's overlapped grad
    reduction waits for a hook of every parameter and asserts otherwise. The audio / video-condition
    branches see no input in the other tasks of a mixed task list (condition dropout zeroes inputs but
    still uses the branch)."""
    wants = {t for t, w in cfg.data.task_weights.items() if w > 0}
    branch_task = {"audio": "audio", "editing": "editing"}.get(cfg.variant)
    return branch_task is None or wants <= {branch_task}


def resumed_optimizer_format(cfg) -> bool | None:
    """Whether the checkpoint this run resumes holds distributed-optimizer state (None: no resume).

    megatron's plain and distributed optimizers store their state under different keys, so a resumed
    run keeps the format it finds; checkpoints from before the key was written all used the
    distributed optimizer."""
    if not cfg.checkpoint.load:
        return None
    from hcustom_mc.training.checkpoint import latest_checkpoint, read_train_state

    try:
        # only its optimizer format is read here: sizes suffice (the loop verifies what it loads as configured)
        path = latest_checkpoint(cfg.checkpoint.load, verify="size")
    except Exception:
        return None  # the loop reports a broken checkpoint itself
    if path is None:
        return None
    return bool(read_train_state(path).get("distributed_optimizer", True))


def ddp_and_optimizer_overlap(cfg, info, *, fusion_usable: bool | None = None) -> Overlap:
    """The DDP / optimizer / model-config settings for this run (see the module docstring).

    `cfg.optim.overlap_grad_reduce` / `overlap_param_gather` (default True) can turn either off;
    `fusion_usable` overrides the environment probe (tests)."""
    dp = info.dp_size
    distopt = bool(cfg.optim.use_distributed_optimizer) and dp > 1
    resumed = resumed_optimizer_format(cfg)
    if resumed is not None and resumed != distopt:
        if info.rank == 0:
            log.warning("resuming a checkpoint with %s optimizer state: keeping that format (distributed "
                        "optimizer %s) instead of the default for DP %d", "distributed" if resumed else "plain",
                        resumed, dp)
        distopt = resumed
    grad = bool(getattr(cfg.optim, "overlap_grad_reduce", True)) and dp > 1 and every_parameter_used_every_step(cfg)
    params = bool(getattr(cfg.optim, "overlap_param_gather", True)) and distopt and grad
    fusion = _grad_accum_fusion_usable() if fusion_usable is None else fusion_usable
    result = Overlap(
        ddp=dict(use_distributed_optimizer=distopt, overlap_grad_reduce=grad, overlap_param_gather=params),
        optimizer=dict(use_distributed_optimizer=distopt, overlap_param_gather=params),
        model=dict(gradient_accumulation_fusion=fusion),
    )
    if info.rank == 0:
        log.info("overlap: grad reduce %s, param gather %s, distributed optimizer %s (DP %d), "
                 "gradient accumulation fusion %s", grad, params, distopt, dp, fusion)
    return result


def set_cuda_connections(tensor_parallel: int) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 when TP > 1 (unless the user set it); call before CUDA starts."""
    if tensor_parallel > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")



def ddp_param_layout(chunk, ddp_config, disable_bucketing: bool) -> dict:
    """DistributedDataParallel's `full_param_layout` keyword for this chunk: {} where megatron-core does not take
    one (before 0.19) or the distributed optimizer is off. megatron-core 0.19 asks DDP's caller to compute the
    distributed optimizer's parameter layout (and warns when it has to compute it itself). The arguments are DDP's
    own: the trainable parameters in module order, its bucket size (the default max(4e7, 1e6 x DP), none without
    overlapped reduction, for a chunk after the first or on a later pipeline stage) and the data x context
    parallel size it shards over (one distributed-optimizer instance)."""
    import inspect

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel

    if not ddp_config.use_distributed_optimizer or "full_param_layout" not in inspect.signature(
            DistributedDataParallel.__init__).parameters:
        return {}
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    bucket = ddp_config.bucket_size
    if bucket is None:
        bucket = max(40_000_000, 1_000_000 * ps.get_data_parallel_world_size())
    if not ddp_config.overlap_grad_reduce or disable_bucketing or ps.get_pipeline_model_parallel_rank() > 0:
        bucket = None
    params = [p for _, p in chunk.named_parameters() if p.requires_grad]
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    layout = DistributedOptimizer.compute_full_param_layout(params, bucket, dp_cp, ddp_config,
                                                            expert_data_parallel_world_size=dp_cp)
    return {"full_param_layout": layout}
