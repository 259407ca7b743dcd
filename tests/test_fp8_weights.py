"""fp8 weights kept fp8 for sampling (hcustom_mc.model.fp8, checkpoint.fp8, inference.fp8, sample --fp8-weights).

References are independent of the fp8 layers: the dequantising loader (`load_release_state_dict`, which builds
bf16 weights from the pair) or a plain model loaded with weights dequantised by hand, in fp32, exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_inputs
from tests.torchrun import REPO, child_pythonpath, run_python, torchrun

BF16 = torch.bfloat16


def _cast(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, single_process):
    """A tiny model's weights (random, biases too) as a bf16 release file and as fp8 pairs, per-tensor (the
    release's own format) and per-channel, a LoRA file on four block linears and two others, and inputs."""
    from safetensors.torch import save_file

    from hcustom_mc.checkpoint.lora import Adapters, to_original
    from hcustom_mc.checkpoint.release import save_release_fp8, save_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.parallel.sharding import full_state_dict

    root = tmp_path_factory.mktemp("fp8")
    cfg = get_model_config("tiny", "base")
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=3, zero_init=False)
    sd = {k: v.to(BF16) for k, v in full_state_dict(model).items()}
    g = torch.Generator().manual_seed(11)
    for k, v in sd.items():  # rows of very different size: e4m3 is a float format, so one per-tensor scale
        # costs precision only where rows fall below its normal range (|w| < amax * 2^-6 / 448 ~ amax / 28672)
        if k.endswith("linear1.weight"):
            sd[k] = (v.float() * torch.logspace(-6, 0, v.shape[0])[:, None]).to(BF16)
    (root / "bf16").mkdir()
    save_release_state_dict(sd, root / "bf16")
    save_release_fp8(sd, root / "pt")
    save_release_fp8(sd, root / "pc", "per-channel")
    names = ["double_blocks.0.img_attn_qkv", "double_blocks.1.txt_mlp.fc2", "single_blocks.0.linear1",
             "single_blocks.1.linear2", "final_layer.linear", "txt_in.individual_token_refiner.blocks.0.self_attn_qkv"]
    tensors = {}
    for n in names:
        out_f, in_f = sd[f"{n}.weight"].shape
        tensors[n] = (torch.randn(4, in_f, generator=g) * 0.2, torch.randn(out_f, 4, generator=g) * 0.2)
    adapters = Adapters(tensors, "test-lora")
    save_file(to_original(adapters), str(root / "lora.safetensors"))
    inputs = tiny_inputs(cfg, seed=5)
    torch.save(inputs, root / "inputs.pt")
    return {"root": root, "cfg": cfg, "sd": sd, "adapters": adapters, "inputs": inputs}


def _fp8_file(ckpts, kind):
    return ckpts["root"] / kind / "mp_rank_00_model_states_fp8.pt"


def _exact_reference(ckpts, kind, dtype, adapters=None, scale=1.0):
    """A plain model (no fp8 layers) whose block weights are w8.float() * scale in fp32, exactly (cast to
    `dtype` once), the scale as the release runtime reads it (bf16-rounded); optional LoRA merged."""
    from hcustom_mc.checkpoint.lora import merge_into_model
    from hcustom_mc.checkpoint.release import fp8_effective_scale, read_release_fp8
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.model.fp8 import dequantize_weight
    from hcustom_mc.parallel.sharding import load_full_state_dict

    sd, scales = read_release_fp8(_fp8_file(ckpts, kind))
    full = {k: dequantize_weight(v, fp8_effective_scale(scales[k[:-7]]), torch.float32) if k[:-7] in scales else v
            for k, v in sd.items()}
    model = HunyuanCustomDiT(ckpts["cfg"], params_dtype=dtype).eval()
    load_full_state_dict(model, full)
    if adapters is not None:
        merge_into_model(model, adapters, scale)
    return model


def _forward(model, inputs, dtype):
    with torch.no_grad():
        return model(**_cast(inputs, dtype))


