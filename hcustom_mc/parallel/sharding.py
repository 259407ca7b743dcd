"""Tensor-parallel sharding of full (release-layout) tensors.

A sharded weight is, along one dim, a concatenation of segments (e.g. fused [q; k; v] or
single-block linear1 [q; k; v; mlp]); each segment is split evenly across TP ranks and rank r
holds cat(segment_i[r] for all i). One rule covers every layer, so loading, gathering and the
megatron dist-checkpoint layout all derive from the same `TPSplit` attached to the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPSplit:
    dim: int
    segments: tuple[int, ...]  # full sizes along `dim`

    def local_segments(self, tp: int) -> tuple[int, ...]:
        return tuple(s // tp for s in self.segments)


def mark_tp_split(param: torch.Tensor, dim: int, segments: tuple[int, ...] | list[int]) -> None:
    param.hc_tp_split = TPSplit(dim, tuple(int(s) for s in segments))
    # megatron reads these (grad norm, clipping): megatron sets them only when it initialises the
    # weight itself, and we initialise TP-invariantly ourselves (perform_initialization=False)
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def get_tp_split(param: torch.Tensor) -> TPSplit | None:
    return getattr(param, "hc_tp_split", None)


def shard_full_tensor(full: torch.Tensor, split: TPSplit, rank: int, tp: int) -> torch.Tensor:
    if full.shape[split.dim] != sum(split.segments):
        raise ValueError(f"tensor of size {full.shape[split.dim]} along dim {split.dim} does not match {split.segments}")
    pieces = [seg.chunk(tp, split.dim)[rank] for seg in full.split(list(split.segments), split.dim)]
    return torch.cat(pieces, split.dim)


def unshard_tensors(shards: list[torch.Tensor], split: TPSplit) -> torch.Tensor:
    """Inverse of shard_full_tensor: `shards` are the local tensors of TP ranks 0..tp-1."""
    tp = len(shards)
    local = list(split.local_segments(tp))
    per_rank = [s.split(local, split.dim) for s in shards]
    return torch.cat([torch.cat([per_rank[r][i] for r in range(tp)], split.dim) for i in range(len(local))], split.dim)


# ---------------------------------------------------------------- model level
class StateDictError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _tp(model: torch.nn.Module):
    """(TP group, rank in it, its size) of `model`: the group it was built with (parallel/groups.py)."""
    from hcustom_mc.parallel.groups import group_rank, group_size, tensor_parallel_group

    group = tensor_parallel_group(model)
    return group, group_rank(group), group_size(group)


def _ignored(name: str) -> bool:
    return name.endswith("_extra_state")  # transformer-engine fp8 metadata, not weights


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full (release-layout, TP=1) tensors into this rank's shards of `model`.

    Raises StateDictError listing every missing and unexpected key and every shape mismatch.
    """
    _, rank, tp = _tp(model)
    params = {n: p for n, p in model.state_dict(keep_vars=True).items() if not _ignored(n)}
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    shards = {}
    for name, param in params.items():
        if name not in full:
            continue
        split = get_tp_split(param)
        expected = list(param.shape)
        if split is not None:
            expected[split.dim] = sum(split.segments)
        if list(full[name].shape) != expected:
            problems.append(f"{name}: checkpoint shape {tuple(full[name].shape)} != model shape {tuple(expected)}")
            continue
        shards[name] = full[name] if split is None or tp == 1 else shard_full_tensor(full[name], split, rank, tp)
    if problems:
        raise StateDictError("state dict does not fit the model:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for name, tensor in shards.items():
            params[name].copy_(tensor)


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def full_state_dict(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """All-gather TP shards into full release-layout tensors (same result on every TP rank).

    `grads=True` gathers the parameters' gradients instead (parity tests compare them); gradients
    each TP rank holds only a part of (hc_tp_partial_grad, and megatron's `sequence_parallel` mark:
    row biases under sequence parallelism) are summed, as training's finalize step does.
    """
    import torch.distributed as dist

    group, rank, tp = _tp(model)
    out = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if _ignored(name) or (grads and not isinstance(param, torch.nn.Parameter)):
            continue
        if grads and param.grad is None:
            raise ValueError(f"{name} has no gradient")
        tensor = (param.grad if grads else param).detach()
        if grads and tp > 1 and (getattr(param, "hc_tp_partial_grad", False) or getattr(param, "sequence_parallel", False)):
            tensor = tensor.clone()
            dist.all_reduce(tensor, group=group)
        split = get_tp_split(param)
        if split is not None and tp > 1:
            # float8 (fp8 sampling weights) travels as its bytes: gloo has no float8 types
            wire = tensor.view(torch.uint8) if tensor.dtype in _FLOAT8 else tensor
            gathered = [torch.empty_like(wire) for _ in range(tp)]
            dist.all_gather(gathered, wire.contiguous(), group=group)
            tensor = unshard_tensors([g.view(tensor.dtype) for g in gathered], split)
        out[name] = tensor.clone()
    return out


def gather_pipeline_state_dict(stage_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Merge the (TP-gathered) state dicts of all pipeline stages on the first stage; None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return stage_state_dict
    group = ps.get_pipeline_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(stage_state_dict, parts, dst=first, group=group)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)  # parameters every stage holds are equal: any copy will do
    return merged
