"""How attention is split across ranks: the context-parallel (CP) joint attention over [image tokens ; text tokens].

The model's attention (model/attention.py `JointAttention`) calls one strategy object built here from the
layout and the model's process groups (`context_parallel_attention(cp_mode, pg_collection)`): `NoContextParallel`,
`Ulysses`, `Ring` or `Usp`. Each says how the latent frames are split over its CP ranks (`frames_per_rank`)
and runs the attention of this rank's rows (`attend`); the model knows no strategy by name.

Each CP rank holds a contiguous run of whole latent frames of the image tokens; the text tokens are
replicated on every rank. The result equals single-process `segment_attention` over
[all image tokens in rank order ; text], i.e. per sample the segments [image + valid text] and
[text padding]. The modes:

  ulysses: all-to-all heads <-> sequence, attention on H/cp heads of the full sequence, all-to-all back.
           Needs heads % cp == 0; uses the regular attention backends (flash / TE / SDPA).
  ring:    image K/V chunks travel around the ring (`parallel/ring.py`): one autograd.Function,
           flash-style tiles merged through the log-sum-exp, transfers overlapped with compute,
           backward recomputed from the saved log-sum-exp. Any head count; memory O(sequence).
  usp:     both (hybrid Ulysses x ring): Ulysses inside groups of `u` consecutive CP ranks, ring
           across the cp/u groups. Needs heads % u == 0. Its groups are the pair of sub-groups (Ulysses, ring):
           the collection's `hcp` (megatron's hierarchical CP groups, made once by parallel/state.py or
           parallel/groups.py).

Every collective is an autograd.Function whose backward is the adjoint collective, so gradients
are exact. Gradients of the replicated text q/k/v are per-rank partial sums: summing them over the
CP group (as the data/CP gradient reduction does for replicated parameters) gives the full gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from torch import Tensor

from hcustom_mc.parallel.ring import ring_attention
from hcustom_mc.segments import Segments, segment_attention

MODES = ("ulysses", "ring", "usp")


def frame_partition(num_frames: int, cp_size: int) -> list[range]:
    """Contiguous ranges of whole latent frames, one per CP rank; the first ranks get the extra frame."""
    if cp_size < 1:
        raise ValueError(f"context-parallel size must be >= 1, got {cp_size}")
    if num_frames < cp_size:
        raise ValueError(
            f"cannot split {num_frames} latent frame(s) over {cp_size} context-parallel ranks: every rank "
            f"needs at least one whole frame (use more frames or a smaller context_parallel size)"
        )
    base, extra = divmod(num_frames, cp_size)
    ranges, start = [], 0
    for r in range(cp_size):
        n = base + (1 if r < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges


def _group_size_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0  # no process group at all: behave like a CP group of one
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------- ulysses collectives


def _seq_to_heads(x: Tensor, image_lens: list[int], group) -> Tensor:
    """[S_local, B, H, ...] -> [S_total, B, H/cp, ...]: scatter heads, gather the sequence."""
    cp, _ = _group_size_rank(group)
    s, b, h = x.shape[:3]
    rest = x.shape[3:]
    # chunk j of the head dim goes to rank j, so put it first and flatten it into dim 0
    send = x.reshape(s, b, cp, h // cp, *rest).movedim(2, 0).contiguous().reshape(cp * s, b, h // cp, *rest)
    recv = x.new_empty(sum(image_lens), b, h // cp, *rest)
    dist.all_to_all_single(recv, send, output_split_sizes=list(image_lens), input_split_sizes=[s] * cp, group=group)
    return recv


def _heads_to_seq(x: Tensor, image_lens: list[int], group) -> Tensor:
    """[S_total, B, H/cp, ...] -> [S_local, B, H, ...]: gather heads, scatter the sequence (inverse of above)."""
    cp, rank = _group_size_rank(group)
    s = image_lens[rank]
    b, hl = x.shape[1:3]
    rest = x.shape[3:]
    recv = x.new_empty(cp * s, b, hl, *rest)
    dist.all_to_all_single(recv, x.contiguous(), output_split_sizes=[s] * cp, input_split_sizes=list(image_lens),
                           group=group)
    return recv.reshape(cp, s, b, hl, *rest).movedim(0, 2).reshape(s, b, cp * hl, *rest)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, image_lens, group):
        ctx.image_lens, ctx.group = image_lens, group
        return _seq_to_heads(x, image_lens, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.image_lens, ctx.group), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, image_lens, group):
        ctx.image_lens, ctx.group = image_lens, group
        return _heads_to_seq(x, image_lens, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.image_lens, ctx.group), None, None


class _GatherHeads(torch.autograd.Function):
    """All-gather head slices [L, B, H/cp, D] -> [L, B, H, D].

    Every rank uses the gathered (replicated) output downstream, so the gradient of a rank's slice is
    the sum of all ranks' gradients for that slice: a reduce-scatter (SUM)."""

    @staticmethod
    def forward(ctx, x, group):
        cp, _ = _group_size_rank(group)
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        cp, _ = _group_size_rank(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(cp, dim=2)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def _ulysses(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, group, cache=None):
    cp, rank = _group_size_rank(group)
    H, D = q_img.shape[2], q_img.shape[3]
    if H % cp:
        raise ValueError(f"ulysses context parallelism needs heads ({H}) divisible by the CP size ({cp}); "
                         f"use mode='ring' for this head count")
    h = H // cp
    # one all-to-all for q, k and v together
    qkv = _SeqToHeads.apply(torch.stack([q_img, k_img, v_img], dim=3), image_lens, group)
    heads = slice(rank * h, (rank + 1) * h)  # text is replicated: just take our heads, no communication
    q, k, v = (torch.cat([t, txt[:, :, heads]]) for t, txt in zip(qkv.unbind(3), (q_txt, k_txt, v_txt)))
    n_img, L = qkv.shape[0], q_txt.shape[0]
    # the gathered sequence's segments; cached per forward so its device descriptors are built once
    key = ("ulysses", n_img, L, tuple(text_valid))
    seg = cache.get(key) if cache is not None else None
    if seg is None:
        seg = Segments(seq_len=n_img + L, valid=[n_img + n for n in text_valid])
        if cache is not None:
            cache[key] = seg
    out = segment_attention(q, k, v, seg)
    B = out.shape[1]
    img = _HeadsToSeq.apply(out[:n_img].reshape(n_img, B, h, D), image_lens, group)
    txt = _GatherHeads.apply(out[n_img:].reshape(L, B, h, D), group)
    return img.reshape(img.shape[0], B, H * D), txt.reshape(L, B, H * D)


# ----------------------------------------------------------------------------- hybrid (USP)


def _usp(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, groups, cache=None):
    """Ulysses inside `groups[0]` (consecutive CP ranks), ring across `groups[1]`.

    CP rank c = ring_rank * u + ulysses_rank. The all-to-all gathers the image tokens of one Ulysses
    group and scatters heads (H/u per rank); the ring then runs over the r Ulysses groups, every member
    of the ring holding the same head slice; a final all-to-all gives each rank its rows back."""
    uly, ring = groups
    u, ur = _group_size_rank(uly)
    r, rr = _group_size_rank(ring)
    H, D = q_img.shape[2], q_img.shape[3]
    if H % u:
        raise ValueError(f"usp context parallelism needs heads ({H}) divisible by the Ulysses degree ({u}); "
                         f"use a smaller --ulysses-degree or mode='ring'")
    if len(image_lens) != u * r:
        raise ValueError(f"usp: {len(image_lens)} image shards for a {u} x {r} CP group")
    if u == 1:  # degenerate layouts: plain ring / plain Ulysses over the one non-trivial group
        return ring_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, ring)
    if r == 1:
        return _ulysses(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, uly, cache)
    h = H // u
    uly_lens = image_lens[rr * u:(rr + 1) * u]
    ring_lens = [sum(image_lens[j * u:(j + 1) * u]) for j in range(r)]
    qkv = _SeqToHeads.apply(torch.stack([q_img, k_img, v_img], dim=3), uly_lens, uly)
    heads = slice(ur * h, (ur + 1) * h)
    q, k, v = qkv.unbind(3)
    n, B, L = q.shape[0], q.shape[1], q_txt.shape[0]
    img, txt = ring_attention(q, k, v, q_txt[:, :, heads], k_txt[:, :, heads], v_txt[:, :, heads], text_valid,
                              ring_lens, ring)
    img = _HeadsToSeq.apply(img.reshape(n, B, h, D), uly_lens, uly)
    txt = _GatherHeads.apply(txt.reshape(L, B, h, D), uly)
    return img.reshape(img.shape[0], B, H * D), txt.reshape(L, B, H * D)


