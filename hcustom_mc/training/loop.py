"""The training loop: build, (resume), then per step: batch -> megatron schedule -> optimizer -> log -> save.

Read top to bottom: `train(cfg)` is the whole job.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hcustom_mc.checkpoint.lora import base_fingerprint
from hcustom_mc.checkpoint.mcore import STAGE_SHARED, _stage_replica
from hcustom_mc.model import HunyuanCustomDiT
from hcustom_mc.model.init import initialize_weights
from hcustom_mc.model.lora import apply_lora, is_lora_name
from hcustom_mc.model.ops import set_kernel_backend
from hcustom_mc.parallel.groups import group_size, layout_process_groups, layout_virtual_pipeline
from hcustom_mc.parallel.sequence import SequenceLayout
from hcustom_mc.parallel.state import current_parallel_info, destroy_parallel, initialize_parallel
from hcustom_mc.training import checkpoint as ckpt
from hcustom_mc.training.config import TrainConfig, config_json
from hcustom_mc.training.ema import WeightEMA
from hcustom_mc.training.step import NonFiniteError, adam_implementation, build_scheduler, micro_batch_losses, optimizer_step, schedule_changes
from hcustom_mc.model.config import ConfigError
from hcustom_mc.training.batches import BatchMaker
from hcustom_mc.training.objective import flow_matching_loss_sum
from hcustom_mc.training.save_lock import prepare_save_folder
from hcustom_mc.training.save_lock import release_all as release_save_locks
from hcustom_mc.training.overlap import ddp_and_optimizer_overlap, ddp_param_layout
from hcustom_mc.training.tracking import (Tracker, default_run_name, model_flops_per_sample, peak_memory_gib,
                                         peak_tflops)
from hcustom_mc.device import compute_device, misplaced, resolve_device

log = logging.getLogger("hcustom_mc")
NEW_MODULES = ("audio_proj.", "audio_models.", "bg_in.", "bg_proj.")


# ----------------------------------------------------------------------------- model
def _is_stage_shared(name: str) -> bool:
    return name.startswith(STAGE_SHARED) or name.startswith("audio_proj.")


def _is_trainable(cfg: TrainConfig, name: str) -> bool:
    if cfg.lora_rank:  # the base is frozen: adapters, and with trainable=new the new modules too
        chosen = is_lora_name(name) or (cfg.trainable == "new" and name.startswith(NEW_MODULES))
    else:
        chosen = cfg.trainable == "all" or name.startswith(NEW_MODULES)
    return chosen and not any(name.startswith(p) for p in cfg.freeze)


def build_model_chunks(cfg: TrainConfig, model_cfg, cp_mode: str, device: torch.device | str | None = None,
                       initialize: bool = True, config_overrides: dict | None = None) -> list[HunyuanCustomDiT]:
    """This rank's model chunks (one per VPP stage), every parameter on `device` (default: the compute device).
    `initialize=False` leaves the weights for a checkpoint to fill (resume, pretrained); `config_overrides` are
    megatron TransformerConfig fields (overlap / fusion, training/overlap.py); sequence_parallel comes from
    cfg.parallel."""
    vpp = layout_virtual_pipeline()
    config_overrides = {**(config_overrides or {}), "sequence_parallel": cfg.parallel.sequence_parallel,
                        "virtual_pipeline_model_parallel_size": vpp}
    device = resolve_device(device)
    groups = layout_process_groups()  # every chunk runs on the groups of the layout initialize_parallel set up
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    chunks = []
    for v in range(vpp or 1):
        chunk = HunyuanCustomDiT(model_cfg, params_dtype=dtype, vp_stage=v if vpp else None, cp_mode=cp_mode,
                                 device=device, config_overrides=config_overrides, pg_collection=groups)
        if initialize:
            initialize_weights(chunk, seed=cfg.init_seed, zero_init=cfg.zero_init)
        if cfg.lora_rank:
            apply_lora(chunk, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.init_seed)
        chunk.recompute_granularity = cfg.recompute_granularity
        chunk.recompute_method, chunk.recompute_num_layers = cfg.recompute_method, cfg.recompute_num_layers
        for name, param in chunk.named_parameters():
            param.requires_grad_(_is_trainable(cfg, name))
            if _is_stage_shared(name):
                param.hc_stage_shared = True
                # copies on later stages are left out of the grad norm, as megatron does for tied weights
                param.shared = _stage_replica(chunk, name) != 0
        chunks.append(chunk)
    if not any(p.requires_grad for c in chunks for p in c.parameters()) and group_size(groups.pp) == 1:
        raise ValueError("no trainable parameters (check --trainable and freeze)")
    return chunks


def whole_model(model_cfg) -> HunyuanCustomDiT:
    """The whole model (every layer) on the meta device: names and shapes, nothing allocated."""
    return HunyuanCustomDiT(model_cfg, layers=range(model_cfg.num_double_blocks + model_cfg.num_single_blocks),
                            device="meta")


def stage_shared_names(model_cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stage-shared parameter of the whole model, identical on all ranks."""
    return [(n, tuple(p.shape)) for n, p in whole_model(model_cfg).named_parameters() if _is_stage_shared(n)]


