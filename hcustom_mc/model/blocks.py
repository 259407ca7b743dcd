"""Double-stream, single-stream and token-refiner blocks (facts file section 1.5).

All blocks work on sequence-first tensors [S, B, C] (megatron's layout). The transformer state
is one tensor [image tokens ; text tokens]; double blocks split it into their two streams and
join them again, so every block has the same interface (what pipeline stages pass along).
Heads and MLP width are sharded over tensor parallel ranks; the TPSplit marks tell loaders how
full release-layout weights map onto a rank. Under sequence parallelism x holds this rank's rows of
each stream; `attend.layout` (parallel/sequence.py) says where they are, and is the identity split
without it, so the maths reads the same either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from hcustom_mc.model import ops
from hcustom_mc.model.attention import JointAttention, masked_attention
from hcustom_mc.model.layers import Modulation, RMSNorm, affine_layer_norm
from hcustom_mc.model.recompute import consume
from hcustom_mc.model.spec import LinearSubmodules, build_column, build_row
from hcustom_mc.parallel.groups import group_size
from hcustom_mc.parallel.sharding import mark_tp_split


def _column(sub, in_f, out_f, config, tp_group, segments):
    layer = build_column(sub.column, in_f, out_f, config, tp_group)
    mark_tp_split(layer.weight, 0, segments)
    mark_tp_split(layer.bias, 0, segments)
    return layer


def _row(sub, in_f, out_f, config, tp_group, segments):
    layer = build_row(sub.row, in_f, out_f, config, tp_group)
    mark_tp_split(layer.weight, 1, segments)  # bias is added after the all-reduce: replicated
    return layer


class MLP(nn.Module):
    """fc1 (column) -> activation -> fc2 (row). Under selective recompute the activation output (the
    4x-wide input fc2 keeps) is freed after fc2 and recomputed in backward."""

    def __init__(self, hidden, mlp_hidden, config, sub, tp_group, activation):
        super().__init__()
        self.fc1 = _column(sub, hidden, mlp_hidden, config, tp_group, [mlp_hidden])
        self.fc2 = _row(sub, mlp_hidden, hidden, config, tp_group, [mlp_hidden])
        self.activation = activation

    def forward(self, x, selective: bool = False):
        return consume(selective, self.activation, (self.fc1(x)[0],), lambda a: self.fc2(a)[0])


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def norm_linear(selective: bool, linear, x, shift, scale, eps):
    """linear(layernorm_modulate(x)); under selective recompute the normed input the linear keeps is
    freed after the linear and recomputed from x (kept anyway as the residual) in backward."""
    return consume(selective, lambda x_, sh, sc: ops.layernorm_modulate(x_, sh, sc, eps), (x, shift, scale),
                   lambda h: linear(h)[0] if not isinstance(linear, MLP) else linear(h, selective))


def norm_and_rotate(selective: bool, rotary, q, k, q_norm, k_norm, image_len):
    """QK RMSNorm + RoPE; under selective recompute their fp32 intermediates are not kept (checkpoint:
    only q, k before the norm are saved; the rotated q, k are what attention keeps anyway)."""
    if selective:
        return torch.utils.checkpoint.checkpoint(rotary.norm_and_rotate, q, k, q_norm, k_norm, image_len,
                                                 use_reentrant=False)
    return rotary.norm_and_rotate(q, k, q_norm, k_norm, image_len)


def split_heads(x: torch.Tensor, parts: int, head_dim: int) -> list[torch.Tensor]:
    """[S, B, parts*h*D] -> `parts` tensors [S, B, h, D] (the fused [q; k; v] layout)."""
    return list(x.unflatten(-1, (parts, -1, head_dim)).unbind(-3))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg, config, sub: LinearSubmodules, tp_group):
        super().__init__()
        H, D, M = cfg.hidden_size, cfg.head_dim, cfg.mlp_hidden
        self.head_dim, self.eps = D, cfg.norm_eps
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(H, 6, config, sub, tp_group))
            setattr(self, f"{stream}_attn_qkv", _column(sub, H, 3 * H, config, tp_group, [H, H, H]))
            setattr(self, f"{stream}_attn_q_norm", RMSNorm(D, cfg.norm_eps))
            setattr(self, f"{stream}_attn_k_norm", RMSNorm(D, cfg.norm_eps))
            setattr(self, f"{stream}_attn_proj", _row(sub, H, H, config, tp_group, [H]))
            setattr(self, f"{stream}_mlp", MLP(H, M, config, sub, tp_group, gelu_tanh))

    def _qkv(self, stream: str, x, shift, scale, selective):
        out = norm_linear(selective, getattr(self, f"{stream}_attn_qkv"), x, shift, scale, self.eps)
        return split_heads(out, 3, self.head_dim)

    def forward(self, x, vec, rotary: ops.Rotary, attend: JointAttention):
        image_len, sel, seq = attend.image_len, attend.selective, attend.layout
        img, txt = seq.split(x)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec, seq)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec, seq)
        # the column linears return each whole stream (SP: all-gathered, with pad rows at its end)
        iq, ik, iv = self._qkv("img", img, i_shift1, i_scale1, sel)
        iq, ik = norm_and_rotate(sel, rotary, iq, ik, self.img_attn_q_norm, self.img_attn_k_norm, image_len)
        tq, tk, tv = self._qkv("txt", txt, t_shift1, t_scale1, sel)
        tq, tk = norm_and_rotate(sel, rotary, tq, tk, self.txt_attn_q_norm, self.txt_attn_k_norm, 0)
        attn = attend(torch.cat([iq, tq]), torch.cat([ik, tk]), torch.cat([iv, tv]))
        img = ops.gated_residual(img, i_gate1, self.img_attn_proj(attn[: seq.image_pad])[0])
        img = ops.gated_residual(img, i_gate2, norm_linear(sel, self.img_mlp, img, i_shift2, i_scale2, self.eps))
        txt = ops.gated_residual(txt, t_gate1, self.txt_attn_proj(attn[seq.image_pad :])[0])
        txt = ops.gated_residual(txt, t_gate2, norm_linear(sel, self.txt_mlp, txt, t_shift2, t_scale2, self.eps))
        return torch.cat([img, txt])


class SingleStreamBlock(nn.Module):
    """linear1 = [q; k; v; mlp_in] (column), linear2 on [attn; gelu(mlp)] (row)."""

    def __init__(self, cfg, config, sub: LinearSubmodules, tp_group):
        super().__init__()
        H, D, M = cfg.hidden_size, cfg.head_dim, cfg.mlp_hidden
        self.head_dim, self.eps = D, cfg.norm_eps
        self.qkv_local = 3 * H // group_size(tp_group)
        self.linear1 = _column(sub, H, 3 * H + M, config, tp_group, [H, H, H, M])
        self.linear2 = _row(sub, H + M, H, config, tp_group, [H, M])
        self.q_norm = RMSNorm(D, cfg.norm_eps)
        self.k_norm = RMSNorm(D, cfg.norm_eps)
        self.modulation = Modulation(H, 3, config, sub, tp_group)

    def forward(self, x, vec, rotary: ops.Rotary, attend: JointAttention):
        image_len, sel, seq = attend.image_len, attend.selective, attend.layout
        shift, scale, gate = self.modulation(vec, seq)
        # SP: linear1 all-gathers both streams' local rows at once; `streams` puts them in sequence order
        out = seq.streams(norm_linear(sel, self.linear1, x, shift, scale, self.eps))
        qkv, mlp = out[..., : self.qkv_local], out[..., self.qkv_local :]
        q, k, v = split_heads(qkv, 3, self.head_dim)
        q, k = norm_and_rotate(sel, rotary, q, k, self.q_norm, self.k_norm, image_len)
        attn = attend(q, k, v)
        # selective: linear2's [attn ; gelu(mlp)] input (H + 4H wide) is freed and rebuilt in backward;
        # SP: `interleave` orders it so that linear2's reduce-scatter hands each rank its own rows
        fused = consume(sel, lambda a, m: seq.interleave(torch.cat([a, gelu_tanh(m)], dim=-1)), (attn, mlp),
                        lambda h: self.linear2(h)[0])
        return ops.gated_residual(x, gate, fused)


class RefinerBlock(nn.Module):
    """IndividualTokenRefinerBlock: affine LayerNorms, SiLU MLP, gates (gate_msa, gate_mlp) only."""

    def __init__(self, cfg, config, sub: LinearSubmodules, tp_group):
        super().__init__()
        H, D, M = cfg.hidden_size, cfg.head_dim, cfg.mlp_hidden
        self.head_dim = D
        self.norm1 = affine_layer_norm(H, eps=cfg.norm_eps)
        self.self_attn_qkv = _column(sub, H, 3 * H, config, tp_group, [H, H, H])
        self.self_attn_proj = _row(sub, H, H, config, tp_group, [H])
        self.norm2 = affine_layer_norm(H, eps=cfg.norm_eps)
        self.mlp = MLP(H, M, config, sub, tp_group, F.silu)
        modulation = build_column(sub.modulation, H, 2 * H, config, tp_group, gather=True)
        mark_tp_split(modulation.weight, 0, [2 * H])
        mark_tp_split(modulation.bias, 0, [2 * H])
        self.adaLN_modulation = nn.ModuleList([nn.SiLU(), modulation])

    def forward(self, x, c, mask):
        gate_msa, gate_mlp = self.adaLN_modulation[1](F.silu(c))[0].chunk(2, dim=-1)
        q, k, v = split_heads(self.self_attn_qkv(self.norm1(x))[0], 3, self.head_dim)
        x = x + gate_msa.unsqueeze(0) * self.self_attn_proj(masked_attention(q, k, v, mask))[0]
        return x + gate_mlp.unsqueeze(0) * self.mlp(self.norm2(x))


class TokenRefiner(nn.Module):
    """`txt_in`: project LLaVA states to hidden and refine them conditioned on t and pooled text."""

    def __init__(self, cfg, config, sub: LinearSubmodules, tp_group):
        super().__init__()
        from hcustom_mc.model.layers import TextProjection, TimestepEmbedder

        H = cfg.hidden_size
        self.input_embedder = nn.Linear(cfg.text_dim, H)
        self.t_embedder = TimestepEmbedder(H)
        self.c_embedder = TextProjection(cfg.text_dim, H)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(
            [RefinerBlock(cfg, config, sub, tp_group) for _ in range(cfg.num_refiner_blocks)]
        )

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """text [B, L, text_dim], mask [B, L] -> refined [L, B, hidden]."""
        mask_f = mask.float().unsqueeze(-1)
        pooled = ((text.float() * mask_f).sum(dim=1) / mask_f.sum(dim=1)).to(text.dtype)
        c = self.t_embedder(timestep) + self.c_embedder(pooled)
        x = self.input_embedder(text).transpose(0, 1)
        valid = mask.bool()
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        pair[..., 0] = True  # every query sees key 0, so fully padded rows stay finite (as released)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, pair)
        return x
