"""Checkpoint formats: release (.pt, fp8 pair) and diffusers (safetensors folder)."""

from __future__ import annotations

import json

import pytest
import torch

from hcustom_mc.checkpoint.diffusers_format import (
    diffusers_config_from_model_config,
    diffusers_to_release,
    load_diffusers_folder,
    model_config_from_diffusers_config,
    release_keys,
    release_to_diffusers,
    save_diffusers_folder,
)
from hcustom_mc.checkpoint.release import (
    CheckpointFormatError,
    load_release_state_dict,
    quantize_release_fp8,
    save_release_fp8,
    save_release_state_dict,
)
from hcustom_mc.model.config import ModelConfig, get_model_config

diffusers = pytest.importorskip("diffusers")
HunyuanVideoTransformer3DModel = diffusers.HunyuanVideoTransformer3DModel

TINY_KW = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
    num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
    pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
)

# Released naming (facts file 1.6) for 1 refiner + 1 double + 1 single block, without guidance_in.
EXPECTED_RELEASE_KEYS = [
    "img_in.proj.weight", "img_in.proj.bias",
    "txt_in.input_embedder.weight", "txt_in.input_embedder.bias",
    "txt_in.t_embedder.mlp.0.weight", "txt_in.t_embedder.mlp.0.bias",
    "txt_in.t_embedder.mlp.2.weight", "txt_in.t_embedder.mlp.2.bias",
    "txt_in.c_embedder.linear_1.weight", "txt_in.c_embedder.linear_1.bias",
    "txt_in.c_embedder.linear_2.weight", "txt_in.c_embedder.linear_2.bias",
    "txt_in.individual_token_refiner.blocks.0.norm1.weight", "txt_in.individual_token_refiner.blocks.0.norm1.bias",
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.bias",
    "txt_in.individual_token_refiner.blocks.0.self_attn_proj.weight",
    "txt_in.individual_token_refiner.blocks.0.self_attn_proj.bias",
    "txt_in.individual_token_refiner.blocks.0.norm2.weight", "txt_in.individual_token_refiner.blocks.0.norm2.bias",
    "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight", "txt_in.individual_token_refiner.blocks.0.mlp.fc1.bias",
    "txt_in.individual_token_refiner.blocks.0.mlp.fc2.weight", "txt_in.individual_token_refiner.blocks.0.mlp.fc2.bias",
    "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.weight",
    "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias",
    "time_in.mlp.0.weight", "time_in.mlp.0.bias", "time_in.mlp.2.weight", "time_in.mlp.2.bias",
    "vector_in.in_layer.weight", "vector_in.in_layer.bias", "vector_in.out_layer.weight", "vector_in.out_layer.bias",
    "double_blocks.0.img_mod.linear.weight", "double_blocks.0.img_mod.linear.bias",
    "double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_attn_qkv.bias",
    "double_blocks.0.img_attn_q_norm.weight", "double_blocks.0.img_attn_k_norm.weight",
    "double_blocks.0.img_attn_proj.weight", "double_blocks.0.img_attn_proj.bias",
    "double_blocks.0.img_mlp.fc1.weight", "double_blocks.0.img_mlp.fc1.bias",
    "double_blocks.0.img_mlp.fc2.weight", "double_blocks.0.img_mlp.fc2.bias",
    "double_blocks.0.txt_mod.linear.weight", "double_blocks.0.txt_mod.linear.bias",
    "double_blocks.0.txt_attn_qkv.weight", "double_blocks.0.txt_attn_qkv.bias",
    "double_blocks.0.txt_attn_q_norm.weight", "double_blocks.0.txt_attn_k_norm.weight",
    "double_blocks.0.txt_attn_proj.weight", "double_blocks.0.txt_attn_proj.bias",
    "double_blocks.0.txt_mlp.fc1.weight", "double_blocks.0.txt_mlp.fc1.bias",
    "double_blocks.0.txt_mlp.fc2.weight", "double_blocks.0.txt_mlp.fc2.bias",
    "single_blocks.0.linear1.weight", "single_blocks.0.linear1.bias",
    "single_blocks.0.linear2.weight", "single_blocks.0.linear2.bias",
    "single_blocks.0.q_norm.weight", "single_blocks.0.k_norm.weight",
    "single_blocks.0.modulation.linear.weight", "single_blocks.0.modulation.linear.bias",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
]
GUIDANCE_KEYS = ["guidance_in.mlp.0.weight", "guidance_in.mlp.0.bias", "guidance_in.mlp.2.weight", "guidance_in.mlp.2.bias"]

