"""Fused attention of one query block to one key block with log-sum-exp merging: ring attention's tile kernel.

Ring context parallelism attends this rank's queries to one key/value chunk at a time and merges the partial
results through their log-sum-exps. This module does one such chunk in Triton, flash-attention style: the
[M, N] score matrix lives in registers a tile at a time, never in memory.

    merge_block_attention(q, k, v, q_pad, k_pad, scale, out, lse)
        out, lse <- the log-sum-exp merge of (out, lse) with attention of q to (k, v)
    block_attention_backward(q, k, v, dout, lse, delta, q_pad, k_pad, scale, dq, dk, dv)
        dq, dk, dv += the gradients of this key block's share, from the final lse and delta = rowsum(dout * out)

q [B, H, M, D]; k, v [B, H, N, D] (any strides with a unit last stride); q_pad [B, M], k_pad [B, N] bool or
None. A query may see a key only when their padded flags agree (k_pad None: no key is padded, so padded
queries see nothing here). out, lse, dq, dk, dv are fp32 accumulators ([B, H, M, D], [B, H, M], ...) that
the kernels read and write in place; a row no key was allowed for keeps lse = -inf and adds nothing.
Scores, softmax statistics and accumulators are fp32; as in flash-attention, the probabilities (and the
score gradients) are rounded to the input dtype for their products with v, dout, k and q (a no-op in fp32).

Kernels (one program owns its output rows: no atomics, deterministic):
  forward: one program per (block of BLOCK_M query rows, b*h); loops over key blocks with an online softmax,
      then merges into out/lse.
  backward dK/dV: one program per (block of BLOCK_N keys, b*h); loops over query blocks.
  backward dQ: one program per (block of BLOCK_M query rows, b*h); loops over key blocks.
"""

from __future__ import annotations

import math

import torch

from hcustom_kernels._checks import check_float_tensors
from hcustom_kernels.frame_attention import _INTERPRETED, _dot, _to
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# A [BLOCK, D] tile of q, k, v, dout and the accumulators is held on chip: at D = 256 the forward and dQ
# kernels need 256 KiB of shared memory at these tiles (over the 227 KiB of an H100; sm_90 compiles)
_MAX_D = 128
_MAX_GRID_Y = 65535  # B * H programs along CUDA's grid dimension 1
# Tile sizes (tl.dot needs >= 16). Untuned defaults for head dim 128 on Hopper; the tests lower them.
_FWD_BLOCK_M, _FWD_BLOCK_N = 128, 64
_BWD_BLOCK_M, _BWD_BLOCK_N = 64, 64


