"""Identity RoPE positions, the rotation, per-frame audio cross-attention and the video condition."""

import math

import pytest
import torch

from hcustom_mc.model.conditions import AudioCrossAttention, align_audio_tokens, pad_audio_features_paper
from hcustom_mc.model.rope import apply_rope, identity_positions, image_positions, rope_cos_sin, video_positions
from tests.conftest import tiny_inputs


def test_video_positions_follow_token_order():
    pos = video_positions(2, 3, 4)
    expected = [(t, h, w) for t in range(2) for h in range(3) for w in range(4)]
    assert pos.tolist() == [list(p) for p in expected]


def test_identity_positions_release_formula():
    H, W = 3, 5
    pos = identity_positions(1, H, W, "release")
    expected = [(-1, i, j + W) for i in range(H) for j in range(W)]  # t=-1, h=i, w=j+W'
    assert pos.tolist() == [list(p) for p in expected]


@pytest.mark.parametrize("K", [1, 3])
def test_identity_positions_paper_formula(K):
    H, W = 3, 5
    pos = identity_positions(K, H, W, "paper")
    expected = [(-k, i + H, j + W) for k in range(1, K + 1) for i in range(H) for j in range(W)]
    assert pos.tolist() == [list(p) for p in expected]


def test_release_mode_rejects_several_identity_images():
    with pytest.raises(ValueError, match="exactly one identity image"):
        identity_positions(2, 3, 3, "release")


def test_image_positions_put_identity_first():
    pos = image_positions(2, 2, 3, 3, "paper")
    assert pos.shape == (2 * 9 + 2 * 9, 3)
    assert (pos[:18, 0] < 0).all() and (pos[18:, 0] >= 0).all()


def test_rope_matches_complex_rotation():
    """Adjacent-pair rotation == multiplying (x0 + i x1) by exp(i * pos * theta^(-2k/d)) per axis."""
    dims, theta = (4, 6, 6), 256.0
    pos = image_positions(1, 2, 3, 4, "release")
    x = torch.randn(pos.shape[0], 2, 3, sum(dims), dtype=torch.float64)
    cos, sin = rope_cos_sin(pos, dims, theta)
    got = apply_rope(x.float(), cos, sin).double()
    angles = []
    for axis, d in enumerate(dims):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(pos[:, axis : axis + 1].double() * freqs)
    rot = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=1))  # [N, D/2]
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rot[:, None, None]).flatten(-2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_audio_cross_attention_equals_per_frame_loop():
    from hcustom_mc.model.config import get_model_config

    cfg = get_model_config("tiny", "audio")
    attn = AudioCrossAttention(cfg)
    _randomize(attn)
    B, Fr, HW, C = 2, 3, 5, cfg.hidden_size
    video, audio = torch.randn(B, Fr, HW, C), torch.randn(B, Fr, 16, C)
    got = attn(video, audio)
    for b in range(B):
        for f in range(Fr):  # plain loop: one frame's queries see only that frame's 16 audio tokens
            q = attn.to_q(torch.nn.functional.layer_norm(video[b, f], (C,), attn.norm2.weight, attn.norm2.bias))
            kv = attn.to_kv(torch.nn.functional.layer_norm(audio[b, f], (C,), attn.norm1.weight, attn.norm1.bias))
            k, v = kv[:, : q.shape[1]], kv[:, q.shape[1] :]
            weights = torch.softmax(q @ k.T / math.sqrt(q.shape[1]), dim=-1)
            torch.testing.assert_close(got[b, f], attn.to_out(weights @ v), atol=1e-5, rtol=1e-5)


def test_audio_alignment_release_repeats_first_frame():
    B, f, C = 1, 3, 2
    tokens = torch.arange(B * (4 * (f - 1) + 1) * 4 * C, dtype=torch.float32).reshape(B, -1, 4, C)
    aligned = align_audio_tokens(tokens, f, 1, "release")
    assert aligned.shape == (B, f, 16, C)
    first = tokens[:, 0]
    for r in range(4):  # latent frame 0 = the first video frame 4 times (3 repeats + itself)
        torch.testing.assert_close(aligned[:, 0, 4 * r : 4 * r + 4], first)
    torch.testing.assert_close(aligned[:, 1].reshape(B, 4, 4, C), tokens[:, 1:5])


def test_audio_alignment_paper_pads_before_first_frame():
    f, K = 3, 2
    feats = torch.randn(1, 4 * (f - 1) + 1, 10, 2, 8)
    padded = pad_audio_features_paper(feats, f, K)
    assert padded.shape[1] == (f + K) * 4
    assert padded[:, : padded.shape[1] - feats.shape[1]].abs().sum() == 0
    torch.testing.assert_close(padded[:, -feats.shape[1] :], feats)
    assert align_audio_tokens(torch.randn(1, (f + K) * 4, 4, 6), f, K, "paper").shape == (1, f + K, 16, 6)


def _model(single_process, variant, mode="release", **kw):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights

    cfg = get_model_config("tiny", variant, mode=mode, max_identity_images=1 if mode == "release" else 3, **kw)
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=1, zero_init=False)
    return model


