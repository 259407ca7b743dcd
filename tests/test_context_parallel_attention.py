"""Context-parallel joint attention (ulysses and ring) equals single-process segment attention."""

import pytest
import torch

from hcustom_mc.segments import Segments, segment_attention
from hcustom_mc.parallel import context
from hcustom_mc.parallel.context import cp_joint_attention, frame_partition
from tests.torchrun import torchrun

SCRIPT = "tests/dist_scripts/cp_attention_check.py"


SMALL_TILES = {"HCUSTOM_ATTN_BLOCK_Q": "8", "HCUSTOM_ATTN_BLOCK_K": "5"}  # tiles cut every sequence at odd places
# the fused tile kernels (kernels/hcustom_kernels/block_attention.py) in the Triton interpreter; fp64 cases keep the torch tiles
TRITON_TILES = {"HCUSTOM_RING_TILES": "triton", "TRITON_INTERPRET": "1"}


@pytest.mark.parametrize("nproc, args, env", [
    (2, ["ulysses"], {}),
    (2, ["ring"], {}),
    (2, ["ring"], SMALL_TILES),
    pytest.param(3, ["ring"], SMALL_TILES, marks=pytest.mark.slow),  # cp2 small tiles covers the multi-tile path
    (4, ["usp", "2"], SMALL_TILES),
    (2, ["ring"], TRITON_TILES),
], ids=["cp2_ulysses", "cp2_ring", "cp2_ring_small_tiles", "cp3_ring_small_tiles", "cp4_usp2x2_small_tiles",
        "cp2_ring_triton_tiles"])
def test_cp_equals_single_process(nproc, args, env):
    """Outputs and gradients (fp32, fp64, bf16) against single-process fp64 segment attention: uneven frame
    splits, odd lengths, padded text (see the script)."""
    out = torchrun(nproc, SCRIPT, *args, timeout=180, env=env)
    assert f"cp attention {args[0]} OK" in out


