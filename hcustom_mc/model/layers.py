"""Small building blocks of the HunyuanCustom DiT (names follow the released checkpoint keys)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from hcustom_mc.console import log_once
from hcustom_mc.device import uses_cuda
from hcustom_mc.model.spec import LinearSubmodules, build_column
from hcustom_mc.parallel.sequence import NO_SP, SequenceLayout
from hcustom_mc.parallel.sharding import mark_tp_split


@functools.lru_cache(maxsize=None)
def _apex_fused_layer_norm():
    try:
        from apex.normalization import FusedLayerNorm
        # apex's Python package imports without its CUDA extension (a build without --cuda_ext); then
        # FusedLayerNorm.__init__ fails on `importlib.import_module("fused_layer_norm_cuda")`, so probe it here
        import fused_layer_norm_cuda  # noqa: F401
    except Exception:  # not installed, or built without its CUDA extension
        return None
    return FusedLayerNorm


def affine_layer_norm(hidden: int, eps: float = 1e-5, device: torch.device | str | None = None) -> nn.Module:
    """An affine LayerNorm (token refiner, AudioNet): apex's FusedLayerNorm on CUDA when apex is importable,
    else nn.LayerNorm. Both keep `weight` and `bias`, so checkpoints do not care which one was built.
    `device` defaults to the one the model is being built under (`with torch.device(...)`). A model built in host
    memory to run on the GPU (block offload, fp8 loading) gets the same choice as one built there: FusedLayerNorm
    falls back to F.layer_norm for CPU inputs, so the choice follows where the process computes."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    fused = _apex_fused_layer_norm() if device.type == "cuda" or uses_cuda() else None
    log_once(f"affine LayerNorms: {'apex FusedLayerNorm' if fused else 'torch nn.LayerNorm'}")
    return fused(hidden, eps=eps) if fused else nn.LayerNorm(hidden, eps=eps)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (img/txt norm1/norm2, pre_norm, norm_final)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [S, B, C]; shift/scale [B, C]."""
    return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)


class RMSNorm(nn.Module):
    """Per-head RMSNorm (QK norm), computed in fp32 and cast back.

    The weight is shared by all heads while tensor parallelism splits the heads, so each TP rank's
    gradient covers only its heads: `hc_tp_partial_grad` marks it for a sum over the TP group.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight.hc_tp_partial_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first then sin (as released)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear; keys mlp.0 / mlp.2."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    """CLIP pooled vector -> hidden; keys in_layer / out_layer."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """Refiner c_embedder; keys linear_1 / linear_2."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """The release's Conv3d with kernel = stride = patch; [B, C, F, H, W] -> [B, F*H'*W', hidden].

    With kernel = stride the convolution is a linear map of each patch, so it runs as patchify + matmul on the
    Conv3d's own weight (same keys and shapes as the release). That is the plain GEMM on every device, and it
    avoids torch's CPU bf16 Conv3d backward, which returns NaN weight gradients on one thread (torch 2.13,
    tests/test_model_inputs.py)."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = patch = self.proj.kernel_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latents {tuple(x.shape[2:])} are not a whole number of {patch} patches")
        patches = rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Modulation(nn.Module):
    """SiLU -> Linear(hidden, factor*hidden), TP-sharded by output and gathered; key `linear`.

    Under sequence parallelism the vectors modulate only this rank's tokens: `seq.replicated` sums
    their gradient over TP in backward (parallel/sequence.py)."""

    def __init__(self, hidden: int, factor: int, config, submodules: LinearSubmodules, tp_group):
        super().__init__()
        self.factor = factor
        self.linear = build_column(submodules.modulation, hidden, factor * hidden, config, tp_group, gather=True)
        mark_tp_split(self.linear.weight, 0, [factor * hidden])
        mark_tp_split(self.linear.bias, 0, [factor * hidden])

    def forward(self, vec: torch.Tensor, seq: SequenceLayout = NO_SP) -> list[torch.Tensor]:
        out, _ = self.linear(F.silu(vec))
        return list(seq.replicated(out).chunk(self.factor, dim=-1))


class FinalLayer(nn.Module):
    """LayerNorm -> modulate(shift, scale) -> Linear to patch pixels; keys linear, adaLN_modulation.1."""

    def __init__(self, hidden: int, patch: tuple[int, int, int], out_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden, math.prod(patch) * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x, self.eps), shift, scale))
