"""LoRA adapters on megatron's tensor-parallel linears, applied from outside the model maths.

`apply_lora(chunk, targets, rank, alpha, dropout)` turns every matched ColumnParallelLinear /
RowParallelLinear into a subclass of its own class (the module object stays where it is, so the base
parameter names remain the release checkpoint keys) that owns two more parameters, `<module>.lora_A`
[r, in] and `<module>.lora_B` [out, r], and returns what the base returns, (out, bias), with
out += scale * B(A(dropout(x))), scale = alpha / r.

Sharding follows the base so TP adds no communication of its own (megatron local linears):
- column-parallel base (weight [out/tp, in]): A replicated, B [out/tp, r] split with the base's
  segments (fused q;k;v gets each part's rows). megatron's layer all-reduces the gradient of its input
  in backward; the adapter reads the same input, so its input gradient is a per-rank partial sum too.
  The wrapper switches the base's own reduction off and runs base and adapter on one
  `copy_to_tensor_model_parallel_region` of the input: the single backward all-reduce sums both.
  A's gradient (B_local^T dy_local x) is a per-rank partial sum: marked `hc_tp_partial_grad`, which
  the training loop all-reduces over TP with the QK-norm gradients.
- row-parallel base (weight [out, in/tp]): A [r, in/tp] split along `in` with the base's segments,
  B replicated. The adapter's partial output B(A_local x_local) is added to the base's partial output
  before the base's all-reduce (linear, so exact): no extra communication. The gradient reaching B is
  replicated, so B's gradient is a per-rank partial sum: `hc_tp_partial_grad`.
transformer-engine linears (GPU) keep their fused forward; there the adapter runs beside the base
and costs one extra all-reduce: of its input gradient ([S, B, in], column) or of its [S, B, r] partial
output (row). B then sees the reduced (replicated) h, so its gradient is complete, not partial.

Sequence parallel (the base's config.sequence_parallel, TP > 1): the input of a column base is this
rank's rows of the sequence. The local wrapper all-gathers it once (backward: one reduce-scatter of
the summed base + adapter input gradient) and runs the base without its own gather; a TE base gathers
for itself and the adapter gathers again. A row base reduce-scatters instead of all-reducing: the
adapter's partial joins before it (local), or its [S, B, r] partial is reduce-scattered (TE), so B
then sees only this rank's rows and its gradient is a per-rank partial sum in both cases.

Dropout masks are drawn from the default RNG: with dropout > 0 runs are not layout-invariant.
A is seeded TP-invariantly by (seed, parameter name), like hcustom_mc.model.init; B starts at zero,
so an adapted model starts equal to its base.
"""

from __future__ import annotations

import fnmatch
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcustom_mc.parallel.groups import group_rank, group_size, tensor_parallel_group
from hcustom_mc.parallel.sharding import get_tp_split, mark_tp_split, shard_full_tensor

DEFAULT_TARGETS = (
    "double_blocks.*.img_attn_qkv", "double_blocks.*.txt_attn_qkv",
    "double_blocks.*.img_attn_proj", "double_blocks.*.txt_attn_proj",
    "double_blocks.*.img_mlp.fc1", "double_blocks.*.img_mlp.fc2",
    "double_blocks.*.txt_mlp.fc1", "double_blocks.*.txt_mlp.fc2",
    "single_blocks.*.linear1", "single_blocks.*.linear2",
)
LORA_PARAMS = ("lora_A", "lora_B")


def is_lora_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


class _LoRAMixin:
    lora_rank: int
    lora_scale: float

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.lora_scale


