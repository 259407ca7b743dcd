"""The pipeline stages of a training layout, called as one model for sampling (forward only).

Validation during training samples with the training model itself: under pipeline parallelism each rank holds
some model chunks (with VPP, chunk v of PP rank r is stage v * PP + r, as megatron interleaves them). Forward only
needs no schedule: the stages run in order, each sending its hidden state to the next stage's rank, and the last
stage's velocity is broadcast over the PP group, so that every rank holds it, as ParallelSampler expects of a
model (each rank then integrates the same latents). The hidden states travel between ranks of the same TP and CP
coordinates, as in training, so TP, CP and sequence parallelism inside each stage work unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hcustom_mc.parallel.groups import group_rank, group_size


def _send(tensor: torch.Tensor, dst: int, group) -> None:
    shape = torch.tensor([tensor.ndim, *tensor.shape] + [0] * (8 - tensor.ndim), dtype=torch.long,
                         device=tensor.device)
    dist.send(shape, dst=dist.get_global_rank(group, dst), group=group)
    dist.send(tensor.contiguous(), dst=dist.get_global_rank(group, dst), group=group)


def _recv(src: int, group, dtype: torch.dtype, device) -> torch.Tensor:
    shape = torch.zeros(9, dtype=torch.long, device=device)
    dist.recv(shape, src=dist.get_global_rank(group, src), group=group)
    out = torch.empty(shape[1 : 1 + int(shape[0])].tolist(), dtype=dtype, device=device)
    dist.recv(out, src=dist.get_global_rank(group, src), group=group)
    return out


class StagedModel:
    """This rank's chunks of a pipelined DiT, callable like the whole model: `model(latents, timestep, ...)` returns
    the velocity on every rank of the PP group. Collective over the PP group."""

    def __init__(self, chunks: list):
        self.chunks = list(chunks)
        first = self.chunks[0]
        self.cfg, self.pg_collection = first.cfg, first.pg_collection
        self.pp_group = first.pg_collection.pp

    def parameters(self):
        return self.chunks[0].parameters()

    def video_frames_here(self, *args):
        return self.chunks[0].video_frames_here(*args)  # context parallelism's split: the same in every stage

    def velocity_shape(self, latents: torch.Tensor, identity_latents: torch.Tensor | None) -> tuple[int, ...]:
        K = 0 if identity_latents is None else identity_latents.shape[2]
        pt, ph, pw = self.cfg.patch_size
        f, hw = latents.shape[2] // pt, (latents.shape[3] // ph) * (latents.shape[4] // pw)
        frames = self.video_frames_here(K, f, hw)
        return (latents.shape[0], self.cfg.out_channels, len(frames) * pt, latents.shape[3], latents.shape[4])

    @torch.no_grad()
    def __call__(self, latents, timestep, guidance=None, **inputs) -> torch.Tensor:
        pp, me = group_size(self.pp_group), group_rank(self.pp_group)
        dtype = next(self.parameters()).dtype
        stages = pp * len(self.chunks)
        hidden, velocity = None, None
        for stage in range(stages):
            chunk, owner = divmod(stage, pp)
            if owner != me:
                continue
            if stage > 0:
                hidden = _recv((owner - 1) % pp, self.pp_group, dtype, latents.device)
            out = self.chunks[chunk](latents, timestep, guidance=guidance, hidden=hidden, **inputs)
            if stage < stages - 1:
                _send(out, (owner + 1) % pp, self.pp_group)
            else:
                velocity = out.float()  # fp32, the sampler's dtype: one buffer dtype on every rank
        if pp > 1:
            if velocity is None:
                velocity = torch.empty(self.velocity_shape(latents, inputs.get("identity_latents")),
                                       dtype=torch.float32, device=latents.device)
            dist.broadcast(velocity, src=dist.get_global_rank(self.pp_group, (stages - 1) % pp), group=self.pp_group)
        return velocity
