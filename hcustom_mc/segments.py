"""Per-segment attention: what every rank computes on the tokens it holds, with the release's padding semantics.

Below both the model (model/attention.py, the blocks' joint attention) and the context-parallel strategies
(parallel/context.py), which both call `segment_attention`; it imports neither.

The release packs each sample as two variable-length segments for flash-attn varlen:
[image + valid text] and [text padding]. So valid tokens never attend to padded text, and padded
tokens attend only to padding. Every backend here implements exactly that, and a padded batch is
always one call per segment kind (never a loop over samples):

  fa3     FlashAttention-3 (`flash_attn_interface`, Hopper only), varlen with cu_seqlens
  cudnn   torch SDPA with the cuDNN attention backend first (sm80+, cuDNN >= 9)
  flash   flash-attn 2 varlen
  te      transformer-engine DotProductAttention, THD format with the same cu_seqlens
  sdpa    torch SDPA (any device): per batch one call over all rows with a [B, 1, 1, S] key mask
          (valid keys) and one small call over the text rows with the padding-key mask; rows
          are then taken from the call of their segment. No S x S mask is built.

On GPU in fp16/bf16 `auto` tries them in the order above (the kernel speed order at head dim 128 on
Hopper, see shared/reference/performance-facts.md). `HCUSTOM_ATTN_BACKEND` forces one; the chosen
path is logged once. The decision is `choose_backend(device_type, dtype, capability, available)`,
a pure function, so it is tested on CPU. The segment descriptors (cu_seqlens, key masks) are built
once per forward on the device (`Segments` caches them), not per attention call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from hcustom_mc.console import log_once

BACKENDS = ("auto", "fa3", "cudnn", "flash", "te", "sdpa")
VARLEN = ("fa3", "flash", "te")  # the backends that take packed [B*S] tokens + cu_seqlens


@dataclass
class Segments:
    """Per-sample split of a length-`seq_len` sequence into [0, valid) and [valid, seq_len).

    Built once per forward; the device-side descriptors are cached on it, so every layer reuses them."""

    seq_len: int
    valid: list[int]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_text_mask(cls, image_len: int, text_mask: torch.Tensor) -> "Segments":
        lengths = text_mask.sum(dim=1).tolist()  # one host sync per forward, not per layer
        return cls(seq_len=image_len + text_mask.shape[1], valid=[image_len + int(n) for n in lengths])

    def cu_seqlens(self, device) -> tuple[torch.Tensor, int]:
        """Boundaries of the packed [B*S] sequence, empty padding segments dropped (cached per device)."""
        key = ("cu", str(device))
        if key not in self._cache:
            bounds, max_len = [0], 0
            for b, v in enumerate(self.valid):
                start = b * self.seq_len
                for end in (start + v, start + self.seq_len):
                    if end > bounds[-1]:
                        max_len = max(max_len, end - bounds[-1])
                        bounds.append(end)
            self._cache[key] = (torch.tensor(bounds, dtype=torch.int32, device=device), max_len)
        return self._cache[key]

    def key_masks(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For the masked SDPA path with unequal valid lengths (cached per device):
        valid_keys [B, 1, 1, S]: key j < valid[b];  tail from lo = min(valid):
        pad_keys [B, 1, 1, S-lo]: key lo+j >= valid[b] (every key for a sample without padding, whose
        tail rows are discarded anyway: no row is ever fully masked, so no NaN even in unused rows);
        pad_rows [B, 1, S-lo, 1]: row lo+i is padding of sample b."""
        key = ("masks", str(device))
        if key not in self._cache:
            pos = torch.arange(self.seq_len, device=device)
            valid = torch.tensor(self.valid, device=device)
            lo = min(self.valid)
            valid_keys = pos[None, :] < valid[:, None]
            pad = pos[None, lo:] >= valid[:, None]
            unpadded = (valid == self.seq_len)[:, None]
            self._cache[key] = (valid_keys[:, None, None, :], (pad | unpadded)[:, None, None, :],
                                pad[:, None, :, None], lo)
        return self._cache[key]


@lru_cache(maxsize=None)
def _fa3():
    try:
        from flash_attn_interface import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:
        return None


@lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:
        return None


@lru_cache(maxsize=None)
def _te_attention(heads: int, head_dim: int):
    try:
        from transformer_engine.pytorch import DotProductAttention
    except Exception:
        return None
    return DotProductAttention(heads, head_dim, attention_dropout=0.0, qkv_format="thd", attn_mask_type="padding")


def _cudnn_sdpa_usable() -> bool:
    """cuDNN attention through torch SDPA: a torch that has the backend and cuDNN >= 9."""
    try:
        from torch.nn.attention import SDPBackend

        SDPBackend.CUDNN_ATTENTION  # noqa: B018
        return bool(torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000)
    except Exception:
        return False


def available_backends(heads: int = 1, head_dim: int = 64) -> dict[str, bool]:
    """Which kernels this process can call (imports are lazy and cached)."""
    te = False
    if torch.cuda.is_available():
        try:
            te = _te_attention(heads, head_dim) is not None
        except Exception:
            te = False
    return {"fa3": _fa3() is not None, "cudnn": _cudnn_sdpa_usable(), "flash": _flash_attn() is not None,
            "te": te, "sdpa": True}


