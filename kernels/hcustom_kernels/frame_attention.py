"""Per-frame audio cross-attention core (AudioCrossAttention), forward and backward.

    out[b, f] = softmax(q[b, f] k[b, f]^T / sqrt(d)) v[b, f]
q [B, F, N, d] (video tokens of a frame), k, v [B, F, M, d] (M audio tokens of the same frame, 16 in
the model), one head. Scores and softmax in fp32, output in the input dtype.

Kernels (the [B, F, N, M] score/probability tensor never exists in memory; it lives in registers):
  forward: one program per (block of BLOCK_N query rows, frame). Loops over d in BLOCK_D chunks to
      build the [BLOCK_N, M] scores with tl.dot, softmax in fp32 (exp2), then a second loop over d
      writes out = P v chunk by chunk. When a backward will follow it also stores the per-row
      logsumexp (base 2, [B*F, N] fp32) so the backward can rebuild P without a max/sum pass.
  backward: one program per (group of row blocks, frame). For each row block: a first loop over d
      rebuilds S = q k^T and dP = dO v^T; then P = exp2(S - lse), delta = rowsum(P * dP) (equal to
      rowsum(dO * O), without reading O), dS = P * (dP - delta) / sqrt(d); a second loop over d
      writes dQ = dS k and accumulates dK = dS^T q and dV = P^T dO into the program's own fp32
      partial rows of a [2, B*F, n_split, M, d] buffer (no atomics: deterministic), which torch
      sums over n_split afterwards. The [M, d] accumulator is too large for registers at the model's
      head dim (16 x 1024 fp32 per program), so it lives in that buffer: a barrier at the top of each
      row block orders the previous block's stores before this block's load-add-store.
"""

from __future__ import annotations

import math
import os

import torch

from hcustom_kernels._checks import check_backend, check_float_tensors
import triton
import triton.language as tl

