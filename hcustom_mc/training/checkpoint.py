"""Training checkpoints: megatron-core dist_checkpointing, written atomically, resumable at any TP/PP.

Layout of `--save DIR`:
    DIR/iter_0000030/         a complete checkpoint (model, optimizer, train_state.json, rng/)
    DIR/iter_0000030.tmp/     a save in progress (a crash leaves only this; it is never loaded)
    DIR/latest                the name of the newest complete checkpoint, replaced atomically

A save writes into `iter_N.tmp`, all ranks reach a barrier, rank 0 renames it to `iter_N` and then
points `latest` at it (write a temp file, os.replace). SIGKILL at any moment leaves `latest`
naming a complete checkpoint. Model weights are stored per global parameter name (TP segments,
see hcustom_mc.checkpoint.mcore), so they load at any TP/PP/VPP. Optimizer state is stored in
megatron's `fully_reshardable` layout, which megatron-core reshards across TP, PP and DP.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hcustom_mc.checkpoint import integrity
from hcustom_mc.checkpoint.mcore import CONFIG_FILE, model_sharded_state_dict
from hcustom_mc.checkpoint.safe_load import dist_load, read_json, weights_only_load
from hcustom_mc.device import compute_device, uses_cuda

log = logging.getLogger("hcustom_mc")
OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}
STATE_FILE = integrity.STATE_FILE


class CheckpointError(RuntimeError):
    pass


def _fault(step: int, phase: str) -> None:
    # fault injection for the crash-safety tests: HCUSTOM_FAULT_KILL_IN_SAVE=N dies like SIGKILL after
    # the data of step N's save is written; N:sealed after its manifest; N:published after `latest` moved
    want = os.environ.get("HCUSTOM_FAULT_KILL_IN_SAVE", "")
    if want and want.split(":")[0] == str(step) and (want.split(":") + ["written"])[1] == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _chunks_state_dict(model_chunks, trainable_only: bool = False) -> dict:
    # One entry per model chunk (VPP); tensor keys inside are global parameter names.
    # `trainable_only` (LoRA): the adapters (and any other trained parameters), not the frozen base.
    def names(m):
        return {n for n, p in unwrap(m).named_parameters() if p.requires_grad} if trainable_only else None

    return {f"model{i}": model_sharded_state_dict(unwrap(m), names=names(m)) for i, m in enumerate(model_chunks)}


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _optimizer_sd(optimizer, model_sd, is_loading):
    if optimizer is None:
        return None
    if is_loading:
        # torch Adam (no transformer-engine / apex) has no state before its first step, and
        # megatron's loader fills existing state in place.
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
                inner._init_optimizer_states_with_dummy_values()
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_META)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1}


def save_checkpoint(root: str | Path, step: int, model_chunks, optimizer, scheduler, train_state: dict,
                    model_config=None, keep_last: int = 2, ema=None, adapter_base: dict | None = None,
                    loaded: str | Path | None = None) -> Path:
    """Collective. Returns the final checkpoint folder. `ema` (a WeightEMA) is saved beside the weights.
    `adapter_base` (LoRA, see checkpoint.lora.base_fingerprint): store only the trained parameters, with this pointer to the base.
    `loaded`: the checkpoint this run resumed from, which pruning never deletes."""
    from megatron.core import dist_checkpointing

    from hcustom_mc.training.param_sync import params_ready

    params_ready(model_chunks)  # overlap_param_gather leaves the parameters incomplete until the next forward

    start = time.time()
    root = Path(root)
    final = root / f"iter_{step:07d}"
    tmp = root / f"iter_{step:07d}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_sd = _chunks_state_dict(model_chunks, trainable_only=adapter_base is not None)
    state = {**model_sd}
    flat_model_sd = {f"{k}.{n}": v for k, sd in model_sd.items() for n, v in sd.items()}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sd(optimizer, flat_model_sd, is_loading=False)
    if ema is not None:  # a LoRA checkpoint: the adapters' EMA only
        state.update(ema.sharded_state_dict(trainable_only=adapter_base is not None))
    _refuse_nonfinite(state, step, root)
    need = _check_room(state, tmp)
    error = None
    try:
        with integrity.write_errors_explained(tmp, need):
            dist_checkpointing.save(state, str(tmp))
            _fault(step, "written")
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if uses_cuda() else None},
                       tmp / "rng" / f"rank{dist.get_rank():05d}.pt")
            if dist.get_rank() == 0:
                meta = {**train_state, "step": step, "layout": _layout(), "ema": ema is not None,
                        "adapter_only": adapter_base is not None, "adapter_base": adapter_base,
                        # the optimizer-state format (training/overlap.py keeps it when resuming)
                        "distributed_optimizer": any(type(o).__name__ == "DistributedOptimizer"
                                                     for o in getattr(optimizer, "chained_optimizers", [optimizer])),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None}
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
                if model_config is not None:
                    (tmp / CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    except integrity.CheckpointWriteError as exc:  # disk full, permissions: every rank learns it below
        error = exc
    _raise_write_errors(error, tmp)  # collective (in place of a barrier): no rank waits for a failed one
    try:
        with integrity.write_errors_explained(tmp, need):
            integrity.seal_folder(tmp)  # hash + fsync every file, write the manifest (rank 0)
    except integrity.CheckpointWriteError as exc:
        error = exc
    _raise_write_errors(error, tmp)
    _fault(step, "sealed")
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        integrity.publish(tmp, final)  # rename, fsync, point `latest` at it
        _fault(step, "published")
        _prune(root, keep_last, final, loaded)
        log.info("saved checkpoint %s in %.1fs", final, time.time() - start)
    dist.barrier()
    return final


def _check_room(state: dict, tmp: Path) -> int:
    """Collective: the bytes this save writes (the main replica of every tensor, summed over ranks); refuse it,
    before anything is written, when the disk has not that much free. Returns the bytes needed."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    mine = 0
    for v in nested_values(state):
        if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id):
            mine += v.data.numel() * v.data.element_size() if v.data is not None else 0
    need = integrity.checkpoint_bytes_estimate(sum(integrity.gather_objects(mine)), 1, with_optimizer=False)
    message = None
    if dist.get_rank() == 0:
        free = shutil.disk_usage(tmp).free
        if free < need:
            shutil.rmtree(tmp, ignore_errors=True)
            message = integrity.explain_write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{tmp}, "
                                                            f"{integrity.human_bytes(free)} free"), tmp, need)
    message = integrity.gather_objects(message)[0]
    if message:
        raise integrity.CheckpointWriteError(message)
    return need


