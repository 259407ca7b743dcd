"""kernels/hcustom_kernels/frame_attention.py: per-frame audio cross-attention vs the PyTorch reference, forward and
backward, on tiny odd shapes; a check that the [B, F, N, M] score tensor is never allocated; input
validation. Launching tests take `kernel_device`: the Triton interpreter on CPU, the compiled kernels on
CUDA (a `gpu` test)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hcustom_kernels import frame_attention as fa

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}

# (B, F, N, M, d, BLOCK_N, BLOCK_D): N = 37 leaves a masked row tail with 16-row blocks and gives
# 3 row blocks, so a backward program loops over 2 of them; d = 24 is not a power of two: one masked
# 32-wide chunk, or a 16 + 8 chunk loop; M = 5 pads the key tile; M = 64 is the largest supported
SHAPES = [(2, 3, 37, 16, 24, 16, 16), (2, 3, 37, 5, 24, 16, 32), (1, 1, 1, 1, 16, 16, 16),
          (1, 2, 20, 64, 40, 64, 64)]


def _inputs(B, F, N, M, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, F, N, d, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    k = (torch.randn(B, F, M, d, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, F, M, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dout = torch.randn(B, F, N, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, dout


def _run(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _blocks(monkeypatch, block_n, block_d):
    monkeypatch.setattr(fa, "_BLOCK_N", block_n)
    monkeypatch.setattr(fa, "_BLOCK_D", block_d)


@pytest.mark.parametrize("B, F, N, M, d, block_n, block_d", SHAPES)
def test_fp32_forward_backward(monkeypatch, kernel_device, B, F, N, M, d, block_n, block_d):
    _blocks(monkeypatch, block_n, block_d)
    q, k, v, dout = _inputs(B, F, N, M, d, device=kernel_device)
    got = _run(fa.frame_cross_attention, q, k, v, dout)
    ref = _run(fa.frame_cross_attention_reference, q, k, v, dout)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype and got[0].device == q.device
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("per_program", [1, 2, 3, 5])
def test_dk_dv_accumulate_over_row_blocks(monkeypatch, kernel_device, per_program):
    """dK/dV partials summed over 1, 2, 3 and 5 row blocks per backward program (5 row blocks of 16 rows, the
    last one masked): each program loads, adds to and stores its partial rows once per row block, with a
    barrier between row blocks (tests/sm90_compile.py checks that it is compiled in)."""
    _blocks(monkeypatch, 16, 16)
    n_blocks = 5
    monkeypatch.setattr(fa, "_split", lambda n, frames, device: (-(-n // per_program), per_program))
    q, k, v, dout = _inputs(1, 2, 16 * n_blocks - 3, 16, 24, device=kernel_device, seed=2)
    got = _run(fa.frame_cross_attention, q, k, v, dout)
    ref = _run(fa.frame_cross_attention_reference, q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [16, 5])
def test_half_precision(monkeypatch, kernel_device, dtype, M):
    """Close to the same-dtype reference, and no further from the exact (fp32) math of the same
    rounded inputs than that reference is (same roundings of P and the outputs; dP stays fp32).
    On CUDA: the compiled kernels' native bf16/fp16 dots against the same bounds."""
    _blocks(monkeypatch, 16, 16)
    q, k, v, dout = _inputs(2, 3, 37, M, 24, dtype=dtype, seed=1, device=kernel_device)
    got = _run(fa.frame_cross_attention, q, k, v, dout)
    ref = _run(fa.frame_cross_attention_reference, q, k, v, dout)
    exact = _run(fa.frame_cross_attention_reference, *(t.detach().float().requires_grad_(True) for t in (q, k, v)),
                 dout.float())
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, ref, exact):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")
        err, ref_err = (a.float() - e).abs(), (b.float() - e).abs()
        assert err.max() <= 1.5 * ref_err.max() + 1e-4, f"{name}: max error {err.max()} vs reference {ref_err.max()}"
        assert err.mean() <= 1.1 * ref_err.mean() + 1e-5, f"{name}: mean error {err.mean()} vs reference {ref_err.mean()}"


def test_partial_requires_grad_and_no_grad(kernel_device):
    q, k, v, dout = _inputs(1, 2, 9, 16, 32, device=kernel_device)
    k, v = k.detach(), v.detach()  # only q needs a gradient
    (dq,) = torch.autograd.grad(fa.frame_cross_attention(q, k, v), q, dout)
    (dq_ref,) = torch.autograd.grad(fa.frame_cross_attention_reference(q, k, v), q, dout)
    torch.testing.assert_close(dq, dq_ref, **TOL[torch.float32])
    with torch.no_grad():
        out = fa.frame_cross_attention(q, k, v)
    assert not out.requires_grad
    torch.testing.assert_close(out, fa.frame_cross_attention_reference(q, k, v).detach(), **TOL[torch.float32])