def check_placement(chunks, device) -> None:
    """Every parameter and buffer of every chunk on `device`, before DDP wraps them."""
    stray = [f"chunk {i}: {n}" for i, c in enumerate(chunks) for n in misplaced(c, device)]
    if stray:
        raise RuntimeError(f"{len(stray)} model tensors are not on the training device {device}: {stray[:20]}")


def init_from_pretrained(cfg: TrainConfig, chunks, model_cfg) -> None:
    """--pretrained: weights only, this rank's part; the allowed missing modules initialised fresh."""
    from hcustom_mc.checkpoint.pretrained import load_pretrained

    ck = cfg.checkpoint

    def init(chunk, names):
        initialize_weights(chunk, seed=cfg.init_seed, zero_init=cfg.zero_init, names=names)

    report = load_pretrained(chunks, whole_model(model_cfg), ck.pretrained, ck.pretrained_format, ck.pretrained_key,
                             tuple(ck.pretrained_allow_missing), init=init)
    if dist.get_rank() == 0:
        log.info("weights from %s (%s); %d tensors on rank 0%s", report.description, report.format, report.loaded,
                 f"; initialised fresh ({len(report.initialised)}): {report.initialised}" if report.initialised else "")


def allreduce_stage_shared_grads(model_chunks, shared: list[tuple[str, tuple[int, ...]]]) -> None:
    """Sum the gradients of the embedders every pipeline stage holds, over all stages and chunks.

    Runs before the data-parallel reduction (which is linear, so the order is exact) because the
    distributed optimizer's reduce-scatter leaves only this rank's shard of each buffer valid.
    """
    from megatron.core import parallel_state as ps

    if (ps.get_pipeline_model_parallel_world_size() == 1 and len(model_chunks) == 1) or not shared:
        return  # (nothing shared trains with LoRA on a frozen base)
    holders: dict[str, list[torch.Tensor]] = {}
    for chunk in model_chunks:
        for name, param in ckpt.unwrap(chunk).named_parameters():
            if getattr(param, "hc_stage_shared", False) and param.requires_grad:
                holders.setdefault(name, []).append(param.main_grad)
    flat = torch.cat([sum(holders[n]).flatten() if n in holders else torch.zeros(s, dtype=torch.float32, device=compute_device()).flatten()
                      for n, s in shared])
    dist.all_reduce(flat, group=ps.get_pipeline_model_parallel_group())
    offset = 0
    for name, shape in shared:
        n = int(torch.Size(shape).numel())
        for grad in holders.get(name, []):
            grad.copy_(flat[offset : offset + n].view(shape))
        offset += n


