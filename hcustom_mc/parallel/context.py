"""Context-parallel (CP) joint attention over [image tokens ; text tokens].

Each CP rank holds a contiguous run of whole latent frames of the image tokens; the text tokens are
replicated on every rank. The result equals single-process `segment_attention` over
[all image tokens in rank order ; text], i.e. per sample the segments [image + valid text] and
[text padding]. Two modes:

  ulysses: all-to-all heads <-> sequence, attention on H/cp heads of the full sequence, all-to-all back.
           Needs heads % cp == 0; uses the regular attention backends (flash / TE / SDPA).
  ring:    image K/V chunks travel around the ring; an online softmax merges the partial results.
           Any head count; plain torch ops (scores of local queries vs. one chunk are materialised).

Every collective is an autograd.Function whose backward is the adjoint collective, so gradients
are exact. Gradients of the replicated text q/k/v are per-rank partial sums: summing them over the
CP group (as the data/CP gradient reduction does for replicated parameters) gives the full gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from hcustom_mc.model.attention import Segments, segment_attention

MODES = ("ulysses", "ring")
_TAG_FWD, _TAG_BWD = 7301, 7302  # distinct p2p tags so forward and backward messages never pair up


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


def _ulysses(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, group):
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
    out = segment_attention(q, k, v, Segments(seq_len=n_img + L, valid=[n_img + n for n in text_valid]))
    B = out.shape[1]
    img = _HeadsToSeq.apply(out[:n_img].reshape(n_img, B, h, D), image_lens, group)
    txt = _GatherHeads.apply(out[n_img:].reshape(L, B, h, D), group)
    return img.reshape(img.shape[0], B, H * D), txt.reshape(L, B, H * D)


# ----------------------------------------------------------------------------- ring


def _ring_p2p(x: Tensor, recv_shape, group, forward: bool) -> Tensor:
    """Send `x` to the next rank and receive from the previous one (forward), or the reverse."""
    cp, rank = _group_size_rank(group)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % cp), dist.get_global_rank(group, (rank - 1) % cp)
    dst, src, tag = (nxt, prv, _TAG_FWD) if forward else (prv, nxt, _TAG_BWD)
    recv = x.new_empty(recv_shape)
    ops = [dist.P2POp(dist.isend, x.contiguous(), dst, group, tag), dist.P2POp(dist.irecv, recv, src, group, tag)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


class _RingShift(torch.autograd.Function):
    """Differentiable ring step: the gradient of the received chunk goes back to its sender."""

    @staticmethod
    def forward(ctx, x, recv_shape, group):
        ctx.send_shape, ctx.group = x.shape, group
        return _ring_p2p(x, recv_shape, group, forward=True)

    @staticmethod
    def backward(ctx, grad):
        return _ring_p2p(grad, ctx.send_shape, ctx.group, forward=False), None, None


def _ring(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid, image_lens, group):
    cp, rank = _group_size_rank(group)
    S, B, H, D = q_img.shape
    L = q_txt.shape[0]
    dtype = q_img.dtype
    work = torch.promote_types(dtype, torch.float32)  # softmax statistics in (at least) fp32
    to_bhsd = lambda t: t.to(work).permute(1, 2, 0, 3)  # noqa: E731  [S, B, H, D] -> [B, H, S, D]
    scale = 1.0 / math.sqrt(D)

    # queries: local image + all text (replicated compute, so txt_out needs no communication)
    q = to_bhsd(torch.cat([q_img, q_txt])) * scale
    dev = q.device
    pos = torch.arange(L, device=dev)
    txt_valid = pos[None, :] < torch.tensor(text_valid, device=dev)[:, None]  # [B, L]
    q_valid = torch.cat([torch.ones(B, S, dtype=torch.bool, device=dev), txt_valid], dim=1)  # [B, S+L]
    img_mask = q_valid[:, None, :, None]  # padded text queries never see image keys
    txt_mask = (q_valid[:, :, None] == txt_valid[:, None, :])[:, None]  # valid<->valid, pad<->pad

    m = torch.full((B, H, S + L, 1), -math.inf, dtype=work, device=dev)  # running max, detached
    num = torch.zeros(B, H, S + L, D, dtype=work, device=dev)
    den = torch.zeros(B, H, S + L, 1, dtype=work, device=dev)

    def merge(k, v, mask):
        nonlocal m, num, den
        s = (q @ k.transpose(-1, -2)).masked_fill(~mask, -math.inf)
        m_new = torch.maximum(m, s.detach().amax(dim=-1, keepdim=True))
        # rows with no allowed key so far: any finite reference works (all their terms are zero)
        ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - ref)  # exp(-inf) = 0 for rows that had nothing yet
        p = torch.exp(s - ref)
        num = num * alpha + p @ v
        den = den * alpha + p.sum(dim=-1, keepdim=True)
        m = m_new

    kv = torch.stack([to_bhsd(k_img), to_bhsd(v_img)]).contiguous()  # one message per ring step
    for step in range(cp):
        merge(kv[0], kv[1], img_mask)
        if step < cp - 1:
            src = (rank - step - 1) % cp  # owner of the chunk arriving now
            shape = (2, B, H, image_lens[src], D)
            kv = _RingShift.apply(kv, shape, group)
    merge(to_bhsd(k_txt), to_bhsd(v_txt), txt_mask)

    # every row saw at least one key (itself among the padding, or the image), so den >= 1
    out = (num / den.clamp_min(torch.finfo(work).tiny)).to(dtype)  # [B, H, S+L, D]
    out = out.permute(2, 0, 1, 3).reshape(S + L, B, H * D)
    return out[:S], out[S:]


# ----------------------------------------------------------------------------- entry point


def cp_joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid: list[int], image_lens: list[int],
                       mode: str, group) -> tuple[Tensor, Tensor]:
    """Joint attention with the image sequence split over the CP `group`.

    q/k/v_img: this rank's image tokens [image_lens[rank], B, H, D]; q/k/v_txt: the replicated text
    [L, B, H, D]; text_valid[b]: valid text tokens of sample b. Returns (img_out [S_local, B, H*D],
    txt_out [L, B, H*D]): this rank's image rows and the full text rows of the single-process result."""
    if mode not in MODES:
        raise ValueError(f"context-parallel attention mode must be one of {MODES}, got {mode!r}")
    cp, rank = _group_size_rank(group)
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
    group = dist.group.WORLD if group is None else group  # p2p needs a concrete group for rank lookup
    fn = _ulysses if mode == "ulysses" else _ring
    return fn(q_img, k_img, v_img, q_txt, k_txt, v_txt, list(text_valid), list(image_lens), group)
