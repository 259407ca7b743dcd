"""kernels/hcustom_kernels/rope.py: fused QK RMSNorm + 3D RoPE against the PyTorch reference. Launching tests take
`kernel_device`: the Triton interpreter on CPU, the compiled kernels on CUDA (a `gpu` test)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hcustom_kernels.rope as kr
from hcustom_kernels.rope import qk_norm_rope, qk_norm_rope_reference

# tiny shapes: every (token, batch) row is one interpreted program
D, DIMS = 16, (4, 6, 6)


def _inputs(S, B, H, d, dtype, w_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, H, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    k = (2.0 * torch.randn(S, B, H, d, generator=g)).to(device=device, dtype=dtype).requires_grad_()  # other scale than q
    w_dtype = w_dtype or dtype
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(device=device, dtype=w_dtype).requires_grad_()
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(device=device, dtype=w_dtype).requires_grad_()
    return q, k, qw, kw


def _compare(device, S, B, H, kw, dtype=torch.float32, w_dtype=None, d=D, tol=None, wtol=None):
    """Forward outputs and gradients of q, k, both weights: kernel vs reference."""
    inputs = _inputs(S, B, H, d, dtype, w_dtype, device=device)
    out = qk_norm_rope(*inputs, **kw)
    ref = qk_norm_rope_reference(*inputs, **kw)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape and o.device == inputs[0].device
    g = torch.Generator().manual_seed(1)
    douts = [torch.randn(o.shape, generator=g).to(device=device, dtype=dtype) for o in out]
    grads = torch.autograd.grad(out, inputs, douts)
    grads_ref = torch.autograd.grad(ref, inputs, douts)
    tol = tol or dict(atol=1e-5, rtol=1e-5)
    # weight grads are sums over S * B * H rows: scale the absolute tolerance with their size
    wtol = wtol or dict(atol=1e-4, rtol=1e-5)
    for name, a, b in zip(("q_out", "k_out"), out, ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    for name, a, b, t in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, grads_ref, (tol, tol, wtol, wtol)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **t, msg=lambda m: f"{name}: {m}")
    return out, ref


def _kw(grid, K, mode, image_len, frame_offset=0, dims=DIMS, theta=256.0):
    return dict(grid=grid, num_identity=K, mode=mode, rope_dims=dims, theta=theta, eps=1e-6,
                image_len=image_len, frame_offset=frame_offset)


# ------------------------------------------------------------------ fp32 against the reference
@pytest.mark.parametrize(
    "grid, K, mode, frames, offset, text",
    [
        ((2, 3, 5), 1, "release", 3, 0, 4),   # identity + 2 video frames, odd Hp/Wp, text tail
        ((1, 2, 3), 3, "paper", 4, 0, 3),     # K = 3 paper images
        ((2, 3, 5), 0, "release", 2, 0, 2),   # no identity image
        ((2, 2, 3), 0, "paper", 2, 0, 0),     # no identity, no text
        ((3, 3, 5), 2, "paper", 2, 3, 2),     # CP shard of video frames 1..2 (frame_offset past the identities)
        ((2, 2, 3), 3, "paper", 3, 1, 2),     # CP shard starting inside the identity frames (images 2, 3, video 0)
        ((2, 3, 5), 1, "release", 2, 1, 1),   # release shard holding video frames only
    ],
)
def test_fp32_matches_reference(kernel_device, grid, K, mode, frames, offset, text):
    image_len = frames * grid[1] * grid[2]
    _compare(kernel_device, image_len + text, 2, 3, _kw(grid, K, mode, image_len, offset))


def test_text_only_and_odd_split(kernel_device):
    # image_len = 0 (the model's text stream), and a split with an empty t axis
    _compare(kernel_device, 5, 2, 3, _kw((2, 2, 3), 1, "release", 0, dims=(0, 8, 8)))
    _compare(kernel_device, 6 + 2, 1, 1, _kw((2, 2, 3), 1, "paper", 6, frame_offset=2, dims=(2, 6, 8)))


def test_masked_tails(monkeypatch, kernel_device):
    # D/2 = 10 pairs in a 16-wide tile, 5 heads in blocks of 2 (loop with a masked last block)
    monkeypatch.setattr(kr, "_MAX_BLOCK_H", 2)
    _compare(kernel_device, 2 * 6 + 3, 2, 5, _kw((1, 2, 3), 1, "paper", 12, dims=(4, 8, 8)), d=20)


def test_production_split_and_large_positions(kernel_device):
    # D = 128 split 16/56/56 as in the 13B model
    _compare(kernel_device, 12 + 2, 1, 2, _kw((2, 2, 3), 1, "release", 12, dims=(16, 56, 56)), d=128,
             wtol=dict(atol=2e-4, rtol=1e-5))
    # wide grid: identity w positions reach 2 * Wp - 1 = 127 rad at i = 0 (exercises the range reduction);
    # the fp32 angle itself is only good to ~1e-5 there
    _compare(kernel_device, 64, 1, 1, _kw((1, 1, 64), 1, "release", 64), tol=dict(atol=5e-5, rtol=1e-5))


def test_theta_and_backend_torch(kernel_device):
    kw = _kw((1, 2, 3), 1, "paper", 12, theta=10000.0)
    _compare(kernel_device, 13, 1, 2, kw)
    q, k, qw, kw_ = _inputs(13, 1, 2, D, torch.float32)
    for a, b in zip(qk_norm_rope(q, k, qw, kw_, **kw, backend="torch"), qk_norm_rope_reference(q, k, qw, kw_, **kw)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------ the reference is the model's maths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid, K, mode, frames, offset", [((2, 3, 5), 1, "release", 3, 0), ((3, 2, 3), 2, "paper", 3, 1),
                                                           ((2, 2, 3), 0, "paper", 1, 1)])
def test_reference_equals_the_model_pieces(dtype, grid, K, mode, frames, offset):
    """The kernel package stands alone (it imports nothing of hcustom_mc), so its reference is written anew: the
    model's RMSNorm, image_positions, rope_cos_sin and apply_rope, to the last bit of the dtype (the CPU's
    vectorised cos/sin may round one lane differently from its scalar tail, depending on the tensor's layout)."""
    from hcustom_mc.model.layers import RMSNorm
    from hcustom_mc.model.rope import apply_rope, image_positions, rope_cos_sin

    hw, text = grid[1] * grid[2], 3
    q, k, qw, kw_ = (t.detach() for t in _inputs(frames * hw + text, 2, 3, D, dtype, torch.float32))
    kw = _kw(grid, K, mode, frames * hw, frame_offset=offset)
    pos = image_positions(K, *grid, mode=mode)[offset * hw:(offset + frames) * hw]
    cos, sin = rope_cos_sin(pos, DIMS, 256.0)
    for x, w, got in zip((q, k), (qw, kw_), qk_norm_rope_reference(q, k, qw, kw_, **kw)):
        normed = torch.func.functional_call(RMSNorm(D, 1e-6), {"weight": w}, (x,))
        want = torch.cat([apply_rope(normed[:frames * hw], cos, sin), normed[frames * hw:]])
        torch.testing.assert_close(got, want)  # the dtype's default tolerance: a last-bit difference at most


