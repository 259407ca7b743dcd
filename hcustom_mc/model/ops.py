"""The one dispatch point between the model and the custom kernels (`kernels/`).

    kernels: auto | triton | torch      (HCUSTOM_KERNELS, or set_kernel_backend(); default auto)
    auto   = Triton on CUDA tensors, PyTorch otherwise;  triton = Triton everywhere (the interpreter on
    CPU: slow, for tests);  torch = the PyTorch reference paths.
The model calls only the functions here; each has the same numbers with either backend (tested).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from hcustom_mc.console import log_once
from hcustom_mc.model.layers import layer_norm, modulate
from hcustom_mc.model.rope import apply_rope, image_positions, rope_cos_sin

BACKENDS = ("auto", "triton", "torch")
_override: str | None = None


def set_kernel_backend(name: str | None) -> None:
    """Process-wide choice (None = back to HCUSTOM_KERNELS / auto)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {name!r}")
    _override = name


def kernel_backend(t: torch.Tensor) -> str:
    wanted = _override or os.environ.get("HCUSTOM_KERNELS", "auto")
    if wanted not in BACKENDS:
        raise ValueError(f"HCUSTOM_KERNELS must be one of {BACKENDS}, got {wanted!r}")
    choice = ("triton" if t.is_cuda else "torch") if wanted == "auto" else wanted
    log_once(f"DiT glue kernels: {_KERNEL_NAMES[choice]}")
    return choice


_KERNEL_NAMES = {"triton": "Triton (kernels/)", "torch": "PyTorch reference"}


# ------------------------------------------------------------------ adaLN
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift. x [S, B, C]; shift, scale [B, C]."""
    if kernel_backend(x) == "triton":
        from hcustom_kernels.adaln import layernorm_modulate as fused

        return fused(x.contiguous(), shift.contiguous(), scale.contiguous(), eps=eps)
    return modulate(layer_norm(x, eps), shift, scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y. x, y [S, B, C]; gate [B, C]."""
    if kernel_backend(x) == "triton":
        from hcustom_kernels.adaln import gated_residual as fused

        return fused(x.contiguous(), gate.contiguous(), y.contiguous())
    return x + gate.unsqueeze(0) * y


# ------------------------------------------------------------------ QK norm + RoPE
@dataclass
class Rotary:
    """What RoPE needs for the image tokens held here: the latent grid, identity count and mode, and
    the first frame held (context parallel). The PyTorch path builds cos/sin tables once per forward;
    the Triton path computes the angles in the kernel."""

    grid: tuple[int, int, int]
    num_identity: int
    mode: str
    dims: tuple[int, int, int]
    theta: float
    frames: range  # frames held here, in the [identity ; video] frame list
    device: torch.device
    identity_rope: str = "paper"  # paper mode: where identity images sit spatially (model/rope.py)
    _tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def image_len(self) -> int:
        return len(self.frames) * self.grid[1] * self.grid[2]

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None:
            hw = self.grid[1] * self.grid[2]
            pos = image_positions(self.num_identity, *self.grid, mode=self.mode,
                                  identity_rope=self.identity_rope)[self.frames.start * hw : self.frames.stop * hw]
            self._tables = rope_cos_sin(pos, self.dims, self.theta, device=self.device)
        return self._tables

    def norm_and_rotate(self, q, k, q_norm, k_norm, image_len: int):
        """RMSNorm q and k per head, rotate the first `image_len` tokens ([S, B, H, D] tensors)."""
        if kernel_backend(q) == "triton":
            from hcustom_kernels.rope import qk_norm_rope

            return qk_norm_rope(q.contiguous(), k.contiguous(), q_norm.weight, k_norm.weight, grid=self.grid,
                                num_identity=self.num_identity, mode=self.mode, identity_rope=self.identity_rope,
                                rope_dims=tuple(self.dims),
                                theta=self.theta, eps=q_norm.eps, image_len=image_len,
                                frame_offset=self.frames.start)
        q, k = q_norm(q), k_norm(k)
        if image_len == 0:
            return q, k
        cos, sin = self.tables()
        if image_len == q.shape[0]:
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return (torch.cat([apply_rope(q[:image_len], cos, sin), q[image_len:]]),
                torch.cat([apply_rope(k[:image_len], cos, sin), k[image_len:]]))


# ------------------------------------------------------------------ per-frame audio cross-attention
def frame_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, F, N, d] against k, v [B, F, M, d] per frame; softmax over M in fp32."""
    if kernel_backend(q) == "triton":
        from hcustom_kernels.frame_attention import frame_cross_attention as fused

        return fused(q.contiguous(), k.contiguous(), v.contiguous())
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
