"""One optimizer step and what guards it: the LR schedule (and its changes on resume), non-finite losses and
gradient norms stopped before the weights move.

`optimizer_step` is megatron's `MegatronOptimizer.step()` split at the gradient norm (prepare_grads, the norm,
clipping, step_with_ready_grads: the same calls in the same order, so the update is bit-identical), so that a
non-finite norm can stop the step before any weight or optimizer state changes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# scheduler state key -> (the flag that sets it, how the run derives it)
SCHEDULE_FIELDS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_style": "--lr-decay-style",
    "lr_decay_steps": "--train-iters",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters",
}


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm that is inf or NaN; the step was not applied."""


def build_scheduler(cfg, optimizer, override: bool = False):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train_steps, o.warmup_steps + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train_steps, wd_incr_style="constant",
        # with override, a loaded checkpoint keeps only its step count; otherwise its values (which we check
        # equal ours first, see schedule_changes)
        use_checkpoint_opt_param_scheduler=not override, override_opt_param_scheduler=override)


def schedule_changes(saved: dict | None, scheduler) -> list[str]:
    """The schedule settings that differ between a checkpoint's scheduler state and this run's scheduler."""
    if not saved:
        return []
    ours = scheduler.state_dict()
    out = []
    for key, flag in SCHEDULE_FIELDS.items():
        if key in saved and saved[key] != ours[key]:
            out.append(f"{flag} ({key}): checkpoint {saved[key]!r}, this run {ours[key]!r}")
    return out


def _inner(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


@torch.no_grad()
def optimizer_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """(applied, grad norm). Not applied when the gradients hold inf/NaN (the norm is then non-finite)."""
    from megatron.core.optimizer import optimizer as mopt

    found_inf = optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()
    norm = float(norm) if norm is not None else 0.0
    if found_inf or not math.isfinite(norm):
        return False, norm if not found_inf else float("inf")
    if clip_grad > 0.0:
        for opt in _inner(optimizer):
            params = opt.get_parameters()
            if getattr(opt, "is_stub_optimizer", False) or not params:
                continue
            # looked up on the module at call time: the CPU compatibility layer wraps it there
            mopt.clip_grad_by_total_norm_fp32(params, clip_grad, norm,
                                              opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), norm


def micro_batch_losses(losses: list[dict], num_micro: int, device) -> tuple[float, list[float]]:
    """(mean loss, per-micro-batch losses), each averaged over data parallel, on every rank (the losses exist on
    the last pipeline stage only). The mean is computed exactly as before per-micro reporting existed."""
    from megatron.core import parallel_state as ps

    value = torch.zeros(num_micro + 1, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        per = torch.stack([l["loss"].reshape(()) for l in losses]).to(value.device)
        value[:num_micro] = per
        value[num_micro] = per.mean()
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    value /= ps.get_data_parallel_world_size()
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())  # other stages hold 0
    values = value.tolist()
    return values[num_micro], values[:num_micro]


def adam_implementation() -> str:
    """The Adam megatron-core picked when it was imported: transformer-engine's or apex's fused kernel when
    one is installed, else torch's AdamW (megatron's own order)."""
    from megatron.core import optimizer as megatron_optimizer

    cls = megatron_optimizer.Adam
    origin = cls.__module__.split(".")[0]
    names = {"transformer_engine": "transformer-engine FusedAdam", "apex": "apex FusedAdam"}
    return names.get(origin, f"torch {cls.__name__} (neither transformer-engine nor apex is installed)")
