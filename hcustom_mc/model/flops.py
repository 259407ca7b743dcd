"""Model FLOPs of a training step: pure arithmetic on the config (used by tracking and the planner)."""

from __future__ import annotations

from hcustom_mc.model.config import ModelConfig


def model_flops_per_sample(cfg: ModelConfig, image_tokens: int, text_tokens: int) -> float:
    """Training FLOPs (forward + backward) of one sample; recomputation is not counted.

    Linear layers: 2 FLOPs per weight per token forward, x3 with backward, each stream's weights
    counted only for its own tokens (a double block's image weights see only image tokens):
        double block: (3H^2 + H^2 + 2HM) per stream -> x S_img and x S_txt
        single block: H(3H + M) + (H + M)H         -> x (S_img + S_txt)
    Attention (bidirectional, joint over S = S_img + S_txt): QK^T and AV are 2*2*S*S*H forward,
    x3 with backward = 12 * H * S^2 per block.
    Embedders, modulation vectors, the token refiner and the audio cross-attention are <1% at
    video lengths and are left out.
    """
    H, M = cfg.hidden_size, cfg.mlp_hidden
    S = image_tokens + text_tokens
    double_stream = 4 * H * H + 2 * H * M
    single = H * (3 * H + M) + (H + M) * H
    linear = cfg.num_double_blocks * double_stream * S + cfg.num_single_blocks * single * S
    attention = 12 * H * S * S * (cfg.num_double_blocks + cfg.num_single_blocks)
    return 6.0 * linear + attention
