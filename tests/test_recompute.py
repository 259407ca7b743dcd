"""Recomputation: every mode gives the same outputs and gradients; selective keeps less for backward and
never recomputes the attention core; megatron-style --recompute-method plans."""

import pytest
import torch

from hcustom_mc.parallel import context as attention  # the single-rank strategy calls its segment_attention
from hcustom_mc.model.model import recompute_plan
from tests.conftest import tiny_inputs

MODES = [(None, None, None), ("selective", None, None), ("full", None, None), ("full", "uniform", 3),
         ("full", "block", 1)]


def run(model, inputs, granularity, method, n):
    model.recompute_granularity, model.recompute_method, model.recompute_num_layers = granularity, method, n
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    (out.float() ** 2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tiny_model(single_process):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights

    cfg = get_model_config("tiny", "audio")
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=0, zero_init=False)
    model.train()
    return model, tiny_inputs(cfg)


def test_every_mode_same_numbers(tiny_model):
    model, inputs = tiny_model
    ref_out, ref_grads = run(model, inputs, None, None, None)
    for mode in MODES[1:]:
        out, grads = run(model, inputs, *mode)
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7, msg=lambda m: f"{mode}: {m}")
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{mode} {k}: {m}")


def saved_bytes_and_core_calls(model, inputs, granularity, monkeypatch):
    """Bytes of activation storages kept for backward at the end of forward (parameters excluded), and the
    number of attention-core calls over forward + backward."""
    calls, saved = [0], []
    real = attention.segment_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "segment_attention", counting)
    model.recompute_granularity, model.recompute_method, model.recompute_num_layers = granularity, None, None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    storages = {}
    for t in saved:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()  # a discarded activation has 0 bytes now
    (out.float() ** 2).mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), calls[0]


def test_selective_keeps_less_and_never_recomputes_attention(tiny_model, monkeypatch):
    model, inputs = tiny_model
    # larger latents so activations, not the small conditioning tensors, dominate
    from hcustom_mc.model import get_model_config

    big = tiny_inputs(get_model_config("tiny", "audio"), frames=4, height=8, width=8)
    none_bytes, none_calls = saved_bytes_and_core_calls(model, big, None, monkeypatch)
    sel_bytes, sel_calls = saved_bytes_and_core_calls(model, big, "selective", monkeypatch)
    blocks = len(model.layers)
    assert none_calls == sel_calls == blocks  # the attention core ran once per block, forward only
    print(f"saved activations: none {none_bytes / 2**20:.2f} MiB, selective {sel_bytes / 2**20:.2f} MiB")
    assert sel_bytes < 0.75 * none_bytes


@pytest.mark.parametrize("method, n, expected", [
    (None, None, [([0], True), ([1], True), ([2], True), ([3], True), ([4], True)]),
    ("uniform", 2, [([0, 1], True), ([2, 3], True), ([4], True)]),
    ("block", 2, [([0], True), ([1], True), ([2, 3, 4], False)]),
    ("block", 0, [([0, 1, 2, 3, 4], False)]),
    ("block", 9, [([i], True) for i in range(5)]),
])
def test_recompute_plan(method, n, expected):
    assert recompute_plan(list(range(5)), method, n, True) == expected
    assert recompute_plan(list(range(5)), method, n, False) == [(list(range(5)), False)]


def test_config_rules():
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    cfg = build_config(["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"])
    assert (cfg.recompute_method, cfg.recompute_num_layers) == ("uniform", 2)
    cfg.validate(1)
    for argv in (["--recompute-granularity", "selective", "--recompute-method", "block"],
                 ["--recompute-granularity", "full", "--recompute-method", "stripes"],
                 ["--recompute-granularity", "full", "--recompute-num-layers", "2"]):
        with pytest.raises(ConfigError, match="recompute"):
            build_config(argv).validate(1)


def test_refilled_activations_are_freed_during_backward():
    """A recomputed activation lives only until its consumer's backward has run: the backward peak of a chain
    of selective layers stays near one activation, not the sum of all of them (measured: live CPU bytes)."""
    from torch.profiler import ProfilerActivity, profile

    from hcustom_mc.model.recompute import consume

    torch.manual_seed(0)
    layers, width, rows = 8, 256, 1024
    weights = [torch.randn(width, width, requires_grad=True) for _ in range(layers)]
    x = torch.randn(rows, width, requires_grad=True)
    h = x
    for w in weights:
        h = consume(True, torch.tanh, (h,), lambda a, w=w: a @ w)
    activation = rows * width * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        h.sum().backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    # grads of the weights (layers x 256 KiB) and of x, a few working tensors; without the release every
    # refilled tanh output (1 MiB each) stayed until the end: > layers activations
    assert peak < layers * width * width * 4 + 6 * activation, f"backward peak {peak} B"