H, MLP = 32, 128  # tiny hidden size and MLP width


def tiny_diffusers(guidance: bool, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(guidance_embeds=guidance, **TINY_KW).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # many weights are zero-initialised: make every one random
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_release_sd(guidance: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    return diffusers_to_release(tiny_diffusers(guidance, seed).state_dict())


def assert_same(a: dict, b: dict) -> None:
    """Same keys, dtypes, shapes and bits."""
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


def model_inputs(guidance: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0]]),
        pooled_projections=torch.randn(1, 16, generator=g),
    )
    if guidance:
        inputs["guidance"] = torch.tensor([6000.0])
    return inputs


# ---------------------------------------------------------------------------------------------
# diffusers <-> release
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [False, True])
def test_diffusers_release_round_trip_bit_exact(guidance):
    dsd = tiny_diffusers(guidance).state_dict()
    rsd = diffusers_to_release(dsd)
    expected = EXPECTED_RELEASE_KEYS + (GUIDANCE_KEYS if guidance else [])
    assert sorted(rsd) == sorted(expected)
    assert release_keys(1, 1, 1, guidance) == list(rsd)
    back = release_to_diffusers(rsd)
    assert set(back) == set(dsd)
    for k, v in dsd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # and release -> diffusers -> release
    assert_same(diffusers_to_release(back), rsd)


def test_release_key_shapes_and_fused_layouts():
    dsd = tiny_diffusers(False).state_dict()
    rsd = diffusers_to_release(dsd)
    assert rsd["double_blocks.0.img_attn_qkv.weight"].shape == (3 * H, H)
    assert rsd["single_blocks.0.linear1.weight"].shape == (3 * H + MLP, H)
    assert rsd["single_blocks.0.linear2.weight"].shape == (H, H + MLP)
    assert rsd["final_layer.adaLN_modulation.1.weight"].shape == (2 * H, H)
    assert rsd["img_in.proj.weight"].shape == (H, 4, 1, 2, 2)
    # fused qkv = [q; k; v]; txt stream from the add_* projections
    q, k, v = rsd["double_blocks.0.txt_attn_qkv.bias"].chunk(3)
    assert torch.equal(q, dsd["transformer_blocks.0.attn.add_q_proj.bias"])
    assert torch.equal(v, dsd["transformer_blocks.0.attn.add_v_proj.bias"])
    # linear1 = [q; k; v; mlp]
    w = rsd["single_blocks.0.linear1.weight"]
    assert torch.equal(w[2 * H : 3 * H], dsd["single_transformer_blocks.0.attn.to_v.weight"])
    assert torch.equal(w[3 * H :], dsd["single_transformer_blocks.0.proj_mlp.weight"])
    # final layer: release (shift, scale) = diffusers (scale, shift) swapped
    rel = rsd["final_layer.adaLN_modulation.1.bias"]
    dif = dsd["norm_out.linear.bias"]
    assert torch.equal(rel[:H], dif[H:]) and torch.equal(rel[H:], dif[:H])
    # dtype preserved (bf16 in, bf16 out)
    bf = {k: t.to(torch.bfloat16) for k, t in dsd.items()}
    assert all(t.dtype == torch.bfloat16 for t in diffusers_to_release(bf).values())


def test_conversion_outputs_do_not_alias_inputs():
    dsd = tiny_diffusers(False).state_dict()
    rsd = diffusers_to_release(dsd)
    out = release_to_diffusers(rsd)
    ptrs = {t.untyped_storage().data_ptr() for t in rsd.values()}
    assert not any(t.untyped_storage().data_ptr() in ptrs for t in out.values())
    shallow = release_to_diffusers(rsd, copy=False)
    assert shallow["x_embedder.proj.weight"] is rsd["img_in.proj.weight"]


