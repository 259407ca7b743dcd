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

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hcustom_mc.checkpoint.mcore import CONFIG_FILE, model_sharded_state_dict

log = logging.getLogger("hcustom_mc")
OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}
STATE_FILE = "train_state.json"


class CheckpointError(RuntimeError):
    pass


def _chunks_state_dict(model_chunks) -> dict:
    # One entry per model chunk (VPP); tensor keys inside are global parameter names.
    return {f"model{i}": model_sharded_state_dict(unwrap(m)) for i, m in enumerate(model_chunks)}


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
                    model_config=None, keep_last: int = 2) -> Path:
    """Collective. Returns the final checkpoint folder."""
    from megatron.core import dist_checkpointing

    from hcustom_mc.training.overlap import params_ready

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
    model_sd = _chunks_state_dict(model_chunks)
    state = {**model_sd}
    flat_model_sd = {f"{k}.{n}": v for k, sd in model_sd.items() for n, v in sd.items()}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sd(optimizer, flat_model_sd, is_loading=False)
    dist_checkpointing.save(state, str(tmp))
    if os.environ.get("HCUSTOM_FAULT_KILL_IN_SAVE") == str(step):
        # fault injection for the crash-safety test: die like SIGKILL, mid-save, before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "rng" / f"rank{dist.get_rank():05d}.pt")
    if dist.get_rank() == 0:
        meta = {**train_state, "step": step, "layout": _layout(),
                # the optimizer-state format (training/overlap.py keeps it when resuming)
                "distributed_optimizer": any(type(o).__name__ == "DistributedOptimizer"
                                             for o in getattr(optimizer, "chained_optimizers", [optimizer])),
                "scheduler": scheduler.state_dict() if scheduler is not None else None}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if model_config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        _prune(root, keep_last)
        log.info("saved checkpoint %s in %.1fs", final, time.time() - start)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder `latest` names (None when `root` has no complete checkpoint)."""
    root = Path(root)
    if (root / STATE_FILE).is_file():  # given a checkpoint folder itself
        return root
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | Path, model_chunks, optimizer, scheduler, load_optimizer: bool = True) -> dict:
    """Collective. Fills model (and optimizer, scheduler, RNG) from `path`; returns its train state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    same_layout = meta.get("layout") == _layout()
    model_sd = _chunks_state_dict(model_chunks)
    state = {**model_sd}
    flat_model_sd = {f"{k}.{n}": v for k, sd in model_sd.items() for n, v in sd.items()}
    if optimizer is not None and load_optimizer:
        state["optimizer"] = _optimizer_sd(optimizer, flat_model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path), strict="raise_all")
    for i, chunk in enumerate(model_chunks):
        params = unwrap(chunk).state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in loaded[f"model{i}"].items():
                params[name].copy_(tensor)
    if "optimizer" in state:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    rng = path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if same_layout and rng.is_file():
        states = torch.load(rng, weights_only=True)
        torch.set_rng_state(states["cpu"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    elif dist.get_rank() == 0:
        log.warning("checkpoint layout %s differs from this run's %s: per-rank RNG state not restored "
                    "(training noise is seeded per sample, so the data and noise still continue exactly)",
                    meta.get("layout"), _layout())
    if dist.get_rank() == 0:
        log.info("loaded checkpoint %s (step %d)", path, meta["step"])
    return meta
