"""Blockwise (flash-style) attention tiles in plain torch: the portable per-block kernel of ring attention.

Works on any device and dtype. Inputs stay in the compute dtype; each query-block x key-block tile is
upcast on the fly and every statistic (scores, running max, log-sum-exp, output and gradient
accumulators) is kept in fp32 (or fp64 for fp64 inputs). At most one tile of scores
[B, H, block_q, block_k] exists at a time, so memory is O(sequence), never O(sequence^2).

Padding follows the release's two segments per sample ([image + valid text] and [text padding]):
every query row and key column carries a "padded" flag, and a query may see a key only when both
flags agree. Image keys are never padded, so padded text queries see no image key at all.

Layout: q [B, H, M, D], k/v [B, H, N, D]; q_pad [B, M] bool, k_pad [B, N] bool or None (= no padding).
`q_pad_from` / `k_pad_from` are host-side bounds below which no row / column is padded in any sample:
tiles entirely below them skip building a mask (no device-to-host sync is ever needed for that).

On a GPU the same two functions run fused Triton kernels instead (kernels/hcustom_kernels/block_attention.py: the score
tile stays in registers, bf16/fp16 products on the tensor cores); `tile_backend` decides, once per call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from hcustom_mc.console import log_once

TILE_BACKENDS = ("auto", "triton", "torch")


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class Padding:
    """Padded flags of the query rows and key columns of one attention block (see the module docstring)."""

    q_pad: Tensor  # [B, M] bool
    q_pad_from: int  # rows < q_pad_from are valid in every sample
    k_pad: Tensor | None = None  # [B, N] bool; None: no key is padded (image keys)
    k_pad_from: int = 0

    def tile(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        """Allowed-mask [B, 1, i1-i0, j1-j0] of one tile, or None when every pair is allowed."""
        rows_clean = i1 <= self.q_pad_from
        if self.k_pad is None:
            if rows_clean:
                return None
            return ~self.q_pad[:, None, i0:i1, None]
        if rows_clean and j1 <= self.k_pad_from:
            return None
        return (self.q_pad[:, None, i0:i1, None] == self.k_pad[:, None, None, j0:j1])


def block_sizes() -> tuple[int, int]:
    """(queries, keys) per tile; HCUSTOM_ATTN_BLOCK_Q / _K override the defaults (1024 x 1024).

    1024 x 1024 keeps one fp32 score tile at 4 MiB per head; smaller tiles only add Python loop
    overhead, larger ones hold more memory than the O(S) state for realistic head dims."""
    return _env_int("HCUSTOM_ATTN_BLOCK_Q", 1024), _env_int("HCUSTOM_ATTN_BLOCK_K", 1024)


def choose_tile_backend(device_type: str, dtype: torch.dtype, head_dim: int, wanted: str | None = None) -> str:
    """'triton' (kernels/hcustom_kernels/block_attention.py) or 'torch' (the tiles below) for ring attention on `device_type`.

    wanted (default: HCUSTOM_RING_TILES, else auto): auto = Triton for bf16/fp16 CUDA tensors; triton = also
    fp32, and CPU tensors, which need the Triton interpreter (TRITON_INTERPRET=1: the tests); torch. fp64
    inputs and head dims over 128 always take the torch tiles. Compiled for sm_90, the fp32 kernels run
    their dots off the tensor cores and spill 8-17 KB per thread, so auto leaves fp32 to cuBLAS."""
    wanted = wanted or os.environ.get("HCUSTOM_RING_TILES", "auto")
    if wanted not in TILE_BACKENDS:
        raise ValueError(f"HCUSTOM_RING_TILES must be one of {TILE_BACKENDS}, got {wanted!r}")
    if head_dim > 128 or wanted == "torch":
        return "torch"
    if wanted == "triton":
        return "triton" if dtype in (torch.float32, torch.bfloat16, torch.float16) else "torch"
    return "triton" if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) else "torch"


def tile_backend(q: Tensor) -> str:
    """choose_tile_backend for q, logged once per choice."""
    choice = choose_tile_backend(q.device.type, q.dtype, q.shape[-1])
    log_once("ring attention tiles: " + ("fused Triton kernels (kernels/hcustom_kernels/block_attention.py)" if choice == "triton"
                                         else "plain torch (parallel/blockwise.py)"))
    return choice


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: fp32, or fp64 for fp64 inputs (the exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


def _masked(s: Tensor, allowed: Tensor | None) -> Tensor:
    return s if allowed is None else s.masked_fill_(~allowed, -math.inf)


def forward_into(q: Tensor, k: Tensor, v: Tensor, pad: Padding, scale: float, out: Tensor, lse: Tensor,
                 block_q: int | None = None, block_k: int | None = None) -> None:
    """Attend q to (k, v) and merge the result into the running (out, lse) in place.

    out [B, H, M, D] (work dtype) is the normalised output so far and lse [B, H, M] its log-sum-exp
    (-inf where no key was seen yet). Merging two partial results with log-sum-exps a and b:
    lse = log(e^a + e^b), out = out_a e^(a - lse) + out_b e^(b - lse)."""
    if tile_backend(q) == "triton":
        from hcustom_kernels.block_attention import merge_block_attention

        return merge_block_attention(q, k, v, pad.q_pad, pad.k_pad, scale, out, lse)
    bq, bk = block_q or block_sizes()[0], block_k or block_sizes()[1]
    M, N, wd = q.shape[2], k.shape[2], out.dtype
    for i0 in range(0, M, bq):
        i1 = min(i0 + bq, M)
        qi = q[:, :, i0:i1].to(wd) * scale
        m = torch.full(qi.shape[:-1], -math.inf, dtype=wd, device=q.device)  # running row max of this block
        l = torch.zeros_like(m)  # running sum of exp(s - m)
        acc = torch.zeros_like(qi)  # running sum of exp(s - m) v
        for j0 in range(0, N, bk):
            j1 = min(j0 + bk, N)
            s = _masked(qi @ k[:, :, j0:j1].to(wd).transpose(-1, -2), pad.tile(i0, i1, j0, j1))
            m_new = torch.maximum(m, s.amax(dim=-1))
            # rows with no allowed key yet keep m = -inf; any finite reference gives them zero terms
            ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp_(s.sub_(ref[..., None]))
            corr = torch.exp(m - ref)
            l = l * corr + p.sum(dim=-1)
            acc = acc * corr[..., None] + p @ v[:, :, j0:j1].to(wd)
            m = m_new
            del s, p
        seen = l > 0
        blk_lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), torch.full_like(l, -math.inf))
        blk_out = acc / torch.where(seen, l, torch.ones_like(l))[..., None]
        merge_into(out[:, :, i0:i1], lse[:, :, i0:i1], blk_out, blk_lse)


def merge_into(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
    """In-place log-sum-exp merge of a partial result (blk_out, blk_lse) into (out, lse) (views allowed)."""
    new = torch.logaddexp(lse, blk_lse)  # -inf only where neither part saw a key
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    out.mul_(torch.exp(lse - ref)[..., None]).add_(blk_out * torch.exp(blk_lse - ref)[..., None])
    lse.copy_(new)


def backward_into(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, pad: Padding,
                  scale: float, dq: Tensor, dk: Tensor, dv: Tensor,
                  block_q: int | None = None, block_k: int | None = None) -> None:
    """Accumulate the gradients of q, k, v for one key block from the final lse (flash-style recompute).

    With the probabilities recomputed per tile as p = exp(q k^T scale - lse) (lse: of the *whole* row,
    over every key block), the exact gradients are
      dv += p^T dout,  ds = p * (dout v^T - delta),  dq += ds k scale,  dk += ds^T q scale,
    where delta = rowsum(dout * out). dq, dk, dv are work-dtype accumulators, added to in place."""
    if tile_backend(q) == "triton":
        from hcustom_kernels.block_attention import block_attention_backward

        return block_attention_backward(q, k, v, dout, lse, delta, pad.q_pad, pad.k_pad, scale, dq, dk, dv)
    bq, bk = block_q or block_sizes()[0], block_k or block_sizes()[1]
    M, N, wd = q.shape[2], k.shape[2], dq.dtype
    for i0 in range(0, M, bq):
        i1 = min(i0 + bq, M)
        qi = q[:, :, i0:i1].to(wd) * scale
        doi = dout[:, :, i0:i1].to(wd)
        # every final row saw at least one key (its own segment), so lse is finite; guard anyway
        li = torch.where(torch.isinf(lse[:, :, i0:i1]), torch.zeros_like(lse[:, :, i0:i1]), lse[:, :, i0:i1])
        di = delta[:, :, i0:i1]
        dqi = torch.zeros_like(qi)
        for j0 in range(0, N, bk):
            j1 = min(j0 + bk, N)
            kj, vj = k[:, :, j0:j1].to(wd), v[:, :, j0:j1].to(wd)
            s = _masked(qi @ kj.transpose(-1, -2), pad.tile(i0, i1, j0, j1))
            p = torch.exp_(s.sub_(li[..., None]))  # masked entries: exp(-inf) = 0
            dv[:, :, j0:j1] += p.transpose(-1, -2) @ doi
            ds = (doi @ vj.transpose(-1, -2)).sub_(di[..., None]).mul_(p)
            del p, s
            dqi += ds @ kj
            dk[:, :, j0:j1] += ds.transpose(-1, -2) @ qi  # qi already carries the scale
            del ds
        dq[:, :, i0:i1] += dqi * scale