# ------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype, w_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                            (torch.float16, None)])
def test_low_precision(kernel_device, dtype, w_dtype):
    """On CUDA: the compiled kernels' bf16/fp16 tolerance."""
    tol = dict(atol=4e-2, rtol=2e-2)
    out, ref = _compare(kernel_device, 2 * 15 + 3, 2, 3, _kw((1, 3, 5), 1, "release", 30), dtype=dtype, w_dtype=w_dtype,
                        tol=tol, wtol=dict(atol=0.25, rtol=2e-2))
    # the normed value is rounded to the I/O dtype before rotating, as in the model: most elements agree exactly
    for o, r in zip(out, ref):
        assert (o == r).float().mean() > 0.99


# ------------------------------------------------------------------ no cos/sin table
class _RecordAllocs(TorchDispatchMode):
    """Every tensor produced by an aten op while active: (op, numel, dtype, storage pointer)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.numel(), t.dtype, t.untyped_storage().data_ptr()))
        return out


def _per_token_buffers(fn, inputs, image_len):
    """Tensors created during fn(*inputs) with >= image_len elements that are not inputs or outputs
    (a cos/sin table [image_len, D], a position table [image_len, 3], an fp32 copy of q, ...)."""
    with _RecordAllocs() as rec:
        out = fn(*inputs)
    known = {t.untyped_storage().data_ptr() for t in (*inputs, *out)}
    return [s for s in rec.seen if s[3] not in known and s[1] >= image_len]


def test_forward_allocates_no_rope_table(kernel_device):
    S, B, H = 3 * 6 + 2, 2, 3
    kw = _kw((2, 2, 3), 1, "paper", 18)
    inputs = _inputs(S, B, H, D, torch.float32, device=kernel_device)
    assert _per_token_buffers(lambda *a: qk_norm_rope(*a, **kw), inputs, 18) == []
    # the check can fail: the reference path builds fp32 cos/sin tables of image_len x D/2 pair angles
    ref_bufs = _per_token_buffers(lambda *a: qk_norm_rope_reference(*a, **kw), inputs, 18)
    assert any(n == 18 * D // 2 and dt == torch.float32 for _, n, dt, _ in ref_bufs), ref_bufs


def test_backward_allocates_no_rope_table(kernel_device):
    S, B, H = 3 * 6 + 2, 2, 3
    kw = _kw((2, 2, 3), 1, "paper", 18)
    inputs = _inputs(S, B, H, D, torch.float32, device=kernel_device)
    out = qk_norm_rope(*inputs, **kw)
    douts = [torch.ones_like(o) for o in out]
    with _RecordAllocs() as rec:
        torch.autograd.grad(out, inputs, douts)
    table_sizes = {n * c for n in (18, S) for c in (3, D // 2, D)}
    bad = [s for s in rec.seen if s[2] == torch.float32 and s[1] in table_sizes]
    assert bad == [], bad


# ------------------------------------------------------------------ validation
def _base(device="cpu"):
    q, k, qw, kw = (t.detach() for t in _inputs(12 + 2, 1, 2, D, torch.float32, device=device))
    return dict(q=q, k=k, q_weight=qw, k_weight=kw, **_kw((1, 2, 3), 1, "release", 12))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(rope_dims=(4, 5, 7)), ValueError, "even"),
        (dict(rope_dims=(4, 6, 8)), ValueError, "sum to 18"),
        (dict(rope_dims=(8, 8)), TypeError, "three ints"),
        (dict(q_weight=torch.ones(12)), ValueError, "q_weight must be"),
        (dict(k_weight=torch.ones(2, 8)), ValueError, "k_weight must be"),
        (dict(q="q", k="k"), TypeError, "must be a torch.Tensor"),
        (dict(q=torch.ones(14, 1, 2, 16, dtype=torch.float64)), TypeError, "dtype"),
        (dict(q=torch.ones(14, 1, 2, 16, dtype=torch.int32)), TypeError, "dtype"),
        (dict(q=torch.ones(14, 1, 2, 16, dtype=torch.bfloat16)), TypeError, "differ"),
        (dict(k_weight=torch.ones(16, dtype=torch.float64)), TypeError, "dtype"),
        (dict(q=torch.ones(14, 1, 2, 32)[..., ::2]), ValueError, "contiguous"),
        (dict(k=torch.ones(14, 2, 16)), ValueError, "shape"),
        (dict(q=torch.ones(14, 2, 16), k=torch.ones(14, 2, 16)), ValueError, r"\[S, B, H, D\]"),
        (dict(image_len=7), ValueError, "multiple"),
        (dict(image_len=18), ValueError, "image_len"),
        (dict(mode="both"), ValueError, "unknown RoPE mode"),
        (dict(num_identity=2), ValueError, "release mode"),
        (dict(num_identity=-1, mode="paper"), ValueError, "num_identity"),
        (dict(frame_offset=-1), ValueError, "frame_offset"),
        (dict(frame_offset=1), ValueError, "frame_offset"),  # 1 + 2 frames > 1 identity + 1 video
        (dict(grid=(1, 0, 3)), ValueError, "grid"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_invalid_inputs(change, exc, match):
    args = {**_base(), **change}
    with pytest.raises(exc, match=match):
        qk_norm_rope(**args)


def test_valid_edge_offsets(kernel_device):
    # the last shard may end exactly at the last frame; a text-only call may sit past the last frame
    args = _base(kernel_device)
    args.update(grid=(2, 2, 3), frame_offset=1)
    qk_norm_rope(**args)
    args.update(image_len=0, frame_offset=3)
    qk_norm_rope(**args)
