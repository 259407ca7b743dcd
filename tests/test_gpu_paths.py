"""CUDA-only paths (`gpu` tests; skipped without CUDA, saying so): the NCCL world of one, every
installed attention backend in bf16 against an fp32 reference, and the DiT built and run on the GPU."""

import pytest
import torch

from tests.conftest import tiny_inputs

pytestmark = pytest.mark.gpu


def test_nccl_world_of_one_computes_on_the_gpu(single_process):
    import torch.distributed as dist

    from hcustom_mc.parallel.cpu_compat import cpu_compat_active

    assert dist.get_backend() == "nccl" and single_process.device.type == "cuda"
    assert not cpu_compat_active(), "megatron's CPU layer must stay off on the NCCL path"
    t = torch.full((4,), 2.0, device=single_process.device)
    dist.all_reduce(t)
    assert t.device.type == "cuda" and torch.equal(t.cpu(), torch.full((4,), 2.0))


def _unusable(A, backend: str) -> str | None:
    """Why `backend` cannot run on this GPU, or None."""
    cap = torch.cuda.get_device_capability()
    if backend == "fa3":
        if A._fa3() is None:
            return "FlashAttention-3 (flash_attn_interface, built from flash-attention/hopper) is not installed"
        if cap[0] != 9:
            return f"FlashAttention-3 runs on Hopper (sm90) only; this GPU is sm{cap[0]}{cap[1]}"
    if backend == "cudnn" and not (A._cudnn_sdpa_usable() and cap >= (8, 0)):
        return f"no cuDNN attention here (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, sm{cap[0]}{cap[1]})"
    if backend == "flash" and A._flash_attn() is None:
        return "flash-attn (FA2) is not installed"
    if backend == "te" and A._te_attention(4, 128) is None:
        return "transformer-engine is not installed"
    return None


def _padded_batch(equal=False):
    """13B head geometry (head dim 128), B = 2: the release's two segments per sample, the second sample's text
    padded (as in CFG: an empty negative prompt), fp32 on the CPU, with an output gradient."""
    from hcustom_mc import segments as A

    S_img, L, B, H, D = 300, 16, 2, 4, 128
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, 9:] = 0
    if not equal:
        mask[0, 9:] = 1
    seg = A.Segments.from_text_mask(S_img, mask)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S_img + L, B, H, D, generator=g) for _ in range(3))
    return seg, (q, k, v), torch.randn(S_img + L, B, H * D, generator=g)


def _check_bf16_against_fp64(run, seg, qkv, dout):
    """`run(q, k, v)` on bf16 CUDA tensors [S, B, H, D] (what the model hands attention: [B, H, S, D] views of them
    are not contiguous) against the fp64 reference, forward and backward."""
    from hcustom_mc import segments as A

    ref_in = [t.double().requires_grad_() for t in qkv]
    ref = A.sdpa_segment_attention(*ref_in, seg)
    ref.backward(dout.double())
    got_in = [t.cuda().bfloat16().requires_grad_() for t in qkv]
    out = run(*got_in)
    out.backward(dout.cuda().bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=3e-2, rtol=2e-2)  # bf16 inputs: max 0.011 seen on CPU
    for name, got, want in zip("qkv", got_in, ref_in):
        grad = got.grad.double().cpu()
        # CPU bf16 SDPA: max 0.013, relative norm 0.005 (13B head dim, this batch)
        torch.testing.assert_close(grad, want.grad, atol=5e-2, rtol=3e-2, msg=lambda m: f"d{name}: {m}")
        assert (grad - want.grad).norm() <= 2e-2 * want.grad.norm(), f"d{name}"


@pytest.mark.parametrize("backend", ["fa3", "cudnn", "flash", "te", "sdpa"])
def test_attention_backend_bf16_matches_fp32_reference(monkeypatch, backend):
    """Every backend `auto` may pick (cuDNN on the bare image, FA3 on Hopper with it installed), forced, on the
    padded B=2 batch, forward and backward."""
    from hcustom_mc import segments as A

    reason = _unusable(A, backend)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("HCUSTOM_ATTN_BACKEND", backend)
    seg, qkv, dout = _padded_batch()
    assert A.select_backend(qkv[0].cuda().bfloat16()) == backend
    _check_bf16_against_fp64(lambda q, k, v: A.segment_attention(q, k, v, seg), seg, qkv, dout)


def test_cudnn_attention_itself_takes_the_strided_views():
    """The cudnn backend lists cuDNN first but lets torch fall back where cuDNN declines (masks), so a pass above
    may not have run cuDNN at all. Here cuDNN alone (no fallback: torch raises if it declines) computes the
    equal-length batch, whose calls are unmasked, on the same non-contiguous [B, H, S, D] views (cuDNN SDPA has
    had stride bugs, PyTorch PR 138354), forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hcustom_mc import segments as A

    reason = _unusable(A, "cudnn")
    if reason:
        pytest.skip(reason)
    seg, qkv, dout = _padded_batch(equal=True)

    def cudnn_only(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return A.sdpa_segment_attention(q, k, v, seg)

    _check_bf16_against_fp64(cudnn_only, seg, qkv, dout)


def test_dit_built_and_run_on_the_gpu_in_bf16(single_process):
    from hcustom_mc.device import misplaced
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights

    cfg = get_model_config("tiny", "audio")
    model = HunyuanCustomDiT(cfg, params_dtype=torch.bfloat16)  # default device: this rank's GPU
    initialize_weights(model, seed=1, zero_init=False)
    assert misplaced(model, "cuda") == []
    inputs = tiny_inputs(cfg, device="cuda")
    inputs = {k: v.bfloat16() if v.is_floating_point() and k not in ("timestep", "guidance") else v
              for k, v in inputs.items()}
    torch.cuda.reset_peak_memory_stats()
    out = model(**inputs)
    (out.float() ** 2).mean().backward()
    assert out.is_cuda and torch.isfinite(out.float()).all()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters() if p.requires_grad)
    assert torch.cuda.max_memory_allocated() > 0