def test_torch_backend_sdpa_baseline_and_bytes(kernel_device):
    q, k, v, _ = _inputs(2, 3, 7, 5, 24, device=kernel_device)
    ref = fa.frame_cross_attention_reference(q, k, v)
    torch.testing.assert_close(fa.frame_cross_attention(q, k, v, backend="torch"), ref)
    torch.testing.assert_close(fa.frame_cross_attention_sdpa(q, k, v), ref, **TOL[torch.float32])
    assert fa.frame_attention_bytes_moved(q, k, v) == (2 * 2 * 3 * 7 * 24 + 2 * 2 * 3 * 5 * 24) * 4
    empty = fa.frame_cross_attention(q[:, :, :0].detach(), k, v)
    assert empty.shape == (2, 3, 0, 24)


# ------------------------------------------------------------------ no [B, F, N, M] tensor
class _RecordAllocations(TorchDispatchMode):
    """Every tensor produced by any aten op (allocations, and views too: stricter than needed)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [(str(func), t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _record(fn, q, k, v, dout):
    with _RecordAllocations() as rec:
        _run(fn, q, k, v, dout)
    return rec.numels


def test_score_tensor_never_allocated(monkeypatch, kernel_device):
    _blocks(monkeypatch, 16, 16)
    B, F, N, M, d = 2, 3, 37, 5, 24  # B*F*N*M = 1110 is no multiple of d: no other tensor has that size
    q, k, v, dout = _inputs(B, F, N, M, d, device=kernel_device)
    scores = B * F * N * M

    # the check can fail: the reference materialises scores and probabilities, forward and backward
    ref = _record(fa.frame_cross_attention_reference, q, k, v, dout)
    assert sum(n == scores for _, n in ref) >= 2

    got = _record(fa.frame_cross_attention, q, k, v, dout)
    assert not [op for op, n in got if n == scores], "kernel path allocated a [B, F, N, M] tensor"
    # the recorder saw the kernel's own buffers, forward (lse) and backward (dK/dV partials)
    n_split, _ = fa._split(3, B * F, kernel_device)  # 3 row blocks; 2 programs per frame in the interpreter
    assert kernel_device.type == "cuda" or n_split == 2
    assert B * F * N in [n for _, n in got]
    assert 2 * B * F * n_split * M * d in [n for _, n in got]


# ------------------------------------------------------------------ validation
def _ok(B=1, F=2, N=3, M=4, d=16, dtype=torch.float32):
    return torch.randn(B, F, N, d).to(dtype), torch.randn(B, F, M, d).to(dtype), torch.randn(B, F, M, d).to(dtype)


@pytest.mark.parametrize("case, exc, match", [
    ("batch", ValueError, "disagree on B, F or d"),
    ("frames", ValueError, "disagree on B, F or d"),
    ("dim", ValueError, "disagree on B, F or d"),
    ("kv_shape", ValueError, "same shape"),
    ("ndim", ValueError, "must be 4-D"),
    ("too_many_keys", ValueError, "M = 65"),
    ("no_keys", ValueError, "M = 0"),
    ("d_too_big", ValueError, "head dim"),
    ("frame_too_big", ValueError, "one frame holds"),
    ("float64", TypeError, "dtype torch.float64"),
    ("int", TypeError, "dtype torch.int64"),
    ("mixed", TypeError, "mixed dtypes"),
    ("not_tensor", TypeError, "must be a torch.Tensor"),
    ("non_contiguous", ValueError, r"contiguous.*\.contiguous\(\)"),
    ("backend", ValueError, "backend must be one of"),
])
def test_invalid_inputs(case, exc, match):
    q, k, v = _ok()
    kwargs = {}
    if case == "batch":
        k, v = _ok(B=2)[1:]
    elif case == "frames":
        k, v = _ok(F=3)[1:]
    elif case == "dim":
        k, v = _ok(d=8)[1:]
    elif case == "kv_shape":
        v = _ok(M=5)[2]
    elif case == "ndim":
        q = q[0]
    elif case == "too_many_keys":
        q, k, v = _ok(M=65)
    elif case == "no_keys":
        q, k, v = _ok(M=0)
    elif case == "d_too_big":
        q, k, v = _ok(N=1, M=1, d=fa._MAX_D + 1)
    elif case == "frame_too_big":  # meta tensors: validation only looks at shapes
        q = torch.empty(1, 1, 2**20, 2**12, device="meta")
        k = v = torch.empty(1, 1, 16, 2**12, device="meta")
    elif case == "float64":
        q, k, v = _ok(dtype=torch.float64)
    elif case == "int":
        q, k, v = (t.long() for t in _ok())
    elif case == "mixed":
        k = k.bfloat16()
    elif case == "not_tensor":
        v = v.tolist()
    elif case == "non_contiguous":
        q = torch.randn(1, 2, 16, 3).transpose(-1, -2)
    elif case == "backend":
        kwargs["backend"] = "cuda"
    with pytest.raises(exc, match=match):
        fa.frame_cross_attention(q, k, v, **kwargs)
