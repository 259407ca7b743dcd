"""The blocks' attention: joint attention over [image tokens ; text tokens], and the refiner's masked attention.

`JointAttention` is built once per forward (model.py `conditioning`) and called by every block. It removes
the sequence-parallel padding and hands the rest to the model's context-parallel strategy
(parallel/context.py: how the tokens are split across ranks), which runs the per-segment kernels of
hcustom_mc/segments.py on the tokens each rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hcustom_mc.parallel.context import ContextParallelAttention
from hcustom_mc.parallel.sequence import SequenceLayout
from hcustom_mc.segments import Segments


@dataclass
class JointAttention:
    """Attention over [image ; text] tokens as the blocks call it: this rank holds `image_len` image tokens
    (all of them without context parallelism) and the whole text."""

    segments: Segments  # of the whole (all CP ranks') sequence
    image_len: int  # image tokens on this rank
    # the hidden state's sequence-parallel layout; q, k, v arrive as [image (padded) ; text (padded)]
    layout: SequenceLayout
    context_parallel: ContextParallelAttention
    image_lens: list[int]  # image tokens on every CP rank, in rank order
    # selective recomputation in the blocks around this attention (norms, modulation, MLP activation,
    # QK norm + RoPE; see model/recompute.py). The attention core itself is never recomputed.
    selective: bool = False
    cache: dict = field(default_factory=dict, repr=False)  # per-forward descriptors of the CP paths

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # sequence parallel pads each stream to a multiple of TP: attention sees only the real tokens
        seq = self.layout
        out = self.context_parallel.attend(seq.unpad(q), seq.unpad(k), seq.unpad(v), self.segments, self.image_lens,
                                           self.cache)
        return seq.pad(out)


def masked_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Reference/refiner path: q, k, v [S, B, H, D], boolean mask [B, 1, S, S]. Returns [S, B, H*D]."""
    S, B, H, D = q.shape
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return out.permute(2, 0, 1, 3).reshape(S, B, H * D)