# ----------------------------------------------------------------------------- strategies (what the model holds)


class ContextParallelAttention(ABC):
    """Joint attention with this rank's image tokens and the replicated text, as the model calls it.

    `frames_per_rank(num_frames)`: the latent frames each CP rank holds (whole frames, rank order);
    `attend(q, k, v, segments, image_lens, cache)`: q, k, v [image rows here ; text rows, L] x [B, H, D],
    `segments` of the whole (all ranks') sequence, `image_lens` the image tokens of every CP rank,
    `cache` a dict living for one forward. Returns this rank's rows [image here ; text] x [B, H*D]."""

    size: int = 1
    rank: int = 0

    def frames_per_rank(self, num_frames: int) -> list[range]:
        return frame_partition(num_frames, self.size)

    @abstractmethod
    def attend(self, q: Tensor, k: Tensor, v: Tensor, segments: Segments, image_lens: list[int],
               cache: dict) -> Tensor:
        """This rank's attention output [image here ; text] x [B, H*D]."""


class NoContextParallel(ContextParallelAttention):
    """One CP rank: every token is here; attention over the forward's segments as they are."""

    def attend(self, q, k, v, segments, image_lens, cache):
        return segment_attention(q, k, v, segments)


class _Split(ContextParallelAttention):
    """The image sequence split over a CP group of more than one rank: `split_attention` takes the image and
    text parts apart (cp_joint_attention's arguments) and returns (image rows here, text rows)."""

    def attend(self, q, k, v, segments, image_lens, cache):
        n = image_lens[self.rank]
        # the text is the tail of the whole sequence on every rank: its valid length per sample
        text_valid = [valid - segments.seq_len + (q.shape[0] - n) for valid in segments.valid]
        img, txt = self.split_attention(q[:n], k[:n], v[:n], q[n:], k[n:], v[n:], text_valid, list(image_lens), cache)
        return torch.cat([img, txt])

    @abstractmethod
    def split_attention(self, q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, cache):
        """(image rows here [S_local, B, H*D], text rows [L, B, H*D])."""


