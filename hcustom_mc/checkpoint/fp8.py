"""fp8 checkpoints into a model that keeps its block linears in fp8 (hcustom_mc.model.fp8), and LoRA on them.

- `load_fp8_pair(model, fp8_sd, scales)`: the release fp8 pair (`read_release_fp8`: float8 weights as stored,
  scales per tensor or per output channel) into `model` without dequantising anything: each linear whose
  weight is float8 in the file becomes an fp8 linear, and the one loader of full (TP=1) state dicts
  (`load_full_state_dict`) slices the float8 weights per TP rank like any weight; a per-tensor scale is the same
  on every rank, a per-channel scale is sliced with the rows of a column-parallel weight and whole for a
  row-parallel one (its rows are not split).
- `apply_adapters(model, adapters, scale)`: LoRA where the base is fp8: a side adapter on each fp8 linear
  (out += scale * (x A^T) B^T, this rank's shard of A or B), merged into the weight elsewhere.
"""

from __future__ import annotations

from typing import Mapping

import torch

from hcustom_mc.checkpoint.release import CheckpointFormatError, fp8_effective_scale
from hcustom_mc.model.fp8 import block_linears, fp8_structure_, is_fp8_linear, linear_kind, set_side_adapter
from hcustom_mc.parallel.groups import group_rank, group_size, tensor_parallel_group
from hcustom_mc.parallel.sharding import TPSplit, get_tp_split, load_full_state_dict, shard_full_tensor


def load_fp8_pair(model: torch.nn.Module, fp8_sd: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                  compute_dtype: torch.dtype, mode: str = "release", matmul: str = "upcast",
                  source: str = "<fp8 state dict>") -> int:
    """Fill `model` (built with local linears) from an fp8 pair; returns the number of fp8 linears.

    `mode` picks the scale the weights are multiplied by, as `dequantize_release_fp8` does (release: rounded
    to bf16, as the released runtime), so the fp8 model computes with exactly the weights the dequantising
    loader would give (in bf16)."""
    linears = dict(block_linears(model))
    outside = sorted(n for n in scales if n not in linears)
    if outside:
        raise CheckpointFormatError(f"{source}: float8 weights of linears that are not block linears of this model: "
                                    f"{outside[:10]}")
    full = dict(fp8_sd)
    for name, scale in scales.items():
        fp8_structure_(linears[name], scale.ndim == 1, compute_dtype, matmul)
        full[f"{name}.weight_scale"] = fp8_effective_scale(scale, mode)
    load_full_state_dict(model, full)
    return len(scales)


def _shard(t: torch.Tensor, split: TPSplit | None, dim: int, rank: int, tp: int) -> torch.Tensor:
    if tp == 1:
        return t
    return shard_full_tensor(t, split if split is not None else TPSplit(dim, (t.shape[dim],)), rank, tp)


def apply_adapters(model: torch.nn.Module, adapters, scale: float = 1.0, full_shapes=None) -> tuple[int, int]:
    """LoRA `adapters` (full TP=1 tensors, hcustom_mc.checkpoint.lora.Adapters) times `scale` on a model whose
    block linears may be fp8: a side adapter on every fp8 linear (several adapters on one linear concatenate
    along the rank), merged into the weight of every other linear. Returns (side adapters, merged)."""
    from hcustom_mc.checkpoint.lora import Adapters, check_against_shapes, merge_into_model, weight_shapes

    full_shapes = full_shapes or weight_shapes(model)
    check_against_shapes(adapters, full_shapes)
    group = tensor_parallel_group(model)
    rank, tp = group_rank(group), group_size(group)
    modules = dict(model.named_modules())
    side, rest = {}, {}
    for name, (A, B) in adapters.tensors.items():
        (side if name in modules and is_fp8_linear(modules[name]) else rest)[name] = (A, B)
    with torch.no_grad():
        for name, (A, B) in side.items():
            module = modules[name]
            split = get_tp_split(module.weight)
            Bs = B.float() * scale
            if linear_kind(module) == "column":  # this rank's output rows of B, A whole
                A_local, B_local = A.float(), _shard(Bs, split, 0, rank, tp)
            else:  # row: this rank's input columns of A, B whole
                A_local, B_local = _shard(A.float(), split, 1, rank, tp), Bs
            old_A, old_B = getattr(module, "fp8_side_A", None), getattr(module, "fp8_side_B", None)
            if old_A is not None:
                A_local = torch.cat([old_A.float().cpu(), A_local], 0)
                B_local = torch.cat([old_B.float().cpu(), B_local], 1)
            set_side_adapter(module, A_local, B_local)
    merged = merge_into_model(model, Adapters(rest, adapters.source), scale, full_shapes=full_shapes) if rest else 0
    return len(side), merged


__all__ = ["apply_adapters", "load_fp8_pair"]