_MAX_M = 64  # audio tokens per frame: the whole [BLOCK_N, M] score tile is held in registers
_MAX_D = 4096  # head dim (1024 at 13B)
_MAX_FRAME = 2**31 - 1  # offsets inside one frame (N * d) are int32; frame bases are int64
# Query rows per program and d chunk width (tl.dot needs >= 16). The tests lower them to force
# masked row tails and several d chunks.
_BLOCK_N = 64
_BLOCK_D = 64
_LOG2E = 1.4426950408889634
# Triton 3.9's interpreter gets bf16 wrong twice: tl.dot multiplies bf16 operands as their raw
# uint16 bits, and fp32 -> bf16 casts truncate (the GPU rounds to nearest even). Under the
# interpreter, bf16 dot operands are widened to fp32 (exact) and casts round explicitly, so the CPU
# tests see the GPU's numbers. Compiled kernels keep native bf16 dots and casts.
# Read at import, as triton.jit reads it when it decorates the kernels below.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------ kernels
@triton.jit
def _dot(a, b, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    """a @ b accumulated in fp32."""
    if FIX_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _to(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 x rounded to dtype (nearest even)."""
    if FIX_BF16:
        # round the fp32 bits to bf16 precision so the interpreter's truncating cast is exact
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, M, D, qk_scale,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                STORE_LSE: tl.constexpr, FIX_BF16: tl.constexpr, DOT_PREC: tl.constexpr):
    nb = tl.program_id(0)
    bf = tl.program_id(1)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    kmask = keys < M
    # int64 frame bases: B*F*N*d can pass 2**31; offsets inside one frame stay int32
    q_base = q_ptr + bf.to(tl.int64) * N * D
    o_base = o_ptr + bf.to(tl.int64) * N * D
    k_base = k_ptr + bf.to(tl.int64) * M * D
    v_base = v_ptr + bf.to(tl.int64) * M * D

    s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cm = d0 + cols < D
        qc = tl.load(q_base + rows[:, None] * D + d0 + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        kc = tl.load(k_base + keys[:, None] * D + d0 + cols[None, :], mask=kmask[:, None] & cm[None, :], other=0.0)
        s += _dot(qc, tl.trans(kc), FIX_BF16, DOT_PREC)

    # base-2 softmax: qk_scale folds 1/sqrt(d) and log2(e); padded keys get -inf, padded rows
    # (q = 0) get finite uniform scores, so no NaN appears anywhere
    s = tl.where(kmask[None, :], s * qk_scale, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, axis=1)
    p = p / l[:, None]
    if STORE_LSE:
        tl.store(lse_ptr + bf.to(tl.int64) * N + rows, m + tl.log2(l), mask=rmask)

    for d0 in range(0, D, BLOCK_D):
        cm = d0 + cols < D
        vc = tl.load(v_base + keys[:, None] * D + d0 + cols[None, :], mask=kmask[:, None] & cm[None, :], other=0.0)
        # P is rounded to v's dtype for the product, as the reference does (a no-op in fp32)
        oc = _dot(_to(p, vc.dtype, FIX_BF16), vc, FIX_BF16, DOT_PREC)
        tl.store(o_base + rows[:, None] * D + d0 + cols[None, :], _to(oc, o_ptr.dtype.element_ty, FIX_BF16),
                 mask=rmask[:, None] & cm[None, :])


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, dq_ptr, dk_part_ptr, dv_part_ptr,
                N, M, D, qk_scale, sm_scale, n_blocks, blocks_per_prog, n_split,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
                DOT_PREC: tl.constexpr):
    sp = tl.program_id(0)
    bf = tl.program_id(1)
    keys = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    kmask = keys < M
    frame = bf.to(tl.int64) * N * D
    kv = bf.to(tl.int64) * M * D
    # this program owns partial row (bf, sp) of the dK/dV buffers: its first row block writes it,
    # later ones add to it (every program gets at least one row block, see _split)
    part = (bf.to(tl.int64) * n_split + sp) * M * D
    kv_idx = keys[:, None] * D + cols[None, :]
    nb_lo = sp * blocks_per_prog
    nb_hi = tl.minimum(nb_lo + blocks_per_prog, n_blocks)
    for nb in range(nb_lo, nb_hi):
        # The partial rows are read back and rewritten by the next row block, and nothing makes the threads
        # that load an element the ones that stored it (the load's and the store's layouts are the compiler's
        # choice). The CTA barrier orders every thread's stores of the previous row block before any thread's
        # loads of this one (global writes before bar.sync are visible to the whole block after it).
        tl.debug_barrier()
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        row_idx = rows[:, None] * D + cols[None, :]

        # pass 1 over d: scores S = q k^T and dP = dO v^T
        s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        dp = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cm = d0 + cols < D
            rm = rmask[:, None] & cm[None, :]
            km = kmask[:, None] & cm[None, :]
            qc = tl.load(q_ptr + frame + d0 + row_idx, mask=rm, other=0.0)
            doc = tl.load(do_ptr + frame + d0 + row_idx, mask=rm, other=0.0)
            kc = tl.load(k_ptr + kv + d0 + kv_idx, mask=km, other=0.0)
            vc = tl.load(v_ptr + kv + d0 + kv_idx, mask=km, other=0.0)
            s += _dot(qc, tl.trans(kc), FIX_BF16, DOT_PREC)
            dp += _dot(doc, tl.trans(vc), FIX_BF16, DOT_PREC)

        lse = tl.load(lse_ptr + bf.to(tl.int64) * N + rows, mask=rmask, other=0.0)
        p = tl.exp2(s * qk_scale - lse[:, None])
        # padded rows/keys: their zero-filled q, k, v, dO already make them contribute nothing;
        # zeroing P keeps that true independently of the fill values
        p = tl.where(rmask[:, None] & kmask[None, :], p, 0.0)
        # delta = rowsum(P * dP) equals rowsum(dO * O) in exact math; taken from the fp32 tiles in
        # registers it needs no read of O and, unlike the rounded bf16 O, keeps rowsum(dS) = 0 exactly
        # as the reference's softmax backward does (the difference dP - delta cancels heavily)
        delta = tl.sum(p * dp, axis=1)
        # gradient of the scaled scores, times the 1/sqrt(d) of d(scores)/d(q, k)
        ds = p * (dp - delta[:, None]) * sm_scale

        # pass 2 over d: dQ chunk (stored), dK/dV chunks (added to this program's partial row).
        # dS stays fp32 in dQ = dS k and dK = dS^T q (TF32 products on GPU for half inputs), like the
        # reference, whose scores are an fp32 matmul; dV = P^T dO rounds P to dO's dtype, as its
        # forward P @ v does.
        for d0 in range(0, D, BLOCK_D):
            cm = d0 + cols < D
            rm = rmask[:, None] & cm[None, :]
            km = kmask[:, None] & cm[None, :]
            qc = tl.load(q_ptr + frame + d0 + row_idx, mask=rm, other=0.0)
            doc = tl.load(do_ptr + frame + d0 + row_idx, mask=rm, other=0.0)
            kc = tl.load(k_ptr + kv + d0 + kv_idx, mask=km, other=0.0)
            dqc = _dot(ds, kc.to(tl.float32), FIX_BF16, DOT_PREC)
            tl.store(dq_ptr + frame + d0 + row_idx, _to(dqc, dq_ptr.dtype.element_ty, FIX_BF16), mask=rm)
            dkc = _dot(tl.trans(ds), qc.to(tl.float32), FIX_BF16, DOT_PREC)
            dvc = _dot(tl.trans(_to(p, doc.dtype, FIX_BF16)), doc, FIX_BF16, DOT_PREC)
            pk = dk_part_ptr + part + d0 + kv_idx
            pv = dv_part_ptr + part + d0 + kv_idx
            if nb > nb_lo:
                dkc += tl.load(pk, mask=km, other=0.0)
                dvc += tl.load(pv, mask=km, other=0.0)
            tl.store(pk, dkc, mask=km)
            tl.store(pv, dvc, mask=km)


# ------------------------------------------------------------------ launch helpers
def _blocks(q: torch.Tensor, M: int) -> dict:
    d = q.shape[-1]
    return dict(BLOCK_N=_BLOCK_N, BLOCK_M=max(16, triton.next_power_of_2(M)),
                BLOCK_D=max(16, min(triton.next_power_of_2(d), _BLOCK_D)),
                FIX_BF16=_INTERPRETED and q.dtype == torch.bfloat16,
                # fp32 inputs: exact fp32 products like torch's matmul (no TF32); the interpreter
                # computes every dot in numpy fp32 whatever this says
                DOT_PREC="ieee" if q.dtype == torch.float32 or _INTERPRETED else "tf32")


def _split(n_blocks: int, frames: int, device: torch.device) -> tuple[int, int]:
    """(n_split, row blocks per program) for the backward's reduction over a frame's rows.

    On a GPU about 4 programs per SM in all; fewer splits mean a smaller partial buffer to sum.
    In the interpreter programs are costly: two per frame (still exercises the multi-block loop)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        n_split = max(1, min(n_blocks, triton.cdiv(target, frames)))
    else:
        n_split = min(2, n_blocks)
    per = triton.cdiv(n_blocks, n_split)
    # recomputed so that no program is left without a row block (its partial row would stay unset)
    return triton.cdiv(n_blocks, per), per


class _FrameAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, need_grad):
        B, F, N, d = q.shape
        M = k.shape[2]
        cfg = _blocks(q, M)
        out = torch.empty_like(q)
        lse = torch.empty((B * F, N) if need_grad else (1,), device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), B * F)
        _fwd_kernel[grid](q, k, v, out, lse, N, M, d, _LOG2E / math.sqrt(d), STORE_LSE=need_grad,
                          num_warps=4, **cfg)
        if need_grad:
            # O is not needed: the backward rebuilds P from the lse
            ctx.save_for_backward(q, k, v, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lse = ctx.saved_tensors
        B, F, N, d = q.shape
        M = k.shape[2]
        cfg = _blocks(q, M)
        dout = dout.contiguous().to(q.dtype)
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        n_split, per = _split(n_blocks, B * F, q.device)
        parts = torch.empty((2, B * F, n_split, M, d), device=q.device, dtype=torch.float32)
        dq = torch.empty_like(q)
        _bwd_kernel[(n_split, B * F)](q, k, v, dout, lse, dq, parts[0], parts[1], N, M, d,
                                      _LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), n_blocks, per, n_split,
                                      num_warps=4, **cfg)
        dk, dv = parts.sum(dim=2).view(2, B, F, M, d).to(k.dtype).unbind(0)
        return dq, dk, dv, None


