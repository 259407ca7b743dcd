"""Fused adaLN glue: LayerNorm (no affine) + modulate, and the gated residual, forward and backward.

    layernorm_modulate(x, shift, scale) = layer_norm(x) * (1 + scale) + shift
    gated_residual(x, gate, y)          = x + gate * y
x, y are [S, B, C] (sequence-major, contiguous); shift, scale, gate are [B, C] and broadcast over S,
so the row r = s * B + b of the flattened [S*B, C] view takes its vectors from row b.

Kernels
  forward LN+modulate: one program per row; fp32 mean/rstd (two-pass variance), saved as [S, B] fp32
      for the backward. C up to _MAX_BLOCK is held in registers in one load; wider rows loop over C.
  backward LN+modulate: one program per (block of S rows, b). dx is the LayerNorm backward of
      g = dy * (1 + scale); dshift/dscale are sums over S, accumulated per program in fp32 and
      written to a [n_blocks, B, C] partial buffer that torch sums (deterministic, no atomics).
  gated residual: elementwise over (row, C-block); its backward writes dy = gate * dout and
      per-program fp32 partials of dout * y for dgate the same way; dx is dout itself.
"""

from __future__ import annotations

import torch

from hcustom_kernels._checks import check_backend, check_float_tensors
import triton
import triton.language as tl

# Widest C chunk held in registers by the LayerNorm kernels (C = 3072 at 13B fits in one chunk);
# the tests lower it to exercise the chunk loop.
_MAX_BLOCK = 4096
# C chunk of the elementwise gated-residual kernels.
_MAX_BLOCK_ELEMWISE = 1024