def test_audio_injection_touches_only_video_tokens_in_release(single_process):
    model = _model(single_process, "audio")
    inputs = tiny_inputs(model.cfg, identity=1)
    x, vec, ctx = model.embed(**inputs)
    y = model.inject_audio(x, ctx, 0)
    id_len = ctx.image_len - ctx.grid[0] * ctx.grid[1] * ctx.grid[2]
    torch.testing.assert_close(y[:id_len], x[:id_len], rtol=0, atol=0)  # identity untouched
    torch.testing.assert_close(y[ctx.image_len :], x[ctx.image_len :], rtol=0, atol=0)  # text untouched
    assert (y[id_len : ctx.image_len] - x[id_len : ctx.image_len]).abs().max() > 0
    # lambda_A scales the update linearly
    model.cfg.audio_strength = 0.5
    y_half = model.inject_audio(x, ctx, 0)
    torch.testing.assert_close(y_half - x, 0.5 * (y - x), atol=1e-6, rtol=1e-5)


def test_audio_zero_init_output_is_identity(single_process):
    from hcustom_mc.model import initialize_weights

    model = _model(single_process, "audio")
    initialize_weights(model, seed=1, zero_init=True)
    inputs = tiny_inputs(model.cfg)
    x, vec, ctx = model.embed(**inputs)
    torch.testing.assert_close(model.inject_audio(x, ctx, 0), x, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["release", "paper"])
def test_video_condition_adds_aligned_features_to_video_tokens(single_process, mode):
    model = _model(single_process, "editing", mode)
    inputs = tiny_inputs(model.cfg, identity=1)
    cond = inputs.pop("video_condition")
    x0, _, ctx = model.embed(**inputs)
    x1, _, _ = model.embed(**inputs, video_condition=cond)
    id_len = ctx.image_len - ctx.grid[0] * ctx.grid[1] * ctx.grid[2]
    if mode == "release":  # bg_proj is one Linear
        expected = model.bg_proj(model.bg_in(cond))
        assert isinstance(model.bg_proj, torch.nn.Linear)
    else:  # four Linear layers with SiLU between
        linears = [m for m in model.bg_proj if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 4
        h = model.bg_in(cond)
        for i, lin in enumerate(linears):
            h = lin(h) if i == 3 else torch.nn.functional.silu(lin(h))
        expected = h
    torch.testing.assert_close(x1[id_len : ctx.image_len] - x0[id_len : ctx.image_len], expected.transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1[:id_len], x0[:id_len], rtol=0, atol=0)
    torch.testing.assert_close(x1[ctx.image_len :], x0[ctx.image_len :], rtol=0, atol=0)


def test_paper_video_condition_starts_as_identity(single_process):
    from hcustom_mc.model import initialize_weights

    model = _model(single_process, "editing", "paper")
    initialize_weights(model, seed=1, zero_init=True)
    inputs = tiny_inputs(model.cfg)
    cond = inputs.pop("video_condition")
    torch.testing.assert_close(model.embed(**inputs)[0], model.embed(**inputs, video_condition=cond)[0], rtol=0, atol=0)