def test_unknown_missing_and_custom_keys_are_reported():
    rsd = tiny_release_sd()
    bad = dict(rsd)
    bad["foo.bar"] = torch.zeros(1)
    del bad["double_blocks.0.img_mlp.fc2.bias"]
    with pytest.raises(CheckpointFormatError) as e:
        release_to_diffusers(bad)
    assert "foo.bar" in str(e.value) and "double_blocks.0.img_mlp.fc2.bias" in str(e.value)
    assert "unknown" in str(e.value) and "missing" in str(e.value)

    # a gap in the block indices is a set of missing keys
    gap = dict(rsd)
    gap["single_blocks.2.q_norm.weight"] = rsd["single_blocks.0.q_norm.weight"]
    with pytest.raises(CheckpointFormatError, match=r"single_blocks\.1\.linear1\.weight"):
        release_to_diffusers(gap)

    # partial guidance_in
    partial = dict(rsd, **{"guidance_in.mlp.0.weight": torch.zeros(H, 256)})
    with pytest.raises(CheckpointFormatError, match=r"guidance_in\.mlp\.2\.bias"):
        release_to_diffusers(partial)

    custom = dict(rsd)
    custom["bg_in.proj.weight"] = torch.zeros(H, 8, 1, 2, 2)
    custom["audio_models.0.to_q.weight"] = torch.zeros(8, H)
    with pytest.raises(CheckpointFormatError) as e:
        release_to_diffusers(custom)
    msg = str(e.value)
    assert "diffusers" in msg and "bg_in.proj.weight" in msg and "audio_models.0.to_q.weight" in msg

    dsd = tiny_diffusers(False).state_dict()
    dsd["transformer_blocks.0.attn.mystery.weight"] = torch.zeros(1)
    del dsd["proj_out.bias"]
    with pytest.raises(CheckpointFormatError) as e:
        diffusers_to_release(dsd)
    assert "transformer_blocks.0.attn.mystery.weight" in str(e.value) and "proj_out.bias" in str(e.value)


# ---------------------------------------------------------------------------------------------
# configs and the diffusers folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [False, True])
def test_config_round_trip(guidance):
    model = tiny_diffusers(guidance)
    cfg = model_config_from_diffusers_config(model.config)
    assert (cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.rope_dims) == (32, 2, (1, 2, 2), (4, 6, 6))
    assert (cfg.text_dim, cfg.pooled_text_dim, cfg.guidance_embed) == (32, 16, guidance)
    d = diffusers_config_from_model_config(cfg)
    for key, value in d.items():
        got = model.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    HunyuanVideoTransformer3DModel(**d)  # constructible
    # the tiny preset and the 13B preset convert too
    assert diffusers_config_from_model_config(get_model_config("13b"))["num_layers"] == 20
    assert diffusers_config_from_model_config(get_model_config("tiny"))["attention_head_dim"] == 16


def test_unsupported_configs_are_refused():
    with pytest.raises(CheckpointFormatError, match="image_condition_type"):
        model_config_from_diffusers_config({**TINY_KW, "image_condition_type": "latent_concat"})
    with pytest.raises(CheckpointFormatError, match="qk_norm"):
        model_config_from_diffusers_config({**TINY_KW, "qk_norm": "layer_norm"})
    with pytest.raises(CheckpointFormatError, match="bogus"):
        model_config_from_diffusers_config({**TINY_KW, "bogus": 1})
    with pytest.raises(CheckpointFormatError, match="audio"):
        diffusers_config_from_model_config(get_model_config("tiny", "audio"))
    with pytest.raises(CheckpointFormatError, match="video_condition"):
        diffusers_config_from_model_config(get_model_config("tiny", "editing"))


@pytest.mark.parametrize("guidance", [False, True])
def test_save_diffusers_folder_from_pretrained_identical_outputs(tmp_path, guidance):
    model = tiny_diffusers(guidance)
    cfg = model_config_from_diffusers_config(model.config)
    rsd = diffusers_to_release(model.state_dict())
    save_diffusers_folder(rsd, cfg, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["_class_name"] == "HunyuanVideoTransformer3DModel"
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))

    loaded = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path).eval()
    assert dict(loaded.config)["guidance_embeds"] == guidance
    assert_same(loaded.state_dict(), model.state_dict())
    inputs = model_inputs(guidance)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        out = loaded(**inputs, return_dict=False)[0]
        # from_pretrained leaves parameters memory-mapped at unaligned offsets, which changes the
        # CPU kernels' summation order (~1e-6); in ordinary (aligned) memory the outputs are identical.
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for p in loaded.parameters():
            p.data = p.data.clone()
        assert torch.equal(loaded(**inputs, return_dict=False)[0], ref)

    rsd2, cfg2 = load_diffusers_folder(tmp_path)
    assert cfg2 == cfg
    assert_same(rsd2, rsd)


