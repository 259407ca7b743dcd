"""kernels/hcustom_kernels/block_attention.py: ring attention's fused tile kernel against a dense masked softmax (forward, the
log-sum-exp merge over several key chunks, and the backward from the final lse) and against the plain-torch
tiles of parallel/blockwise.py; the [M, N] score matrix is never allocated; the tile backend decision per
device; input validation. Launching tests take `kernel_device`: the Triton interpreter on CPU, the compiled
kernels on CUDA (a `gpu` test)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hcustom_mc.parallel import blockwise
from hcustom_kernels import block_attention as ba

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles: every shape below has masked row and key tails and several blocks per loop."""
    for name in ("_FWD_BLOCK_M", "_FWD_BLOCK_N", "_BWD_BLOCK_M", "_BWD_BLOCK_N"):
        monkeypatch.setattr(ba, name, 16)


def _case(B=2, H=3, M=37, N=23, D=24, dtype=torch.float32, device="cpu", seed=0, text_keys=True):
    """Inputs shaped like a ring step: queries [image ; text] with padded text tails, and either text keys
    (padded tails, k_pad given) or image keys (k_pad None)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = ((torch.randn(B, H, n, D, generator=g) * 1.5).to(device=device, dtype=dtype) for n in (M, N, N))
    dout = torch.randn(B, H, M, D, generator=g).to(device=device, dtype=dtype)
    q_pad = torch.zeros(B, M, dtype=torch.bool, device=device)
    q_pad[0, M - 7:], q_pad[-1, M - 4:] = True, True
    k_pad = None
    if text_keys:
        k_pad = torch.zeros(B, N, dtype=torch.bool, device=device)
        k_pad[0, N - 8:], k_pad[-1, N - 3:] = True, True
    return q, k, v, dout, q_pad, k_pad


def _dense(q, k, v, dout, q_pad, k_pad, scale):
    """out, lse and autograd gradients of the dense reference, in fp64."""
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    out, lse = ba.block_attention_reference(*ins, q_pad, k_pad, scale)
    out.backward(dout.double())
    return out.detach(), lse.detach(), [t.grad for t in ins]


def _fused(q, k, v, dout, q_pad, k_pad, scale, cuts):
    """The ring's use: merge over key chunks cut at `cuts`, then the backward chunk by chunk."""
    B, H, M, D = q.shape
    N = k.shape[2]
    out = torch.zeros(B, H, M, D, device=q.device)
    lse = torch.full((B, H, M), -math.inf, device=q.device)
    bounds = list(zip([0, *cuts], [*cuts, N]))
    part = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
    for a, b in bounds:
        ba.merge_block_attention(q, k[:, :, a:b], v[:, :, a:b], q_pad, part(k_pad, a, b), scale, out, lse)
    delta = (dout.float() * out).sum(-1)
    dq, dk, dv = (torch.zeros(t.shape, device=q.device) for t in (q, k, v))
    for a, b in bounds:
        ba.block_attention_backward(q, k[:, :, a:b], v[:, :, a:b], dout, lse, delta, q_pad, part(k_pad, a, b), scale,
                                    dq, dk[:, :, a:b], dv[:, :, a:b])
    return out, lse, [dq, dk, dv]


@pytest.mark.parametrize("text_keys", [True, False], ids=["text_keys", "image_keys"])
# masked tails and a non-power-of-two head dim; one query row against three tiny chunks; several full blocks
@pytest.mark.parametrize("M, N, D, cuts", [(37, 23, 24, [9]), (1, 5, 8, [2, 4]), (50, 40, 64, [17])])
def test_fp32_equals_dense_reference(small_blocks, kernel_device, text_keys, M, N, D, cuts):
    q, k, v, dout, q_pad, k_pad = _case(M=M, N=N, D=D, device=kernel_device, text_keys=text_keys)
    scale = 1 / math.sqrt(D)
    ref_out, ref_lse, ref_grads = _dense(q, k, v, dout, q_pad, k_pad, scale)
    out, lse, grads = _fused(q, k, v, dout, q_pad, k_pad, scale, cuts)
    torch.testing.assert_close(out, ref_out.float(), **TOL[torch.float32])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # rows that saw no key: exactly those
    torch.testing.assert_close(lse.nan_to_num(neginf=0), ref_lse.float().nan_to_num(neginf=0), **TOL[torch.float32])
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got, ref.float(), **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_exact_math(small_blocks, kernel_device, dtype):
    """bf16/fp16 inputs: within the dtype's tolerance of exact math on the same (rounded) inputs."""
    q, k, v, dout, q_pad, k_pad = _case(dtype=dtype, device=kernel_device, seed=1)
    scale = 1 / math.sqrt(q.shape[-1])
    ref_out, _, ref_grads = _dense(q, k, v, dout, q_pad, k_pad, scale)
    out, _, grads = _fused(q, k, v, dout, q_pad, k_pad, scale, [9])
    torch.testing.assert_close(out, ref_out.float(), **TOL[dtype])
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got, ref.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_production_tiles_bf16_head_dim_128(kernel_device):
    """The tile sizes and head dim the 13B model runs (128 x 64 forward, 64 x 64 backward, D = 128), bf16."""
    q, k, v, dout, q_pad, k_pad = _case(B=1, H=2, M=300, N=200, D=128, dtype=torch.bfloat16, device=kernel_device,
                                        seed=4)
    scale = 1 / math.sqrt(128)
    ref_out, _, ref_grads = _dense(q, k, v, dout, q_pad, k_pad, scale)
    out, _, grads = _fused(q, k, v, dout, q_pad, k_pad, scale, [130])
    torch.testing.assert_close(out, ref_out.float(), **TOL[torch.bfloat16])
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got, ref.float(), **TOL[torch.bfloat16], msg=lambda m: f"{name}: {m}")


