"""Parameter counts of the DiT by arithmetic on its config (no model built, no process groups): what the training
planner (hcustom_mc/plan) and the sampling planner (inference/memory.py) size memory with. Checked against the
built model by tests/test_plan.py."""

from __future__ import annotations

import math

from hcustom_mc.model.config import ModelConfig


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def stage_parameters(cfg: ModelConfig, tp: int, layers: range, lora_rank: int = 0) -> dict[str, tuple[int, int]]:
    """{module prefix: (parameters on this TP rank, LoRA adapter parameters)} of one pipeline chunk,
    matching HunyuanCustomDiT._build (column-parallel outputs and row-parallel inputs split by TP)."""
    H, M, D, r = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim, lora_rank
    total = cfg.num_double_blocks + cfg.num_single_blocks
    col = lambda i, o: i * o // tp + o // tp  # noqa: E731  weight + bias split by output
    row = lambda i, o: i // tp * o + o  # noqa: E731  bias replicated (added after the all-reduce)
    lora_col = lambda i, o: r * i + o // tp * r  # noqa: E731  A replicated, B split
    lora_row = lambda i, o: r * i // tp + o * r  # noqa: E731
    stream = col(H, 6 * H) + col(H, 3 * H) + 2 * D + row(H, H) + col(H, M) + row(M, H)
    stream_lora = lora_col(H, 3 * H) + lora_row(H, H) + lora_col(H, M) + lora_row(M, H)
    single = col(H, 3 * H + M) + row(H + M, H) + 2 * D + col(H, 3 * H)
    single_lora = lora_col(H, 3 * H + M) + lora_row(H + M, H)
    embedder = _linear(256, H) + _linear(H, H)  # TimestepEmbedder
    out: dict[str, tuple[int, int]] = {}
    nd = sum(1 for i in layers if i < cfg.num_double_blocks)
    ns = len(layers) - nd
    out["double_blocks"] = (nd * 2 * stream, nd * 2 * stream_lora)
    out["single_blocks"] = (ns * single, ns * single_lora)
    out["time_in"] = (embedder, 0)
    out["vector_in"] = (_linear(cfg.pooled_text_dim, H) + _linear(H, H), 0)
    if cfg.guidance_embed:
        out["guidance_in"] = (embedder, 0)
    if layers.start == 0:
        patch = math.prod(cfg.patch_size)
        out["img_in"] = (_linear(cfg.in_channels * patch, H), 0)
        refiner_block = 4 * H + col(H, 3 * H) + row(H, H) + col(H, M) + row(M, H) + col(H, 2 * H)
        out["txt_in"] = (_linear(cfg.text_dim, H) + embedder + _linear(cfg.text_dim, H) + _linear(H, H)
                         + cfg.num_refiner_blocks * refiner_block, 0)
        if cfg.video_condition:
            out["bg_in"] = (_linear(cfg.video_condition_channels * patch, H), 0)
            out["bg_proj"] = (_linear(H, H) * (1 if cfg.mode == "release" else 4), 0)
    if cfg.audio:
        slots = [i for i in cfg.audio_insert_blocks if i in layers]
        if slots:
            A, P = cfg.audio_head_dim, cfg.audio_proj_dim
            out["audio_proj"] = (_linear(cfg.audio_input_dim, P) + _linear(P, P) + _linear(P, cfg.audio_tokens_per_frame * H)
                                 + 2 * H, 0)
            out["audio_models"] = (len(slots) * (4 * H + H * A + H * 2 * A + A * H), 0)
    if layers.stop == total:
        out["final_layer"] = (_linear(H, math.prod(cfg.patch_size) * cfg.out_channels) + _linear(H, 2 * H), 0)
    return out


def block_parameters(cfg: ModelConfig) -> tuple[int, ...]:
    """Parameters of each block at TP = 1, in run order (double blocks, then single blocks)."""
    double = stage_parameters(cfg, 1, range(0, 1))["double_blocks"][0] if cfg.num_double_blocks else 0
    single_at = cfg.num_double_blocks
    single = stage_parameters(cfg, 1, range(single_at, single_at + 1))["single_blocks"][0] if cfg.num_single_blocks else 0
    return (double,) * cfg.num_double_blocks + (single,) * cfg.num_single_blocks


def total_parameters(cfg: ModelConfig) -> int:
    """Parameters of the whole DiT at TP = 1."""
    return sum(n for n, _ in stage_parameters(cfg, 1, range(cfg.num_double_blocks + cfg.num_single_blocks)).values())
