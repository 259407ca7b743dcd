"""Linear weights kept in float8_e4m3fn with their scales, upcast just before each matmul.

A block linear (megatron's local ColumnParallelLinear / RowParallelLinear, the classes every block
linear is built from when transformer-engine is not used) is turned in place into a subclass of its own
class, as LoRA does (hcustom_mc.model.lora): its `weight` becomes a float8_e4m3fn Parameter of the same
(per-rank) shape and it gains a float32 buffer `weight_scale`, shape () (per-tensor, as the released fp8
checkpoint) or [out_local] (per output channel). The real weight is `weight.float() * scale` (row-wise).

Both megatron forwards hand their weight to `self._forward_impl(input=..., weight=...)`, after their own
tensor-parallel input handling and before the output gather / all-reduce, so overriding `_forward_impl`
alone covers column, row and gathered (modulation) layers at any TP: the dequantised weight exists only
for the duration of one matmul. Module names, parameter names and TP split marks stay as they were, and
the fp8 tensors stay parameters / buffers of their block, so whatever moves a block's tensors between
host and GPU moves 1 byte per weight.

The matmul (`fp8_matmul_backend` decides; the CPU always upcasts):
  upcast      W = (w8.float() * s).to(compute dtype); then megatron's own matmul on W. In bf16 this is
              exactly the bf16 weight the dequantising loader builds (one rounding of the same fp32
              product), so the output equals that model's bit for bit.
  rowwise /   torch._scaled_mm on fp8 inputs (GPUs with fp8 tensor cores): the activation is quantised
  tensorwise  to fp8 per token (rowwise, sm_90+) or per tensor (sm_89, per-tensor weights only). Faster,
              but not exact: it adds the activation's fp8 rounding (relative 2^-4 per element).
A side adapter (LoRA on an fp8 base) adds `(x A^T) B^T` to the layer's partial output (see
`set_side_adapter`); it is exact under TP for the same reason LoRA is (column: A whole, B this rank's
rows; row: A this rank's input columns, B whole, summed by the layer's own all-reduce).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from hcustom_mc.parallel.groups import group_size
from hcustom_mc.parallel.sharding import TPSplit, get_tp_split, mark_tp_split

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
GRANULARITIES = ("per-tensor", "per-channel")
MATMUL_MODES = ("upcast", "auto")
BLOCK_MARKERS = ("double_blocks", "single_blocks")


class Fp8Error(ValueError):
    """fp8 weights or scales that cannot be used; the message names the tensor and what is wrong."""


# ----------------------------------------------------------------------------- quantisation maths
def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16-representable value >= x (positive finite fp32 x), as fp32."""
    b = x.to(torch.bfloat16)
    bits = b.view(torch.int16)
    bits = torch.where(b.float() < x, bits + 1, bits)  # next bf16 up: positive floats order like their bits
    return bits.view(torch.bfloat16).float()


