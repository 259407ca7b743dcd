"""Context-parallel joint attention equals single-process segment attention: outputs and gradients.

usage: torchrun --nproc_per_node N cp_attention_check.py MODE [U]   (MODE: ulysses | ring | usp, U: Ulysses degree)
The WORLD group is the CP group (usp: sub-groups of U consecutive ranks for Ulysses, strided for the ring).
Set HCUSTOM_ATTN_BLOCK_Q / _K small to make the ring's tiles cut the sequences at odd places. Loss on rank r: its image rows + 1/cp of the replicated text rows, so
image grads must match the reference rows and text grads summed over ranks the reference text grads.
"""

import os
import sys

import torch
import torch.distributed as dist


GROUP = None  # what cp_joint_attention gets as `group` (WORLD, or the usp sub-group pair)


def usp_groups(u: int):
    """(ulysses, ring) sub-groups of WORLD; every rank creates every group, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    r = world // u
    mine = [None, None]
    for j in range(r):
        g = dist.new_group(list(range(j * u, (j + 1) * u)))
        if rank // u == j:
            mine[0] = g
    for i in range(u):
        g = dist.new_group(list(range(i, world, u)))
        if rank % u == i:
            mine[1] = g
    return tuple(mine)


def check_case(mode, *, batch, heads, frames, tokens_per_frame, text_valid, dtype, dim=8, text_len=7, seed=0):
    from hcustom_mc.segments import Segments, sdpa_segment_attention_looped
    from hcustom_mc.parallel.context import cp_joint_attention, frame_partition

    cp, rank = dist.get_world_size(), dist.get_rank()
    image_lens = [len(r) * tokens_per_frame for r in frame_partition(frames, cp)]
    n_img, L = sum(image_lens), text_len
    g = torch.Generator().manual_seed(seed)  # same seed everywhere: every rank builds the global problem
    q, k, v = (torch.randn(n_img + L, batch, heads, dim, generator=g, dtype=dtype) for _ in range(3))
    w_img = torch.randn(n_img, batch, heads * dim, generator=g, dtype=dtype)
    w_txt = torch.randn(L, batch, heads * dim, generator=g, dtype=dtype)

    # single-process reference over the whole sequence
    ref_in = [t.to(torch.float64, copy=True).requires_grad_() for t in (q, k, v)]
    seg = Segments(seq_len=n_img + L, valid=[n_img + n for n in text_valid])
    ref = sdpa_segment_attention_looped(*ref_in, seg)  # per sample and segment: independent of every CP path

    # this rank's share
    lo = sum(image_lens[:rank])
    rows = slice(lo, lo + image_lens[rank])
    img_in = [t[rows].clone().requires_grad_() for t in (q, k, v)]
    txt_in = [t[n_img:].clone().requires_grad_() for t in (q, k, v)]
    img_out, txt_out = cp_joint_attention(*img_in, *txt_in, text_valid, image_lens, mode, GROUP)
    ((img_out.double() * w_img[rows].double()).sum() + (txt_out.double() * w_txt.double()).sum() / cp).backward()
    w_img, w_txt = w_img.double(), w_txt.double()  # the reference runs in fp64
    ((ref[:n_img] * w_img).sum() + (ref[n_img:] * w_txt).sum()).backward()
    ref = ref.to(dtype)
    ref_grads = [t.grad.to(dtype) for t in ref_in]

    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]
    assert img_out.dtype == dtype and txt_out.dtype == dtype
    torch.testing.assert_close(img_out, ref[rows].detach(), **tol, msg=lambda m: f"image output: {m}")
    torch.testing.assert_close(txt_out, ref[n_img:].detach(), **tol, msg=lambda m: f"text output: {m}")
    for name, mine, txt, full in zip("qkv", img_in, txt_in, ref_grads):
        assert torch.isfinite(mine.grad).all() and torch.isfinite(txt.grad).all(), f"non-finite grad d{name}"
        torch.testing.assert_close(mine.grad, full[rows], **tol, msg=lambda m: f"image d{name}: {m}")
        wide = torch.promote_types(dtype, torch.float32)  # gloo sums fp32 / fp64 on every build
        summed = txt.grad.to(wide)
        dist.all_reduce(summed)  # replicated text: CP ranks' partial grads add up
        torch.testing.assert_close(summed, full[n_img:].to(wide), **tol, msg=lambda m: f"text d{name}: {m}")


def main():
    global GROUP
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    GROUP = usp_groups(int(sys.argv[2])) if mode == "usp" else dist.group.WORLD
    base = dict(batch=2, frames=5, tokens_per_frame=6)
    # uneven frame split (3/2 frames at cp=2), one fully valid and one padded text; H=4 at cp=2
    for dtype in (torch.float32, torch.float64):
        check_case(mode, heads=2 * cp, text_valid=[7, 3], dtype=dtype, **base)
    # heads == cp (one head per rank under ulysses), all text valid
    check_case(mode, heads=cp, text_valid=[7, 7], dtype=torch.float32, batch=2, frames=4, tokens_per_frame=5)
    # padded text on the first sample only, different seed
    check_case(mode, heads=2 * cp, text_valid=[2, 7], dtype=torch.float32, seed=1, **base)
    if mode != "ulysses":
        # odd lengths (7 frames of 7 tokens, split 2/2/2/1 or 4/3), odd text lengths, bf16 inputs
        check_case(mode, heads=2 * cp, text_valid=[5, 9], dtype=torch.float32, batch=2, frames=7, tokens_per_frame=7,
                   text_len=11, seed=2)
        check_case(mode, heads=2 * cp, text_valid=[3, 9], dtype=torch.bfloat16, batch=2, frames=5, tokens_per_frame=7,
                   text_len=9, seed=3)
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
