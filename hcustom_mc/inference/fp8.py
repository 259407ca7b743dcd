"""Sampling with the DiT blocks' linear weights kept in float8 (`--fp8-weights on`).

Where the weights come from decides how they become fp8:
- a release fp8 pair (`..._fp8.pt` + `..._fp8_map.pt`, the released file or `convert --fp8`): the float8
  tensors go into the model as stored, TP-sliced per rank, never dequantised as a whole; LoRAs become side
  adapters on the fp8 linears (out += scale * (x A^T) B^T), since there is no bf16 weight to merge into.
- any other checkpoint (bf16/fp32: release, diffusers, mcore): loaded as usual, LoRAs merged into the bf16
  weights, then every block linear quantised in place per output channel (TP-invariant scales).
The model is built with megatron's local linears (the fp8 layers hook their `_forward_impl`, see
hcustom_mc.model.fp8), and, except for mcore sources (whose distributed loader wants the compute device),
on the CPU: the bf16 block weights an fp8 file never fills are never touched, and only the fp8 model moves
to the GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hcustom_mc.device import compute_device, place_module
from hcustom_mc.model import HunyuanCustomDiT
from hcustom_mc.model.config import ModelConfig

log = logging.getLogger("hcustom_mc")
FP8_WEIGHTS = ("off", "on")
FP8_MATMUL = ("upcast", "auto")


@dataclass
class Fp8LoadReport:
    source: str  # "fp8 checkpoint" | "quantised on load"
    granularity: str  # per-tensor | per-channel | mixed
    linears: int
    bytes: dict = field(default_factory=dict)  # hcustom_mc.model.fp8.weight_bytes on this rank
    lora: list = field(default_factory=list)  # (source, scale, side adapters, merged)

    def describe(self) -> str:
        mib = lambda n: n / 2**20  # noqa: E731
        b = self.bytes
        loras = "".join(f"; LoRA {src} x {scale:g}: {side} side adapters on fp8 linears, {merged} merged"
                        for src, scale, side, merged in self.lora)
        return (f"fp8 weights ({self.source}, {self.granularity} scales): {self.linears} block linears in "
                f"float8_e4m3fn, {mib(b['block_linears']):.2f} MiB with scales (bf16: "
                f"{mib(b['block_linears_as_bf16']):.2f} MiB), other DiT tensors {mib(b['other']):.2f} MiB, DiT total "
                f"{mib(b['total']):.2f} MiB on this rank{loras}")


def _granularity(model: torch.nn.Module) -> str:
    from hcustom_mc.model.fp8 import block_linears, is_fp8_linear

    kinds = {"per-channel" if m.weight_scale.ndim == 1 else "per-tensor"
             for _, m in block_linears(model) if is_fp8_linear(m)}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")


def load_fp8_model(path: Path, fmt: str, model_cfg: ModelConfig, dtype: torch.dtype, cp_mode: str,
                   load_key: str = "module", loras=(), matmul: str = "upcast", fp8_dequant: str = "release",
                   device: torch.device | None = None) -> tuple[HunyuanCustomDiT, Fp8LoadReport]:
    """Collective: this rank's shard of the DiT with fp8 block linears (computing in `dtype`), LoRAs
    (`loras`: [(Adapters, scale)], as checkpoint.lora.load_specs gives) applied, on `device` (default: the
    compute device)."""
    from hcustom_mc.checkpoint.fp8 import apply_adapters, load_fp8_pair
    from hcustom_mc.checkpoint.lora import merge_into_model
    from hcustom_mc.checkpoint.release import is_release_fp8, read_release_fp8
    from hcustom_mc.inference.pipeline import load_model
    from hcustom_mc.checkpoint.release import CheckpointFormatError
    from hcustom_mc.model.fp8 import MATMUL_MODES, Fp8Error, quantize_model_, weight_bytes
    from hcustom_mc.model.spec import local_linear_submodules
    from hcustom_mc.parallel.groups import layout_process_groups

    if matmul not in MATMUL_MODES:
        raise ValueError(f"--fp8-matmul must be one of {MATMUL_MODES}, got {matmul!r}")
    device = compute_device() if device is None else device
    build_on = torch.device("cpu")
    if fmt == "release" and is_release_fp8(path):
        sd, scales = read_release_fp8(path, load_key)  # checked before anything is built
        model = HunyuanCustomDiT(model_cfg, submodules=local_linear_submodules(), params_dtype=dtype, cp_mode=cp_mode,
                                 pg_collection=layout_process_groups(), device=build_on)
        count = load_fp8_pair(model, sd, scales, dtype, mode=fp8_dequant, matmul=matmul, source=str(path))
        del sd
        report = Fp8LoadReport("fp8 checkpoint", _granularity(model), count)
        for adapters, scale in loras:
            side, merged = apply_adapters(model, adapters, scale)
            report.lora.append((adapters.source, scale, side, merged))
    else:
        if fmt == "mcore":
            build_on = device  # megatron's distributed loader fills tensors on the compute device
        model = load_model(path, fmt, model_cfg, dtype, cp_mode, load_key, device=build_on,
                           submodules=local_linear_submodules())
        report = Fp8LoadReport("quantised on load", "per-channel", 0)
        for adapters, scale in loras:  # into the bf16 weights, before they are quantised
            merged = merge_into_model(model, adapters, scale)
            report.lora.append((adapters.source, scale, 0, merged))
        try:
            report.linears = quantize_model_(model, "per-channel", dtype, matmul)
        except Fp8Error as err:  # e.g. non-finite weights: the checkpoint's fault, said with its name
            raise CheckpointFormatError(f"{path}: cannot keep its weights in fp8: {err}") from None
    place_module(model, device)
    model.eval().requires_grad_(False)
    report.bytes = weight_bytes(model)
    return model, report


__all__ = ["FP8_MATMUL", "FP8_WEIGHTS", "Fp8LoadReport", "load_fp8_model"]