# ----------------------------------------------------------------------------- one step
def make_forward_step():
    from megatron.core import parallel_state as ps

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(**mb["inputs"])
        dit = ckpt.unwrap(model)
        if not dit.post_process:
            return output, None
        target = mb["target"]
        K = mb["inputs"]["identity_latents"].shape[2] if "identity_latents" in mb["inputs"] else 0
        _, _, f, h, w = target.shape
        pt, ph, pw = dit.cfg.patch_size
        frames = dit.video_frames_here(K, f // pt, (h // ph) * (w // pw))
        local = target[:, :, frames.start * pt : frames.stop * pt]
        count = target.numel()  # all video elements of the micro batch, across CP ranks

        def loss_func(out):
            sse = flow_matching_loss_sum(out, local)
            reported = sse.detach().clone()
            if ps.get_context_parallel_world_size() > 1:
                dist.all_reduce(reported, group=ps.get_context_parallel_group())
            # megatron multiplies by the CP size and DDP averages over DP x CP: the net gradient is
            # that of the global mean squared error.
            return sse / count, {"loss": reported / count}

        return output, loss_func

    return forward_step


def seq_length_arg(model_chunk, mb: dict) -> int:
    inputs = mb["inputs"]
    dit = ckpt.unwrap(model_chunk)
    K = inputs["identity_latents"].shape[2] if "identity_latents" in inputs else 0
    _, _, f, h, w = inputs["latents"].shape
    pt, ph, pw = dit.cfg.patch_size
    hw = (h // ph) * (w // pw)
    frames, _ = dit.image_frames_here(K + f // pt)
    # megatron's schedules divide the length they are given by the CP size (and under sequence
    # parallelism by TP) to get the per-rank shape; CP shards can differ by a frame and SP pads each
    # stream, so hand over this rank's exact rows times CP (x TP)
    from megatron.core import parallel_state as ps

    layout = SequenceLayout.build(len(frames) * hw, inputs["text_states"].shape[1], dit.config.sequence_parallel,
                                  dit.pg_collection.tp)
    return layout.local_rows * layout.tp * ps.get_context_parallel_world_size()


# ----------------------------------------------------------------------------- the job
class _StopRequest:
    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    def agreed(self) -> bool:
        """Collective: did any rank get SIGTERM/SIGINT?"""
        flag = torch.tensor([1.0 if self.signal else 0.0], device=compute_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg: TrainConfig) -> dict:
    """Run the configured training; returns {'losses': [...], 'grad_norms': [...], 'step': last step}."""
    import os

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = cfg.model_config()
    cfg.validate(world)
    t_start = time.time()
    info = initialize_parallel(cfg.parallel, model_cfg, seed=cfg.init_seed, dp_name=None)  # layout said below
    set_kernel_backend(cfg.kernels)
    device = compute_device()
    prepare_save_folder(cfg, model_cfg)  # writable, room for a checkpoint, one writer (lock released by run)
    if info.rank == 0:
        run_dir = Path(cfg.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config_json(cfg) + "\n")
        if cfg.logging.verbose:  # else only in the run folder's config.json (a hundred lines)
            log.info("config:\n%s", config_json(cfg))
        log.info("layout: world %d = TP %d x PP %d (VPP %s) x CP %d (%s) x DP %d on %s; sequence parallel: %s",
                 info.world_size, info.tp_size, info.pp_size, cfg.parallel.virtual_pipeline_parallel, info.cp_size,
                 cfg.parallel.cp_mode, info.dp_size, device, _sp_status(cfg))

    # Validation jobs: checked, and their conditions encoded on rank 0, before the model takes the device.
    validation = None
    if cfg.validation.jobs:
        from hcustom_mc.training.validation import Validation

        validation = Validation(cfg, model_cfg, info, torch.bfloat16 if cfg.bf16 else torch.float32)

    # Where the weights come from: a checkpoint to resume (--load), a pretrained model, or a fresh init.
    resume = (ckpt.latest_checkpoint(cfg.checkpoint.load, cfg.checkpoint.verify)
              if cfg.checkpoint.load and Path(cfg.checkpoint.load).exists() else None)
    if cfg.checkpoint.load and resume is None and not cfg.checkpoint.pretrained:
        raise FileNotFoundError(f"--load {cfg.checkpoint.load}: no complete checkpoint there (no `latest`)")
    # LoRA checkpoints hold only the adapters: resuming one rebuilds the frozen base from --pretrained (or the seed)
    adapter_base = base_fingerprint(cfg.checkpoint.pretrained, cfg.init_seed) if cfg.lora_rank else None
    resume_state = ckpt.read_train_state(resume) if resume is not None else {}
    adapter_resume = bool(resume_state.get("adapter_only"))
    if adapter_resume:
        ckpt.check_adapter_base(resume, resume_state, adapter_base)
    pretrained = cfg.checkpoint.pretrained if resume is None or adapter_resume else None
    if resume is not None and cfg.checkpoint.pretrained and not adapter_resume and info.rank == 0:
        log.info("--load %s holds a checkpoint: resuming from it (--pretrained is used only for a fresh start)", resume)

    # Model, DDP, optimizer, LR schedule.
    overlap = ddp_and_optimizer_overlap(cfg, info)  # exact overlap / fusion defaults (training/overlap.py)
    chunks = build_model_chunks(cfg, model_cfg, cfg.parallel.cp_mode, device,
                                initialize=(resume is None or adapter_resume) and not pretrained,
                                config_overrides=overlap.model)
    if pretrained:
        init_from_pretrained(cfg, chunks, model_cfg)
    check_placement(chunks, device)
    # the trainable stage-shared parameters, the same list on every rank (some stages hold none)
    shared = [(n, s) for n, s in stage_shared_names(model_cfg) if _is_trainable(cfg, n)]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, **overlap.ddp)
    model = [DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0,
                                     **ddp_param_layout(c, ddp_config, disable_bucketing=i > 0))
             for i, c in enumerate(chunks)]
    opt_config = OptimizerConfig(optimizer="adam", lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                 weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.adam_beta1,
                                 adam_beta2=cfg.optim.adam_beta2, adam_eps=cfg.optim.adam_eps,
                                 clip_grad=cfg.optim.clip_grad, bf16=cfg.bf16,
                                 params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                 **overlap.optimizer)
    optimizer = get_megatron_optimizer(opt_config, model)
    log.info("optimizer: %s", adam_implementation())
    scheduler = build_scheduler(cfg, optimizer, override=cfg.checkpoint.override_schedule)
    ema = WeightEMA(optimizer, model, cfg.ema_decay) if cfg.ema_decay else None
    for c in chunks:  # what megatron's schedules read from the model config
        c.config.grad_scale_func = optimizer.scale_loss
        c.config.finalize_model_grads_func = functools.partial(_finalize, shared=shared, finalize=finalize_model_grads)
        c.config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        c.config.grad_sync_func = None

    # Data (built before resuming: the sampler position is part of the checkpoint).
    num_micro = cfg.num_microbatches(info.world_size)
    from megatron.core import parallel_state as ps

    first_of_dp_group = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
                         and ps.get_pipeline_model_parallel_rank() == 0)
    batches = BatchMaker(cfg, model_cfg, info.dp_rank, info.dp_size, num_micro, log_events=first_of_dp_group)

    # Resume.
    start_step, train_state, changed = 0, {}, []
    if resume is not None:
        changed = schedule_changes(resume_state.get("scheduler"), scheduler)
        if changed and not cfg.checkpoint.override_schedule:
            raise ConfigError(f"resuming {resume} with a different LR schedule than it was trained with:\n  - "
                              + "\n  - ".join(changed) + "\nrestore those flags, or pass --override-schedule to "
                              "continue with the new schedule from the resumed step")
        train_state = ckpt.load_checkpoint(resume, model, optimizer, scheduler, ema=ema)
        start_step = int(train_state["step"])
        if changed and info.rank == 0:
            log.warning("--override-schedule: from step %d the schedule follows this run's settings:\n  - %s",
                        start_step, "\n  - ".join(changed))
        if not train_state["optimizer_loaded"] and hasattr(optimizer, "reload_model_params"):
            # main weights from the loaded model weights; never after loading the optimizer's own fp32 copies
            optimizer.reload_model_params()
        batches.load_state_dict(train_state.get("data", {}), start_step)

    # Tracking.
    tracker = Tracker(info.rank == 0, cfg.logging.run_dir, cfg.logging.mlflow_tracking_uri, cfg.logging.mlflow_experiment,
                      cfg.logging.run_name or default_run_name(cfg, info),
                      run_id=train_state.get("mlflow_run_id") if resume is not None else None)
    # the config, and what the launch decided: the world and data-parallel sizes and the device
    tracker.log_params({**cfg.to_dict(), "world_size": info.world_size, "data_parallel": info.dp_size,
                        "device": info.device.type})
    if resume is not None and changed:  # MLflow params cannot change: record the override beside them
        tracker.log_params({f"schedule_override_at_step_{start_step}": "; ".join(changed)})
    peak = peak_tflops(cfg.bf16, cfg.logging.peak_tflops)
    stop = _StopRequest()
    forward_backward = get_forward_backward_func()
    forward_step = make_forward_step()
    history = {"losses": [], "grad_norms": [], "step": start_step, "skipped_steps": []}
    skipped = int(train_state.get("skipped_nonfinite_steps", 0))

    step = start_step
    for step in range(start_step + 1, cfg.train_steps + 1):
        t0 = time.time()
        task, micro = batches.microbatches(step)
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [iter(micro) for _ in model] if len(model) > 1 else iter(micro)
        losses = forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                  model=model if len(model) > 1 else model[0], num_microbatches=num_micro,
                                  seq_length=seq_length_arg(model[0], micro[0]), micro_batch_size=cfg.micro_batch_size,
                                  forward_only=False)
        _inject_fault(step, losses, chunks)
        loss, per_micro = micro_batch_losses(losses, num_micro, device)
        problem = _nonfinite_loss(per_micro, step, task, cfg, batches)
        grad_norm = float("nan")
        if problem is None:
            applied, grad_norm = optimizer_step(optimizer, cfg.optim.clip_grad)
            if not applied:
                problem = f"step {step} (task {task}): the gradient norm is {grad_norm}; the step was not applied"
        if problem is not None:
            skipped += 1
            history["skipped_steps"].append(step)
            if skipped > cfg.skip_nonfinite_steps:
                raise NonFiniteError(problem + (f" ({skipped - 1} non-finite steps skipped before, --skip-nonfinite-steps "
                                                f"{cfg.skip_nonfinite_steps})" if cfg.skip_nonfinite_steps else "")
                                     + "; nothing of this step was saved")
            if info.rank == 0:
                log.warning("skipping %s (%d of --skip-nonfinite-steps %d)", problem, skipped, cfg.skip_nonfinite_steps)
            tracker.log_metrics(step, {"skipped_nonfinite_steps": skipped})
            continue
        scheduler.step(increment=1)
        if ema is not None:
            ema.update()
        step_time = time.time() - t0
        history["losses"].append(loss)
        history["grad_norms"].append(grad_norm)
        history["step"] = step
        if step % cfg.logging.log_interval == 0 or step == cfg.train_steps:
            metrics = _metrics(cfg, model_cfg, micro[0], loss, grad_norm, optimizer, step_time, info, peak, task)
            metrics["data_wait_s"] = batches.data_wait_s  # time this step waited for its batch (in step_time)
            tracker.log_step(step, cfg.train_steps, task, metrics)
            # the loss per task beside the mixed curve: tasks of different difficulty make the mix noise
            tracker.log_metrics(step, {f"loss/{task}": loss})
        signalled = stop.agreed()
        stopping = signalled or (cfg.exit_after_steps is not None and step - start_step >= cfg.exit_after_steps)
        interval = cfg.checkpoint.save_interval
        if cfg.checkpoint.save and (stopping or step == cfg.train_steps or (interval and step % interval == 0)):
            ckpt.save_checkpoint(cfg.checkpoint.save, step, model, optimizer, scheduler,
                                 {"mlflow_run_id": tracker.run_id, "consumed_samples": step * cfg.global_batch_size,
                                  "data": batches.state_dict(), "skipped_nonfinite_steps": skipped,
                                  # what `python -m hcustom_mc.checkpoint.lora export` needs besides the tensors
                                  "lora": {"rank": cfg.lora_rank, "alpha": float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha),
                                           "targets": list(cfg.lora_targets)} if cfg.lora_rank else None},
                                 model_cfg, cfg.checkpoint.keep_last, ema=ema, adapter_base=adapter_base, loaded=resume)
        # after the save (a failure here loses no checkpoint); a signal asks to leave now: no validation then
        if validation is not None and not signalled and validation.due(step, last=step == cfg.train_steps):
            validation.run(step, model, ema, tracker)
        if stopping:
            if info.rank == 0:
                reason = f"signal {stop.signal}" if stop.signal else f"--exit-after-iters {cfg.exit_after_steps}"
                log.warning("stopping after step %d on %s (checkpoint %s)", step, reason,
                            "saved" if cfg.checkpoint.save else "not requested: no --save")
            break
    # what the closing summary (tracking.print_summary) names
    history.update(run_dir=str(Path(cfg.logging.run_dir).resolve()), mlflow_run_id=tracker.run_id,
                   tracking_uri=getattr(tracker, "tracking_uri", None), experiment=cfg.logging.mlflow_experiment,
                   total_steps=cfg.train_steps, start_step=start_step, elapsed_s=time.time() - t_start,
                   checkpoint=_latest_saved(cfg.checkpoint.save),
                   validation_runs=validation.runs if validation else 0,
                   validation_s=validation.total_s if validation else 0.0,
                   validation_failed=validation.failed_runs if validation else 0,
                   validation_dir=str((Path(cfg.logging.run_dir) / "validation").resolve()) if validation else None)
    tracker.finish()
    history["trainable_numel"] = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    history["optimizer_state_numel"] = _optimizer_state_numel(optimizer)  # this rank's Adam moments
    history["bad_samples"] = batches.summarize(cfg.logging.run_dir, info.rank == 0)
    if info.rank == 0:
        (Path(cfg.logging.run_dir) / "history.json").write_text(json.dumps(history) + "\n")
    return history


