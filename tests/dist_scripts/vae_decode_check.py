"""Distributed VAE decode (temporal tiles over ranks) equals the single-rank tiled decode exactly.

usage: torchrun --nproc_per_node N vae_decode_check.py VAE_FOLDER
"""

import sys

import torch
import torch.distributed as dist

from hcustom_mc.encoders.vae import VideoVAE
from hcustom_mc.inference.decode import decode_across_ranks


def main() -> None:
    dist.init_process_group("gloo")
    tiles = dict(height=16, width=16, stride_height=8, stride_width=8, frames=8, stride_frames=4)
    vae = VideoVAE.from_pretrained(sys.argv[1], tile_sizes=tiles)
    latents = torch.randn(1, 4, 6, 3, 5, generator=torch.Generator().manual_seed(0))  # 6 latent frames, 2 per tile
    out = decode_across_ranks(vae, latents)
    if dist.get_rank() == 0:
        want = vae.decode(latents)
        assert out.shape == want.shape == (1, 3, 21, 24, 40), (out.shape, want.shape)
        assert torch.equal(out, want), f"max diff {(out - want).abs().max()}"
        print("decode OK", tuple(out.shape))
    else:
        assert out is None
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