# ----------------------------------------------------------------------------- loading and outputs
@pytest.mark.parametrize("kind", ["pt", "pc"])
def test_fp8_pair_stays_fp8_and_matches_the_dequantising_loader(ckpts, kind):
    """The pair's float8 tensors are the model's weights as stored (same bytes, half the bf16 model's block
    bytes) and the output equals the dequantising loader's model: bit for bit in bf16 (the upcast builds the
    loader's very bf16 weights, then the same matmul), and in fp32 bit for bit against a model holding the
    exact fp32 products w8 * scale (the loader itself rounds them to bf16 first)."""
    from hcustom_mc.checkpoint.release import read_release_fp8
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.inference.pipeline import load_model
    from hcustom_mc.model.fp8 import FP8_DTYPE, block_linears, weight_bytes

    cfg, path = ckpts["cfg"], _fp8_file(ckpts, kind)
    stored, scales = read_release_fp8(path)
    for dtype in (BF16, torch.float32):
        model, report = load_fp8_model(path, "release", cfg, dtype, "ulysses")
        linears = block_linears(model)
        assert len(linears) == report.linears == len(scales) == 26
        for name, m in linears:
            assert m.weight.dtype == FP8_DTYPE and m.weight_scale.dtype == torch.float32
            assert torch.equal(m.weight.view(torch.uint8), stored[f"{name}.weight"].view(torch.uint8))
            assert m.weight_scale.shape == ((m.weight.shape[0],) if kind == "pc" else ())
        ref = load_model(path, "release", cfg, dtype, "ulysses")  # dequantised to bf16 on load
        ref_linears = block_linears(ref)
        assert all(m.weight.dtype == dtype for _, m in ref_linears)
        got, want = weight_bytes(model), weight_bytes(ref)
        numel = sum(m.weight.numel() for _, m in linears)
        scale_bytes = sum(m.weight_scale.numel() * 4 for _, m in linears)
        assert got["block_linears"] == numel + scale_bytes
        assert want["block_linears"] == numel * ref_linears[0][1].weight.element_size()
        assert got["other"] == want["other"] and got["total"] < want["total"]
        out = _forward(model, ckpts["inputs"], dtype)
        if dtype == BF16:
            assert torch.equal(out, _forward(ref, ckpts["inputs"], dtype))
        else:
            assert torch.equal(out, _forward(_exact_reference(ckpts, kind, dtype), ckpts["inputs"], dtype))
            # against the loader's bf16-rounded weights: they differ by <= 2^-9 relative, outputs by little
            loader = _forward(ref, ckpts["inputs"], dtype)
            assert (out - loader).abs().max() <= 1e-3 * loader.abs().max()
    assert "float8_e4m3fn" in report.describe() and "MiB" in report.describe()


def test_short_sampler_run_equals_the_dequantising_loader(ckpts):
    """Three guided Euler steps (the sampler's own loop, two branches) in bf16: the same latents, exactly."""
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout, load_model

    cfg, path = ckpts["cfg"], _fp8_file(ckpts, "pt")
    inputs = _cast(tiny_inputs(cfg, batch=1, seed=9), BF16)
    branch = {k: v for k, v in inputs.items() if k not in ("latents", "timestep")}
    uncond = dict(branch, text_states=branch["text_states"] * 0)
    branches = {"cond": branch, "uncond": uncond}
    noise = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (load_fp8_model(path, "release", cfg, BF16, "ulysses")[0], load_model(path, "release", cfg, BF16, "ulysses")):
        results.append(ParallelSampler(model, SamplerLayout()).sample(noise, branches, steps=3, shift=5.0, cfg_scale=4.0))
    assert torch.isfinite(results[0]).all() and (results[0] - noise).abs().max() > 0.1
    assert torch.equal(results[0], results[1])


