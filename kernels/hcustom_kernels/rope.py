"""Fused per-head QK RMSNorm + 3D RoPE (HunyuanCustom identity-image positions), forward and backward.

    q_out, k_out = rope(rmsnorm(q)), rope(rmsnorm(k))
q, k are [S, B, H, D] (sequence-major, contiguous). RMSNorm (fp32 statistics, weight [D]) applies to
every token; RoPE only to the first `image_len` tokens (identity frames, then video frames; frame-major,
rows, columns), the rest are text. RoPE rotates adjacent pairs (2i, 2i+1) of the head dim split as
[t | h | w] by `rope_dims`, angle = pos * theta^(-2i/d_axis) (HunyuanVideo's 3D RoPE; the model's own rope module must agree, and
its tests check that it does).

Kernels (no cos/sin table is built: the angles come from the token index inside the kernel)
  forward: one program per (token, batch) row. It derives the token's (t, h, w) position, the D/2 pair
      angles and their cos/sin once, then loops over head blocks: a [BLOCK_H, D/2] tile of even and
      odd lanes of q (then k) is normalised per head, scaled by the weight and rotated.
  backward: one program per block of rows. Per row it recomputes the angles and the rstd (nothing is
      saved in the forward but the inputs), rotates dout by -angle (the rotation is orthogonal), then
      applies the RMSNorm backward. The weight gradients are summed over the program's rows and heads
      in fp32 and written to a [n_blocks, D] partial buffer that torch sums (deterministic, no atomics).
"""

from __future__ import annotations

import math

import torch

from hcustom_kernels._checks import check_backend, check_float_tensors
import triton
import triton.language as tl

_MODES = ("release", "paper")
# paper mode's identity-image spatial offsets: paper (h += Hp, w += Wp) or release_spatial (w += Wp only)
_IDENTITY_ROPES = ("paper", "release_spatial")
# Heads per tile; 24 heads x D/2 = 64 pairs fit in one 32 x 64 tile. The tests lower it to exercise the
# head loop and its masked tail.
_MAX_BLOCK_H = 32
_TWO_PI = 2.0 * math.pi
# 2*pi split for Cody-Waite range reduction: _TWO_PI_HI has few mantissa bits, so k * _TWO_PI_HI is
# exact in fp32 for any k this kernel meets (|angle| < ~1e4).
_TWO_PI_HI = 6.28125
_TWO_PI_LO = _TWO_PI - _TWO_PI_HI