def _latest_saved(save: str | None) -> str | None:
    """The checkpoint folder `latest` names in the save root, for the summary (None: nothing saved)."""
    from hcustom_mc.checkpoint.integrity import read_latest

    target = read_latest(Path(save))[0] if save and (Path(save) / "latest").is_file() else None
    return str(target.resolve()) if target is not None else None


def _optimizer_state_numel(optimizer) -> int:
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return sum(t.numel() for o in opts for state in o.optimizer.state.values() for k, t in state.items()
               if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(t))


def _nonfinite_loss(per_micro: list[float], step: int, task: str, cfg, batches=None) -> str | None:
    bad = [(m, v) for m, v in enumerate(per_micro) if not math.isfinite(v)]
    if not bad:
        return None
    m, v = bad[0]
    mbs = cfg.micro_batch_size
    where = ""
    if batches is not None and m < len(batches.sources):  # this rank's samples of that micro batch
        data_bad = batches.nonfinite_sources[m]
        where = (f"; its data holds NaN/inf: {'; '.join(data_bad)}" if data_bad
                 else f"; its samples here: {'; '.join(batches.sources[m])}")
    return (f"step {step} (task {task}): the loss is {v} in micro batch {m} (samples {m * mbs}..{m * mbs + mbs - 1} of "
            f"each data-parallel rank's share){f' and {len(bad) - 1} more' if len(bad) > 1 else ''}{where}; the step "
            f"was not applied")


