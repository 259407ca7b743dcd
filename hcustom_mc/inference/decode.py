"""VAE decoding split across ranks: the temporal tiles of the causal VAE's framewise decode are independent,
so rank r decodes tiles r, r+W, ...; rank 0 receives them and blends exactly as the single-rank decode does.

With framewise decoding off, or a clip no longer than one temporal tile, rank 0 decodes alone. Each tile's
own spatial tiling is diffusers' (`tiled_decode`); only the tile loop and the gather are ours. The result
on rank 0 equals `VideoVAE.decode` bit for bit (same tile computations, same blending).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tile_plan(m, num_frames: int) -> tuple[list[int], int, int]:
    """(start latent frame of every temporal tile, latent frames per tile, pixel frames blended)."""
    t = m.temporal_compression_ratio
    per_tile = m.tile_sample_min_num_frames // t
    stride = m.tile_sample_stride_num_frames // t
    return list(range(0, num_frames, stride)), per_tile, m.tile_sample_min_num_frames - m.tile_sample_stride_num_frames


def _decode_tile(m, z: torch.Tensor) -> torch.Tensor:
    s = m.spatial_compression_ratio
    if m.use_tiling and (z.shape[-1] > m.tile_sample_min_width // s or z.shape[-2] > m.tile_sample_min_height // s):
        return m.tiled_decode(z, return_dict=True).sample
    return m.decoder(m.post_quant_conv(z))


def _tile_shape(m, z: torch.Tensor, start: int, per_tile: int) -> tuple[int, ...]:
    frames = min(z.shape[2], start + per_tile + 1) - start
    return (z.shape[0], m.config.out_channels, (frames - 1) * m.temporal_compression_ratio + 1,
            z.shape[3] * m.spatial_compression_ratio, z.shape[4] * m.spatial_compression_ratio)


@torch.no_grad()
def decode_across_ranks(vae, latents: torch.Tensor, group=None) -> torch.Tensor | None:
    """Collective over `group` (default: the world). Scaled latents -> video in [-1, 1] on rank 0, None elsewhere."""
    m = vae.model
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    z = latents.to(vae.device, vae.dtype) / vae.scaling_factor
    starts, per_tile, blend = _tile_plan(m, z.shape[2])
    if world == 1 or not m.use_framewise_decoding or z.shape[2] <= per_tile:
        return vae.decode(latents) if rank == 0 else None

    # tile i covers latent frames [s, s + per_tile + 1): one frame of causal context more than its stride
    tiles: dict[int, torch.Tensor] = {}
    for i in range(rank, len(starts), world):
        tiles[i] = _decode_tile(m, z[:, :, starts[i] : starts[i] + per_tile + 1]).contiguous()
    to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    if rank != 0:
        for i in sorted(tiles):
            dist.send(tiles[i], dst=to_global(0), group=group)
        return None
    for i in range(len(starts)):
        if i not in tiles:  # arrives from rank i % world, in that rank's tile order
            buf = torch.empty(_tile_shape(m, z, starts[i], per_tile), dtype=z.dtype, device=z.device)
            dist.recv(buf, src=to_global(i % world), group=group)
            tiles[i] = buf

    stride = m.tile_sample_stride_num_frames
    pieces = []
    for i in range(len(starts)):
        tile = tiles[i] if i == 0 else tiles[i][:, :, 1:]  # later tiles repeat their causal context frame
        if i > 0:
            tile = m.blend_t(prev, tile, blend)
            pieces.append(tile[:, :, :stride])
        else:
            pieces.append(tile[:, :, : stride + 1])
        prev = tile
    frames = (z.shape[2] - 1) * m.temporal_compression_ratio + 1
    return torch.cat(pieces, dim=2)[:, :, :frames].clamp(-1, 1)
