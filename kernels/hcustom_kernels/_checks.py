"""Input checks shared by the kernel launchers: raised before any work, naming the kernel and input."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("triton", "torch")


def check_backend(name: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")


def check_float_tensors(name: str, tensors: dict, same_dtype: tuple[str, ...] | None = None,
                        dtype_hint: str = "cast all inputs to one dtype") -> None:
    """Every entry a tensor of a supported float dtype, all on one device; the entries named in
    `same_dtype` (default: all) share one dtype."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {key} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: {key} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    dtypes = {key: tensors[key].dtype for key in (same_dtype or tensors)}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{name}: mixed dtypes {dtypes}; {dtype_hint}")
    devices = {key: t.device for key, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{name}: inputs on different devices {devices}")
