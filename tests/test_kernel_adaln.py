"""kernels/hcustom_kernels/adaln.py: fused LayerNorm+modulate and gated residual vs the PyTorch references, forward
and backward, on tiny odd shapes, plus input validation. Launching tests take `kernel_device`: the Triton
interpreter on CPU, the compiled kernels on CUDA (a `gpu` test)."""

import pytest
import torch

from hcustom_kernels import adaln

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}

# (S, B, C, max LN block, max elementwise block): C not powers of two; the small caps force the
# chunk loops with a masked tail (100 = 3 * 32 + 4)
SHAPES = [(7, 3, 40, 4096, 1024), (7, 3, 100, 4096, 1024), (5, 2, 100, 32, 32), (1, 1, 1, 4096, 1024)]


def _rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _assert_grads(got, ref, dtype):
    # fp32 grads are compared in fp32 so both the kernel's and torch's roundings stay within TOL
    for name, a, b in zip(("0", "1", "2"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("S, B, C, max_block, max_elem", SHAPES)
def test_layernorm_modulate_fp32(monkeypatch, kernel_device, S, B, C, max_block, max_elem):
    monkeypatch.setattr(adaln, "_MAX_BLOCK", max_block)
    dev = dict(device=kernel_device)
    x, shift, scale = _rand(S, B, C, seed=1, **dev) * 3 + 1, _rand(B, C, seed=2, **dev), _rand(B, C, seed=3, **dev)
    dout = torch.randn(S, B, C, **dev)
    out = adaln.layernorm_modulate(x, shift, scale, eps=1e-6)
    ref = adaln.layernorm_modulate_reference(x, shift, scale, eps=1e-6)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    _assert_grads(_grads(out, (x, shift, scale), dout), _grads(ref, (x, shift, scale), dout), torch.float32)


@pytest.mark.parametrize("S, B, C, max_block, max_elem", SHAPES)
def test_gated_residual_fp32(monkeypatch, kernel_device, S, B, C, max_block, max_elem):
    monkeypatch.setattr(adaln, "_MAX_BLOCK_ELEMWISE", max_elem)
    dev = dict(device=kernel_device)
    x, gate, y = _rand(S, B, C, seed=1, **dev), _rand(B, C, seed=2, **dev), _rand(S, B, C, seed=3, **dev)
    dout = torch.randn(S, B, C, **dev)
    out = adaln.gated_residual(x, gate, y)
    ref = adaln.gated_residual_reference(x, gate, y)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    _assert_grads(_grads(out, (x, gate, y), dout), _grads(ref, (x, gate, y), dout), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_block", [4096, 32])
def test_half_precision(monkeypatch, kernel_device, dtype, max_block):
    """Kernels compute in fp32 and round once; the reference is the fp32 computation of the same inputs
    (on CUDA: the compiled kernels' bf16/fp16 tolerance)."""
    monkeypatch.setattr(adaln, "_MAX_BLOCK", max_block)
    monkeypatch.setattr(adaln, "_MAX_BLOCK_ELEMWISE", max_block)
    S, B, C = 7, 3, 100
    dev = dict(dtype=dtype, device=kernel_device)
    x, shift, scale = _rand(S, B, C, seed=1, **dev), _rand(B, C, seed=2, **dev), _rand(B, C, seed=3, **dev)
    dout = torch.randn(S, B, C, **dev)
    out = adaln.layernorm_modulate(x, shift, scale)
    assert out.dtype == dtype
    x32, sh32, sc32 = (t.detach().float().requires_grad_(True) for t in (x, shift, scale))
    ref = adaln.layernorm_modulate_reference(x32, sh32, sc32)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    got = _grads(out, (x, shift, scale), dout)
    assert all(g.dtype == dtype for g in got)
    _assert_grads(got, _grads(ref, (x32, sh32, sc32), dout.float()), dtype)

    gate, y = _rand(B, C, seed=4, **dev), _rand(S, B, C, seed=5, **dev)
    out = adaln.gated_residual(x, gate, y)
    x32, g32, y32 = (t.detach().float().requires_grad_(True) for t in (x, gate, y))
    ref = adaln.gated_residual_reference(x32, g32, y32)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    _assert_grads(_grads(out, (x, gate, y), dout), _grads(ref, (x32, g32, y32), dout.float()), dtype)


def test_backward_reduction_over_many_row_blocks(monkeypatch, kernel_device):
    """dshift/dscale/dgate summed over several S-blocks of unequal length (one row per block at the end)."""
    monkeypatch.setattr(adaln, "_row_blocks", lambda S, B, device: (-(-S // 2), 2))
    S, B, C = 9, 2, 24
    dev = dict(device=kernel_device)
    x, shift, scale, gate, y = (_rand(S, B, C, seed=1, **dev), _rand(B, C, seed=2, **dev), _rand(B, C, seed=3, **dev),
                                _rand(B, C, seed=4, **dev), _rand(S, B, C, seed=5, **dev))
    dout = torch.randn(S, B, C, **dev)
    for fn, ref_fn, inputs in ((adaln.layernorm_modulate, adaln.layernorm_modulate_reference, (x, shift, scale)),
                               (adaln.gated_residual, adaln.gated_residual_reference, (x, gate, y))):
        _assert_grads(_grads(fn(*inputs), inputs, dout), _grads(ref_fn(*inputs), inputs, dout), torch.float32)


def test_partial_requires_grad_and_no_grad(kernel_device):
    S, B, C = 3, 2, 40
    dev = dict(device=kernel_device)
    x = _rand(S, B, C, seed=1, **dev).detach()
    shift, scale = _rand(B, C, seed=2, **dev), _rand(B, C, seed=3, **dev).detach()
    dout = torch.randn(S, B, C, **dev)
    # only shift needs a gradient: the forward still saves mean/rstd
    got = _grads(adaln.layernorm_modulate(x, shift, scale), (shift,), dout)
    torch.testing.assert_close(got[0], dout.sum(0))
    with torch.no_grad():
        out = adaln.layernorm_modulate(x, shift, scale)
        assert not out.requires_grad
        torch.testing.assert_close(out, adaln.layernorm_modulate_reference(x, shift, scale))


def test_torch_backend_is_the_reference():
    S, B, C = 3, 2, 8
    x, shift, scale, y = _rand(S, B, C, seed=1), _rand(B, C, seed=2), _rand(B, C, seed=3), _rand(S, B, C, seed=4)
    assert torch.equal(adaln.layernorm_modulate(x, shift, scale, backend="torch"),
                       adaln.layernorm_modulate_reference(x, shift, scale))
    assert torch.equal(adaln.gated_residual(x, shift, y, backend="torch"), adaln.gated_residual_reference(x, shift, y))


def test_empty_sequence(kernel_device):
    x, v = torch.randn(0, 2, 8, device=kernel_device), torch.randn(2, 8, device=kernel_device)
    assert adaln.layernorm_modulate(x, v, v).shape == (0, 2, 8)
    assert adaln.gated_residual(x, v, x).shape == (0, 2, 8)


def test_bytes_moved():
    x = torch.empty(5, 2, 8, dtype=torch.bfloat16)
    assert adaln.adaln_bytes_moved(x) == (2 * 80 + 2 * 16) * 2
    assert adaln.gated_residual_bytes_moved(x) == (3 * 80 + 16) * 2


def _ok(dtype=torch.float32):
    return torch.randn(4, 2, 8, dtype=dtype), torch.randn(2, 8, dtype=dtype), torch.randn(2, 8, dtype=dtype)


@pytest.mark.parametrize("case, error, match", [
    ("shift_B", ValueError, r"shift must be \[B, C\]"),
    ("scale_C", ValueError, r"scale must be \[B, C\]"),
    ("x_2d", ValueError, r"x must be \[S, B, C\]"),
    ("int_dtype", TypeError, "supported: float32"),
    ("float64", TypeError, "supported: float32"),
    ("mixed", TypeError, "mixed dtypes"),
    ("noncontig_x", ValueError, "x must be contiguous"),
    ("backend", ValueError, "backend must be one of"),
    ("not_tensor", TypeError, "must be a torch.Tensor"),
])
def test_layernorm_modulate_invalid(case, error, match):
    x, shift, scale = _ok()
    kw = {}
    if case == "shift_B":
        shift = torch.randn(3, 8)
    elif case == "scale_C":
        scale = torch.randn(2, 7)
    elif case == "x_2d":
        x = x[0]
    elif case == "int_dtype":
        x = x.long()
    elif case == "float64":
        x, shift, scale = x.double(), shift.double(), scale.double()
    elif case == "mixed":
        shift = shift.bfloat16()
    elif case == "noncontig_x":
        x = torch.randn(2, 4, 8).transpose(0, 1)
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "not_tensor":
        scale = [1.0] * 8
    with pytest.raises(error, match=match):
        adaln.layernorm_modulate(x, shift, scale, **kw)


@pytest.mark.parametrize("case, error, match", [
    ("gate_shape", ValueError, r"gate must be \[B, C\]"),
    ("y_shape", ValueError, "y shape"),
    ("mixed", TypeError, "mixed dtypes"),
    ("noncontig_y", ValueError, "y must be contiguous"),
    ("noncontig_x", ValueError, "x must be contiguous"),
])
def test_gated_residual_invalid(case, error, match):
    x, gate, _ = _ok()
    y = torch.randn_like(x)
    if case == "gate_shape":
        gate = torch.randn(8)
    elif case == "y_shape":
        y = torch.randn(4, 2, 9)
    elif case == "mixed":
        y = y.half()
    elif case == "noncontig_y":
        y = torch.randn(8, 2, 4).permute(2, 1, 0)
    elif case == "noncontig_x":
        x = torch.randn(4, 2, 16)[..., ::2]
    with pytest.raises(error, match=match):
        adaln.gated_residual(x, gate, y)