# ------------------------------------------------------------------ kernels
@triton.jit
def _batch_head(H):
    """(b * H + h, b, h) of this program: grid axis 1 runs over batch x heads; b, h int64 for the offsets."""
    bh = tl.program_id(1)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _fwd_kernel(Q, K, V, QF, KF, O, LSE, H, M, N, D,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh, b, h = _batch_head(H)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = cols < D
    rows64 = rows.to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + rows64[:, None] * sqm + cols[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    qf = tl.load(QF + b * M + rows, mask=rmask, other=2)  # flags 0/1; 2 (rows past M) and 3 (keys) never match
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k, v, kf, kv_mask = _key_block(K, V, KF, b, h, keys, cols, N, D, skb, skh, skn, svb, svh, svn)
        s = _dot(q, tl.trans(k), FIX_BF16, DOT_PREC) * qk_scale
        s = tl.where(qf[:, None] == kf[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows with no allowed key yet keep m = -inf; any finite reference gives them zero terms
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - ref[:, None])
        corr = tl.exp2(m_i - ref)
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None] + _dot(_to(p, v.dtype, FIX_BF16), v, FIX_BF16, DOT_PREC)
        m_i = m_new
    seen = l_i > 0
    blk_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    blk_out = acc / tl.where(seen, l_i, 1.0)[:, None]

    # merge into the running (out, lse): lse = log(e^a + e^b), out = out_a e^(a - lse) + out_b e^(b - lse)
    o_ptr = O + b * sob + h * soh + rows64[:, None] * som + cols[None, :]
    l_ptr = LSE + b * slb + h * slh + rows
    omask = rmask[:, None] & dmask[None, :]
    old_lse = tl.load(l_ptr, mask=rmask, other=float("-inf"))
    old_out = tl.load(o_ptr, mask=omask, other=0.0)
    big = tl.maximum(old_lse, blk_lse)
    big = tl.where(big == float("-inf"), 0.0, big)
    total = tl.exp(old_lse - big) + tl.exp(blk_lse - big)
    new_lse = tl.where(total > 0, big + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))  # -inf: no key yet
    ref = tl.where(new_lse == float("-inf"), 0.0, new_lse)
    new_out = old_out * tl.exp(old_lse - ref)[:, None] + blk_out * tl.exp(blk_lse - ref)[:, None]
    tl.store(o_ptr, new_out, mask=omask)
    tl.store(l_ptr, new_lse, mask=rmask)


@triton.jit
def _probabilities(q, k, qf, kf, lse2, qk_scale, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    """p = exp(q k^T scale - lse) of one tile, 0 where the key is not allowed (or out of range)."""
    s = _dot(q, tl.trans(k), FIX_BF16, DOT_PREC) * qk_scale
    return tl.where(qf[:, None] == kf[None, :], tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def _key_block(K, V, KF, b, h, keys, cols, N, D, skb, skh, skn, svb, svh, svn):
    """k, v [BLOCK_N, BLOCK_D], their padded flags and the tile mask of one key block (zeros past N and D)."""
    keys64 = keys.to(tl.int64)
    kv_mask = (keys < N)[:, None] & (cols < D)[None, :]
    k = tl.load(K + b * skb + h * skh + keys64[:, None] * skn + cols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + keys64[:, None] * svn + cols[None, :], mask=kv_mask, other=0.0)
    kf = tl.load(KF + b * N + keys, mask=keys < N, other=3)  # flags 0/1; 3 never matches a query's
    return k, v, kf, kv_mask


@triton.jit
def _query_block(Q, DO, QF, LSE, DELTA, b, h, bh, rows, cols, M, D, sqb, sqh, sqm, sdb, sdh, sdm):
    """What the backward needs of one query block: q, dout, flags, lse (base 2, -inf rows as 0), delta, mask."""
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    row_mask = rmask[:, None] & (cols < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows64[:, None] * sqm + cols[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows64[:, None] * sdm + cols[None, :], mask=row_mask, other=0.0)
    qf = tl.load(QF + b * M + rows, mask=rmask, other=2)  # 2 never matches a key's flag
    lse = tl.load(LSE + bh.to(tl.int64) * M + rows, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * M + rows, mask=rmask, other=0.0)
    return q, do, qf, lse2, delta, row_mask


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QF, KF, DK, DV, H, M, N, D,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                     skgb, skgh, skgn, svgb, svgh, svgn, qk_scale, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh, b, h = _batch_head(H)
    keys = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k, v, kf, kv_mask = _key_block(K, V, KF, b, h, keys, cols, N, D, skb, skh, skn, svb, svh, svn)
    keys64 = keys.to(tl.int64)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q, do, qf, lse2, delta, row_mask = _query_block(Q, DO, QF, LSE, DELTA, b, h, bh, rows, cols, M, D,
                                                        sqb, sqh, sqm, sdb, sdh, sdm)
        p = _probabilities(q, k, qf, kf, lse2, qk_scale, FIX_BF16, DOT_PREC)
        dv += _dot(tl.trans(_to(p, do.dtype, FIX_BF16)), do, FIX_BF16, DOT_PREC)
        dp = _dot(do, tl.trans(v), FIX_BF16, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(_to(ds, q.dtype, FIX_BF16)), q, FIX_BF16, DOT_PREC)
    dk_ptr = DK + b * skgb + h * skgh + keys64[:, None] * skgn + cols[None, :]
    dv_ptr = DV + b * svgb + h * svgh + keys64[:, None] * svgn + cols[None, :]
    tl.store(dk_ptr, tl.load(dk_ptr, mask=kv_mask, other=0.0) + dk * scale, mask=kv_mask)
    tl.store(dv_ptr, tl.load(dv_ptr, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, QF, KF, DQ, H, M, N, D,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sqgb, sqgh, sqgm, qk_scale, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh, b, h = _batch_head(H)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q, do, qf, lse2, delta, row_mask = _query_block(Q, DO, QF, LSE, DELTA, b, h, bh, rows, cols, M, D,
                                                    sqb, sqh, sqm, sdb, sdh, sdm)
    rows64 = rows.to(tl.int64)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k, v, kf, kv_mask = _key_block(K, V, KF, b, h, keys, cols, N, D, skb, skh, skn, svb, svh, svn)
        p = _probabilities(q, k, qf, kf, lse2, qk_scale, FIX_BF16, DOT_PREC)
        dp = _dot(do, tl.trans(v), FIX_BF16, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(_to(ds, k.dtype, FIX_BF16), k, FIX_BF16, DOT_PREC)
    dq_ptr = DQ + b * sqgb + h * sqgh + rows64[:, None] * sqgm + cols[None, :]
    tl.store(dq_ptr, tl.load(dq_ptr, mask=row_mask, other=0.0) + dq * scale, mask=row_mask)


# ------------------------------------------------------------------ launch helpers
def _config(q: torch.Tensor) -> dict:
    D = q.shape[-1]
    return dict(BLOCK_D=max(16, triton.next_power_of_2(D)), FIX_BF16=_INTERPRETED and q.dtype == torch.bfloat16,
                # fp32 inputs: exact fp32 products like torch's matmul (no TF32); the interpreter computes
                # every dot in numpy fp32 whatever this says
                DOT_PREC="ieee" if q.dtype == torch.float32 or _INTERPRETED else "tf32")


def _warps(block_rows: int, D: int) -> int:
    # the row tiles of q/k/v/dout and the fp32 accumulators: more warps spread them over more registers
    return 8 if block_rows * D >= 8192 else 4


def _flags(pad: torch.Tensor | None, B: int, n: int, device) -> torch.Tensor:
    """[B, n] int8 padded flags (0/1), contiguous; None -> all 0."""
    if pad is None:
        return torch.zeros(B, n, dtype=torch.int8, device=device)
    return pad.to(device=device, dtype=torch.int8).contiguous()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(name: str, q, k, v, q_pad, k_pad, accumulators: dict) -> None:
    """Raise TypeError/ValueError for what the kernels do not handle, before any work."""
    check_float_tensors(name, {"q": q, "k": k, "v": v}, dtype_hint="cast q, k, v to one dtype")
    for key, t in {"q": q, "k": k, "v": v}.items():
        if t.dim() != 4:
            raise ValueError(f"{name}: {key} must be 4-D ([B, H, tokens, D]), got shape {tuple(t.shape)}")
    B, H, M, D = q.shape
    N = k.shape[2]
    if k.shape != v.shape or (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"{name}: q [B, H, M, D] = {tuple(q.shape)} and k, v [B, H, N, D] = {tuple(k.shape)}, "
                         f"{tuple(v.shape)} disagree")
    if not 1 <= D <= _MAX_D:
        raise ValueError(f"{name}: head dim D = {D}; supported 1..{_MAX_D}")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"{name}: B * H = {B * H} programs per row block; at most {_MAX_GRID_Y} (CUDA grid dim 1)")
    if tuple(q_pad.shape) != (B, M) or (k_pad is not None and tuple(k_pad.shape) != (B, N)):
        raise ValueError(f"{name}: q_pad must be [B, M] = {(B, M)} and k_pad [B, N] = {(B, N)} or None")
    for key, (t, shape) in accumulators.items():
        if t.dtype != torch.float32 or tuple(t.shape) != shape or t.device != q.device:
            raise ValueError(f"{name}: {key} must be an fp32 tensor of shape {shape} on {q.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if key not in ("lse", "delta") or name.startswith("merge"):  # written in place: no copy is made
            if t.stride(-1) != 1:
                raise ValueError(f"{name}: {key} is written in place and needs a unit last stride")
    _check_launchable(name, q.device)


def _check_launchable(name: str, device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"{name}: the Triton kernels are compiled in this process and need CUDA tensors; "
                         "on CPU set TRITON_INTERPRET=1 before triton is imported (or use the torch tiles)")


# ------------------------------------------------------------------ public API
def merge_block_attention(q, k, v, q_pad, k_pad, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge attention of q to (k, v) into the running fp32 (out [B, H, M, D], lse [B, H, M]), in place."""
    B, H, M, D = q.shape
    N = k.shape[2]
    _check("merge_block_attention", q, k, v, q_pad, k_pad, {"out": (out, (B, H, M, D)), "lse": (lse, (B, H, M))})
    if M == 0 or N == 0 or B * H == 0:
        return
    q, k, v = (_unit_last(t) for t in (q, k, v))
    qf, kf = _flags(q_pad, B, M, q.device), _flags(k_pad, B, N, q.device)
    cfg = _config(q)
    grid = (triton.cdiv(M, _FWD_BLOCK_M), B * H)
    _fwd_kernel[grid](q, k, v, qf, kf, out, lse, H, M, N, D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                      *out.stride()[:3], *lse.stride()[:2], scale * _LOG2E, BLOCK_M=_FWD_BLOCK_M,
                      BLOCK_N=_FWD_BLOCK_N, num_warps=_warps(_FWD_BLOCK_M, D), **cfg)


def block_attention_backward(q, k, v, dout, lse, delta, q_pad, k_pad, scale: float,
                             dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """dq, dk, dv (fp32 accumulators) += the gradients through attention of q to this key block, given the
    final lse [B, H, M] (over every key block) and delta = rowsum(dout * out) [B, H, M]."""
    B, H, M, D = q.shape
    N = k.shape[2]
    _check("block_attention_backward", q, k, v, q_pad, k_pad,
           {"dq": (dq, (B, H, M, D)), "dk": (dk, (B, H, N, D)), "dv": (dv, (B, H, N, D)),
            "lse": (lse, (B, H, M)), "delta": (delta, (B, H, M))})
    if tuple(dout.shape) != (B, H, M, D):
        raise ValueError(f"block_attention_backward: dout must be {(B, H, M, D)}, got {tuple(dout.shape)}")
    if M == 0 or N == 0 or B * H == 0:
        return
    q, k, v = (_unit_last(t) for t in (q, k, v))
    dout = _unit_last(dout.to(q.dtype))
    lse, delta = lse.contiguous(), delta.contiguous()  # the kernels index them as [B * H, M]
    qf, kf = _flags(q_pad, B, M, q.device), _flags(k_pad, B, N, q.device)
    cfg = _config(q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    _bwd_dkdv_kernel[(triton.cdiv(N, _BWD_BLOCK_N), B * H)](
        q, k, v, dout, lse, delta, qf, kf, dk, dv, H, M, N, D, *strides, *dk.stride()[:3], *dv.stride()[:3],
        scale * _LOG2E, scale, BLOCK_M=_BWD_BLOCK_M, BLOCK_N=_BWD_BLOCK_N, num_warps=_warps(_BWD_BLOCK_N, D), **cfg)
    _bwd_dq_kernel[(triton.cdiv(M, _BWD_BLOCK_M), B * H)](
        q, k, v, dout, lse, delta, qf, kf, dq, H, M, N, D, *strides, *dq.stride()[:3], scale * _LOG2E, scale,
        BLOCK_M=_BWD_BLOCK_M, BLOCK_N=_BWD_BLOCK_N, num_warps=_warps(_BWD_BLOCK_M, D), **cfg)


def block_attention_reference(q, k, v, q_pad, k_pad, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense PyTorch reference in the work dtype (fp32, fp64 for fp64): (out, lse) of q attending to (k, v)
    under the same padding rule; rows with no allowed key give out 0, lse -inf."""
    wd = torch.promote_types(q.dtype, torch.float32)
    B, N = q.shape[0], k.shape[2]
    qf = q_pad.to(q.device)
    kf = torch.zeros(B, N, dtype=torch.bool, device=q.device) if k_pad is None else k_pad.to(q.device)
    allowed = (qf[:, None, :, None] == kf[:, None, None, :])
    s = (q.to(wd) @ k.to(wd).transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    lse = s.logsumexp(-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return p @ v.to(wd), lse