# ------------------------------------------------------------------ validation
def _check(q, k, v, backend: str) -> None:
    """Raise TypeError/ValueError for what the kernels do not handle, before any work."""
    name = "frame_cross_attention"
    check_backend(name, backend)
    tensors = {"q": q, "k": k, "v": v}
    check_float_tensors(name, tensors, dtype_hint="cast q, k, v to one dtype")
    for key, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name}: {key} must be 4-D ([B, F, tokens, d]), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape [B, F, M, d]")
    B, F, N, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, F, d):
        raise ValueError(f"{name}: q [B, F, N, d] = {tuple(q.shape)} and k/v [B, F, M, d] = {tuple(k.shape)} "
                         "disagree on B, F or d")
    M = k.shape[2]
    if not 1 <= M <= _MAX_M:
        raise ValueError(f"{name}: M = {M} keys per frame; supported 1..{_MAX_M}")
    if not 1 <= d <= _MAX_D:
        raise ValueError(f"{name}: head dim d = {d}; supported 1..{_MAX_D}")
    if N * d > _MAX_FRAME:
        raise ValueError(f"{name}: one frame holds N * d = {N * d} elements; at most {_MAX_FRAME} supported")
    for key, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: {key} must be contiguous; call .contiguous() first")


# ------------------------------------------------------------------ public API
def frame_cross_attention_reference(q, k, v):
    """PyTorch, same math as AudioCrossAttention: fp32 scores and softmax, P cast to v's dtype, P @ v."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def frame_cross_attention_sdpa(q, k, v):
    """Baseline for the benchmark: one SDPA call over [B*F, 1, tokens, d] (one head, default scale)."""
    B, F, N, d = q.shape
    M = k.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B * F, 1, N, d), k.reshape(B * F, 1, M, d), v.reshape(B * F, 1, M, d))
    return out.view(B, F, N, d)


def frame_cross_attention(q, k, v, backend="triton"):
    """q [B, F, N, d], k and v [B, F, M, d] (M = 16 audio tokens per frame; support any M <= 64),
    contiguous, float32/bfloat16/float16. Returns softmax(q k^T / sqrt(d)) v per (b, f), [B, F, N, d]."""
    _check(q, k, v, backend)
    if backend == "torch" or q.numel() == 0:
        return frame_cross_attention_reference(q, k, v)
    # grad mode is off inside Function.forward: decide here whether the lse must be kept
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _FrameAttention.apply(q, k, v, need_grad)


def frame_attention_bytes_moved(q, k, v) -> int:
    """Bytes the forward reads and writes: q, k, v and out (the fp32 lse, written only when a
    gradient is needed, is left out)."""
    B, F, N, d = q.shape
    M = k.shape[2]
    return (2 * B * F * N * d + 2 * B * F * M * d) * q.element_size()