def test_load_sharded_diffusers_folder(tmp_path):
    from safetensors.torch import save_file

    model = tiny_diffusers(False)
    dsd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(dsd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: dsd[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel",
                                                     **dict(model.config)}, default=list))
    rsd, cfg = load_diffusers_folder(tmp_path)
    assert cfg.num_double_blocks == 1 and not cfg.guidance_embed
    assert_same(rsd, diffusers_to_release(dsd))


def test_save_diffusers_folder_refuses_config_mismatch(tmp_path):
    rsd = tiny_release_sd()
    cfg = model_config_from_diffusers_config(tiny_diffusers(False).config)
    wrong = ModelConfig(**{**cfg.to_dict(), "num_single_blocks": 2})
    with pytest.raises(CheckpointFormatError, match=r"single_blocks\.1"):
        save_diffusers_folder(rsd, wrong, tmp_path)


# ---------------------------------------------------------------------------------------------
# release .pt files
# ---------------------------------------------------------------------------------------------


def test_release_save_load_round_trip(tmp_path):
    rsd = {k: v.to(torch.bfloat16) for k, v in tiny_release_sd(guidance=True).items()}
    file = save_release_state_dict(rsd, tmp_path)
    assert file.name == "mp_rank_00_model_states.pt"
    raw = torch.load(file, weights_only=True)
    assert list(raw) == ["module"]
    for source in (file, tmp_path):
        assert_same(load_release_state_dict(source), rsd)
    ema = save_release_state_dict(rsd, tmp_path / "ema" / "x_model_states.pt", load_key="ema")
    assert_same(load_release_state_dict(ema, load_key="ema"), rsd)
    # HunyuanVideo's bare pytorch_model_{module,ema}.pt
    torch.save(rsd, tmp_path / "pytorch_model_ema.pt")
    assert_same(load_release_state_dict(tmp_path / "pytorch_model_ema.pt", load_key="ema"), rsd)


def test_release_save_writes_views_compactly(tmp_path):
    big = torch.randn(64, 64)
    file = save_release_state_dict({"a.weight": big[:2]}, tmp_path / "m_model_states.pt")
    assert file.stat().st_size < big.numel() * 4
    assert torch.equal(load_release_state_dict(file)["a.weight"], big[:2])


def test_missing_load_key_and_directory_errors(tmp_path):
    rsd = tiny_release_sd()
    save_release_state_dict(rsd, tmp_path)
    with pytest.raises(CheckpointFormatError, match=r"no 'ema' entry.*\['module'\]"):
        load_release_state_dict(tmp_path / "mp_rank_00_model_states.pt", load_key="ema")
    torch.save({"module": rsd}, tmp_path / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointFormatError, match="mp_rank_01_model_states.pt"):
        load_release_state_dict(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointFormatError, match="no \\*_model_states.pt"):
        load_release_state_dict(empty)
    with pytest.raises(CheckpointFormatError, match="not found"):
        load_release_state_dict(tmp_path / "nope.pt")


def test_legacy_format_namespace_args_and_junk(tmp_path):
    import argparse

    rsd = tiny_release_sd()
    legacy = tmp_path / "legacy_model_states.pt"  # pre-zipfile format: cannot be memory-mapped
    torch.save({"module": rsd, "args": argparse.Namespace(lr=1e-4)}, legacy, _use_new_zipfile_serialization=False)
    assert_same(load_release_state_dict(legacy), rsd)
    junk = tmp_path / "junk_model_states.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="junk_model_states.pt") as e:
        load_release_state_dict(junk)
    assert "unsafe" not in str(e.value)


class _Payload:  # a custom class: must never be unpickled
    def __init__(self):
        self.x = 1


def test_pickled_custom_object_is_refused(tmp_path):
    file = tmp_path / "evil_model_states.pt"
    torch.save({"module": {"a.weight": torch.zeros(2)}, "extra": _Payload()}, file)
    with pytest.raises(CheckpointFormatError, match="evil_model_states.pt") as e:
        load_release_state_dict(file)
    assert "unsafe" in str(e.value) and "_Payload" in str(e.value)


# ---------------------------------------------------------------------------------------------
# fp8
# ---------------------------------------------------------------------------------------------


