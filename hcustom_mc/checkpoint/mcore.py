"""megatron-core distributed checkpoints of the DiT, loadable at any TP (and, via global keys, PP).

Each parameter is stored as global tensors: a TP-sharded weight made of segments (fused
[q; k; v], linear1 [q; k; v; mlp], linear2 [attn; mlp]) is stored one global tensor per segment
(`<name>#seg<i>`), so resharding to another TP size is a plain slice of each segment. Replicated
parameters are stored once (replica 0 writes). The model config travels in `hcustom_model.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hcustom_mc.checkpoint.integrity import (MODEL_CONFIG_FILE, CheckpointWriteError, gather_objects, iter_folders, nonfinite_tensors,
                                             seal_folder, select_checkpoint, write_errors_explained)
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY
from hcustom_mc.checkpoint.safe_load import dist_load, dist_load_tensors_metadata, read_json
from hcustom_mc.parallel.sharding import get_tp_split

CONFIG_FILE = MODEL_CONFIG_FILE


def _ranks():
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _segment_factory(key: str, param: torch.Tensor, split, tp_rank: int, tp: int, replica_id):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    local_sizes = list(split.local_segments(tp))

    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(f"{key}: flattened (distributed-optimizer) views of segmented weights")
        return [
            ShardedTensor.from_rank_offsets(f"{key}#seg{i}", piece, (split.dim, tp_rank, tp), replica_id=replica_id)
            for i, piece in enumerate(data.detach().split(local_sizes, split.dim))
        ]

    def merge(pieces):
        return torch.cat(list(pieces), split.dim)

    return ShardedTensorFactory(key, param, build, merge, replica_id)


STAGE_SHARED = ("time_in.", "vector_in.", "guidance_in.")  # held by every pipeline stage


def _stage_replica(model, name: str) -> int:
    """Which copy of a parameter held by several pipeline stages this is (0 = the one that is written)."""
    from hcustom_mc.model.model import split_layers

    chunks, chunk = getattr(model, "stage", (1, 0))
    if name.startswith(STAGE_SHARED):
        return chunk
    if name.startswith("audio_proj."):
        cfg = model.cfg
        ranges = split_layers(cfg.num_double_blocks + cfg.num_single_blocks, chunks)
        holders = [c for c, r in enumerate(ranges) if any(i in r for i in cfg.audio_insert_blocks)]
        return holders.index(chunk)
    return 0


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "model.", keep_vars: bool = True,
                             tensors: dict[str, torch.Tensor] | None = None, names=None) -> dict:
    """The megatron sharded state dict of `model` (keys are global parameter names).

    `keep_vars` keeps the Parameter objects as data: megatron's distributed optimizer finds each
    parameter's checkpoint entry by identity. `tensors` (name -> tensor shaped like the parameter)
    stores other tensors under the parameters' sharding, e.g. the EMA weights under prefix "ema.";
    `names` keeps only those parameters.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp_rank, tp, dp_rank = _ranks()
    out = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or (names is not None and name not in names):
            continue
        if tensors is not None and name not in tensors:
            continue
        key = prefix + name
        split = get_tp_split(param)
        data = tensors[name] if tensors is not None else param if keep_vars else param.detach()
        stage = _stage_replica(model, name)
        if split is None:  # replicated across TP: TP rank 0 of each DP replica 0 writes it
            out[name] = ShardedTensor.from_rank_offsets(key, data, replica_id=(stage, tp_rank, dp_rank))
        elif len(split.segments) == 1:
            out[name] = ShardedTensor.from_rank_offsets(key, data, (split.dim, tp_rank, tp), replica_id=(stage, 0, dp_rank))
        else:  # same keys at every TP size, so checkpoints reshard freely
            out[name] = _segment_factory(key, data, split, tp_rank, tp, (stage, 0, dp_rank))
    return out


def _apply_loaded(model: torch.nn.Module, loaded: dict) -> None:
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)