def test_quantise_on_load_is_per_channel_and_close_to_bf16(ckpts):
    """A bf16 checkpoint with --fp8-weights on: every block linear quantised per output channel, exactly as
    the per-channel export quantises (same fp8 bytes and scales); the output stays near the bf16 model's."""
    from hcustom_mc.checkpoint.release import quantize_release_fp8
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.inference.pipeline import load_model
    from hcustom_mc.model.fp8 import block_linears

    path = ckpts["root"] / "bf16" / "mp_rank_00_model_states.pt"
    model, report = load_fp8_model(path, "release", ckpts["cfg"], BF16, "ulysses")
    assert (report.source, report.granularity, report.linears) == ("quantised on load", "per-channel", 26)
    fp8_sd, fp8_map = quantize_release_fp8(ckpts["sd"], "per-channel")
    for name, m in block_linears(model):
        assert torch.equal(m.weight.view(torch.uint8), fp8_sd[f"{name}.weight"].view(torch.uint8)), name
        assert torch.equal(m.weight_scale, fp8_map[name]), name
    out = _forward(model, ckpts["inputs"], BF16).float()
    ref = _forward(load_model(path, "release", ckpts["cfg"], BF16, "ulysses"), ckpts["inputs"], BF16).float()
    # e4m3 keeps 3 mantissa bits: weights move by <= 1/16 relative; measured here ~1-2% of the output's range
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_cpu_matmul_is_the_upcast_and_the_gemm_decision():
    """The decision routes every CPU matmul to the upcast; torch._scaled_mm only on fp8-capable CUDA GPUs."""
    from hcustom_mc.model.fp8 import fp8_matmul_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    kw = dict(in_features=64, out_features=192, per_channel=True, has_scaled_mm=True)
    assert fp8_matmul_backend("auto", cpu, BF16, **kw) == "upcast"
    assert fp8_matmul_backend("upcast", cuda, BF16, capability=(9, 0), **kw) == "upcast"
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(9, 0), **kw) == "rowwise"
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(10, 0), **kw) == "rowwise"
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(8, 9), **kw) == "upcast"  # sm_89: tensor-wise only
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(8, 9), **{**kw, "per_channel": False}) == "tensorwise"
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(8, 0), **kw) == "upcast"  # A100: no fp8 cores
    assert fp8_matmul_backend("auto", cuda, torch.float32, capability=(9, 0), **kw) == "upcast"
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(9, 0), **{**kw, "in_features": 72}) == "upcast"
    assert fp8_matmul_backend("auto", cuda, BF16, capability=(9, 0), **{**kw, "has_scaled_mm": False}) == "upcast"


def test_auto_matmul_on_cpu_is_the_upcast(ckpts):
    from hcustom_mc.inference.fp8 import load_fp8_model

    path = _fp8_file(ckpts, "pc")
    a = _forward(load_fp8_model(path, "release", ckpts["cfg"], BF16, "ulysses", matmul="auto")[0], ckpts["inputs"], BF16)
    b = _forward(load_fp8_model(path, "release", ckpts["cfg"], BF16, "ulysses")[0], ckpts["inputs"], BF16)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_fp8_gemm_on_this_gpu(ckpts):
    """On a GPU with fp8 tensor cores, --fp8-matmul auto runs torch._scaled_mm (activations quantised per token):
    finite and within a few percent of the upcast's output (each activation moves by <= 2^-4 relative)."""
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.model.fp8 import block_linears, fp8_matmul_backend

    cuda = torch.device("cuda", torch.cuda.current_device())
    path = _fp8_file(ckpts, "pc")
    gemm, _ = load_fp8_model(path, "release", ckpts["cfg"], BF16, "ulysses", matmul="auto", device=cuda)
    upcast, _ = load_fp8_model(path, "release", ckpts["cfg"], BF16, "ulysses", device=cuda)
    kinds = {fp8_matmul_backend("auto", cuda, BF16, m.weight.shape[1], m.weight.shape[0], True)
             for _, m in block_linears(gemm)}
    if kinds == {"upcast"}:
        pytest.skip(f"this GPU (sm_{''.join(map(str, torch.cuda.get_device_capability()))}) has no row-wise fp8 GEMM")
    inputs = {k: v.to(cuda) for k, v in ckpts["inputs"].items()}
    a, b = _forward(gemm, inputs, BF16).float(), _forward(upcast, inputs, BF16).float()
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("rowwise", [True, False])
def test_scaled_mm_linear_maths(rowwise):
    """The fp8 GEMM path's maths (torch._scaled_mm also runs on the CPU, so it is checked here even though the
    CPU never picks it): x quantised to e4m3 per row / per tensor adds <= 2^-4 relative per element, so the
    output error is bounded by 2^-4 * (|x| @ |W|^T), plus bf16 output rounding."""
    from hcustom_mc.model.fp8 import dequantize_weight, quantize_weight, scaled_mm_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-1, 0, 48)[:, None]
    x = torch.randn(2, 5, 64, generator=g) * torch.logspace(-1, 1, 5)[None, :, None]
    bias = torch.randn(48, generator=g)
    w8, s = quantize_weight(w, "per-channel" if rowwise else "per-tensor")
    W = dequantize_weight(w8, s, torch.float32)
    y = scaled_mm_linear(x.to(BF16), w8, s, bias.to(BF16), BF16, rowwise).float()
    ref = x.to(BF16).float() @ W.t() + bias.to(BF16).float()
    bound = 2**-4 * (x.abs() @ W.abs().t()) + 2**-7 * ref.abs() + 1e-3
    assert y.shape == (2, 5, 48) and (y - ref).abs().le(bound).all()
    assert (y - ref).abs().max() > 0  # it did quantise the activation