# ------------------------------------------------------------------ kernels
@triton.jit
def _pair_cos_sin(s, image_len, HW, Wp, K, frame_offset, h_shift, PT, PH, DT, DH, DW, log2_theta,
                  two_pi_hi, two_pi_lo, inv_two_pi, BLOCK_P: tl.constexpr):
    """cos/sin [BLOCK_P] of the pair angles of token s (cos=1, sin=0 for text tokens)."""
    g = frame_offset + s // HW  # frame in the [identity ; video] list
    rem = s % HW
    is_id = g < K
    # identity image g+1 sits at t = -(g+1); video frame g-K at t = g-K. Only identity images are shifted
    # (w by Wp always, h by Hp with the paper's positions: h_shift is 0 in release mode and with release_spatial).
    t = tl.where(is_id, -(g + 1), g - K)
    h = rem // Wp + tl.where(is_id, h_shift, 0)
    w = rem % Wp + tl.where(is_id, Wp, 0)
    p = tl.arange(0, BLOCK_P)
    in_t = p < PT
    in_h = p < PT + PH
    pos = tl.where(in_t, t, tl.where(in_h, h, w)).to(tl.float32)
    i_ax = tl.where(in_t, p, tl.where(in_h, p - PT, p - PT - PH))
    d_ax = tl.where(in_t, DT, tl.where(in_h, DH, DW))
    # theta^(-2i/d) in fp32, the exponent rounded as the reference's arange(0, d, 2) / d
    freq = tl.exp2(-((2 * i_ax).to(tl.float32) / d_ax.to(tl.float32)) * log2_theta)
    ang = pos * freq
    # explicit range reduction to [-pi, pi]: GPU sin/cos may use approximate instructions that lose
    # accuracy away from the origin (w positions reach 2 * Wp)
    kk = tl.floor(ang * inv_two_pi + 0.5)
    ang = (ang - kk * two_pi_hi) - kk * two_pi_lo
    rot = s < image_len
    c = tl.where(rot, tl.cos(ang), 1.0)
    sn = tl.where(rot, tl.sin(ang), 0.0)
    return c, sn


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 -> dtype, round to nearest even. bf16 is rounded on the bits: Triton's interpreter truncates
    fp32 -> bf16 where the GPU rounds, so this way the CPU tests see the GPU's rounding."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # NaN: keep it a (quiet) NaN instead of letting the rounding carry into the exponent
        bits = tl.where(x == x, bits + 0x7FFF + ((bits >> 16) & 1), bits | 0x400000)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _fwd_tile(x_ptr, o_ptr, off, m, w_e, w_o, c, sn, D, eps):
    """RMSNorm + rotation of one [BLOCK_H, BLOCK_P] tile of heads (even and odd lanes)."""
    xe = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + off + 1, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / D + eps)
    # round the normed value to the I/O dtype, as the unfused model path (RMSNorm casts back) does
    ye = _cast(xe * r[:, None] * w_e[None, :], o_ptr.dtype.element_ty).to(tl.float32)
    yo = _cast(xo * r[:, None] * w_o[None, :], o_ptr.dtype.element_ty).to(tl.float32)
    oe = ye * c[None, :] - yo * sn[None, :]
    oo = yo * c[None, :] + ye * sn[None, :]
    tl.store(o_ptr + off, _cast(oe, o_ptr.dtype.element_ty), mask=m)
    tl.store(o_ptr + off + 1, _cast(oo, o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, B, H, D, HALF, eps,
                image_len, HW, Wp, K, frame_offset, h_shift, PT, PH, DT, DH, DW, log2_theta,
                two_pi_hi, two_pi_lo, inv_two_pi, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    s = row // B
    c, sn = _pair_cos_sin(s, image_len, HW, Wp, K, frame_offset, h_shift, PT, PH, DT, DH, DW, log2_theta,
                          two_pi_hi, two_pi_lo, inv_two_pi, BLOCK_P)
    p = tl.arange(0, BLOCK_P)
    pm = p < HALF
    # even/odd lanes as two strided loads: both touch the same cache lines, and the rotation needs
    # the partner lane in registers
    qw_e = tl.load(qw_ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
    qw_o = tl.load(qw_ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    kw_e = tl.load(kw_ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
    kw_o = tl.load(kw_ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    base = row.to(tl.int64) * H * D  # int64: S * B * H * D exceeds 2**31 for long videos
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        m = (hh < H)[:, None] & pm[None, :]
        off = base + hh[:, None].to(tl.int64) * D + 2 * p[None, :]
        _fwd_tile(q_ptr, qo_ptr, off, m, qw_e, qw_o, c, sn, D, eps)
        _fwd_tile(k_ptr, ko_ptr, off, m, kw_e, kw_o, c, sn, D, eps)


@triton.jit
def _bwd_tile(x_ptr, do_ptr, dx_ptr, off, m, w_e, w_o, c, sn, D, eps):
    """dx of one tile; returns the tile's weight-gradient terms summed over heads (even, odd)."""
    de = tl.load(do_ptr + off, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off + 1, mask=m, other=0.0).to(tl.float32)
    # transpose of the rotation = rotation by -angle
    ge = de * c[None, :] + do * sn[None, :]
    go = do * c[None, :] - de * sn[None, :]
    xe = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + off + 1, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / D + eps)
    he = xe * r[:, None]
    ho = xo * r[:, None]
    gwe = ge * w_e[None, :]
    gwo = go * w_o[None, :]
    # y = xhat * w, xhat = x * r:  dx = r * (g*w - xhat * mean(g*w*xhat))
    proj = (tl.sum(gwe * he, axis=1) + tl.sum(gwo * ho, axis=1)) / D
    dxe = r[:, None] * (gwe - he * proj[:, None])
    dxo = r[:, None] * (gwo - ho * proj[:, None])
    tl.store(dx_ptr + off, _cast(dxe, dx_ptr.dtype.element_ty), mask=m)
    tl.store(dx_ptr + off + 1, _cast(dxo, dx_ptr.dtype.element_ty), mask=m)
    return tl.sum(ge * he, axis=0), tl.sum(go * ho, axis=0)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, dqo_ptr, dko_ptr, dq_ptr, dk_ptr, dw_part_ptr,
                R, B, H, D, HALF, eps, ROWS,
                image_len, HW, Wp, K, frame_offset, h_shift, PT, PH, DT, DH, DW, log2_theta,
                two_pi_hi, two_pi_lo, inv_two_pi, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    blk = tl.program_id(0)
    nblk = tl.num_programs(0)
    r_lo = blk * ROWS
    r_hi = tl.minimum(r_lo + ROWS, R)
    p = tl.arange(0, BLOCK_P)
    pm = p < HALF
    qw_e = tl.load(qw_ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
    qw_o = tl.load(qw_ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    kw_e = tl.load(kw_ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
    kw_o = tl.load(kw_ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    acc_qe = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_qo = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_ke = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_ko = tl.zeros([BLOCK_P], dtype=tl.float32)
    for i in range(0, r_hi - r_lo):
        row = r_lo + i  # a tensor in both compiled and interpreted mode (.to(int64) below)
        s = row // B
        c, sn = _pair_cos_sin(s, image_len, HW, Wp, K, frame_offset, h_shift, PT, PH, DT, DH, DW, log2_theta,
                              two_pi_hi, two_pi_lo, inv_two_pi, BLOCK_P)
        base = row.to(tl.int64) * H * D
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            m = (hh < H)[:, None] & pm[None, :]
            off = base + hh[:, None].to(tl.int64) * D + 2 * p[None, :]
            a_e, a_o = _bwd_tile(q_ptr, dqo_ptr, dq_ptr, off, m, qw_e, qw_o, c, sn, D, eps)
            acc_qe += a_e
            acc_qo += a_o
            a_e, a_o = _bwd_tile(k_ptr, dko_ptr, dk_ptr, off, m, kw_e, kw_o, c, sn, D, eps)
            acc_ke += a_e
            acc_ko += a_o
    # partial buffer [2, nblk, D]: this program owns row blk of both halves, plain stores
    q_part = dw_part_ptr + blk.to(tl.int64) * D
    k_part = dw_part_ptr + (nblk + blk).to(tl.int64) * D
    tl.store(q_part + 2 * p, acc_qe, mask=pm)
    tl.store(q_part + 2 * p + 1, acc_qo, mask=pm)
    tl.store(k_part + 2 * p, acc_ke, mask=pm)
    tl.store(k_part + 2 * p + 1, acc_ko, mask=pm)


# ------------------------------------------------------------------ launch helpers
def _h_shift(mode: str, identity_rope: str, Hp: int) -> int:
    """Rows added to identity-image tokens: H' only with the paper's positions (paper mode, identity_rope paper)."""
    return Hp if mode == "paper" and identity_rope == "paper" else 0


def _launch_args(S, B, H, D, grid, num_identity, mode, rope_dims, theta, eps, image_len, frame_offset,
                 identity_rope="paper"):
    """Scalar kernel arguments shared by forward and backward."""
    _, Hp, Wp = grid
    dt, dh, dw = rope_dims
    # d of an axis with no pairs is never selected; max(., 2) keeps masked lanes free of 0/0
    return dict(
        H=H, D=D, HALF=D // 2, eps=float(eps), image_len=image_len, HW=Hp * Wp, Wp=Wp, K=num_identity,
        frame_offset=frame_offset, h_shift=_h_shift(mode, identity_rope, Hp), PT=dt // 2, PH=dh // 2,
        DT=max(dt, 2), DH=max(dh, 2), DW=max(dw, 2), log2_theta=math.log2(theta),
        two_pi_hi=_TWO_PI_HI, two_pi_lo=_TWO_PI_LO, inv_two_pi=1.0 / _TWO_PI,
        BLOCK_H=min(triton.next_power_of_2(H), _MAX_BLOCK_H), BLOCK_P=triton.next_power_of_2(D // 2),
    )


def _row_blocks(R: int, device: torch.device) -> tuple[int, int]:
    """(number of row blocks, rows per block) for the backward: about 4 programs per SM on a GPU,
    two in the interpreter (each program is costly there; few partial rows to sum)."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    n = max(1, min(R, target))
    rows = triton.cdiv(R, n)
    return triton.cdiv(R, rows), rows


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, args):
        S, B, H, D = q.shape
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        _fwd_kernel[(S * B,)](q, k, q_weight, k_weight, qo, ko, B, **args, num_warps=4)
        ctx.args = args
        ctx.save_for_backward(q, k, q_weight, k_weight)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        q, k, q_weight, k_weight = ctx.saved_tensors
        S, B, H, D = q.shape
        R = S * B
        n_blk, rows = _row_blocks(R, q.device)
        parts = torch.empty((2, n_blk, D), device=q.device, dtype=torch.float32)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        _bwd_kernel[(n_blk,)](q, k, q_weight, k_weight, dqo.contiguous(), dko.contiguous(), dq, dk, parts,
                              R, B, ROWS=rows, **ctx.args, num_warps=4)
        dw = parts.sum(dim=1)
        return dq, dk, dw[0].to(q_weight.dtype), dw[1].to(k_weight.dtype), None


# ------------------------------------------------------------------ validation
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(q, k, q_weight, k_weight, grid, num_identity, mode, rope_dims, theta, eps, image_len, frame_offset,
           backend="triton", identity_rope="paper") -> None:
    """Raise TypeError/ValueError for anything the kernel (or the reference) does not handle, before any work."""
    name = "qk_norm_rope"
    check_backend(name, backend)
    tensors = {"q": q, "k": k, "q_weight": q_weight, "k_weight": k_weight}
    check_float_tensors(name, tensors, same_dtype=("q", "k"), dtype_hint="q and k dtypes differ: cast them to one dtype")
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be [S, B, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{name}: k shape {tuple(k.shape)} != q shape {tuple(q.shape)}")
    for key in ("q", "k"):
        if not tensors[key].is_contiguous():
            raise ValueError(f"{name}: {key} must be contiguous ([S, B, H, D] row-major); call .contiguous() first")
    S, B, H, D = q.shape
    for key in ("q_weight", "k_weight"):
        if tuple(tensors[key].shape) != (D,):
            raise ValueError(f"{name}: {key} must be [D] = [{D}] (head dim of q), got {list(tensors[key].shape)}")
    if not (isinstance(rope_dims, (tuple, list)) and len(rope_dims) == 3 and all(_is_int(d) for d in rope_dims)):
        raise TypeError(f"{name}: rope_dims must be three ints (t, h, w), got {rope_dims!r}")
    if any(d < 0 or d % 2 for d in rope_dims):
        raise ValueError(f"{name}: every rope_dims entry must be even and >= 0 (pairs), got {tuple(rope_dims)}")
    if sum(rope_dims) != D:
        raise ValueError(f"{name}: rope_dims {tuple(rope_dims)} sum to {sum(rope_dims)}, head dim is {D}")
    if mode not in _MODES:
        raise ValueError(f"{name}: unknown RoPE mode {mode!r}; expected one of {_MODES}")
    if identity_rope not in _IDENTITY_ROPES:
        raise ValueError(f"{name}: unknown identity_rope {identity_rope!r}; expected one of {_IDENTITY_ROPES}")
    if mode == "release" and identity_rope != "paper":
        raise ValueError(f"{name}: identity_rope={identity_rope!r} is a paper-mode option")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 3 and all(_is_int(g) and g > 0 for g in grid)):
        raise ValueError(f"{name}: grid must be three positive ints (frames, H', W'), got {grid!r}")
    if not _is_int(num_identity) or num_identity < 0:
        raise ValueError(f"{name}: num_identity must be an int >= 0, got {num_identity!r}")
    if mode == "release" and num_identity not in (0, 1):
        raise ValueError(f"{name}: release mode places at most one identity image, got num_identity={num_identity}")
    if not (theta > 0) or not (eps >= 0):
        raise ValueError(f"{name}: theta must be > 0 and eps >= 0, got theta={theta}, eps={eps}")
    hw = grid[1] * grid[2]
    if not _is_int(image_len) or image_len < 0 or image_len > S or image_len % hw:
        raise ValueError(f"{name}: image_len must be a multiple of H'*W' = {hw} in [0, S = {S}], got {image_len!r}")
    total = num_identity + grid[0]
    if not _is_int(frame_offset) or frame_offset < 0 or frame_offset + image_len // hw > total:
        raise ValueError(f"{name}: frame_offset {frame_offset!r} + {image_len // hw} image frames held here exceeds "
                         f"the {total} frames (identity + video)")


# ------------------------------------------------------------------ public API
def _reference_positions(grid, num_identity, mode, first_frame, frames, identity_rope="paper") -> torch.Tensor:
    """[frames*H'*W', 3] (t, h, w) positions of frames first_frame.. of the [identity ; video] frame list."""
    f, Hp, Wp = grid
    g = torch.arange(first_frame, first_frame + frames)
    is_id = g < num_identity
    t = torch.where(is_id, -(g + 1), g - num_identity)
    h_shift = _h_shift(mode, identity_rope, Hp)  # identity images always shift by W'; the paper's positions also by H'
    rows = torch.arange(Hp)[None, :, None] + torch.where(is_id, h_shift, 0)[:, None, None]
    cols = torch.arange(Wp)[None, None, :] + torch.where(is_id, Wp, 0)[:, None, None]
    shape = (frames, Hp, Wp)
    return torch.stack([t[:, None, None].expand(shape), rows.expand(shape), cols.expand(shape)], -1).reshape(-1, 3)


def _reference_rotate(x, positions, rope_dims, theta):
    """Rotate adjacent pairs (2i, 2i+1) of x [S, B, H, D] by pos * theta^(-2i/d_axis) per axis, in fp32."""
    angles = []
    for axis, dim in enumerate(rope_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
        angles.append(positions[:, axis, None].to(device=x.device, dtype=torch.float32) * freqs)
    angle = torch.cat(angles, -1)[:, None, None, :]  # [S, 1, 1, D/2]
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2).to(x.dtype)


def qk_norm_rope_reference(q, k, q_weight, k_weight, *, grid, num_identity, mode, rope_dims, theta=256.0, eps=1e-6,
                           image_len, frame_offset=0, identity_rope="paper"):
    """PyTorch reference, written from the definition above: per-head RMSNorm in fp32 (cast back to the input
    dtype, as the model's unfused path does), then the pair rotation of the image tokens."""
    _check(q, k, q_weight, k_weight, grid, num_identity, mode, rope_dims, theta, eps, image_len, frame_offset,
           identity_rope=identity_rope)

    def norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

    q, k = norm(q, q_weight), norm(k, k_weight)
    if image_len == 0:
        return q, k
    hw = grid[1] * grid[2]
    pos = _reference_positions(tuple(grid), num_identity, mode, frame_offset, image_len // hw, identity_rope)
    return (torch.cat([_reference_rotate(q[:image_len], pos, rope_dims, theta), q[image_len:]]),
            torch.cat([_reference_rotate(k[:image_len], pos, rope_dims, theta), k[image_len:]]))


def qk_norm_rope(q, k, q_weight, k_weight, *, grid, num_identity, mode, rope_dims, theta=256.0, eps=1e-6,
                 image_len, frame_offset=0, backend="triton", identity_rope="paper"):
    """q, k: [S, B, H, D] (contiguous; bf16/fp16/fp32); q_weight/k_weight: [D] RMSNorm weights.

    grid = (f, Hp, Wp) latent grid of the whole video; num_identity = K identity images;
    mode 'release' (K <= 1; identity token (i, j) at t=-1, h=i, w=j+Wp) or 'paper' (image k at t=-k,
    h=i+Hp, w=j+Wp; with identity_rope='release_spatial' h=i, the released spatial offsets). The first image_len tokens (a multiple of Hp*Wp) are image tokens and get RoPE,
    the rest are text (norm only). frame_offset: index in the [identity ; video] frame list of the first
    frame held here (context parallel). Returns (rope(rmsnorm(q)), rope(rmsnorm(k))), dtype of q.
    """
    _check(q, k, q_weight, k_weight, grid, num_identity, mode, rope_dims, theta, eps, image_len, frame_offset,
           backend, identity_rope)
    if backend == "torch" or q.numel() == 0:
        return qk_norm_rope_reference(q, k, q_weight, k_weight, grid=grid, num_identity=num_identity, mode=mode,
                                      rope_dims=rope_dims, theta=theta, eps=eps, image_len=image_len,
                                      frame_offset=frame_offset, identity_rope=identity_rope)
    S, B, H, D = q.shape
    args = _launch_args(S, B, H, D, tuple(grid), num_identity, mode, tuple(rope_dims), theta, eps, image_len,
                        frame_offset, identity_rope)
    # [D] weights are tiny: copying a strided one is cheap
    return _QKNormRope.apply(q, k, q_weight.contiguous(), k_weight.contiguous(), args)


def rope_bytes_moved(q, k) -> int:
    """Bytes the forward reads and writes: q and k in, q and k out, and the two [D] weights
    (counted at q's element size)."""
    D = q.shape[-1]
    return 2 * (q.numel() * q.element_size() + k.numel() * k.element_size()) + 2 * D * q.element_size()
