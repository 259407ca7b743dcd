"""Context-parallel joint attention (ulysses and ring) equals single-process segment attention."""

import pytest
import torch

from hcustom_mc.model.attention import Segments, segment_attention
from hcustom_mc.parallel import context
from hcustom_mc.parallel.context import cp_joint_attention, frame_partition
from tests.torchrun import torchrun

SCRIPT = "tests/dist_scripts/cp_attention_check.py"


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_cp2_equals_single_process(mode):
    """Outputs and gradients over 2 gloo ranks, uneven frame split, padded text (see the script)."""
    out = torchrun(2, SCRIPT, mode, timeout=120)
    assert f"cp attention {mode} OK" in out


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
