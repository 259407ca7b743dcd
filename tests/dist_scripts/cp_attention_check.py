"""Context-parallel joint attention equals single-process segment attention: outputs and gradients.

usage: torchrun --nproc_per_node N cp_attention_check.py MODE     (MODE: ulysses | ring)
The WORLD group is the CP group. Loss on rank r: its image rows + 1/cp of the replicated text rows, so
image grads must match the reference rows and text grads summed over ranks the reference text grads.
"""

import os
import sys

import torch
import torch.distributed as dist


def check_case(mode, *, batch, heads, frames, tokens_per_frame, text_valid, dtype, dim=8, text_len=7, seed=0):
    from hcustom_mc.model.attention import Segments, sdpa_segment_attention
    from hcustom_mc.parallel.context import cp_joint_attention, frame_partition

    cp, rank = dist.get_world_size(), dist.get_rank()
    image_lens = [len(r) * tokens_per_frame for r in frame_partition(frames, cp)]
    n_img, L = sum(image_lens), text_len
    g = torch.Generator().manual_seed(seed)  # same seed everywhere: every rank builds the global problem
    q, k, v = (torch.randn(n_img + L, batch, heads, dim, generator=g, dtype=dtype) for _ in range(3))
    w_img = torch.randn(n_img, batch, heads * dim, generator=g, dtype=dtype)
    w_txt = torch.randn(L, batch, heads * dim, generator=g, dtype=dtype)

    # single-process reference over the whole sequence
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    seg = Segments(seq_len=n_img + L, valid=[n_img + n for n in text_valid])
    ref = sdpa_segment_attention(*ref_in, seg)
    ((ref[:n_img] * w_img).sum() + (ref[n_img:] * w_txt).sum()).backward()

    # this rank's share
    lo = sum(image_lens[:rank])
    rows = slice(lo, lo + image_lens[rank])
    img_in = [t[rows].clone().requires_grad_() for t in (q, k, v)]
    txt_in = [t[n_img:].clone().requires_grad_() for t in (q, k, v)]
    img_out, txt_out = cp_joint_attention(*img_in, *txt_in, text_valid, image_lens, mode, dist.group.WORLD)
    ((img_out * w_img[rows]).sum() + (txt_out * w_txt).sum() / cp).backward()

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    assert img_out.dtype == dtype and txt_out.dtype == dtype
    torch.testing.assert_close(img_out, ref[rows].detach(), **tol, msg=lambda m: f"image output: {m}")
    torch.testing.assert_close(txt_out, ref[n_img:].detach(), **tol, msg=lambda m: f"text output: {m}")
    for name, mine, txt, full in zip("qkv", img_in, txt_in, ref_in):
        assert torch.isfinite(mine.grad).all() and torch.isfinite(txt.grad).all(), f"non-finite grad d{name}"
        torch.testing.assert_close(mine.grad, full.grad[rows], **tol, msg=lambda m: f"image d{name}: {m}")
        summed = txt.grad.clone()
        dist.all_reduce(summed)  # replicated text: CP ranks' partial grads add up
        torch.testing.assert_close(summed, full.grad[n_img:], **tol, msg=lambda m: f"text d{name}: {m}")


def main():
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    base = dict(batch=2, frames=5, tokens_per_frame=6)
    # uneven frame split (3/2 frames at cp=2), one fully valid and one padded text; H=4 at cp=2
    for dtype in (torch.float32, torch.float64):
        check_case(mode, heads=2 * cp, text_valid=[7, 3], dtype=dtype, **base)
    # heads == cp (one head per rank under ulysses), all text valid
    check_case(mode, heads=cp, text_valid=[7, 7], dtype=torch.float32, batch=2, frames=4, tokens_per_frame=5)
    # padded text on the first sample only, different seed
    check_case(mode, heads=2 * cp, text_valid=[2, 7], dtype=torch.float32, seed=1, **base)
    if mode == "ring":
        check_case(mode, heads=2 * cp, text_valid=[4], dtype=torch.float32, batch=1, frames=3, tokens_per_frame=4)
        check_case(mode, heads=cp + 1, text_valid=[7, 5], dtype=torch.float32, **base)  # any head count
    else:
        try:
            check_case(mode, heads=cp + 1, text_valid=[7, 5], dtype=torch.float32, **base)
        except ValueError as exc:
            assert "ring" in str(exc), exc
        else:
            raise AssertionError("ulysses accepted heads not divisible by the CP size")
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"cp attention {mode} OK", flush=True)
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo worker threads can still be releasing the last work's tensors
    # then, need the GIL and abort the process (seen intermittently with torch 2.13 under load).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