# ------------------------------------------------------------------ kernels
@triton.jit
def _ln_mod_fwd_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr, B, C, eps,
                       BLOCK: tl.constexpr, SINGLE: tl.constexpr, STORE_STATS: tl.constexpr):
    row = tl.program_id(0)
    b = row % B
    # int64: S * B * C exceeds 2**31 for long sequences at C = 3072
    x_row = x_ptr + row.to(tl.int64) * C
    o_row = out_ptr + row.to(tl.int64) * C
    sh_row = shift_ptr + b.to(tl.int64) * C
    sc_row = scale_ptr + b.to(tl.int64) * C
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        # whole row in registers: x is read once
        m = cols < C
        x = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        d = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        sh = tl.load(sh_row + cols, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(sc_row + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(o_row + cols, (d * rstd * (1.0 + sc) + sh).to(out_ptr.dtype.element_ty), mask=m)
    else:
        # three passes over the row (mean, centred variance, output); the re-reads hit cache
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, C, BLOCK):
            m = c0 + cols < C
            acc += tl.load(x_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, C, BLOCK):
            m = c0 + cols < C
            x = tl.load(x_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)
        for c0 in range(0, C, BLOCK):
            m = c0 + cols < C
            x = tl.load(x_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            sh = tl.load(sh_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            sc = tl.load(sc_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * (1.0 + sc) + sh
            tl.store(o_row + c0 + cols, y.to(out_ptr.dtype.element_ty), mask=m)
    if STORE_STATS:
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_mod_bwd_kernel(x_ptr, dy_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
                       S, B, C, ROWS, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    sb = tl.program_id(0)
    b = tl.program_id(1)
    s_lo = sb * ROWS
    s_hi = tl.minimum(s_lo + ROWS, S)
    # this program owns partial row (sb, b): plain stores, no atomics
    part = (sb * B + b).to(tl.int64) * C
    sc_row = scale_ptr + b.to(tl.int64) * C
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        m = cols < C
        sc1 = 1.0 + tl.load(sc_row + cols, mask=m, other=0.0).to(tl.float32)
        acc_dsh = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dsc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(s_lo, s_hi):
            row = s * B + b
            off = row.to(tl.int64) * C + cols
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (x - mean) * rstd, 0.0)
            g = dy * sc1
            c_g = tl.sum(g, axis=0) / C
            c_gx = tl.sum(g * xhat, axis=0) / C
            dx = (g - c_g - xhat * c_gx) * rstd
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
            acc_dsh += dy
            acc_dsc += dy * xhat
        tl.store(dshift_part_ptr + part + cols, acc_dsh, mask=m)
        tl.store(dscale_part_ptr + part + cols, acc_dsc, mask=m)
    else:
        # the partial buffers are zeroed by the caller; each row adds its chunk's terms
        for s in range(s_lo, s_hi):
            row = s * B + b
            base = row.to(tl.int64) * C
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            acc_g = tl.zeros([BLOCK], dtype=tl.float32)
            acc_gx = tl.zeros([BLOCK], dtype=tl.float32)
            for c0 in range(0, C, BLOCK):
                m = c0 + cols < C
                x = tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
                sc1 = 1.0 + tl.load(sc_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (x - mean) * rstd, 0.0)
                g = dy * sc1
                acc_g += g
                acc_gx += g * xhat
            c_g = tl.sum(acc_g, axis=0) / C
            c_gx = tl.sum(acc_gx, axis=0) / C
            for c0 in range(0, C, BLOCK):
                m = c0 + cols < C
                x = tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
                sc1 = 1.0 + tl.load(sc_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (x - mean) * rstd, 0.0)
                dx = (dy * sc1 - c_g - xhat * c_gx) * rstd
                tl.store(dx_ptr + base + c0 + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
                p_sh = dshift_part_ptr + part + c0 + cols
                p_sc = dscale_part_ptr + part + c0 + cols
                tl.store(p_sh, tl.load(p_sh, mask=m, other=0.0) + dy, mask=m)
                tl.store(p_sc, tl.load(p_sc, mask=m, other=0.0) + dy * xhat, mask=m)


@triton.jit
def _gated_fwd_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, B, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    off = row.to(tl.int64) * C + cols
    b = row % B
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + b.to(tl.int64) * C + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (x + g * y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd_kernel(dout_ptr, gate_ptr, y_ptr, dy_ptr, dgate_part_ptr, S, B, C, ROWS, BLOCK: tl.constexpr):
    sb = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    s_lo = sb * ROWS
    s_hi = tl.minimum(s_lo + ROWS, S)
    g = tl.load(gate_ptr + b.to(tl.int64) * C + cols, mask=m, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(s_lo, s_hi):
        off = (s * B + b).to(tl.int64) * C + cols
        do = tl.load(dout_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(dy_ptr + off, (g * do).to(dy_ptr.dtype.element_ty), mask=m)
        acc += do * y
    tl.store(dgate_part_ptr + (sb * B + b).to(tl.int64) * C + cols, acc, mask=m)


# ------------------------------------------------------------------ launch helpers
def _ln_block(C: int) -> tuple[int, bool, int]:
    """(chunk width, whole row in one chunk, num_warps)."""
    block = min(triton.next_power_of_2(C), _MAX_BLOCK)
    return block, block >= C, 8 if block >= 2048 else 4


def _row_blocks(S: int, B: int, device: torch.device) -> tuple[int, int]:
    """(number of S-blocks, rows per block) for the backward reductions over S.

    Enough programs to fill the GPU (about 4 per SM), yet few partial rows to sum afterwards; in the
    interpreter each program is costly, so only a couple."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2
    n = max(1, min(S, triton.cdiv(target, B)))
    rows = triton.cdiv(S, n)
    return triton.cdiv(S, rows), rows


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, need_grad):
        S, B, C = x.shape
        out = torch.empty_like(x)
        # mean/rstd are only written (and kept) when a backward will follow
        stats = torch.empty((2, S, B) if need_grad else (2, 1, 1), device=x.device, dtype=torch.float32)
        block, single, warps = _ln_block(C)
        _ln_mod_fwd_kernel[(S * B,)](x, shift, scale, out, stats[0], stats[1], B, C, float(eps),
                                     BLOCK=block, SINGLE=single, STORE_STATS=need_grad, num_warps=warps)
        if need_grad:
            ctx.save_for_backward(x, scale, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, stats = ctx.saved_tensors
        S, B, C = x.shape
        dout = dout.contiguous()
        block, single, warps = _ln_block(C)
        n_sb, rows = _row_blocks(S, B, x.device)
        alloc = torch.empty if single else torch.zeros  # the chunked path accumulates in place
        parts = alloc((2, n_sb, B, C), device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x)
        _ln_mod_bwd_kernel[(n_sb, B)](x, dout, scale, stats[0], stats[1], dx, parts[0], parts[1], S, B, C, rows,
                                      BLOCK=block, SINGLE=single, num_warps=warps)
        dshift, dscale = parts.sum(dim=1).to(scale.dtype).unbind(0)
        return dx, dshift, dscale, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        S, B, C = x.shape
        out = torch.empty_like(x)
        block = min(triton.next_power_of_2(C), _MAX_BLOCK_ELEMWISE)
        _gated_fwd_kernel[(S * B, triton.cdiv(C, block))](x, gate, y, out, B, C, BLOCK=block, num_warps=4)
        ctx.save_for_backward(gate, y)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        S, B, C = y.shape
        dout = dout.contiguous()
        block = min(triton.next_power_of_2(C), _MAX_BLOCK_ELEMWISE)
        n_sb, rows = _row_blocks(S, B, y.device)
        part = torch.empty((n_sb, B, C), device=y.device, dtype=torch.float32)
        dy = torch.empty_like(y)
        _gated_bwd_kernel[(n_sb, B, triton.cdiv(C, block))](dout, gate, y, dy, part, S, B, C, rows,
                                                             BLOCK=block, num_warps=4)
        # d(x + gate*y)/dx is the identity: dout is x's gradient as is
        return dout, part.sum(dim=0).to(gate.dtype), dy


# ------------------------------------------------------------------ validation
def _check(name: str, x: torch.Tensor, vecs: dict, others: dict, backend: str) -> None:
    """Raise TypeError/ValueError for what the kernels do not handle, before any work."""
    check_backend(name, backend)
    check_float_tensors(name, {"x": x, **others, **vecs})
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [S, B, C], got shape {tuple(x.shape)}")
    for k, t in others.items():
        if t.shape != x.shape:
            raise ValueError(f"{name}: {k} shape {tuple(t.shape)} != x shape {tuple(x.shape)}")
    for k, t in vecs.items():
        if t.shape != x.shape[1:]:
            raise ValueError(f"{name}: {k} must be [B, C] = {list(x.shape[1:])}, got {list(t.shape)}")
    for k, t in {"x": x, **others}.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: {k} must be contiguous ([S, B, C] row-major); call .contiguous() first")


# ------------------------------------------------------------------ public API
def layernorm_modulate_reference(x, shift, scale, eps=1e-6):
    """PyTorch: layer_norm(x) * (1 + scale) + shift, computed in fp32, returned in x's dtype."""
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (xn * (1 + scale.float().unsqueeze(0)) + shift.float().unsqueeze(0)).to(x.dtype)


def gated_residual_reference(x, gate, y):
    """PyTorch: x + gate * y with gate [B, C] broadcast over S."""
    return x + gate.unsqueeze(0) * y


def layernorm_modulate(x, shift, scale, eps=1e-6, backend="triton"):
    """x [S, B, C]; shift, scale [B, C]. Returns layer_norm(x) * (1 + scale) + shift (statistics in fp32), dtype of x."""
    _check("layernorm_modulate", x, {"shift": shift, "scale": scale}, {}, backend)
    if backend == "torch" or x.numel() == 0:
        return layernorm_modulate_reference(x, shift, scale, eps)
    # [B, C] vectors are small: copying a strided slice (e.g. a chunk of the modulation output) is cheap
    # grad mode is off inside Function.forward, so decide here whether the backward needs mean/rstd
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale))
    return _LayerNormModulate.apply(x, shift.contiguous(), scale.contiguous(), eps, need_grad)


def gated_residual(x, gate, y, backend="triton"):
    """x, y [S, B, C]; gate [B, C]. Returns x + gate * y."""
    _check("gated_residual", x, {"gate": gate}, {"y": y}, backend)
    if backend == "torch" or x.numel() == 0:
        return gated_residual_reference(x, gate, y)
    return _GatedResidual.apply(x, gate.contiguous(), y)


def adaln_bytes_moved(x) -> int:
    """Bytes the LayerNorm+modulate forward reads and writes: x, out, shift and scale
    (the fp32 mean/rstd, written only when a gradient is needed, are left out)."""
    S, B, C = x.shape
    return (2 * S * B * C + 2 * B * C) * x.element_size()


def gated_residual_bytes_moved(x) -> int:
    """Bytes the gated-residual forward reads and writes: x, y, out and gate."""
    S, B, C = x.shape
    return (3 * S * B * C + B * C) * x.element_size()