def _inject_fault(step: int, losses: list[dict], chunks) -> None:
    """Fault injection for the non-finite tests: HCUSTOM_FAULT_NONFINITE=loss:STEP (NaN loss) or grad:STEP (an
    inf gradient)."""
    import os

    spec = os.environ.get("HCUSTOM_FAULT_NONFINITE")
    if not spec:
        return
    kind, _, at = spec.partition(":")
    if int(at) != step:
        return
    if kind == "loss":
        for entry in losses:
            entry["loss"] = entry["loss"] * float("nan")
    elif kind == "grad":
        for chunk in chunks:
            for param in chunk.parameters():
                if param.requires_grad and getattr(param, "main_grad", None) is not None:
                    param.main_grad.view(-1)[0] = float("inf")
                    return


def allreduce_tp_partial_grads(model_chunks) -> None:
    """Sum over TP the gradients of weights shared by heads that TP splits (QK norms, LoRA factors).
    (Sequence-parallel partial grads, the `sequence_parallel`-marked row biases, are summed by megatron's
    finalize_model_grads; no parameter carries both marks.)"""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.main_grad for c in model_chunks for p in ckpt.unwrap(c).parameters()
             if getattr(p, "hc_tp_partial_grad", False) and p.requires_grad]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _finalize(model, num_tokens=None, *, shared, finalize, **kwargs):
    # both sums are linear, so doing them before megatron's data-parallel reduction is exact
    allreduce_tp_partial_grads(model)
    allreduce_stage_shared_grads(model, shared)
    finalize(model, num_tokens, **kwargs)