def _tp_input(x: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """A column layer's input as its GEMM sees it: replicated (backward all-reduce of the input gradient),
    or under SP all-gathered along the sequence (backward reduce-scatter)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    if group_size(group) == 1:
        return x
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    return copy_to_tensor_model_parallel_region(x, group=group)


class _ColumnLoRA(_LoRAMixin):
    def forward(self, input_, *args, **kwargs):
        sp = self._lora_sequence_parallel
        if getattr(self, "_lora_shared_input", False):  # megatron local layer, own gather / reduction switched off
            x = _tp_input(input_, sp, self.tp_group)
            out, bias = super().forward(x, *args, **kwargs)
        else:  # transformer-engine: the adapter's input gradient needs its own all-reduce / reduce-scatter
            out, bias = super().forward(input_, *args, **kwargs)
            x = _tp_input(input_, sp, self.tp_group)
        delta = self._lora(x)
        if getattr(self, "gather_output", False):
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            delta = gather_from_tensor_model_parallel_region(delta, group=self.tp_group)
        return out + delta.to(out.dtype), bias


def _tp_output(partial: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """A row layer's partial output summed over TP: all-reduced, or under SP reduce-scattered along the sequence."""
    from megatron.core.tensor_parallel.mappings import (reduce_from_tensor_model_parallel_region,
                                                        reduce_scatter_to_sequence_parallel_region)

    if group_size(group) == 1:
        return partial
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(partial, group=group)
    return reduce_from_tensor_model_parallel_region(partial, group=group)


class _RowLoRA(_LoRAMixin):
    def forward(self, input_):
        sp = self._lora_sequence_parallel
        if not getattr(self, "_lora_shared_input", False):  # transformer-engine: reduce the [S, B, r] partial
            out, bias = super().forward(input_)
            h = _tp_output(F.linear(self.lora_dropout(input_), self.lora_A), sp, self.tp_group)
            return out + (F.linear(h, self.lora_B) * self.lora_scale).to(out.dtype), bias
        # megatron's RowParallelLinear.forward (input_is_parallel, bias added after the reduction), with
        # the adapter's partial output joining the base's before the one all-reduce / reduce-scatter
        partial = self._forward_impl(input=input_, weight=self.weight, bias=None,
                                     gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                     allreduce_dgrad=False, sequence_parallel=False, tp_group=self.tp_group,
                                     grad_output_buffer=None)
        partial = partial + self._lora(input_).to(partial.dtype)
        out = _tp_output(partial, sp, self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None


_CLASSES: dict[type, type] = {}


def _lora_class(base_cls: type, kind: str) -> type:
    key = (base_cls, kind)
    if key not in _CLASSES:
        mixin = _ColumnLoRA if kind == "column" else _RowLoRA
        _CLASSES[key] = type(f"LoRA{base_cls.__name__}", (mixin, base_cls), {})
    return _CLASSES[key]


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if "ColumnParallelLinear" in name:
        return "column"
    if "RowParallelLinear" in name:
        return "row"
    return None


def _local_megatron(module: nn.Module) -> bool:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return isinstance(module, (ColumnParallelLinear, RowParallelLinear))


def match_targets(model: nn.Module, targets) -> list[str]:
    return [n for n, m in model.named_modules() if _kind(m) and any(fnmatch.fnmatchcase(n, t) for t in targets)]


def init_lora_A(full_shape, name: str, seed: int) -> torch.Tensor:
    """uniform(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a=sqrt(5)), from (seed, name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(full_shape[1])
    return (torch.rand(full_shape, generator=gen) * 2 - 1) * bound


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 8, alpha: float | None = None,
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Add adapters to the matched linears of `model` (one chunk); returns the adapted module names.

    The adapters are initialised (A seeded by name, B zero) on the base weight's device and dtype."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    tp_group = tensor_parallel_group(model)  # the chunk's own (its ProcessGroupCollection's `tp`)
    tp_rank, tp = group_rank(tp_group), group_size(tp_group)
    names = match_targets(model, targets)
    for name in names:
        module = model.get_submodule(name)
        if hasattr(module, "lora_A"):
            raise ValueError(f"{name} already has a LoRA adapter")
        kind = _kind(module)
        local = _local_megatron(module)
        config = getattr(module, "config", None)
        sp = tp > 1 and bool(getattr(config, "sequence_parallel", False))
        weight = module.weight
        split = get_tp_split(weight)
        out_local, in_local = weight.shape
        full_out = sum(split.segments) if split is not None and kind == "column" else out_local * (tp if kind == "column" else 1)
        full_in = sum(split.segments) if split is not None and kind == "row" else in_local * (tp if kind == "row" else 1)
        kw = dict(device=weight.device, dtype=weight.dtype)
        if kind == "column":
            A = nn.Parameter(torch.empty(rank, in_local, **kw))
            B = nn.Parameter(torch.empty(out_local, rank, **kw))
            mark_tp_split(B, 0, split.segments if split is not None else [full_out])
            A.hc_tp_partial_grad = True
        else:
            A = nn.Parameter(torch.empty(rank, in_local, **kw))
            B = nn.Parameter(torch.empty(out_local, rank, **kw))
            mark_tp_split(A, 1, split.segments if split is not None else [full_in])
            # B's input is the partial A_local x (local), or after the reduction only this rank's rows (SP);
            # only the TE path without SP hands it the whole reduced h, every rank the same gradient
            B.hc_tp_partial_grad = local or sp
        module.lora_rank, module.lora_alpha, module.lora_scale = rank, alpha, alpha / rank
        module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        module.register_parameter("lora_A", A)
        module.register_parameter("lora_B", B)
        module._lora_sequence_parallel = sp
        if local:
            module._lora_shared_input = True
            if kind == "column":  # the wrapper does the (one) gather / input-gradient reduction for base and adapter
                module.allreduce_dgrad = False
                module.disable_grad_reduce = True
                module.sequence_parallel = False
        module.__class__ = _lora_class(type(module), kind)
        if not weight.is_meta:
            with torch.no_grad():
                full_a = init_lora_A((rank, full_in), f"{name}.lora_A", seed)
                a_split = get_tp_split(A)
                if a_split is not None and tp > 1:
                    full_a = shard_full_tensor(full_a, a_split, tp_rank, tp)
                A.copy_(full_a)
                B.zero_()
    return names


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and _kind(m)]


@torch.no_grad()
def merge_lora(model: nn.Module, scale: float = 1.0) -> int:
    """Fold scale * lora_scale * B @ A into each adapted base weight, this rank's shard, and zero B
    (the model's output is unchanged, the adapters are then a no-op). Returns the modules merged.

    Column: W_local += B_local @ A (B holds this rank's rows). Row: W_local += B @ A_local (A holds
    this rank's input columns). Both are exactly the shard of the full merged weight."""
    count = 0
    for _, module in lora_modules(model):
        delta = (module.lora_B.float() @ module.lora_A.float()) * (module.lora_scale * scale)
        module.weight.add_(delta.to(module.weight.dtype))
        module.lora_B.zero_()
        count += 1
    return count


__all__ = ["DEFAULT_TARGETS", "apply_lora", "merge_lora", "is_lora_name", "lora_modules", "match_targets"]
