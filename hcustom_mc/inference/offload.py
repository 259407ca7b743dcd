"""Block offload for sampling: the DiT's blocks live in host memory and are copied to the compute device just
before they run, `ahead` blocks in advance, overlapping each copy with the compute of the blocks before it.

    offloader = BlockOffloader.attach(model, device, ahead=1)   # non-block modules moved to `device`
    model(...)                                                  # blocks stream in and out
    offloader.detach()                                          # hooks removed, blocks left in host memory

How: forward pre/post hooks on every block module (installed from outside the model; the model's own code is
unchanged). A block's tensors are all its parameters and buffers, whatever their dtype (bf16, fp32, float8 with
scale buffers): each is kept as one host tensor (on CUDA in pinned slabs, HostArena, so the copy is asynchronous).
Before block i runs (its pre-hook) its copy is awaited and blocks i+1 .. i+ahead are scheduled; after it runs (its
post-hook) its device tensors are dropped and the module points at the host tensors again. So at most
`ahead + 1` blocks are materialised on the device at any point of a forward: block i and the `ahead` blocks being
copied while it runs (`ahead = 0`: each block is copied when it is needed, with no overlap).

On CUDA the copies run on a side stream: the block's tensors are allocated and filled there, an event orders the
copy before the compute stream's first use, and `record_stream` tells the caching allocator that the compute stream
uses them, so their memory is not handed out again until the compute stream's queued work on them has finished.
The host would otherwise run ahead of the GPU (kernel launches and copies are asynchronous) and allocate fresh
memory for every later block while the released ones still wait for their kernels: so before block i is set up,
the host waits for the GPU to finish block i - 1 (an event recorded after its release). Block i's weights are
already there (copied during block i - 1), so the GPU idles only for the launch of block i's first kernel, and the
device holds at most `ahead + 1` blocks' weights in fact, not only in the bookkeeping.
On the CPU (host == compute device) the same path runs: materialising copies into fresh tensors, releasing drops
them, and the bookkeeping (`live`, `max_live`, `copies`) is the same, which is what the CPU tests check.

Sampling only: the copies are not part of autograd, so a forward with gradients on the blocks' parameters is
refused.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
import torch.nn as nn


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The DiT's blocks in the order `_run_blocks` runs them: double blocks, then single blocks, each by index."""
    blocks = []
    for name in ("double_blocks", "single_blocks"):
        group = getattr(model, name, None)
        if group is not None:
            blocks += [group[k] for k in sorted(group.keys(), key=int)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no double_blocks / single_blocks to offload")
    return blocks


@dataclass
class _Tensor:
    """One tensor of a block and every place that holds it (a Parameter object, or buffer slots of modules)."""

    host: torch.Tensor
    param: nn.Parameter | None = None
    buffer_slots: list[tuple[nn.Module, str]] = field(default_factory=list)

    def point_at(self, t: torch.Tensor) -> None:
        if self.param is not None:
            self.param.data = t  # the Parameter object (and the attributes megatron set on it) stays
        for module, name in self.buffer_slots:
            module._buffers[name] = t


def _block_tensors(block: nn.Module) -> list[_Tensor]:
    """The block's parameters and buffers, each once (a tensor shared by several modules has several slots)."""
    found: dict[int, _Tensor] = {}
    for module in block.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in found:
                found[id(p)] = _Tensor(host=p.data, param=p)
        for name, b in module._buffers.items():
            if b is not None:
                found.setdefault(id(b), _Tensor(host=b)).buffer_slots.append((module, name))
    return list(found.values())


SLAB_BYTES = 1 << 30  # pinned memory is taken in slabs of this size (a power of two: the allocator's own rounding)
ALIGN_BYTES = 512  # each tensor's offset in its slab: aligned for every dtype's view and for fast DMA


class HostArena:
    """Host memory for the blocks' tensors, packed into slabs of SLAB_BYTES. torch's pinned-memory allocator rounds
    every allocation up to a power of two, so pinning each tensor on its own costs about a third more host memory
    than the weights (13B, bf16: 31 GiB for 23 GiB); slabs waste only their tails. A tensor larger than a slab gets
    an allocation of its own. `pin`: page-locked slabs (CUDA copies from them are asynchronous)."""

    def __init__(self, pin: bool, slab_bytes: int = SLAB_BYTES):
        self.pin, self.slab_bytes = pin, slab_bytes
        self.slabs: list[torch.Tensor] = []
        self.free = 0  # bytes left in the last slab
        self.allocated = 0  # bytes of every host allocation made, slabs and large tensors

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self.allocated += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` (same dtype, shape and values), contiguous, in this arena."""
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if nbytes > self.slab_bytes:
            buf = self._allocate(nbytes)
        else:
            need = -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
            if not self.slabs or need > self.free:
                self.slabs.append(self._allocate(self.slab_bytes))
                self.free = self.slab_bytes
            start = self.slab_bytes - self.free
            buf = self.slabs[-1][start : start + nbytes]
            self.free -= need
        host = buf.view(t.dtype).view(t.shape) if nbytes else torch.empty(t.shape, dtype=t.dtype)
        host.copy_(t)
        return host


def _to_host(t: torch.Tensor, arena: HostArena | None) -> torch.Tensor:
    """The host tensor the offloader keeps: `t` itself on the CPU without pinning, else a copy in the arena."""
    if arena is None:
        return t.detach().to("cpu")
    return arena.place(t)


class BlockOffloader:
    """Streams `blocks` (run in this order) to `device`; see the module docstring."""

    def __init__(self, blocks: list[nn.Module], device: torch.device | str, ahead: int = 1):
        if ahead < 0:
            raise ValueError(f"offload ahead must be >= 0 blocks, got {ahead}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.blocks, self.ahead = list(blocks), ahead
        self.position = {id(b): i for i, b in enumerate(self.blocks)}
        # CUDA: pinned slabs (asynchronous copies); the CPU: the tensors as they are
        self.arena = HostArena(pin=True) if self.device.type == "cuda" else None
        self.tensors: list[list[_Tensor]] = []
        for block in self.blocks:
            items = _block_tensors(block)
            for item in items:
                item.host = _to_host(item.host, self.arena)
                item.point_at(item.host)
            self.tensors.append(items)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # bookkeeping: block index -> (its device tensors, the event its copy records); the most at once
        self.live: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.max_live = 0
        self.copies = 0
        self.done: torch.cuda.Event | None = None  # CUDA: recorded on the compute stream after the last block ran
        self.handles = []
        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._before))
            self.handles.append(block.register_forward_hook(self._after))

    @classmethod
    def attach(cls, model: nn.Module, device: torch.device | str, ahead: int = 1) -> "BlockOffloader":
        """Offload `model`'s blocks (model_blocks) and move everything else (embedders, refiner, final layer,
        audio modules) to `device`, where it stays."""
        blocks = model_blocks(model)
        offloader = cls(blocks, device, ahead)
        inside = {id(m) for b in blocks for m in b.modules()}
        for module in model.modules():
            if id(module) in inside:
                continue
            for p in module._parameters.values():
                if p is not None:
                    p.data = p.data.to(offloader.device)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(offloader.device)
        return offloader

    # -------------------------------------------------------------- the copies
    def block_bytes(self, i: int) -> int:
        return sum(t.host.numel() * t.host.element_size() for t in self.tensors[i])

    def _materialise(self, i: int) -> None:
        if i in self.live:
            return
        items = self.tensors[i]
        if self.stream is None:  # host == device: fresh copies, as a device copy would be
            copies, event = [t.host.to(self.device, copy=True) for t in items], None
        else:
            with torch.cuda.stream(self.stream):  # allocated and filled on the side stream
                copies = [t.host.to(self.device, non_blocking=True) for t in items]
                event = torch.cuda.Event()
                event.record(self.stream)
        for item, t in zip(items, copies):
            item.point_at(t)
        self.live[i] = (copies, event)
        self.copies += 1
        self.max_live = max(self.max_live, len(self.live))

    def _release(self, i: int) -> None:
        if self.live.pop(i, None) is None:
            return
        for item in self.tensors[i]:
            item.point_at(item.host)  # the device copies are dropped here (freed once the compute stream is done)

    def release_all(self) -> None:
        for i in list(self.live):
            self._release(i)
        self.done = None

    # -------------------------------------------------------------- hooks
    def _before(self, block: nn.Module, args) -> None:
        i = self.position[id(block)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
            raise RuntimeError("block offload is for sampling: run the model under torch.no_grad() with "
                               "requires_grad_(False) weights")
        # blocks outside this window are stale (a forward stopped by an exception, blocks run out of order)
        for j in [j for j in self.live if not i <= j <= i + self.ahead]:
            self._release(j)
        if self.done is not None:  # the previous block's kernels finished: its memory can take the next copy
            self.done.synchronize()
            self.done = None
        self._materialise(i)
        copies, event = self.live[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)  # the copy before the block's first kernel
            for t in copies:
                t.record_stream(compute)  # allocated on the side stream, used on this one
        for j in range(i + 1, min(i + 1 + self.ahead, len(self.blocks))):
            self._materialise(j)  # queued on the side stream: overlaps block i's compute

    def _after(self, block: nn.Module, args, output) -> None:
        self._release(self.position[id(block)])
        if self.stream is not None:  # recorded after the release, so after the allocator's own events for it
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(self.device))

    def detach(self) -> None:
        """Remove the hooks; every block is left pointing at its host tensors."""
        self.release_all()
        for h in self.handles:
            h.remove()
        self.handles = []


def free_device_memory(device: torch.device) -> None:
    """After the last reference to a loaded model is dropped: collect it and return the cached blocks to the
    driver, so the next model (or a process beside this one) can use them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
