"""Joint attention over [image tokens ; text tokens] with the release's padding semantics.

The release packs each sample as two variable-length segments for flash-attn varlen:
[image + valid text] and [text padding]. So valid tokens never attend to padded text, and padded
tokens attend only to padding. Every backend here implements exactly that:

  flash-attn varlen  (CUDA, fp16/bf16, flash_attn installed)
  transformer-engine (CUDA, TE installed): DotProductAttention in THD format with the same cu_seqlens
  torch SDPA         (everywhere): one unmasked SDPA call per segment, so no S x S mask is built

`HCUSTOM_ATTN_BACKEND=auto|flash|te|sdpa` forces a backend; the chosen path is logged once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

log = logging.getLogger("hcustom_mc")
BACKENDS = ("auto", "flash", "te", "sdpa")


@dataclass
class Segments:
    """Per-sample split of a length-`seq_len` sequence into [0, valid) and [valid, seq_len)."""

    seq_len: int
    valid: list[int]

    @classmethod
    def from_text_mask(cls, image_len: int, text_mask: torch.Tensor) -> "Segments":
        lengths = text_mask.sum(dim=1).tolist()  # one host sync per forward, not per layer
        return cls(seq_len=image_len + text_mask.shape[1], valid=[image_len + int(n) for n in lengths])

    def cu_seqlens(self, device) -> tuple[torch.Tensor, int]:
        """Boundaries of the packed [B*S] sequence, empty padding segments dropped."""
        bounds, max_len = [0], 0
        for b, v in enumerate(self.valid):
            start = b * self.seq_len
            for end in (start + v, start + self.seq_len):
                if end > bounds[-1]:
                    max_len = max(max_len, end - bounds[-1])
                    bounds.append(end)
        return torch.tensor(bounds, dtype=torch.int32, device=device), max_len


@dataclass
class ContextParallel:
    """This rank's share of the image tokens under context parallelism (whole latent frames)."""

    group: object  # the CP group; under "usp" the pair (ulysses sub-group, ring sub-group)
    mode: str  # "ulysses" | "ring" | "usp"
    image_lens: list[int]  # image tokens held by each CP rank, in rank order


@dataclass
class JointAttention:
    """Attention over [image ; text] tokens as the blocks call it: single process, or context parallel
    (this rank holds `image_len` image tokens, the text is replicated on every CP rank)."""

    segments: Segments  # of the whole (global) sequence
    image_len: int  # image tokens on this rank
    cp: ContextParallel | None = None
    recompute: bool = False  # selective recomputation: keep q, k, v, recompute the attention in backward

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._attend, q, k, v, use_reentrant=False)
        return self._attend(q, k, v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cp is None:
            return segment_attention(q, k, v, self.segments)
        from hcustom_mc.parallel.context import cp_joint_attention

        n = self.image_len
        text_valid = [v_ - self.segments.seq_len + (q.shape[0] - n) for v_ in self.segments.valid]
        img, txt = cp_joint_attention(q[:n], k[:n], v[:n], q[n:], k[n:], v[n:], text_valid, self.cp.image_lens,
                                      self.cp.mode, self.cp.group)
        return torch.cat([img, txt])


@lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:
        return None


@lru_cache(maxsize=None)
def _te_attention(heads: int, head_dim: int):
    try:
        from transformer_engine.pytorch import DotProductAttention
    except Exception:
        return None
    return DotProductAttention(heads, head_dim, attention_dropout=0.0, qkv_format="thd", attn_mask_type="padding")


def select_backend(q: torch.Tensor) -> str:
    wanted = os.environ.get("HCUSTOM_ATTN_BACKEND", "auto")
    if wanted not in BACKENDS:
        raise ValueError(f"HCUSTOM_ATTN_BACKEND must be one of {BACKENDS}, got {wanted!r}")
    fast_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if wanted in ("auto", "flash") and fast_ok and _flash_attn() is not None:
        choice = "flash"
    elif wanted in ("auto", "te") and fast_ok and _te_attention(q.shape[2], q.shape[3]) is not None:
        choice = "te"
    else:
        if wanted in ("flash", "te"):
            raise RuntimeError(f"attention backend {wanted!r} requested but not usable (needs CUDA, fp16/bf16, the package)")
        choice = "sdpa"
    _log_once(choice)
    return choice


@lru_cache(maxsize=None)
def _log_once(choice: str) -> None:
    log.info("attention backend: %s", {"flash": "flash-attn varlen", "te": "transformer-engine THD", "sdpa": "torch SDPA per segment"}[choice])


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """q, k, v: [S, B, heads, D]. Returns [S, B, heads*D]."""
    S, B, H, D = q.shape
    backend = select_backend(q)
    if backend in ("flash", "te"):
        pack = lambda t: t.transpose(0, 1).reshape(B * S, H, D)  # noqa: E731
        cu, max_len = segments.cu_seqlens(q.device)
        if backend == "flash":
            out = _flash_attn()(pack(q), pack(k), pack(v), cu, cu, max_len, max_len, dropout_p=0.0, causal=False)
        else:
            out = _te_attention(H, D)(
                pack(q), pack(k), pack(v), cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
            )
        return out.reshape(B, S, H * D).transpose(0, 1)
    return sdpa_segment_attention(q, k, v, segments)


def sdpa_segment_attention(q, k, v, segments: Segments) -> torch.Tensor:
    S, B, H, D = q.shape
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, S, D]
    if len(set(segments.valid)) == 1:
        groups = [(slice(None), segments.valid[0])]
    else:
        groups = [(slice(b, b + 1), n) for b, n in enumerate(segments.valid)]
    outs = []
    for rows, n in groups:
        parts = [F.scaled_dot_product_attention(qb[rows, :, :n], kb[rows, :, :n], vb[rows, :, :n])]
        if n < S:
            parts.append(F.scaled_dot_product_attention(qb[rows, :, n:], kb[rows, :, n:], vb[rows, :, n:]))
        outs.append(torch.cat(parts, dim=2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.permute(2, 0, 1, 3).reshape(S, B, H * D)


def masked_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Reference/refiner path: q, k, v [S, B, H, D], boolean mask [B, 1, S, S]. Returns [S, B, H*D]."""
    S, B, H, D = q.shape
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return out.permute(2, 0, 1, 3).reshape(S, B, H * D)
