"""Peak resident memory of one CP attention forward + backward (this rank), for the memory test.

usage: torchrun --nproc_per_node 2 cp_attention_memory.py MODE IMAGE_TOKENS HEADS HEAD_DIM OUT.json
Linux only: the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs right before
the measured call, so the number is the high-water mark of exactly this forward + backward over the
resident set before it. Run with MALLOC_MMAP_THRESHOLD_ small so freed tensors leave the process
(otherwise glibc keeps them mapped and the counter shows the allocator's history, not the need).
"""

import json
import os
import sys

import torch
import torch.distributed as dist


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main():
    mode, n_img, heads, dim, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    from hcustom_mc.parallel.context import cp_joint_attention

    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    image_lens = [n_img // cp] * cp
    L, B = 16, 1
    g = torch.Generator().manual_seed(rank)
    img = [torch.randn(image_lens[rank], B, heads, dim, generator=g).requires_grad_() for _ in range(3)]
    txt = [torch.randn(L, B, heads, dim, generator=g).requires_grad_() for _ in range(3)]
    w = torch.randn(image_lens[rank] + L, B, heads * dim, generator=g)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    img_out, txt_out = cp_joint_attention(*img, *txt, [L - 3], image_lens, mode, dist.group.WORLD)
    (torch.cat([img_out, txt_out]) * w).sum().backward()
    peak = rss_kib("VmHWM")
    dist.barrier()
    tile = B * heads * image_lens[rank] * max(image_lens) * 4  # the fp32 score tile of the old ring
    result = {"mode": mode, "rank": rank, "peak_delta_bytes": (peak - before) * 1024, "tile_bytes": tile,
              "qkv_bytes": 3 * img[0].numel() * 4}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