def test_fp8_layers_refuse_a_dtype_cast(ckpts):
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.model.fp8 import FP8_DTYPE, Fp8Error

    model, _ = load_fp8_model(_fp8_file(ckpts, "pt"), "release", ckpts["cfg"], BF16, "ulysses")
    with pytest.raises(Fp8Error, match="cannot cast a layer with fp8 weights to torch.float32"):
        model.float()
    model.to("cpu")  # a device move keeps float8
    assert model.single_blocks["0"].linear1.weight.dtype == FP8_DTYPE


# ----------------------------------------------------------------------------- export
def _e4m3_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest e4m3 error of w / scale, in w's units: half a step of 3 mantissa bits (<= 2^-4 |w|) for
    normal values, half the subnormal step 2^-9 below 2^-6."""
    s = scale if scale.ndim == 0 else scale[:, None]
    return torch.maximum(w.abs() * 2**-4, 2**-10 * s.expand_as(w)) * (1 + 1e-6)


def test_per_channel_export_round_trip_bounds(ckpts, tmp_path):
    """`convert --fp8 per-channel`: 1-D [out] scales in the map (bf16-representable), every weight within one
    e4m3 rounding of the source, readers accept it (both dequant modes agree), and on rows spanning six
    decades (the small ones below the per-tensor scale's normal range) it is more accurate than per-tensor."""
    from hcustom_mc.checkpoint.release import load_release_state_dict, read_release_fp8

    run_python("-m", "hcustom_mc.checkpoint.convert", "--src", ckpts["root"] / "bf16", "--src-format", "release",
               "--dst", tmp_path / "out", "--dst-format", "release", "--model-config", "tiny", "--fp8", "per-channel")
    path = tmp_path / "out" / "mp_rank_00_model_states_fp8.pt"
    raw = torch.load(tmp_path / "out" / "mp_rank_00_model_states_fp8_map.pt", weights_only=True)["module"]
    sd, scales = read_release_fp8(path)
    assert set(raw) == set(scales) and len(scales) == 26
    release, fp32 = (load_release_state_dict(path, fp8_dequant=m) for m in ("release", "fp32"))
    _, pt_scales = read_release_fp8(_fp8_file(ckpts, "pt"))
    pt = load_release_state_dict(_fp8_file(ckpts, "pt"), fp8_dequant="fp32")
    err_pc = err_pt = 0.0
    for name, s in scales.items():
        w = ckpts["sd"][f"{name}.weight"].float()
        assert raw[name].shape == (w.shape[0],) and torch.equal(s, s.to(BF16).float())
        assert torch.equal(release[f"{name}.weight"], fp32[f"{name}.weight"])
        exact = sd[f"{name}.weight"].float() * s[:, None]
        assert (exact - w).abs().le(_e4m3_bound(w, s)).all(), name
        assert (pt[f"{name}.weight"].float() - w).abs().le(_e4m3_bound(w, pt_scales[name]) + w.abs() * 2**-8).all()
        if name.endswith("linear1"):  # the mean over rows of each row's relative error
            rel = lambda q: ((q - w).norm(dim=1) / w.norm(dim=1)).mean().item()  # noqa: E731
            err_pc, err_pt = err_pc + rel(exact), err_pt + rel(pt[f"{name}.weight"].float())
    assert err_pc < 0.5 * err_pt, (err_pc, err_pt)
    for k, v in sd.items():  # everything else as in the source
        if k[:-7] not in scales:
            assert torch.equal(v, ckpts["sd"][k]), k
    # --fp8 per-tensor writes the release's own format: the pair save_release_fp8 writes
    run_python("-m", "hcustom_mc.checkpoint.convert", "--src", ckpts["root"] / "bf16", "--src-format", "release",
               "--dst", tmp_path / "pt", "--dst-format", "release", "--model-config", "tiny", "--fp8", "per-tensor")
    got, got_scales = read_release_fp8(tmp_path / "pt" / "mp_rank_00_model_states_fp8.pt")
    want, want_scales = read_release_fp8(_fp8_file(ckpts, "pt"))
    assert all(s.ndim == 0 for s in got_scales.values())
    assert {k: v.view(torch.uint8) if v.dtype.itemsize == 1 else v for k, v in got.items()}.keys() == want.keys()
    assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) if want[k].dtype.itemsize == 1
               else torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(got_scales[n], want_scales[n]) for n in want_scales)
    bad = run_python("-m", "hcustom_mc.checkpoint.convert", "--src", ckpts["root"] / "bf16", "--src-format", "release",
                     "--dst", tmp_path / "d", "--dst-format", "diffusers", "--model-config", "tiny", "--fp8",
                     "per-channel", expect_ok=False)
    assert "--fp8 writes the release fp8 pair: it needs --dst-format release, not diffusers" in bad


