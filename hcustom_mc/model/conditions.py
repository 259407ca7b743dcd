"""HunyuanCustom condition modules: AudioNet and the video-condition branch (paper section 4).

AudioNet
  audio_proj: whisper window [10, 5, 384] per video frame -> flatten 19200 -> 1024 -> 1024 ->
  4 x hidden tokens -> LayerNorm (ReLU between), so each video frame gives 4 audio tokens.
  Alignment to latent frames (16 audio tokens each):
    release: the first video frame's tokens are repeated 3 more times (4(f-1)+1 + 3 = 4f frames),
             then [4f, 4] -> [f, 16]; identity-image tokens are not touched.
    paper:   features arrive already padded (zeros before the first frame) to (f+K)*4 frames,
             eq. 4 gives [f+K, 16], and eq. 5 attends every latent frame, identity frames included.
  audio_models[i]: per-frame spatial cross-attention after double block audio_insert_blocks[i]:
  q = to_q(norm2(video tokens of frame t)), k, v = to_kv(norm1(audio tokens of frame t)),
  one head of width 1024, softmax in fp32, to_out zero-initialised, residual scaled by lambda_A.

Video condition (editing): bg_latents [B, 32, f, H, W] (VAE(masked video) ++ VAE(mask)) ->
  bg_in (Conv3d patch embed, 32 -> hidden), then
    release: bg_proj = one Linear(hidden, hidden);
    paper:   bg_proj = four-layer MLP (SiLU between, last layer zero-initialised),
  added token by token (frame by frame) to the noisy-video tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcustom_mc.model import ops
from hcustom_mc.model.layers import affine_layer_norm



class AudioProjection(nn.Module):
    """`audio_proj`: [B, N, window, layers, channels] -> [B, N, tokens_per_frame, hidden]."""

    def __init__(self, cfg):
        super().__init__()
        self.tokens, self.hidden = cfg.audio_tokens_per_frame, cfg.hidden_size
        self.proj1 = nn.Linear(cfg.audio_input_dim, cfg.audio_proj_dim)
        self.proj2 = nn.Linear(cfg.audio_proj_dim, cfg.audio_proj_dim)
        self.proj3 = nn.Linear(cfg.audio_proj_dim, self.tokens * self.hidden)
        self.norm = affine_layer_norm(self.hidden)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.proj1(feats.flatten(2)))
        x = F.relu(self.proj2(x))
        return self.norm(self.proj3(x).unflatten(-1, (self.tokens, self.hidden)))


def align_audio_tokens(tokens: torch.Tensor, latent_frames: int, num_identity: int, mode: str) -> torch.Tensor:
    """[B, N, 4, C] per-video-frame tokens -> [B, frames_attended, 16, C] per latent frame."""
    B, N, T, C = tokens.shape
    if mode == "release":
        tokens = torch.cat([tokens[:, :1].expand(B, 3, T, C), tokens], dim=1)
        frames = latent_frames
    else:
        frames = latent_frames + num_identity
    return tokens.reshape(B, frames, 4 * T, C)


def audio_frames_expected(latent_frames: int, num_identity: int, mode: str) -> int:
    """Number of per-video-frame audio feature rows the DiT expects."""
    if mode == "release":
        return 4 * (latent_frames - 1) + 1
    return 4 * (latent_frames + num_identity)


def pad_audio_features_paper(feats: torch.Tensor, latent_frames: int, num_identity: int) -> torch.Tensor:
    """Paper alignment: zero-pad per-frame features [B, 4(f-1)+1, ...] before the first frame to (f+K)*4."""
    need = audio_frames_expected(latent_frames, num_identity, "paper")
    if feats.shape[1] > need:
        raise ValueError(f"{feats.shape[1]} audio frames exceed the {need} of {latent_frames} latent frames + {num_identity} identity images")
    pad = feats.new_zeros(feats.shape[0], need - feats.shape[1], *feats.shape[2:])
    return torch.cat([pad, feats], dim=1)


class AudioCrossAttention(nn.Module):
    """One `audio_models[i]`: per-frame spatial cross-attention, single head."""

    def __init__(self, cfg):
        super().__init__()
        H, A = cfg.hidden_size, cfg.audio_head_dim
        self.norm1 = affine_layer_norm(H)  # audio tokens (keys/values)
        self.norm2 = affine_layer_norm(H)  # video tokens (queries)
        self.to_q = nn.Linear(H, A, bias=False)
        self.to_kv = nn.Linear(H, 2 * A, bias=False)
        self.to_out = nn.Linear(A, H, bias=False)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """video [B, F, HW, C], audio [B, F, 16, C] -> update [B, F, HW, C] (before lambda_A)."""
        q = self.to_q(self.norm2(video))
        k, v = self.to_kv(self.norm1(audio)).chunk(2, dim=-1)
        return self.to_out(ops.frame_cross_attention(q, k, v))


def video_condition_projection(cfg) -> nn.Module:
    """`bg_proj`: one Linear (release) or a four-layer MLP with a zero-initialised last layer (paper)."""
    H = cfg.hidden_size
    if cfg.mode == "release":
        return nn.Linear(H, H)
    layers = []
    for i in range(4):
        layers += [nn.Linear(H, H)] + ([nn.SiLU()] if i < 3 else [])
    return nn.Sequential(*layers)