def backend_order(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> list[str]:
    """The kernels worth trying for this device and dtype, fastest first."""
    order = []
    if device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and capability is not None:
        if capability[0] == 9:  # FA3's kernels are written for Hopper (sm90) only
            order.append("fa3")
        if capability >= (8, 0):  # cuDNN fused attention and FA2 need Ampere or newer
            order += ["cudnn", "flash"]
        order.append("te")
    return order + ["sdpa"]


def choose_backend(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None,
                   available: dict[str, bool], wanted: str = "auto") -> str:
    """The attention kernel for these arguments: `wanted`, or under auto the first usable in backend_order."""
    if wanted not in BACKENDS:
        raise ValueError(f"HCUSTOM_ATTN_BACKEND must be one of {BACKENDS}, got {wanted!r}")
    order = backend_order(device_type, dtype, capability)
    if wanted == "auto":
        return next(name for name in order if available.get(name, name == "sdpa"))
    if wanted not in order or not available.get(wanted, wanted == "sdpa"):
        raise RuntimeError(f"attention backend {wanted!r} requested but not usable here ({device_type}, {dtype}, "
                           f"capability {capability}; usable: {[n for n in order if available.get(n)]})")
    return wanted


def select_backend(q: torch.Tensor) -> str:
    wanted = os.environ.get("HCUSTOM_ATTN_BACKEND", "auto")
    cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    choice = choose_backend(q.device.type, q.dtype, cap, _available(q.shape[2], q.shape[3]), wanted)
    log_once(f"attention backend: {_NAMES[choice]}")
    return choice


@lru_cache(maxsize=None)
def _available(heads: int, head_dim: int) -> dict[str, bool]:
    return available_backends(heads, head_dim)


_NAMES = {"fa3": "FlashAttention-3 varlen (flash_attn_interface)", "cudnn": "torch SDPA, cuDNN attention first",
          "flash": "flash-attn 2 varlen", "te": "transformer-engine THD", "sdpa": "torch SDPA (one masked call per segment kind)"}


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """q, k, v: [S, B, heads, D]. Returns [S, B, heads*D]."""
    S, B, H, D = q.shape
    backend = select_backend(q)
    if backend in VARLEN:
        pack = lambda t: t.transpose(0, 1).reshape(B * S, H, D)  # noqa: E731
        cu, max_len = segments.cu_seqlens(q.device)
        if backend == "fa3":
            out = _fa3()(pack(q), pack(k), pack(v), cu, cu, max_len, max_len)
            out = out[0] if isinstance(out, tuple) else out  # older FA3 builds also return the LSE
        elif backend == "flash":
            out = _flash_attn()(pack(q), pack(k), pack(v), cu, cu, max_len, max_len, dropout_p=0.0, causal=False)
        else:
            out = _te_attention(H, D)(
                pack(q), pack(k), pack(v), cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
            )
        return out.reshape(B, S, H * D).transpose(0, 1)
    if backend == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        prefer = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        try:
            ctx = sdpa_kernel(prefer, set_priority=True)  # cuDNN first; others where it cannot (e.g. masks)
        except TypeError:  # torch without priorities: restrict to the list, torch picks among it
            ctx = sdpa_kernel(prefer)
        with ctx:
            return sdpa_segment_attention(q, k, v, segments)
    return sdpa_segment_attention(q, k, v, segments)


def sdpa_segment_attention(q, k, v, segments: Segments) -> torch.Tensor:
    """Torch SDPA with the segment semantics; one call per segment kind for the whole batch."""
    S, B, H, D = q.shape
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, S, D]
    if len(set(segments.valid)) == 1:  # equal valid lengths (B = 1 always): no mask at all
        n = segments.valid[0]
        parts = [F.scaled_dot_product_attention(qb[:, :, :n], kb[:, :, :n], vb[:, :, :n])]
        if n < S:
            parts.append(F.scaled_dot_product_attention(qb[:, :, n:], kb[:, :, n:], vb[:, :, n:]))
        out = torch.cat(parts, dim=2)
    else:
        valid_keys, pad_keys, pad_rows, lo = segments.key_masks(q.device)
        # every row against the valid keys of its sample: right for valid rows (all of rows < lo)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid_keys)
        # rows >= lo against the padding keys: right for padded rows; the rest is discarded below
        tail = F.scaled_dot_product_attention(qb[:, :, lo:], kb[:, :, lo:], vb[:, :, lo:], attn_mask=pad_keys)
        out = torch.cat([out[:, :, :lo], torch.where(pad_rows, tail, out[:, :, lo:])], dim=2)
    return out.permute(2, 0, 1, 3).reshape(S, B, H * D)


def sdpa_segment_attention_looped(q, k, v, segments: Segments) -> torch.Tensor:
    """Reference: one unmasked SDPA call per sample and segment (what the single-call path must equal)."""
    S, B, H, D = q.shape
    outs = []
    for b, n in enumerate(segments.valid):
        qb, kb, vb = (t[:, b : b + 1].permute(1, 2, 0, 3) for t in (q, k, v))
        parts = [F.scaled_dot_product_attention(qb[:, :, :n], kb[:, :, :n], vb[:, :, :n])]
        if n < S:
            parts.append(F.scaled_dot_product_attention(qb[:, :, n:], kb[:, :, n:], vb[:, :, n:]))
        outs.append(torch.cat(parts, dim=2))
    return torch.cat(outs, dim=0).permute(2, 0, 1, 3).reshape(S, B, H * D)