def save_mcore_checkpoint(model: torch.nn.Module, path: str | Path, model_config=None) -> None:
    """Collective over all ranks: write the model's sharded state dict to the (new or empty) folder."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sharded = model_sharded_state_dict(model)
    bad = nonfinite_tensors(sharded)
    if any(gather_objects(bad)):
        raise CheckpointWriteError(f"refusing to write {path}: non-finite values (NaN/inf) in the model, e.g. "
                                   f"{[n for part in gather_objects(bad) for n in part][:5]}")
    with write_errors_explained(path):
        # megatron takes a folder that is not empty for the remains of a failed save (and says so): our files go after
        dist_checkpointing.save(sharded, str(path))
        if model_config is not None and dist.get_rank() == 0:
            (path / CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
        dist.barrier()
        seal_folder(path)  # manifest (size + sha256 per file), everything fsynced


def load_mcore_checkpoint(model: torch.nn.Module, path: str | Path, verify: str = DEFAULT_VERIFY, prefix: str = "model.") -> Path:
    """Collective: fill `model` (any TP layout) from a megatron dist checkpoint folder (or a training save
    folder: its `latest`, with fallback), verified first (`verify`: full | size | off). Returns the folder.
    `prefix="ema."` reads the EMA weights a training run with --ema-decay saved."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a megatron-core distributed checkpoint folder")
    if not (path / "metadata.json").is_file() and ((path / "latest").exists() or iter_folders(path)):
        path = select_checkpoint(path, verify) or path
    elif not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a megatron-core distributed checkpoint (no metadata.json)")
    else:
        select_checkpoint(path, verify)  # explicit: verify, never fall back
    # read into buffers of the stored dtype (EMA weights are fp32 beside bf16 weights), then cast on copy
    meta = dist_load_tensors_metadata(path)
    stored = {k[len(prefix):].split("#seg")[0]: t.dtype for k, t in meta.items() if k.startswith(prefix)}
    params = model.state_dict(keep_vars=True)
    buffers = {n: torch.empty_like(p, dtype=stored.get(n, p.dtype)) for n, p in params.items() if not n.endswith("_extra_state")}
    sharded = model_sharded_state_dict(model, prefix=prefix, tensors=buffers)
    # a checkpoint of another model config fails inside torch's reader as if the files were damaged: compare the
    # stored shapes with the model's first and say what does not fit
    wrong = [f"{t.key}: stored {tuple(meta[t.key].global_shape)}, model {tuple(t.global_shape)}"
             for t in sharded.values() if getattr(t, "key", None) in meta
             and tuple(meta[t.key].global_shape) != tuple(t.global_shape)]
    if wrong:
        from hcustom_mc.parallel.sharding import StateDictError

        raise StateDictError(f"{path} does not fit the model config: {len(wrong)} tensors have other shapes, e.g. "
                             + "; ".join(sorted(wrong)[:3]))
    loaded, missing, unexpected = dist_load(sharded, path, strict="return_all")
    # a training checkpoint also holds optimizer state (and maybe EMA weights): only the asked-for keys must match
    missing, unexpected = ([k for k in keys if k.startswith(prefix)] for keys in (missing, unexpected))
    if missing or unexpected:
        from hcustom_mc.parallel.sharding import StateDictError

        raise StateDictError(f"{path} does not fit the model config:\n  - missing keys ({len(missing)}): "
                             f"{sorted(missing)[:50]}\n  - unexpected keys ({len(unexpected)}): {sorted(unexpected)[:50]}")
    _apply_loaded(model, {k: v for k, v in loaded.items() if k in sharded})
    return path


def has_mcore_prefix(path: str | Path, prefix: str) -> bool:
    """Whether the checkpoint holds tensors under `prefix` (e.g. "ema.")."""
    return any(k.startswith(prefix) for k in dist_load_tensors_metadata(path))


def read_mcore_model_config(path: str | Path):
    from hcustom_mc.model.config import ModelConfig

    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    return ModelConfig.from_dict(read_json(file))
