"""Ring context-parallel attention as one autograd.Function, memory O(sequence) per rank.

Each CP rank holds its image tokens (whole latent frames) and the replicated text. Queries are this
rank's [image ; text] rows; the keys are every rank's image chunk (passed around the ring) plus the
local text. Forward, per ring step: post the send of the held K/V chunk to the next rank and the
receive of the next chunk from the previous one, attend to the held chunk tile by tile while the
transfer runs (`blockwise.forward_into`: fused Triton tiles on a GPU, plain torch elsewhere; one
query-block x key-block score tile alive at a time),
merge through the log-sum-exp, then wait. Only q, the local k/v, the output and the fp32
log-sum-exp are saved: no score tile survives the forward.

Backward recomputes the probabilities per tile from the saved log-sum-exp. The K/V chunks travel the
ring again, and with each chunk its gradient accumulator (fp32): every rank adds its contribution for
the chunk it holds and forwards the sum, so after `cp` steps each owner receives the full dK/dV of
its chunk. Both transfers overlap the next block's compute.

Message order is the same on every rank (kv of step t, then dkv of step t), so NCCL, which matches
point-to-point messages by order, pairs them as gloo does by tag.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import Tensor

from hcustom_mc.parallel import blockwise
from hcustom_mc.parallel.blockwise import Padding

_TAG_KV, _TAG_DKV = 7310, 7320  # distinct tags (+0 k, +1 v): gloo pairs messages by tag


class _Shift:
    """One in-flight ring transfer: send `tensors` to the next rank, receive buffers of `shapes` from the
    previous. Several tensors go as separate messages of one batch, so nothing is stacked (copied) first."""

    def __init__(self, tensors: list[Tensor], shapes: list, group, tag: int):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        nxt = dist.get_global_rank(group, (rank + 1) % cp)
        prv = dist.get_global_rank(group, (rank - 1) % cp)
        self.sent = [t.contiguous() for t in tensors]  # kept alive until the sends complete
        self.recv = [tensors[0].new_empty(shape) for shape in shapes]
        ops = [dist.P2POp(dist.isend, t, nxt, group, tag + i) for i, t in enumerate(self.sent)]
        ops += [dist.P2POp(dist.irecv, t, prv, group, tag + i) for i, t in enumerate(self.recv)]
        self.reqs = dist.batch_isend_irecv(ops)

    def wait(self) -> list[Tensor]:
        for req in self.reqs:
            req.wait()
        self.sent = None
        return self.recv


def _paddings(B: int, S: int, L: int, text_valid: list[int], device) -> tuple[Padding, Padding]:
    """Padding of the local queries [image S ; text L] against image keys, and against the text keys.

    Built once per batch geometry, not per call: every layer's forward, recomputed forward and backward of
    one model forward share it (the text lengths are host ints, so the key needs no device sync)."""
    return _build_paddings(B, S, L, tuple(text_valid), torch.device(device))


@functools.lru_cache(maxsize=8)  # a few geometries alive at once (CFG branches, sampler and training shapes)
def _build_paddings(B: int, S: int, L: int, text_valid: tuple[int, ...], device: torch.device) -> tuple[Padding, Padding]:
    # normal tensors even when first built under inference_mode (the sampler), so training may reuse them
    with torch.inference_mode(False):
        # a pageable host-to-device copy, which drains the stream: once per geometry, never per layer call
        tv = torch.tensor(text_valid, device=device)
        txt_pad = torch.arange(L, device=device)[None, :] >= tv[:, None]  # [B, L]
        q_pad = torch.cat([torch.zeros(B, S, dtype=torch.bool, device=device), txt_pad], dim=1)
    first = min(text_valid)  # host ints: no device sync
    return (Padding(q_pad, S + first), Padding(q_pad, S + first, txt_pad, first))


class RingAttention(torch.autograd.Function):
    """q [B, H, S+L, D] (local image rows, then text), k/v_img [B, H, S, D], k/v_txt [B, H, L, D]
    -> out [S+L, B, H, D] in q's dtype (sequence-first, so the caller's [S, B, H*D] view is free).
    image_lens: image tokens of every CP rank, in rank order."""

    @staticmethod
    def forward(ctx, q, k_img, v_img, k_txt, v_txt, text_valid, image_lens, group):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        B, H, M, D = q.shape
        S, L = k_img.shape[2], k_txt.shape[2]
        wd, scale = blockwise.work_dtype(q.dtype), 1.0 / math.sqrt(D)
        pad_img, pad_txt = _paddings(B, S, L, text_valid, q.device)
        out = torch.zeros(B, H, M, D, dtype=wd, device=q.device)
        lse = torch.full((B, H, M), -math.inf, dtype=wd, device=q.device)

        kv = [k_img, v_img]
        for step in range(cp):
            shift = None
            if step < cp - 1:
                src = (rank - step - 1) % cp  # owner of the chunk arriving next
                shift = _Shift(kv, [(B, H, image_lens[src], D)] * 2, group, _TAG_KV)
            blockwise.forward_into(q, kv[0], kv[1], pad_img, scale, out, lse)  # overlaps the transfer
            if shift is not None:
                kv = shift.wait()
        blockwise.forward_into(q, k_txt, v_txt, pad_txt, scale, out, lse)

        # one copy: transpose to sequence-first and cast to the compute dtype; the fp32 accumulator is freed
        out = torch.empty(M, B, H, D, dtype=q.dtype, device=q.device).copy_(out.permute(2, 0, 1, 3))
        ctx.save_for_backward(q, k_img, v_img, k_txt, v_txt, out, lse)
        ctx.text_valid, ctx.image_lens, ctx.group = text_valid, image_lens, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_img, v_img, k_txt, v_txt, out, lse = ctx.saved_tensors
        group, image_lens = ctx.group, ctx.image_lens
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        B, H, M, D = q.shape
        S, L = k_img.shape[2], k_txt.shape[2]
        wd, scale = lse.dtype, 1.0 / math.sqrt(D)
        pad_img, pad_txt = _paddings(B, S, L, ctx.text_valid, q.device)
        # rowsum(dout * out) [B, H, M], contiguous once here (the Triton tiles read it as [B * H, M])
        delta = (dout.to(wd) * out.to(wd)).sum(dim=-1).permute(1, 2, 0).contiguous()
        dout = dout.permute(1, 2, 0, 3)  # a view: tiles slice it as [B, H, rows, D]
        dq = torch.zeros(B, H, M, D, dtype=wd, device=q.device)

        dkv_txt = torch.zeros(2, B, H, L, D, dtype=wd, device=q.device)
        blockwise.backward_into(q, k_txt, v_txt, dout, lse, delta, pad_txt, scale, dq, dkv_txt[0], dkv_txt[1])

        kv, dkv_shift = [k_img, v_img], None
        for step in range(cp):
            src = (rank - step) % cp  # owner of the chunk held now
            kv_shift = None
            if step < cp - 1:
                kv_shift = _Shift(kv, [(B, H, image_lens[(src - 1) % cp], D)] * 2, group, _TAG_KV)
            grad = [torch.zeros(B, H, image_lens[src], D, dtype=wd, device=q.device) for _ in range(2)]
            blockwise.backward_into(q, kv[0], kv[1], dout, lse, delta, pad_img, scale, dq, grad[0], grad[1])
            if dkv_shift is not None:  # the previous ranks' sum for this chunk
                for mine, theirs in zip(grad, dkv_shift.wait()):
                    mine += theirs
            # forward the sum; at the last step the next rank is the chunk's owner and we receive ours
            nxt_len = image_lens[(src - 1) % cp] if step < cp - 1 else image_lens[rank]
            dkv_shift = _Shift(list(grad), [(B, H, nxt_len, D)] * 2, group, _TAG_DKV)
            if kv_shift is not None:
                kv = kv_shift.wait()
        dkv = dkv_shift.wait()
        dt = q.dtype
        return (dq.to(dt), dkv[0].to(dt), dkv[1].to(dt), dkv_txt[0].to(dt), dkv_txt[1].to(dt), None, None, None)


def ring_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, text_valid: list[int], image_lens: list[int],
                   group) -> tuple[Tensor, Tensor]:
    """[S, B, H, D] image / [L, B, H, D] text inputs -> (img_out [S, B, H*D], txt_out [L, B, H*D])."""
    S, B, H, D = q_img.shape
    L = q_txt.shape[0]
    bhsd = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731  views; the copies below make them contiguous
    q = torch.cat([bhsd(q_img), bhsd(q_txt)], dim=2)  # one copy, straight into [B, H, S+L, D]
    out = RingAttention.apply(q, *(bhsd(t).contiguous() for t in (k_img, v_img, k_txt, v_txt)),
                              list(text_valid), list(image_lens), group)
    out = out.reshape(S + L, B, H * D)
    return out[:S], out[S:]