def test_bad_scales_give_one_clear_message(ckpts, tmp_path):
    from hcustom_mc.checkpoint.release import CheckpointFormatError, load_release_state_dict, read_release_fp8

    src = ckpts["root"] / "pc"
    maps = torch.load(src / "mp_rank_00_model_states_fp8_map.pt", weights_only=True)
    name = "single_blocks.0.linear1"
    n = maps["module"][name].shape[0]
    for case, value, message in [
        ("shape", torch.ones(n - 1), rf"scale of {name} has shape \({n - 1},\); expected one value \(per-tensor\) or \[{n}\]"),
        ("matrix", torch.ones(n, 1), rf"scale of {name} has shape \({n}, 1\)"),
        ("nan", torch.full((n,), float("nan")), rf"scale of {name} holds {n} non-finite or non-positive value"),
        ("inf", torch.tensor(float("inf")), rf"scale of {name} holds 1 non-finite"),
    ]:
        folder = tmp_path / case
        folder.mkdir()
        (folder / "mp_rank_00_model_states_fp8.pt").symlink_to(src / "mp_rank_00_model_states_fp8.pt")
        torch.save({"module": {**maps["module"], name: value}}, folder / "mp_rank_00_model_states_fp8_map.pt")
        for reader in (read_release_fp8, load_release_state_dict):
            with pytest.raises(CheckpointFormatError, match=message) as err:
                reader(folder / "mp_rank_00_model_states_fp8.pt")
            assert str(err.value).count("\n  - ") == 1, str(err.value)  # one problem, said once


def test_non_finite_weights_refused_when_quantising_on_load(ckpts, tmp_path):
    from hcustom_mc.checkpoint.release import CheckpointFormatError, save_release_state_dict
    from hcustom_mc.inference.fp8 import load_fp8_model

    sd = dict(ckpts["sd"])
    sd["double_blocks.1.img_mlp.fc2.weight"] = sd["double_blocks.1.img_mlp.fc2.weight"].clone()
    sd["double_blocks.1.img_mlp.fc2.weight"][0, 3] = float("inf")
    (tmp_path / "ck").mkdir()
    path = save_release_state_dict(sd, tmp_path / "ck")
    with pytest.raises(CheckpointFormatError, match="cannot keep its weights in fp8: double_blocks.1.img_mlp.fc2: "
                                                    "cannot quantise a weight holding non-finite values"):
        load_fp8_model(path, "release", ckpts["cfg"], BF16, "ulysses")


