"""Where tensors live: the one place that decides the process-group backend and the compute device.

NCCL with one GPU per rank when CUDA is available, gloo on CPU tensors otherwise.
`HCUSTOM_DIST_BACKEND=gloo` forces the CPU path on a CUDA host (e.g. a multi-process test with more
ranks than GPUs); `HCUSTOM_DIST_BACKEND=nccl` insists on CUDA and fails clearly without it.
Everything that places a tensor or module asks `compute_device()` (or takes a device argument that
defaults to it), so a CPU run exercises the same decisions a GPU run makes.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "HCUSTOM_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


def dist_backend() -> str:
    """'nccl' (CUDA tensors) or 'gloo' (CPU tensors) for this process."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "nccl" and not torch.cuda.is_available():
        raise RuntimeError(f"{BACKEND_ENV}=nccl but CUDA is not available on this host")
    if forced:
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def uses_cuda() -> bool:
    """True when this process computes on a GPU (the NCCL path)."""
    return dist_backend() == "nccl"


def local_cuda_index() -> int:
    """The GPU of this rank: LOCAL_RANK modulo the visible GPUs."""
    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


def compute_device() -> torch.device:
    """The device this process trains, samples or encodes on."""
    if uses_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device`, or `compute_device()` when None; a bare 'cuda' gets this rank's index."""
    if device is None:
        return compute_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def place_module(module: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """Move every parameter and buffer of `module` to `device` in place (parameter objects are kept,
    so attributes set on them survive); raise if anything is left elsewhere."""
    device = resolve_device(device)
    module.to(device)
    stray = misplaced(module, device)
    if stray:
        raise RuntimeError(f"tensors not on {device} after placement: {stray[:10]}")
    return module


def misplaced(module: torch.nn.Module, device: torch.device | str) -> list[str]:
    """Names (with their device) of the parameters and buffers of `module` that are not on `device`."""
    device = resolve_device(device)

    def same(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    named = [*module.named_parameters(), *module.named_buffers()]
    return [f"{n} ({t.device})" for n, t in named if not same(t)]


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): the CUDA caching allocator's peak on this rank's GPU, else the process's peak
    resident set (the host memory that holds everything on the CPU)."""
    if uses_cuda():
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident set size (ru_maxrss)"  # KiB


def encoder_dtype(device: torch.device | str) -> torch.dtype:
    """The encoders' (LLaVA, CLIP, Whisper, VAE) dtype on `device`: fp16 on a GPU, as the release runs them, fp32 on
    the CPU (no fast fp16 there)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
