"""Attention dispatch on GPU, decided by a pure function (tested here on CPU), and the single-call
padded-batch paths: the masked SDPA call and the varlen packing equal per-sample, per-segment SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from hcustom_mc.console import log_once
from hcustom_mc import segments as attention
from hcustom_mc.segments import Segments, choose_backend

ALL = {"fa3": True, "cudnn": True, "flash": True, "te": True, "sdpa": True}
BF16 = torch.bfloat16


@pytest.mark.parametrize("device, dtype, cap, available, expected", [
    ("cuda", BF16, (9, 0), ALL, "fa3"),  # Hopper with FA3 installed
    ("cuda", BF16, (9, 0), {**ALL, "fa3": False}, "cudnn"),
    ("cuda", BF16, (9, 0), {**ALL, "fa3": False, "cudnn": False}, "flash"),
    ("cuda", BF16, (9, 0), {"te": True, "sdpa": True}, "te"),
    ("cuda", BF16, (9, 0), {"sdpa": True}, "sdpa"),
    ("cuda", torch.float16, (8, 0), ALL, "cudnn"),  # Ampere: FA3 kernels are Hopper-only
    ("cuda", BF16, (10, 0), ALL, "cudnn"),  # Blackwell: no Hopper FA3
    ("cuda", torch.float16, (7, 5), ALL, "te"),  # Turing: neither cuDNN fused attention nor FA2
    ("cuda", torch.float32, (9, 0), ALL, "sdpa"),  # fp32: no fused kernel takes it
    ("cpu", BF16, None, ALL, "sdpa"),
])
def test_auto_order(device, dtype, cap, available, expected):
    assert choose_backend(device, dtype, cap, available) == expected


def test_forced_backend_must_be_usable():
    assert choose_backend("cuda", BF16, (9, 0), ALL, "flash") == "flash"
    with pytest.raises(RuntimeError, match="fa3"):
        choose_backend("cpu", torch.float32, None, ALL, "fa3")
    with pytest.raises(RuntimeError, match="te"):
        choose_backend("cuda", BF16, (9, 0), {**ALL, "te": False}, "te")
    with pytest.raises(ValueError, match="HCUSTOM_ATTN_BACKEND"):
        choose_backend("cpu", torch.float32, None, ALL, "xformers")


def test_select_backend_reads_env_and_logs_once(monkeypatch, caplog):
    monkeypatch.setenv("HCUSTOM_ATTN_BACKEND", "sdpa")
    log_once.cache_clear()
    q = torch.zeros(3, 1, 2, 4)
    with caplog.at_level("INFO", logger="hcustom_mc"):
        assert attention.select_backend(q) == "sdpa"
        assert attention.select_backend(q) == "sdpa"
    assert sum("attention backend" in r.message for r in caplog.records) == 1
    monkeypatch.setenv("HCUSTOM_ATTN_BACKEND", "fa3")
    with pytest.raises(RuntimeError):
        attention.select_backend(q)


def _inputs(S, B, H, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(S, B, H, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


# odd lengths; unequal valid lengths (CFG-like), a sample without padding, a one-token valid segment
@pytest.mark.parametrize("S, valid", [(29, [29, 21, 17]), (13, [5, 13]), (31, [1, 30, 31, 7])])
def test_masked_single_call_equals_per_segment(S, valid):
    B, H, D = len(valid), 3, 8
    seg = Segments(S, valid)
    ins = _inputs(S, B, H, D)
    ref_ins = [t.detach().clone().requires_grad_() for t in ins]
    out = attention.sdpa_segment_attention(*ins, seg)
    ref = attention.sdpa_segment_attention_looped(*ref_ins, seg)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(ins, ref_ins):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad)


def _fake_varlen(calls):
    """A torch stand-in with flash_attn_varlen_func's contract: packed [T, H, D] + cu_seqlens."""
    def fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append((cu_q, max_q))
        assert cu_q.dtype == torch.int32 and cu_q.device == q.device
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_q
        for a, b in zip(bounds, bounds[1:]):
            out[a:b] = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        return out
    return fn


@pytest.mark.parametrize("backend", ["fa3", "flash"])
def test_varlen_packing_and_descriptors_built_once(monkeypatch, backend):
    """The varlen path packs [S, B] into one call with cu_seqlens built once per forward (not per layer)."""
    calls = []
    monkeypatch.setattr(attention, "select_backend", lambda q: backend)
    monkeypatch.setattr(attention, "_fa3" if backend == "fa3" else "_flash_attn", lambda: _fake_varlen(calls))
    S, valid = 23, [23, 16, 9]
    seg = Segments(S, valid)
    ins = _inputs(S, 3, 2, 8)
    ref = attention.sdpa_segment_attention_looped(*ins, seg)
    for _layer in range(3):
        torch.testing.assert_close(attention.segment_attention(*ins, seg), ref)
    assert len(calls) == 3 and all(c[0] is calls[0][0] for c in calls)  # the same device tensor every layer
    assert calls[0][0].tolist() == [0, 23, 23 + 16, 46, 46 + 9, 69]  # empty padding segment dropped


def test_fa3_tuple_return_is_unwrapped(monkeypatch):
    calls = []
    fake = _fake_varlen(calls)
    monkeypatch.setattr(attention, "select_backend", lambda q: "fa3")
    monkeypatch.setattr(attention, "_fa3", lambda: lambda *a, **k: (fake(*a, **k), None))  # older FA3 builds
    seg = Segments(7, [5])
    ins = _inputs(7, 1, 2, 4)
    torch.testing.assert_close(attention.segment_attention(*ins, seg), attention.sdpa_segment_attention_looped(*ins, seg))


def test_cudnn_path_on_cpu_is_exact(monkeypatch):
    """The cudnn choice only sets SDPA backend priorities; the numbers are the masked single call's."""
    monkeypatch.setattr(attention, "select_backend", lambda q: "cudnn")
    seg = Segments(11, [11, 6])
    ins = _inputs(11, 2, 2, 4, dtype=torch.float32)
    try:
        out = attention.segment_attention(*ins, seg)
    except RuntimeError as exc:  # a CPU torch may refuse the list without MATH priority support
        pytest.skip(f"sdpa_kernel priorities unavailable here: {exc}")
    torch.testing.assert_close(out, attention.sdpa_segment_attention_looped(*ins, seg))
    assert not math.isnan(out.sum().item())