def quantize_weight(w: torch.Tensor, granularity: str, amax: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8, scale) with w ~= w8.float() * scale (scale broadcast over rows when per-channel).

    per-tensor: scale = amax(|w|) / 448 in fp32, as the release's fp8 files (an all-zero weight gets 1.0).
    per-channel: one scale per output row, amax_row / 448 rounded up to a bfloat16-representable value, so
    readers that round scales to bf16 (the release's runtime, `--fp8-dequant release`) read exactly the
    scale the weight was quantised with; rounding up keeps |w / scale| <= 448.
    `amax`: precomputed |w| maxima (() or [out]) when `w` is one TP shard of a larger weight (see
    `quantize_linear_`); default: from `w`. q = clamp(w / scale, +-448) rounded to nearest even.
    """
    if granularity not in GRANULARITIES:
        raise Fp8Error(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}")
    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise Fp8Error("cannot quantise a weight holding non-finite values")
    if amax is None:
        amax = wf.abs().amax() if granularity == "per-tensor" else wf.abs().amax(dim=1)
    amax = amax.float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if granularity == "per-channel":
        scale = bf16_ceil(scale)
    q = (wf / (scale if scale.ndim == 0 else scale[:, None])).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w8.float() * scale (row-wise for a [out] scale), rounded once to `dtype`."""
    s = scale.float()
    return (w8.float() * (s if s.ndim == 0 else s[:, None])).to(dtype)


def check_scale(scale, out_features: int, name: str) -> torch.Tensor:
    """A scale as stored in an fp8 map -> fp32 tensor () or [out_features]; Fp8Error says what is wrong."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = torch.tensor(float(scale))
    if not isinstance(scale, torch.Tensor) or not (scale.is_floating_point() and scale.dtype != FP8_DTYPE):
        raise Fp8Error(f"scale of {name} is a {type(scale).__name__ if not isinstance(scale, torch.Tensor) else scale.dtype}, "
                       f"not a float tensor or number")
    s = scale.detach().float()
    if s.numel() == 1:
        s = s.reshape(())
    elif s.ndim == 1 and s.shape[0] == out_features:
        pass
    else:
        raise Fp8Error(f"scale of {name} has shape {tuple(scale.shape)}; expected one value (per-tensor) or "
                       f"[{out_features}] (per output channel of its weight [{out_features}, in])")
    bad = ~torch.isfinite(s) | (s <= 0)
    if bad.any():
        first = s.reshape(-1)[bad.reshape(-1)][0].item()
        raise Fp8Error(f"scale of {name} holds {int(bad.sum())} non-finite or non-positive value(s) (e.g. {first}); "
                       f"fp8 scales are positive finite numbers")
    return s


# ----------------------------------------------------------------------------- the matmul
@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_matmul_backend(mode: str, device: torch.device, compute_dtype: torch.dtype, in_features: int,
                       out_features: int, per_channel: bool, capability: tuple[int, int] | None = None,
                       has_scaled_mm: bool | None = None) -> str:
    """'upcast' | 'rowwise' | 'tensorwise' for one layer's matmul.

    mode 'upcast' always upcasts. mode 'auto' uses torch._scaled_mm only on a CUDA device whose capability
    has fp8 tensor cores (sm_89: tensor-wise scales only, so per-tensor weights; sm_90 and newer: row-wise
    scales, torch's CUTLASS kernel) with bf16 output and both matrix sizes multiples of 16 (the kernels'
    alignment); everything else, the CPU included, upcasts. `capability` / `has_scaled_mm` default to this
    process's torch and GPU (tests pass them)."""
    if mode not in MATMUL_MODES:
        raise Fp8Error(f"fp8 matmul mode must be one of {MATMUL_MODES}, got {mode!r}")
    if mode == "upcast" or device.type != "cuda" or compute_dtype != torch.bfloat16:
        return "upcast"
    if has_scaled_mm is None:
        has_scaled_mm = hasattr(torch, "_scaled_mm")
    if not has_scaled_mm or in_features % 16 or out_features % 16:
        return "upcast"
    if capability is None:
        capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if capability >= (9, 0):
        return "rowwise"
    if capability == (8, 9) and not per_channel:
        return "tensorwise"
    return "upcast"


def scaled_mm_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """x @ (w8 * scale)^T + bias with torch._scaled_mm: x is quantised to fp8 on the fly, per row (token)
    when `rowwise`, else per tensor. x [..., in], w8 [out, in] -> [..., out] in `out_dtype`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    tiny = torch.finfo(torch.float32).tiny
    if rowwise:
        sx = (x2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_(min=tiny)  # [M, 1]
        s = scale.float()
        sw = (s.expand(w8.shape[0]) if s.ndim == 0 else s).reshape(1, -1).contiguous()  # [1, N]
    else:
        sx = (x2.abs().amax() / FP8_MAX).clamp_(min=tiny)
        sw = scale.float().reshape(())
    x8 = (x2 / sx).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*shape[:-1], w8.shape[0])


# ----------------------------------------------------------------------------- the layer
class _Fp8Linear:
    """Mixed into a megatron local linear's own class (see module docstring)."""

    fp8_compute_dtype: torch.dtype
    fp8_matmul: str

    def _forward_impl(self, input, weight, *args, **kwargs):
        if weight is not self.weight:  # a weight handed in by the caller: not ours to dequantise
            return super()._forward_impl(input, weight, *args, **kwargs)
        dtype = self.fp8_compute_dtype
        backend = fp8_matmul_backend(self.fp8_matmul, input.device, dtype, weight.shape[1], weight.shape[0],
                                     self.weight_scale.ndim == 1)
        if backend != "upcast" and not kwargs.get("sequence_parallel", False):
            out = scaled_mm_linear(input, weight, self.weight_scale, kwargs.get("bias"), dtype, backend == "rowwise")
        else:
            out = super()._forward_impl(input, dequantize_weight(weight, self.weight_scale, dtype), *args, **kwargs)
        side = getattr(self, "fp8_side_A", None)
        if side is not None:  # LoRA on the fp8 base: this rank's partial (row) / rows (column) of it
            out = out + nn.functional.linear(nn.functional.linear(input.to(side.dtype), side), self.fp8_side_B).to(out.dtype)
        return out

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .float() / .half() would cast the fp8 weight without its scale: refuse; device
        # moves keep float8 (checked on an empty fp8 tensor before anything is changed)
        probe = fn(torch.empty(0, dtype=FP8_DTYPE, device=self.weight.device))
        if probe.dtype != FP8_DTYPE:
            raise Fp8Error(f"cannot cast a layer with fp8 weights to {probe.dtype}: its weights are float8 with "
                           f"scales (they are upcast to {self.fp8_compute_dtype} at each matmul); move it with "
                           f".to(device) only")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.weight_scale.ndim == 0 else "per-channel"
        return f"{super().extra_repr()}, weight=float8_e4m3fn ({kind} scales, {self.fp8_matmul} -> {self.fp8_compute_dtype})"


_CLASSES: dict[type, type] = {}


def _fp8_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Fp8{base.__name__}", (_Fp8Linear, base), {})
    return _CLASSES[base]


def linear_kind(module: nn.Module) -> str | None:
    """'column' | 'row' for megatron's local parallel linears (and their subclasses), else None."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return None


def is_fp8_linear(module: nn.Module) -> bool:
    return isinstance(module, _Fp8Linear)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears fp8 applies to: every 2-D-weight linear inside double_blocks / single_blocks (what the
    release quantises). They must be megatron local linears (built with local_linear_submodules)."""
    out, other = [], []
    for name, module in model.named_modules():
        if not any(m in name.split(".") for m in BLOCK_MARKERS):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        if linear_kind(module) is None:
            other.append(f"{name} ({type(module).__name__})")
        else:
            out.append((name, module))
    if other:
        raise Fp8Error(f"fp8 weights need megatron's local parallel linears in the blocks; these are not: {other[:5]} "
                       f"(build the model with hcustom_mc.model.spec.local_linear_submodules())")
    return out


def _scale_split(module: nn.Module, per_channel: bool) -> TPSplit | None:
    """A per-channel scale of a column-parallel layer is split with its weight's rows; otherwise replicated."""
    split = get_tp_split(module.weight)
    return split if per_channel and linear_kind(module) == "column" and split is not None and split.dim == 0 else None


def to_fp8_linear(module: nn.Module, w8: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype,
                  matmul: str = "upcast") -> None:
    """Make `module` (a megatron local linear) hold `w8` (this rank's shard, float8_e4m3fn) and `scale`
    (() or [out_local] fp32) in place of its weight; its parameter marks (TP split) are kept."""
    if matmul not in MATMUL_MODES:
        raise Fp8Error(f"fp8 matmul mode must be one of {MATMUL_MODES}, got {matmul!r}")
    if linear_kind(module) is None:
        raise Fp8Error(f"{type(module).__name__} is not a megatron local parallel linear")
    old = module.weight
    if w8.dtype != FP8_DTYPE or tuple(w8.shape) != tuple(old.shape):
        raise Fp8Error(f"fp8 weight {w8.dtype} {tuple(w8.shape)} does not replace {old.dtype} {tuple(old.shape)}")
    if scale.ndim not in (0, 1) or (scale.ndim == 1 and scale.shape[0] != old.shape[0]):
        raise Fp8Error(f"scale of shape {tuple(scale.shape)} does not fit weight {tuple(old.shape)}")
    if getattr(module, "sequence_parallel", False):
        raise Fp8Error("fp8 linears do not run under sequence parallelism (sampling never uses it)")
    if not is_fp8_linear(module):
        module.__class__ = _fp8_class(type(module))
    param = nn.Parameter(w8.to(old.device), requires_grad=False)
    param.__dict__.update({k: v for k, v in old.__dict__.items() if k != "_is_param"})  # TP split marks & co.
    module.weight = param
    module.register_buffer("weight_scale", scale.float().to(old.device), persistent=True)
    split = _scale_split(module, scale.ndim == 1)
    if split is not None:
        mark_tp_split(module.weight_scale, 0, split.segments)
    module.fp8_compute_dtype, module.fp8_matmul = compute_dtype, matmul


def fp8_structure_(module: nn.Module, per_channel: bool, compute_dtype: torch.dtype, matmul: str = "upcast") -> None:
    """Empty fp8 storage (zeros) and scales of the right shapes, to be filled by a state dict load."""
    w = module.weight
    scale = torch.ones(w.shape[0] if per_channel else (), dtype=torch.float32, device=w.device)
    to_fp8_linear(module, torch.zeros(w.shape, dtype=FP8_DTYPE, device=w.device), scale, compute_dtype, matmul)


def reduce_device(group) -> torch.device:
    """Where a collective on `group` can run: NCCL groups take CUDA tensors only (a model quantised in host memory
    before it goes to the GPU still reduces over NCCL), every other backend (gloo) the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    out = t.to(reduce_device(group))
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out.to(t.device)


def quantize_linear_(module: nn.Module, granularity: str, compute_dtype: torch.dtype, matmul: str = "upcast") -> None:
    """Quantise `module`'s own (bf16/fp32, this rank's shard) weight in place. The |w| maxima are taken over
    the whole weight, not the shard (a MAX all-reduce over the layer's TP group where the shard splits a
    channel or the tensor), so every TP layout stores the same fp8 values and scales."""
    w = module.weight.detach()
    kind, tp_group = linear_kind(module), getattr(module, "tp_group", None)
    tp = group_size(tp_group) if tp_group is not None else 1
    if granularity == "per-tensor":
        amax = w.float().abs().amax()
        reduce = tp > 1
    else:
        amax = w.float().abs().amax(dim=1)
        reduce = tp > 1 and kind == "row"  # a row-parallel shard holds part of every output channel
    if reduce:
        amax = _all_reduce_max(amax, tp_group)
    w8, scale = quantize_weight(w, granularity, amax=amax)
    to_fp8_linear(module, w8, scale, compute_dtype, matmul)


def quantize_model_(model: nn.Module, granularity: str, compute_dtype: torch.dtype, matmul: str = "upcast") -> int:
    """Quantise every block linear of `model` in place; returns how many (collective over each layer's TP group)."""
    linears = block_linears(model)
    with torch.no_grad():
        for name, module in linears:
            if not is_fp8_linear(module):
                try:
                    quantize_linear_(module, granularity, compute_dtype, matmul)
                except Fp8Error as err:
                    raise Fp8Error(f"{name}: {err}") from None
    return len(linears)


def set_side_adapter(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    """LoRA on an fp8 layer: out += (x A^T) B^T, with this rank's A [r, in_local] and B [out_local, r] (the
    scale folded into B), in the layer's compute dtype. Several adapters: concatenate along r."""
    if not is_fp8_linear(module):
        raise Fp8Error(f"{type(module).__name__} has no fp8 weight: merge the adapter into its weight instead")
    out_local, in_local = module.weight.shape
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_local or B.shape[0] != out_local or A.shape[0] != B.shape[1]:
        raise Fp8Error(f"side adapter {tuple(B.shape)} @ {tuple(A.shape)} does not fit weight {tuple(module.weight.shape)}")
    dtype, device = module.fp8_compute_dtype, module.weight.device
    module.register_buffer("fp8_side_A", A.to(device, dtype).contiguous(), persistent=False)
    module.register_buffer("fp8_side_B", B.to(device, dtype).contiguous(), persistent=False)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the DiT's tensors held here: the block linears' weights as stored (with scales and side
    adapters), what those weights would take in `bf16`, and everything else."""
    blocks = {id(m.weight) for _, m in block_linears(model)}
    linears = sum(m.weight.numel() * m.weight.element_size() for _, m in block_linears(model))
    extra = sum(b.numel() * b.element_size() for _, m in block_linears(model)
                for n, b in m.named_buffers(recurse=False) if n in ("weight_scale", "fp8_side_A", "fp8_side_B"))
    as_bf16 = sum(m.weight.numel() * 2 for _, m in block_linears(model))
    rest = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in blocks)
    return {"block_linears": linears + extra, "block_linears_as_bf16": as_bf16, "other": rest - extra,
            "total": rest + linears}


__all__ = ["FP8_DTYPE", "FP8_MAX", "GRANULARITIES", "MATMUL_MODES", "Fp8Error", "block_linears", "bf16_ceil",
           "check_scale", "dequantize_weight", "linear_kind", "fp8_matmul_backend", "fp8_structure_", "is_fp8_linear",
           "quantize_linear_", "quantize_model_", "quantize_weight", "scaled_mm_linear", "set_side_adapter",
           "to_fp8_linear", "weight_bytes"]