class Ulysses(_Split):
    """All-to-all heads <-> sequence over the CP group."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = _group_size_rank(group)

    def split_attention(self, q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, cache):
        return _ulysses(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, self.group, cache)


class Ring(_Split):
    """K/V chunks around the CP group (parallel/ring.py)."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = _group_size_rank(group)

    def split_attention(self, q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, cache):
        return ring_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, self.group)


class Usp(_Split):
    """Ulysses inside `ulysses_group` (consecutive CP ranks), ring across `ring_group`."""

    def __init__(self, ulysses_group, ring_group):
        self.groups = (ulysses_group, ring_group)
        (u, ur), (r, rr) = _group_size_rank(ulysses_group), _group_size_rank(ring_group)
        self.size, self.rank = u * r, rr * u + ur

    def split_attention(self, q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, cache):
        return _usp(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, self.groups, cache)


def context_parallel_attention(cp_mode: str, pg_collection) -> ContextParallelAttention:
    """The strategy for `cp_mode` over the CP group of `pg_collection` (hcustom_mc.parallel.groups):
    NoContextParallel for a CP group of one, whatever the mode."""
    if cp_mode not in MODES:
        raise ValueError(f"context-parallel attention mode must be one of {MODES}, got {cp_mode!r}")
    group = getattr(pg_collection, "cp", None)
    if group is None or _group_size_rank(group)[0] == 1:
        return NoContextParallel()
    if cp_mode == "usp":
        sub = getattr(pg_collection, "hcp", None)
        if not sub or len(sub) != 2:
            raise RuntimeError("cp_mode usp needs the process groups' usp sub-groups (hcp = [ulysses, ring]): "
                               "ParallelConfig.ulysses_degree with initialize_parallel, or new_process_groups(cp_sub_sizes=...)")
        return Usp(*sub)
    return Ulysses(group) if cp_mode == "ulysses" else Ring(group)


# ----------------------------------------------------------------------------- functional form


def cp_joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid: list[int], image_lens: list[int],
                       mode: str, group, cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Joint attention with the image sequence split over the CP `group` (under usp the pair (Ulysses, ring)):
    the strategy of `mode`, for a caller that holds a mode and a group rather than a strategy.

    q/k/v_img: this rank's image tokens [image_lens[rank], B, H, D]; q/k/v_txt: the replicated text
    [L, B, H, D]; text_valid[b]: valid text tokens of sample b. Returns (img_out [S_local, B, H*D],
    txt_out [L, B, H*D]): this rank's image rows and the full text rows of the single-process result.
    `cache`: a dict that lives for one model forward (JointAttention's), for per-forward descriptors."""
    if mode not in MODES:
        raise ValueError(f"context-parallel attention mode must be one of {MODES}, got {mode!r}")
    if mode == "usp":
        if not isinstance(group, (tuple, list)) or len(group) != 2:
            raise ValueError("usp needs group = (ulysses_group, ring_group)")
        strategy = Usp(*group)
    else:
        group = dist.group.WORLD if group is None else group  # p2p needs a concrete group for rank lookup
        strategy = Ulysses(group) if mode == "ulysses" else Ring(group)
    cp, rank = strategy.size, strategy.rank
    if len(image_lens) != cp or image_lens[rank] != q_img.shape[0]:
        raise ValueError(f"image_lens {image_lens} does not match CP size {cp} / local image tokens "
                         f"{q_img.shape[0]} on CP rank {rank}")
    if len(text_valid) != q_img.shape[1]:
        raise ValueError(f"text_valid has {len(text_valid)} entries for batch size {q_img.shape[1]}")
    if cp == 1:
        n = q_img.shape[0]
        seg = Segments(seq_len=n + q_txt.shape[0], valid=[n + v for v in text_valid])
        out = segment_attention(torch.cat([q_img, q_txt]), torch.cat([k_img, k_txt]), torch.cat([v_img, v_txt]), seg)
        return out[:n], out[n:]
    return strategy.split_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, list(text_valid), list(image_lens), cache)
