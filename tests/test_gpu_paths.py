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


@pytest.mark.parametrize("backend", ["flash", "te", "sdpa"])
def test_attention_backend_bf16_matches_fp32_reference(monkeypatch, backend):
    """13B head geometry (head dim 128), a padded batch: the release's two segments per sample."""
    from hcustom_mc import segments as A

    if backend == "flash" and A._flash_attn() is None:
        pytest.skip("flash-attn is not installed")
    if backend == "te" and A._te_attention(4, 128) is None:
        pytest.skip("transformer-engine is not installed")
    monkeypatch.setenv("HCUSTOM_ATTN_BACKEND", backend)
    S_img, L, B, H, D = 300, 16, 2, 4, 128
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0
    seg = A.Segments.from_text_mask(S_img, mask)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S_img + L, B, H, D, generator=g) for _ in range(3))
    ref = A.sdpa_segment_attention(q.double(), k.double(), v.double(), seg).float()
    out = A.segment_attention(*(t.cuda().bfloat16() for t in (q, k, v)), seg)
    assert A.select_backend(q.cuda().bfloat16()) == backend
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=2e-2)  # bf16 inputs: max 0.011 seen on CPU


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