def _is_block_linear(k, t):
    return k.endswith(".weight") and t.ndim == 2 and ("double_blocks" in k or "single_blocks" in k)


def test_fp8_quantize_save_load(tmp_path):
    rsd = {k: v.to(torch.bfloat16) for k, v in tiny_release_sd(guidance=True).items()}
    fp8_sd, fp8_map = quantize_release_fp8(rsd)
    quantized = {k for k, t in rsd.items() if _is_block_linear(k, t)}
    assert quantized and {f"{n}.weight" for n in fp8_map} == quantized
    assert "single_blocks.0.linear1" in fp8_map and "double_blocks.0.img_mod.linear" in fp8_map
    for k, t in fp8_sd.items():
        if k in quantized:
            assert t.dtype == torch.float8_e4m3fn
            amax = rsd[k].float().abs().max()
            assert torch.equal(fp8_map[k[:-7]], amax / 448)
            assert t.float().abs().max() == 448  # the largest weight maps to the top of the range
        else:
            assert t is rsd[k]  # norms, biases, embedders, final layer: untouched

    weights, scales = save_release_fp8(rsd, tmp_path)
    assert weights.name == "mp_rank_00_model_states_fp8.pt" and scales.name == "mp_rank_00_model_states_fp8_map.pt"
    stored_map = torch.load(scales, weights_only=True)
    assert set(stored_map) == {"module"} and set(stored_map["module"]) == set(fp8_map)

    for mode in ("release", "fp32"):
        loaded = load_release_state_dict(weights, fp8_dequant=mode)
        assert set(loaded) == set(rsd)
        for k in rsd:
            if k in quantized:
                s = fp8_map[k[:-7]]
                s = s.to(torch.bfloat16).float() if mode == "release" else s
                assert loaded[k].dtype == torch.bfloat16
                assert torch.equal(loaded[k], (fp8_sd[k].float() * s).to(torch.bfloat16)), k
                assert torch.allclose(loaded[k].float(), rsd[k].float(), rtol=0.07, atol=1e-3)
            else:
                assert loaded[k].dtype == rsd[k].dtype and torch.equal(loaded[k], rsd[k]), k

    # release mode = the release runtime: w_fp8.to(bf16) * scale.to(bf16), computed in bf16
    k = "single_blocks.0.linear1.weight"
    release_runtime = fp8_sd[k].to(torch.bfloat16) * fp8_map[k[:-7]].to(torch.bfloat16)
    assert torch.equal(load_release_state_dict(weights)[k], release_runtime)


def test_fp8_map_variants_and_errors(tmp_path):
    rsd = tiny_release_sd()
    fp8_sd, fp8_map = quantize_release_fp8(rsd)
    # HunyuanVideo's flat map, keys with `.weight`, python float scales
    save_release_state_dict(fp8_sd, tmp_path / "a_fp8.pt")
    torch.save({f"{n}.weight": float(s) for n, s in fp8_map.items()}, tmp_path / "a_fp8_map.pt")
    loaded = load_release_state_dict(tmp_path / "a_fp8.pt", fp8_dequant="fp32")
    k = "double_blocks.0.img_attn_qkv.weight"
    assert torch.equal(loaded[k], (fp8_sd[k].float() * fp8_map[k[:-7]]).to(torch.bfloat16))

    # missing map file
    save_release_state_dict(fp8_sd, tmp_path / "b_fp8.pt")
    with pytest.raises(CheckpointFormatError, match="b_fp8_map.pt"):
        load_release_state_dict(tmp_path / "b_fp8.pt")
    # a map without one of the scales
    partial = dict(fp8_map)
    partial.pop("single_blocks.0.linear2")
    torch.save({"module": partial}, tmp_path / "b_fp8_map.pt")
    with pytest.raises(CheckpointFormatError, match=r"single_blocks\.0\.linear2"):
        load_release_state_dict(tmp_path / "b_fp8.pt")
    # the map itself is not a checkpoint
    with pytest.raises(CheckpointFormatError, match="scale map"):
        load_release_state_dict(tmp_path / "b_fp8_map.pt")
    # fp8 tensors in a file not named _fp8.pt
    save_release_state_dict(fp8_sd, tmp_path / "c_model_states.pt")
    with pytest.raises(CheckpointFormatError, match="float8"):
        load_release_state_dict(tmp_path / "c_model_states.pt")
