"""Flow-matching objective (paper, section 3): the model predicts the velocity noise - x0.

    t ~ sigmoid(N(logit_mean, logit_std)),  t <- shift*t / (1 + (shift-1)*t)
    x_t = t * noise + (1 - t) * x0,  target = noise - x0,  model timestep = 1000 * t
Noise and t of a sample depend only on (seed, step, position in the global batch), so every
parallel layout trains on exactly the same numbers.
"""

from __future__ import annotations

import zlib

import torch

from hcustom_mc.training.config import ObjectiveConfig


def sample_noise_and_t(shape: tuple[int, ...], keys: list[tuple[int, int]], cfg: ObjectiveConfig, seed: int):
    """keys: (step, position) per sample. Returns noise [B, *shape] and t [B] in (0, 1)."""
    noise, t = [], []
    for step, pos in keys:
        g = torch.Generator().manual_seed(zlib.crc32(repr(("noise", seed, step, pos)).encode()))
        t.append(torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g)))
        noise.append(torch.randn(shape, generator=g))
    t = torch.stack(t)
    if cfg.shift != 1.0:
        t = cfg.shift * t / (1 + (cfg.shift - 1) * t)
    return torch.stack(noise), t


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for latents [B, C, F, H, W] and t [B]."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return tt * noise + (1 - tt) * x0, noise - x0


def flow_matching_loss_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors in fp32 (the caller divides by the global element count)."""
    return (pred.float() - target.float()).pow(2).sum()