def _raise_write_errors(error: BaseException | None, tmp: Path) -> None:
    """Collective: when any rank failed to write, rank 0 removes the unfinished folder and every rank raises
    (the failing ranks their own error, the others the first one's)."""
    errors = integrity.gather_objects(str(error) if error is not None else None)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise error
    rank, message = failed[0]
    raise integrity.CheckpointWriteError(message if rank == 0 else f"rank {rank}: {message}")


def _refuse_nonfinite(state: dict, step: int, root: Path) -> None:
    """Collective: a state holding NaN/inf on any rank is never written (the last good checkpoint stays `latest`)."""
    bad = integrity.nonfinite_tensors(state)
    flag = torch.tensor([1.0 if bad else 0.0], device=compute_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        names = [f"{n} (rank {r})" for r, part in enumerate(integrity.gather_objects(bad)) for n in part][:8]
        if dist.get_rank() == 0:
            shutil.rmtree(root / f"iter_{step:07d}.tmp", ignore_errors=True)
        raise integrity.CheckpointWriteError(
            f"refusing to save step {step} to {root}: non-finite values (NaN/inf) in {', '.join(names)}; nothing was "
            f"written and `latest` still names the last good checkpoint. The run diverged: resume from it with a "
            f"lower --lr or tighter --clip-grad.")


def _prune(root: Path, keep_last: int, written: Path, loaded: str | Path | None = None) -> None:
    """Rank 0, after `written` was published: keep the newest `keep_last` checkpoints that verify (sizes against
    the manifest; a folder the loader found damaged in this run counts as damaged), never delete `written`, the
    checkpoint this run `loaded` or the one `latest` names, and move damaged folders aside (`iter_N.damaged`)
    instead of counting or deleting them. Folders without a manifest (another tool's) are not counted either, and
    are deleted only when older than every kept checkpoint."""
    if keep_last < 1:  # validated up front; never delete the checkpoint just written
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    known_bad = integrity.rejected_folders()
    target, _ = integrity.read_latest(root)
    protected = {p.resolve() for p in (written, loaded, target) if p is not None and Path(p).is_dir()}
    keep, unverified, damaged, old = [], [], [], []
    for folder in integrity.iter_folders(root):  # newest first
        real = folder.resolve()
        problems = [] if real in protected else (known_bad.get(real) or _prune_check(folder))
        if problems:
            damaged.append((folder, problems))
        elif real not in protected and not integrity.has_manifest(folder):
            unverified.append(folder)
        elif real in protected or len(keep) < keep_last:
            keep.append(folder)
        else:
            old.append(folder)
    oldest_kept = min(int(integrity.ITER_RE.match(k.name).group(1)) for k in keep)
    old += [u for u in unverified if int(integrity.ITER_RE.match(u.name).group(1)) < oldest_kept]
    for folder, problems in damaged:
        aside = _aside(folder)
        os.replace(folder, aside)
        log.warning("checkpoint %s is damaged (%s): moved aside to %s, not counted among the --keep-last %d "
                    "kept; delete it when you no longer need it", folder, "; ".join(problems)[:500], aside.name, keep_last)
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    target, why = integrity.read_latest(root)
    if target is None or not target.is_dir():  # never the case by construction; say so loudly if it were
        log.error("after pruning %s, `latest` does not name an existing checkpoint (%s)", root, why or target)


def _prune_check(folder: Path) -> list[str]:
    if not (folder / STATE_FILE).is_file():
        return [f"no {STATE_FILE}: the save did not finish"]
    return integrity.verify_folder(folder, "size", collective=False)


def _aside(folder: Path) -> Path:
    aside = folder.with_name(folder.name + ".damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged{n}")
    return aside


def check_adapter_base(path: str | Path, meta: dict, base: dict) -> None:
    """Refuse to resume adapters onto a different base than they were trained on."""
    saved = meta.get("adapter_base") or {}
    if saved != base:
        raise CheckpointError(f"{path} holds LoRA adapters trained on the base {saved}; this run's base is {base} "
                              "(resume with the same --pretrained file, or the same --init-seed without --pretrained)")


def latest_checkpoint(root: str | Path, verify: str = integrity.DEFAULT_VERIFY) -> Path | None:
    """The checkpoint to resume from (None when `root` has none): `root` itself if it is a checkpoint
    folder (verified, no fallback), else its `latest`, or the newest sound iter_* when `latest` is not
    (see hcustom_mc.checkpoint.integrity.select_checkpoint). Collective when a process group exists."""
    return integrity.select_checkpoint(root, verify, complete=STATE_FILE)


def read_train_state(path: str | Path) -> dict:
    """The train_state.json of a complete checkpoint folder."""
    return read_json(Path(path) / STATE_FILE)


def load_checkpoint(path: str | Path, model_chunks, optimizer, scheduler, load_optimizer: bool = True,
                    ema=None) -> dict:
    """Collective. Fills model (and optimizer, scheduler, EMA, RNG) from `path`; returns its train state
    (with "optimizer_loaded": whether optimizer state was read)."""
    path = Path(path)
    meta = read_train_state(path)
    same_layout = meta.get("layout") == _layout()
    # an adapter-only checkpoint holds the trained parameters; the caller rebuilt the base (check_adapter_base)
    model_sd = _chunks_state_dict(model_chunks, trainable_only=bool(meta.get("adapter_only")))
    state = {**model_sd}
    flat_model_sd = {f"{k}.{n}": v for k, sd in model_sd.items() for n, v in sd.items()}
    if optimizer is not None and load_optimizer:
        state["optimizer"] = _optimizer_sd(optimizer, flat_model_sd, is_loading=True)
    if ema is not None:
        if not meta.get("ema"):
            raise CheckpointError(f"{path} has no EMA weights (saved without --ema-decay); resume without --ema-decay "
                                  "or start the EMA fresh from --pretrained")
        state.update(ema.sharded_state_dict(trainable_only=bool(meta.get("adapter_only"))))
    loaded, missing, unexpected = dist_load(state, path, strict="return_all")
    # EMA weights of a run that had --ema-decay may be left behind by a run without it
    unexpected = [k for k in unexpected if not k.startswith("ema.")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this run:\n  - missing keys ({len(missing)}): {sorted(missing)[:50]}"
                              f"\n  - unexpected keys ({len(unexpected)}): {sorted(unexpected)[:50]}")
    if meta.get("ema") and ema is None and dist.get_rank() == 0:
        log.warning("%s holds EMA weights; this run has no --ema-decay, so they are not carried on", path)
    for i, chunk in enumerate(model_chunks):
        params = unwrap(chunk).state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in loaded[f"model{i}"].items():
                params[name].copy_(tensor)
    if "optimizer" in state:
        optimizer.load_state_dict(loaded["optimizer"])
    if ema is not None:
        ema.load_full_tensors(loaded)
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    rng = path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if same_layout and rng.is_file():
        states = weights_only_load(rng)
        torch.set_rng_state(states["cpu"])
        if states["cuda"] is not None and uses_cuda():
            torch.cuda.set_rng_state_all(states["cuda"])
    elif dist.get_rank() == 0:
        log.warning("checkpoint layout %s differs from this run's %s: per-rank RNG state not restored "
                    "(training noise is seeded per sample, so the data and noise still continue exactly)",
                    meta.get("layout"), _layout())
    if dist.get_rank() == 0:
        log.info("loaded checkpoint %s (step %d)", path, meta["step"])
    return {**meta, "optimizer_loaded": "optimizer" in state}
