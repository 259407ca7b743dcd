"""The `13b` preset built on the meta device has exactly the released key set and shapes."""

import pytest
import torch

H, M, D, TEXT, POOLED, C = 3072, 12288, 128, 4096, 768, 16


def _linear(prefix, out_f, in_f, bias=True):
    keys = {f"{prefix}.weight": (out_f, in_f)}
    if bias:
        keys[f"{prefix}.bias"] = (out_f,)
    return keys


def released_shapes(variant: str, guidance: bool = False) -> dict:
    """Written from the facts file, section 1.6 (key names and [out, in] shapes)."""
    k = {"img_in.proj.weight": (H, C, 1, 2, 2), "img_in.proj.bias": (H,)}
    k |= _linear("txt_in.input_embedder", H, TEXT)
    k |= _linear("txt_in.t_embedder.mlp.0", H, 256) | _linear("txt_in.t_embedder.mlp.2", H, H)
    k |= _linear("txt_in.c_embedder.linear_1", H, TEXT) | _linear("txt_in.c_embedder.linear_2", H, H)
    for b in range(2):
        p = f"txt_in.individual_token_refiner.blocks.{b}"
        k |= {f"{p}.norm1.weight": (H,), f"{p}.norm1.bias": (H,), f"{p}.norm2.weight": (H,), f"{p}.norm2.bias": (H,)}
        k |= _linear(f"{p}.self_attn_qkv", 3 * H, H) | _linear(f"{p}.self_attn_proj", H, H)
        k |= _linear(f"{p}.mlp.fc1", M, H) | _linear(f"{p}.mlp.fc2", H, M) | _linear(f"{p}.adaLN_modulation.1", 2 * H, H)
    k |= _linear("time_in.mlp.0", H, 256) | _linear("time_in.mlp.2", H, H)
    k |= _linear("vector_in.in_layer", H, POOLED) | _linear("vector_in.out_layer", H, H)
    if guidance:
        k |= _linear("guidance_in.mlp.0", H, 256) | _linear("guidance_in.mlp.2", H, H)
    for b in range(20):
        p = f"double_blocks.{b}"
        for s in ("img", "txt"):
            k |= _linear(f"{p}.{s}_mod.linear", 6 * H, H) | _linear(f"{p}.{s}_attn_qkv", 3 * H, H)
            k |= {f"{p}.{s}_attn_q_norm.weight": (D,), f"{p}.{s}_attn_k_norm.weight": (D,)}
            k |= _linear(f"{p}.{s}_attn_proj", H, H) | _linear(f"{p}.{s}_mlp.fc1", M, H) | _linear(f"{p}.{s}_mlp.fc2", H, M)
    for b in range(40):
        p = f"single_blocks.{b}"
        k |= _linear(f"{p}.linear1", 3 * H + M, H) | _linear(f"{p}.linear2", H, H + M)
        k |= {f"{p}.q_norm.weight": (D,), f"{p}.k_norm.weight": (D,)} | _linear(f"{p}.modulation.linear", 3 * H, H)
    k |= _linear("final_layer.linear", 64, H) | _linear("final_layer.adaLN_modulation.1", 2 * H, H)
    if variant == "editing":
        k |= {"bg_in.proj.weight": (H, 32, 1, 2, 2), "bg_in.proj.bias": (H,)} | _linear("bg_proj", H, H)
    if variant == "audio":
        k |= _linear("audio_proj.proj1", 1024, 19200) | _linear("audio_proj.proj2", 1024, 1024)
        k |= _linear("audio_proj.proj3", 4 * H, 1024) | {"audio_proj.norm.weight": (H,), "audio_proj.norm.bias": (H,)}
        for i in range(6):
            p = f"audio_models.{i}"
            k |= {f"{p}.norm1.weight": (H,), f"{p}.norm1.bias": (H,), f"{p}.norm2.weight": (H,), f"{p}.norm2.bias": (H,)}
            k |= _linear(f"{p}.to_q", 1024, H, False) | _linear(f"{p}.to_kv", 2048, H, False) | _linear(f"{p}.to_out", H, 1024, False)
    return k


def _meta_model(variant, **kw):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config

    return HunyuanCustomDiT(get_model_config("13b", variant, **kw), params_dtype=torch.bfloat16, device="meta")


@pytest.mark.parametrize("variant", ["base", "audio", "editing"])
def test_13b_preset_has_released_keys_and_shapes(single_process, variant):
    model = _meta_model(variant)
    ours = {k: tuple(v.shape) for k, v in model.weight_state_dict().items()}
    expected = released_shapes(variant)
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected


def test_13b_parameter_counts(single_process):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    base = count(_meta_model("base"))
    assert round(base / 1e9, 2) == 12.81  # facts: base DiT = 12.81 B
    assert count(_meta_model("base", guidance_embed=True)) - base == 256 * H + H + H * H + H  # guidance_in
    assert round((count(_meta_model("editing")) - base) / 1e6, 2) == 9.84  # bg_in + bg_proj
    assert round((count(_meta_model("audio")) - base) / 1e6, 1) == 108.9  # audio_proj + 6 cross-attentions


def test_released_shapes_count_matches_facts():
    # the table above, independent of our model, adds up to the facts file's 12.81 B
    total = sum(torch.Size(s).numel() for s in released_shapes("base").values())
    assert round(total / 1e9, 2) == 12.81


def test_meta_build_never_asks_for_transformer_engine_linears(single_process, monkeypatch):
    """On a CUDA host with transformer-engine, get_linear_submodules() returns TE linears, which cannot be
    built on the meta device (megatron's use_cpu_initialization path copies a meta master weight into
    TE's CPU weight: NotImplementedError). Meta builds (names and shapes: loop.whole_model, the sampler's
    memory check, the save lock's size estimate) take megatron's local linears, same names and shapes."""
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model import model as model_module

    cfg = get_model_config("tiny", "base")
    cpu = {n: tuple(p.shape) for n, p in HunyuanCustomDiT(cfg, device="cpu").named_parameters()}

    def te_host(use_te=None):
        raise AssertionError("a meta-device build asked for the default (possibly transformer-engine) linears")

    monkeypatch.setattr(model_module, "get_linear_submodules", te_host)
    meta = HunyuanCustomDiT(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == cpu
