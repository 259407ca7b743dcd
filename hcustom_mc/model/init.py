"""TP-invariant weight initialisation.

Each full tensor is drawn from a generator seeded by (seed, parameter name), then this rank keeps
its shard; so a model initialised at TP=2 equals the same model initialised at TP=1. Zero-init
follows the release (adaLN modulations, final layer) and the paper (audio to_out, paper bg_proj
last layer) so new branches start as the identity.
"""

from __future__ import annotations

import zlib

import torch

from hcustom_mc.parallel.groups import group_rank, group_size, tensor_parallel_group
from hcustom_mc.parallel.sharding import get_tp_split, shard_full_tensor

ZERO_INIT = ("_mod.linear.", "modulation.linear.", "adaLN_modulation.1.", "final_layer.linear.", ".to_out.", "bg_proj.6.")


def _full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    split = get_tp_split(param)
    if split is not None:
        shape[split.dim] = sum(split.segments)
    return shape


def initialize_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02, zero_init: bool = True,
                       names: set[str] | None = None) -> None:
    """Normal(0, std) weights, zero biases, unit norms; `zero_init=False` randomises everything (tests).
    `names` initialises only those parameters (the modules a pretrained source lacks)."""
    group = tensor_parallel_group(model)
    rank, tp = group_rank(group), group_size(group)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_meta or (names is not None and name not in names):
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            is_norm = name.endswith("norm.weight") or "norm1." in name or "norm2." in name or ".norm." in name
            if zero_init and any(tag in name for tag in ZERO_INIT):
                full = torch.zeros(_full_shape(param))
            elif zero_init and is_norm:
                full = torch.ones(_full_shape(param)) if name.endswith("weight") else torch.zeros(_full_shape(param))
            elif zero_init and name.endswith("bias"):
                full = torch.zeros(_full_shape(param))
            else:
                full = torch.randn(_full_shape(param), generator=gen) * std
            split = get_tp_split(param)
            if split is not None and tp > 1:
                full = shard_full_tensor(full, split, rank, tp)
            param.copy_(full.to(param.dtype))