@pytest.mark.parametrize("block", [(1024, 1024), (7, 5), (16, 3)])
def test_blockwise_tiles_equal_reference(block):
    """forward_into / backward_into at odd tile sizes equal autograd through an explicit masked softmax."""
    import math

    from hcustom_mc.parallel import blockwise

    g = torch.Generator().manual_seed(3)
    B, H, M, N, D = 2, 3, 23, 19, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (M, N, N))
    dout = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    q_pad = torch.zeros(B, M, dtype=torch.bool)
    q_pad[0, 17:], q_pad[1, 20:] = True, True
    k_pad = torch.zeros(B, N, dtype=torch.bool)
    k_pad[0, 11:], k_pad[1, 15:] = True, True
    pad = blockwise.Padding(q_pad, 17, k_pad, 11)
    scale = 1 / math.sqrt(D)

    out = torch.zeros(B, H, M, D, dtype=torch.float64)
    lse = torch.full((B, H, M), -math.inf, dtype=torch.float64)
    blockwise.forward_into(q, k, v, pad, scale, out, lse, *block)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    s = (ref_in[0] @ ref_in[1].transpose(-1, -2) * scale).masked_fill(~(q_pad[:, None, :, None] == k_pad[:, None, None, :]), -math.inf)
    ref = s.softmax(-1) @ ref_in[2]
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(lse, s.logsumexp(-1).detach())
    ref.backward(dout)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    delta = (dout * out).sum(-1)
    blockwise.backward_into(q, k, v, dout, lse, delta, pad, scale, *grads, *block)
    for got, t in zip(grads, ref_in):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize(
    "frames, cp, sizes",
    [(6, 3, [2, 2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (4, 1, [4]), (3, 3, [1, 1, 1])],
)
def test_frame_partition(frames, cp, sizes):
    parts = frame_partition(frames, cp)
    assert [len(p) for p in parts] == sizes
    assert [f for p in parts for f in p] == list(range(frames))  # contiguous, in order, complete


def test_frame_partition_too_few_frames():
    with pytest.raises(ValueError, match="2 latent frame.*3 context-parallel ranks"):
        frame_partition(2, 3)


def _inputs(n_img=10, L=5, B=2, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, B, H, D, generator=g, dtype=torch.float64) for n in (n_img,) * 3 + (L,) * 3]


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_group_of_one_is_segment_attention(mode):
    """Without a process group (or a group of one) both modes are plain segment attention."""
    ins = [t.requires_grad_() for t in _inputs()]
    img, txt = cp_joint_attention(*ins, [5, 2], [10], mode, None)
    ref = segment_attention(*(torch.cat([a, b]) for a, b in zip(ins[:3], ins[3:])), Segments(15, [15, 12]))
    torch.testing.assert_close(torch.cat([img, txt]), ref)
    grads = torch.autograd.grad(torch.cat([img, txt]).sum(), ins)
    ref_grads = torch.autograd.grad(ref.sum(), ins)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_bad_arguments():
    ins = _inputs()
    with pytest.raises(ValueError, match="mode"):
        cp_joint_attention(*ins, [5, 2], [10], "stripes", None)
    with pytest.raises(ValueError, match="image_lens"):
        cp_joint_attention(*ins, [5, 2], [9], "ring", None)


def test_ulysses_rejects_indivisible_heads(monkeypatch):
    """Checked before any communication, so a faked CP size of 2 is enough here."""
    monkeypatch.setattr(context, "_group_size_rank", lambda group: (2, 0))
    ins = _inputs(H=3)
    with pytest.raises(ValueError, match="ring"):
        cp_joint_attention(*ins, [5, 2], [10, 10], "ulysses", None)


def test_ring_padding_is_built_once_per_batch(single_process, monkeypatch):
    """Ring attention's padding flags come from the text lengths, a host list: building them is a pageable
    host-to-device copy that drains the stream. Every layer's forward and backward of one batch (here 3 layers,
    6 calls) share one build; a batch of other text lengths builds its own. The result is unchanged."""
    import torch.distributed as dist

    from hcustom_mc.parallel import ring

    class Loopback:  # a ring of one rank: what is sent to the next rank (itself) comes back from the previous
        def __init__(self, tensors, shapes, group, tag):
            self.recv = [t.clone() for t in tensors]

        def wait(self):
            return self.recv

    monkeypatch.setattr(ring, "_Shift", Loopback)  # gloo cannot send a rank to itself
    calls, copies = [], []
    paddings, tensor = ring._paddings, torch.tensor
    monkeypatch.setattr(ring, "_paddings", lambda *a: calls.append(a[3]) or paddings(*a))
    monkeypatch.setattr(torch, "tensor", lambda data, *a, **k: (copies.append(list(data)) if isinstance(data, (list, tuple))
                                                                 else None) or tensor(data, *a, **k))

    def layers(text_valid, n=3):
        ins = [t.requires_grad_() for t in _inputs()]
        outs = [ring.ring_attention(*ins, text_valid, [10], dist.group.WORLD) for _ in range(n)]
        grads = torch.autograd.grad(sum(img.sum() + txt.sum() for img, txt in outs), ins)
        return outs[0], grads

    (img, txt), grads = layers([4, 1])  # text lengths no other test gives ring attention (nothing cached yet)
    assert calls == [[4, 1]] * 6 and copies == [[4, 1]]
    layers([3, 5], n=1)
    assert copies == [[4, 1], [3, 5]]
    monkeypatch.undo()
    ins = [t.requires_grad_() for t in _inputs()]
    ref = segment_attention(*(torch.cat([a, b]) for a, b in zip(ins[:3], ins[3:])), Segments(15, [14, 11]))
    torch.testing.assert_close(torch.cat([img, txt]), ref)
    for got, want in zip(grads, torch.autograd.grad(3 * ref.sum(), ins)):
        torch.testing.assert_close(got, want)