def _metrics(cfg, model_cfg, mb, loss, grad_norm, optimizer, step_time, info, peak, task) -> dict:
    inputs = mb["inputs"]
    K = inputs["identity_latents"].shape[2] if "identity_latents" in inputs else 0
    _, _, f, h, w = inputs["latents"].shape
    pt, ph, pw = model_cfg.patch_size
    image_tokens = (K + f // pt) * (h // ph) * (w // pw)
    text_tokens = inputs["text_states"].shape[1]
    flops = model_flops_per_sample(model_cfg, image_tokens, text_tokens) * cfg.global_batch_size
    tflops = flops / step_time / info.world_size / 1e12  # per device
    return {
        "loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": optimizer.param_groups[0]["lr"], "step_time_s": step_time,
        "tokens_per_s": (image_tokens + text_tokens) * cfg.global_batch_size / step_time,
        "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
        "peak_mem_gib": peak_memory_gib(),
    }


def _sp_status(cfg) -> str:
    if not cfg.parallel.sequence_parallel:
        return "off"
    return f"on (tokens between TP regions split over TP {cfg.parallel.tensor_parallel}, each stream padded to a multiple of it)"


def run(cfg: TrainConfig) -> dict:
    try:
        return train(cfg)
    finally:
        release_save_locks()
        destroy_parallel()


__all__ = ["train", "run", "build_model_chunks", "current_parallel_info"]