# ----------------------------------------------------------------------------- LoRA
def test_lora_on_an_fp8_checkpoint_is_a_side_adapter(ckpts):
    """fp8 pair + LoRA: side adapters on the fp8 block linears, merged into the others; matches the exact
    dequantised weights with the LoRA merged (fp32: they differ only in the order of the sums,
    x(W + sBA)^T vs xW^T + (xA^T)(sB)^T, ~1e-7 relative), and the LoRA changes the output."""
    from hcustom_mc.checkpoint.fp8 import apply_adapters
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.model.fp8 import is_fp8_linear

    adapters, cfg = ckpts["adapters"], ckpts["cfg"]
    for kind in ("pt", "pc"):
        path = _fp8_file(ckpts, kind)
        model, report = load_fp8_model(path, "release", cfg, torch.float32, "ulysses", loras=[(adapters, 0.5)])
        assert report.lora == [("test-lora", 0.5, 4, 2)]
        assert is_fp8_linear(model.single_blocks["0"].linear1) and model.single_blocks["0"].linear1.fp8_side_A.shape[0] == 4
        out = _forward(model, ckpts["inputs"], torch.float32)
        ref = _forward(_exact_reference(ckpts, kind, torch.float32, adapters, 0.5), ckpts["inputs"], torch.float32)
        base = _forward(_exact_reference(ckpts, kind, torch.float32), ckpts["inputs"], torch.float32)
        assert (ref - base).abs().max() > 0.05 * base.abs().max()  # the LoRA matters
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    # two LoRAs on one linear concatenate along the rank: the same as their sum merged
    apply_adapters(model, adapters, 0.25)
    assert model.single_blocks["0"].linear1.fp8_side_A.shape[0] == 8
    ref = _forward(_exact_reference(ckpts, "pc", torch.float32, adapters, 0.75), ckpts["inputs"], torch.float32)
    torch.testing.assert_close(_forward(model, ckpts["inputs"], torch.float32), ref, rtol=0,
                               atol=1e-5 * ref.abs().max().item())


def test_lora_on_a_bf16_checkpoint_is_merged_before_quantising(ckpts):
    """bf16 source + LoRA: merged into the bf16 weights, then quantised per channel: exactly the fp8 of the
    merged state dict (dequantised+merged reference, bit for bit in bf16), not a side adapter."""
    from hcustom_mc.checkpoint.lora import merge_into_state_dict
    from hcustom_mc.checkpoint.release import dequantize_release_fp8, quantize_release_fp8
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.parallel.sharding import load_full_state_dict

    adapters, cfg = ckpts["adapters"], ckpts["cfg"]
    path = ckpts["root"] / "bf16" / "mp_rank_00_model_states.pt"
    model, report = load_fp8_model(path, "release", cfg, BF16, "ulysses", loras=[(adapters, 0.5)])
    assert report.lora == [("test-lora", 0.5, 0, 6)]
    assert getattr(model.single_blocks["0"].linear1, "fp8_side_A", None) is None
    merged = dict(ckpts["sd"])
    merge_into_state_dict(merged, adapters, 0.5)
    fp8_sd, fp8_map = quantize_release_fp8(merged, "per-channel")
    ref = HunyuanCustomDiT(cfg, params_dtype=BF16).eval()
    load_full_state_dict(ref, dequantize_release_fp8(fp8_sd, fp8_map))
    assert torch.equal(_forward(model, ckpts["inputs"], BF16), _forward(ref, ckpts["inputs"], BF16))


