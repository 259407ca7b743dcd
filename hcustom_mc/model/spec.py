"""Layer specs: which parallel linear classes build the blocks (transformer-engine or local).

Megatron-core style: blocks receive `ModuleSpec`s for their linear layers, so the same block
is built with `TEColumnParallelLinear`/`TERowParallelLinear` when transformer-engine is installed
and a GPU is present, and with megatron's local `ColumnParallelLinear`/`RowParallelLinear`
otherwise. The per-sample modulation projections always use local layers because they gather
their output (TE linears do not support `gather_output`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from hcustom_mc.console import log_once
from hcustom_mc.device import resolve_device, uses_cuda

log = logging.getLogger("hcustom_mc")


class RowParallelLinearOnGroup(RowParallelLinear):
    """megatron's local RowParallelLinear, whose forward hands its GEMM the layer's own `tp_group`.

    megatron-core (0.16 to 0.19) calls `_forward_impl(..., tp_group=None)` from RowParallelLinear.forward. The
    row GEMM itself does not communicate (no input-gradient all-reduce, no sequence gather), so the group
    changes no number; but the None makes megatron look up its global TP group, with a "tp_group is None"
    deprecation warning on every call, and fail once megatron makes the group mandatory."""

    def _forward_impl(self, input, weight, *args, tp_group=None, **kwargs):
        return super()._forward_impl(input, weight, *args, tp_group=self.tp_group if tp_group is None else tp_group,
                                     **kwargs)


@dataclass
class LinearSubmodules:
    column: ModuleSpec  # sharded output features (heads, MLP width)
    row: ModuleSpec  # sharded input features, all-reduced output
    modulation: ModuleSpec  # sharded, gathered output (per-sample adaLN vectors)


@lru_cache(maxsize=None)
def transformer_engine_usable() -> bool:
    if not uses_cuda():
        return False
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear  # noqa: F401
        import transformer_engine  # noqa: F401
    except Exception as exc:  # any import failure means the local path
        log.info("transformer-engine not usable (%s); using megatron local linear layers", exc)
        return False
    return True


def get_linear_submodules(use_te: bool | None = None) -> LinearSubmodules:
    """`use_te=None` picks transformer-engine when it is usable."""
    if use_te is None:
        use_te = transformer_engine_usable()
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        log_once("linear layers: transformer-engine (TEColumnParallelLinear / TERowParallelLinear)")
        column, row = ModuleSpec(module=TEColumnParallelLinear), ModuleSpec(module=TERowParallelLinear)
    else:
        log_once("linear layers: megatron-core local (ColumnParallelLinear / RowParallelLinear)")
        return local_linear_submodules()
    return LinearSubmodules(column=column, row=row, modulation=ModuleSpec(module=ColumnParallelLinear))


def local_linear_submodules() -> LinearSubmodules:
    """megatron's local linears (no log line: also what a meta-device build uses, see HunyuanCustomDiT)."""
    return LinearSubmodules(column=ModuleSpec(module=ColumnParallelLinear), row=ModuleSpec(module=RowParallelLinearOnGroup),
                            modulation=ModuleSpec(module=ColumnParallelLinear))


def _no_init(weight: torch.Tensor) -> None:
    # Weights are filled by hcustom_mc.model.init (TP-invariant, seeded by name) or a checkpoint.
    return None


def without_sequence_parallel(config):
    """`config` for layers outside the sequence-parallel region (the text refiner, which runs before
    the hidden state is split, and the per-sample modulation linears whose input is [B, C], not a
    sequence): megatron's SP layers would all-gather / reduce-scatter their dim 0."""
    if not config.sequence_parallel:
        return config
    plain = copy.copy(config)
    plain.sequence_parallel = False
    return plain


def build_column(spec: ModuleSpec, in_f: int, out_f: int, config, tp_group, *, bias: bool = True,
                 gather: bool = False):
    """A column-parallel linear sharded over `tp_group` (the model's ProcessGroupCollection `tp`)."""
    if gather:  # gathered outputs are per-sample vectors here: never sequence parallel
        config = without_sequence_parallel(config)
    return build_module(
        spec, in_f, out_f, config=config, init_method=_no_init, bias=bias, gather_output=gather,
        skip_bias_add=False, is_expert=False, tp_group=tp_group,
    )


def build_row(spec: ModuleSpec, in_f: int, out_f: int, config, tp_group, *, bias: bool = True):
    """A row-parallel linear sharded over `tp_group`."""
    return build_module(
        spec, in_f, out_f, config=config, init_method=_no_init, bias=bias, input_is_parallel=True,
        skip_bias_add=False, is_expert=False, tp_group=tp_group,
    )


def megatron_config(cfg, pg_collection, params_dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None, gradient_accumulation_fusion: bool = False,
                    sequence_parallel: bool = False, virtual_pipeline_model_parallel_size: int | None = None):
    """The megatron TransformerConfig that parallel linear layers read (sizes, dtype, SP); the parallel
    sizes are those of the model's process groups `pg_collection` (hcustom_mc.parallel.groups).

    `sequence_parallel` (TP > 1 only): the blocks' column/row linears all-gather / reduce-scatter the
    sequence (parallel/sequence.py has the layout), and finalize_model_grads sums the row biases' grads.

    megatron allocates its linears on `torch.cuda.current_device()` unless `use_cpu_initialization`;
    then it allocates on the default device, which the model sets to `device` (CPU, or meta for a
    build that allocates nothing). So only a CUDA `device` takes megatron's own CUDA path.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from hcustom_mc.parallel.groups import group_size

    return TransformerConfig(
        num_layers=cfg.num_double_blocks + cfg.num_single_blocks,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.mlp_hidden,
        tensor_model_parallel_size=group_size(pg_collection.tp),
        pipeline_model_parallel_size=group_size(pg_collection.pp),
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=group_size(pg_collection.cp),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=resolve_device(device).type != "cuda",
        perform_initialization=False,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        sequence_parallel=sequence_parallel,
    )