def test_equals_the_torch_tiles_through_blockwise(small_blocks, kernel_device, monkeypatch):
    """blockwise.forward_into / backward_into give the same numbers with either tile backend."""
    q, k, v, dout, q_pad, k_pad = _case(device=kernel_device, seed=2)
    pad = blockwise.Padding(q_pad, q.shape[2] - 7, k_pad, k.shape[2] - 8)
    scale = 1 / math.sqrt(q.shape[-1])
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("HCUSTOM_RING_TILES", backend)
        assert blockwise.tile_backend(q) == backend
        out = torch.zeros(q.shape, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, device=q.device)
        blockwise.forward_into(q, k, v, pad, scale, out, lse, 8, 5)
        delta = (dout * out).sum(-1)
        grads = [torch.zeros(t.shape, device=q.device) for t in (q, k, v)]
        blockwise.backward_into(q, k, v, dout, lse, delta, pad, scale, *grads, 8, 5)
        results[backend] = (out, lse, *grads)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_score_matrix_is_allocated(small_blocks, kernel_device):
    """Nothing of M x N elements exists at any point (the scores live in the kernels' registers)."""
    B, H, M, N, D = 1, 1, 96, 80, 16
    q, k, v, dout, q_pad, k_pad = _case(B=B, H=H, M=M, N=N, D=D, device=kernel_device)
    with _Allocations() as seen:
        _fused(q, k, v, dout, q_pad, k_pad, 0.25, [40])
    assert seen.largest < M * N, seen.largest  # the largest is a [M, D] or [N, D] tensor


@pytest.mark.parametrize("device, dtype, head_dim, wanted, expected", [
    ("cuda", torch.bfloat16, 128, "auto", "triton"),
    ("cuda", torch.float16, 64, "auto", "triton"),
    ("cuda", torch.float32, 128, "auto", "torch"),  # cuBLAS: the fp32 kernels spill on sm_90
    ("cpu", torch.bfloat16, 128, "auto", "torch"),
    ("cpu", torch.float32, 16, "triton", "triton"),
    ("cuda", torch.float32, 128, "triton", "triton"),
    ("cuda", torch.float64, 128, "triton", "torch"),
    ("cuda", torch.bfloat16, 256, "auto", "torch"),  # over the shared memory of an H100 at these tiles
    ("cuda", torch.bfloat16, 256, "triton", "torch"),
    ("cuda", torch.bfloat16, 128, "torch", "torch"),
])
def test_tile_backend_decision(device, dtype, head_dim, wanted, expected):
    assert blockwise.choose_tile_backend(device, dtype, head_dim, wanted) == expected


def test_bad_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv("HCUSTOM_RING_TILES", "fast")
    with pytest.raises(ValueError, match="HCUSTOM_RING_TILES must be one of"):
        blockwise.choose_tile_backend("cuda", torch.bfloat16, 128)


def test_bad_inputs_are_named():
    q, k, v, dout, q_pad, k_pad = _case()
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:3], -math.inf)
    with pytest.raises(ValueError, match="disagree"):
        ba.merge_block_attention(q, k[..., :8], v, q_pad, k_pad, 0.2, out, lse)
    with pytest.raises(ValueError, match="out must be an fp32"):
        ba.merge_block_attention(q, k, v, q_pad, k_pad, 0.2, out.double(), lse)
    with pytest.raises(ValueError, match="q_pad must be"):
        ba.merge_block_attention(q, k, v, q_pad[:, :5], k_pad, 0.2, out, lse)
    with pytest.raises(ValueError, match="head dim D = 256"):
        ba.merge_block_attention(*(torch.zeros(1, 1, 4, 256) for _ in range(3)), q_pad[:1, :4], None, 0.1,
                                 torch.zeros(1, 1, 4, 256), torch.zeros(1, 1, 4))
    with pytest.raises(TypeError, match="mixed dtypes"):
        ba.merge_block_attention(q, k.half(), v, q_pad, k_pad, 0.2, out, lse)
    with pytest.raises(ValueError, match="unit last stride"):
        ba.block_attention_backward(q, k, v, dout, lse, lse, q_pad, k_pad, 0.2, out, torch.zeros(k.shape),
                                    torch.zeros(k.shape[:-1] + (2 * k.shape[-1],))[..., ::2])