# ----------------------------------------------------------------------------- TP
def test_tp2_fp8_loading_equals_tp1(ckpts):
    """TP 2 (gloo): the per-tensor and per-channel pairs with a LoRA side adapter, and a bf16 checkpoint
    quantised on load with the LoRA merged: the same fp8 bytes and scales gathered back (quantise-on-load's
    |w| maxima are all-reduced), and the same outputs as TP 1 up to the row-parallel partial sums' order."""
    import importlib.util

    script = REPO / "tests" / "dist_scripts" / "fp8_tp_check.py"
    spec = importlib.util.spec_from_file_location("fp8_tp_check", script)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    root = ckpts["root"]
    torchrun(2, script, root, 2)
    got = torch.load(root / "tp2.pt", weights_only=True)
    want = helper.run_cases(root)
    assert want["per_tensor.lora"] == [(str(root / "lora.safetensors"), 0.5, 4, 2)]
    for case in helper.CASES:
        for k, v in want[f"{case}.state"].items():
            g = got[f"{case}.state"][k]
            assert g.dtype == v.dtype and torch.equal(g.view(torch.uint8) if g.dtype.itemsize == 1 else g,
                                                      v.view(torch.uint8) if v.dtype.itemsize == 1 else v), (case, k)
        torch.testing.assert_close(got[case], want[case], rtol=0, atol=1e-5 * want[case].abs().max().item(), msg=case)


# ----------------------------------------------------------------------------- the sampler command
@pytest.mark.slow
def test_sample_command_fp8_weights(ckpts, tmp_path):
    """`sample --fp8-weights on --lora` on the fp8 pair: logs the DiT bytes, records the mode in the sidecar,
    and in bf16 (no LoRA) gives the latents of the dequantising loader (--fp8-weights off) exactly."""
    from hcustom_mc.encoders.tiny import save_tiny_encoders

    save_tiny_encoders(tmp_path / "enc", ckpts["cfg"])
    path = _fp8_file(ckpts, "pt")
    common = ["-m", "hcustom_mc.sample", "--checkpoint", path, "--model-config", "tiny", "--encoders-dir",
              tmp_path / "enc", "--task", "t2v", "--prompt", "A red ball.", "--height", 32, "--width", 48, "--frames",
              5, "--steps", 2, "--seed", 3, "--dtype", "bfloat16", "--no-progress"]
    on = run_python(*common, "--fp8-weights", "on", "--out", tmp_path / "on")
    off = run_python(*common, "--out", tmp_path / "off")
    assert "fp8 weights (fp8 checkpoint, per-tensor scales): 26 block linears in float8_e4m3fn" in on
    assert "fp8 weights" not in off
    a = torch.load(tmp_path / "on" / "000_t2v.latents.pt", weights_only=True)
    b = torch.load(tmp_path / "off" / "000_t2v.latents.pt", weights_only=True)
    assert torch.equal(a, b)
    side = json.loads((tmp_path / "on" / "000_t2v.json").read_text())["weights"]
    assert side["fp8_weights"] == "on" and side["fp8_granularity"] == "per-tensor"
    assert side["dit_bytes_per_rank"]["block_linears"] < side["dit_bytes_per_rank"]["block_linears_as_bf16"]
    lora = run_python(*common, "--fp8-weights", "on", "--lora", f"{ckpts['root'] / 'lora.safetensors'}:0.5",
                      "--out", tmp_path / "lora")
    assert "LoRA" in lora and "4 side adapters on fp8 linears, 2 merged" in lora
    c = torch.load(tmp_path / "lora" / "000_t2v.latents.pt", weights_only=True)
    assert not torch.equal(a, c)
    bad = run_python(*common[:-1], "--fp8-matmul", "auto", "--out", tmp_path / "bad", expect_ok=False)
    assert "--fp8-matmul auto needs --fp8-weights on" in bad


def test_the_quantisation_maxima_reduce_where_the_group_can(monkeypatch, single_process):
    """An NCCL group takes CUDA tensors only: a model quantised in host memory (fp8 loading before the GPU) reduces
    its maxima on this rank's GPU, and gloo on the CPU; reduce_device decides. The reduction itself (gloo, one rank)
    gives the maxima back where they were."""
    import torch.distributed as dist

    from hcustom_mc.model import fp8

    out = fp8._all_reduce_max(torch.tensor([1.0, 3.0]), dist.group.WORLD)
    assert torch.equal(out, torch.tensor([1.0, 3.0])) and out.device.type == "cpu"
    assert fp8.reduce_device(dist.group.WORLD) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert fp8.reduce_device(dist.group.WORLD) == torch.device("cuda", 3)
