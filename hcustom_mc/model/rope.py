"""3D rotary position embedding with the HunyuanCustom identity-image positions.

Positions are (t, h, w) triples per image token; text tokens get no RoPE. The rotation acts on
adjacent pairs (2i, 2i+1) of the head dim split as [t | h | w] (16/56/56 at 13B), with
freqs = theta^(-2i/d) per axis (theta = 256), computed in fp32.

Identity images (placed before the video tokens), token (i, j) = row i, column j of the H' x W' latent grid:
  release mode:  one image, at (t=-1, h=i, w=j+W')                  (released code: width shift only)
  paper mode, identity_rope (ModelConfig field, `--identity-rope`):
    paper            image k = 1..K at (t=-k, h=i+H', w=j+W')        (paper eqs. 1-2; the default)
    release_spatial  image k = 1..K at (t=-k, h=i, w=j+W')           (the paper's time index with the released
                     spatial offsets, which the released single-subject weights learned; the paper's positions
                     move the identity tokens by H' rows for them. Which of the two fine-tunes a release
                     checkpoint into K subjects faster is for users to measure.)
"""

from __future__ import annotations

import torch

from hcustom_mc.model.config import IDENTITY_ROPES  # noqa: F401 (the option's values, re-exported here)


def video_positions(frames: int, height: int, width: int) -> torch.Tensor:
    """[f*H'*W', 3] integer (t, h, w) positions in token order (frame-major, then rows, then columns)."""
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def identity_positions(num_images: int, height: int, width: int, mode: str,
                       identity_rope: str = "paper") -> torch.Tensor:
    """[K*H'*W', 3] positions of K identity images on an H' x W' latent grid (`identity_rope`: paper mode only)."""
    if identity_rope not in IDENTITY_ROPES:
        raise ValueError(f"unknown identity_rope {identity_rope!r}; expected one of {IDENTITY_ROPES}")
    if mode == "release" and identity_rope != "paper":
        raise ValueError(f"identity_rope={identity_rope!r} is a paper-mode option (release mode has its own positions)")
    if num_images == 0:
        return torch.zeros(0, 3, dtype=torch.long)
    if mode == "release" and num_images != 1:
        raise ValueError(f"release mode places exactly one identity image, got {num_images}")
    grids = []
    for k in range(1, num_images + 1):
        pos = video_positions(1, height, width)
        if mode == "release":
            pos[:, 0] = -1
            pos[:, 2] += width
        elif mode == "paper":
            pos[:, 0] = -k
            if identity_rope == "paper":
                pos[:, 1] += height
            pos[:, 2] += width
        else:
            raise ValueError(f"unknown RoPE mode {mode!r}")
        grids.append(pos)
    return torch.cat(grids)


def image_positions(num_identity: int, frames: int, height: int, width: int, mode: str,
                    identity_rope: str = "paper") -> torch.Tensor:
    """Positions of the whole image sequence [identity images; video]."""
    return torch.cat([identity_positions(num_identity, height, width, mode, identity_rope),
                      video_positions(frames, height, width)])


def rope_cos_sin(positions: torch.Tensor, rope_dims, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [N, head_dim] for the given (t, h, w) positions."""
    cos, sin = [], []
    positions = positions.to(device=device, dtype=torch.float32)
    for axis, dim in enumerate(rope_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim))
        angles = torch.outer(positions[:, axis], freqs)  # [N, dim/2]
        cos.append(angles.cos().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs. x: [S, B, heads, D]; cos/sin: [S, D] (fp32). Computed in fp32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = xf * cos[:, None, None, :] + rotated * sin[:, None, None, :]
    return out.to(x.dtype)
