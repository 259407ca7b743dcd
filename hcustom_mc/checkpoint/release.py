"""Released HunyuanCustom / HunyuanVideo checkpoint files (the `release` layout).

The released DiT weights are DeepSpeed-style `torch.save` dicts: `{"module": state_dict}` in
`mp_rank_00_model_states.pt` (the `"ema"` key is also accepted, `--load-key`), or bare state dicts
in HunyuanVideo's `pytorch_model_{module,ema}.pt`. Our model's parameter names are exactly the
released ones, so every function here works on plain `dict[str, Tensor]`.

FP8 pair (facts file 1.7): `..._fp8.pt` holds float8_e4m3fn weights for every Linear weight inside
`double_blocks`/`single_blocks` (everything else as stored), and `..._fp8_map.pt` holds one
per-tensor scale per Linear, `torch.load(map)["module"][linear_name]` (HunyuanCustom wraps the map
in `"module"`, HunyuanVideo's map is flat; both are read). Our per-channel export (`convert --fp8
per-channel`) stores a 1-D [out] scale instead, which every reader here accepts. `read_release_fp8`
returns the pair as stored (for `sample --fp8-weights on`, which keeps the weights fp8);
`load_release_state_dict` dequantises it.

Safety: every file is read with `torch.load(weights_only=True)`, so no arbitrary object is ever
unpickled. The only non-tensor class allowed in addition to torch's own weights-only allowlist is
`argparse.Namespace` (DeepSpeed-style checkpoints may carry the training `args`; it is
attribute-only data). A file that needs anything else fails with `CheckpointFormatError` naming
the file.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "CheckpointFormatError",
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_BLOCK_MARKERS",
    "MODEL_STATES_NAME",
    "FP8_NAME",
    "FP8_MAP_NAME",
    "load_release_state_dict",
    "save_release_state_dict",
    "quantize_release_fp8",
    "dequantize_release_fp8",
    "read_release_fp8",
    "is_release_fp8",
    "fp8_effective_scale",
    "save_release_fp8",
    "is_fp8_quantized_weight",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_BLOCK_MARKERS = ("double_blocks", "single_blocks")
MODEL_STATES_NAME = "mp_rank_00_model_states.pt"
FP8_NAME = "mp_rank_00_model_states_fp8.pt"
FP8_MAP_NAME = "mp_rank_00_model_states_fp8_map.pt"
FP8_DEQUANT_MODES = ("release", "fp32")

# Classes allowed on top of torch's weights-only allowlist (see the module docstring).
_EXTRA_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointFormatError(ValueError):
    """A checkpoint file or state dict that does not have the expected format."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _safe_torch_load(path: Path) -> Any:
    """`torch.load` restricted to tensors and plain containers; memory-mapped where possible."""
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint file not found: {path}")
    with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
        try:
            try:
                return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
            except RuntimeError as err:
                # Legacy (pre-zipfile) torch.save files cannot be memory-mapped; read them whole.
                if "mmap" not in str(err):
                    raise
                return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as err:
            text = " ".join(str(err).split())
            detail = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0].strip()
            if "Unsupported global" in text:
                raise CheckpointFormatError(
                    f"refusing to load {path}: it contains pickled Python objects other than tensors and "
                    f"plain containers, which would need arbitrary (unsafe) unpickling ({detail[:300]}). "
                    f"Re-save just its state dict, `torch.save({{'module': state_dict}}, ...)`, in a trusted "
                    f"environment."
                ) from err
            raise CheckpointFormatError(
                f"cannot read {path} as a weights-only torch checkpoint: {detail[:300] or text[:300]}"
            ) from err
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointFormatError(f"cannot read {path} as a torch checkpoint: {err}") from err


def _resolve_checkpoint_path(path: Path, load_key: str) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointFormatError(f"checkpoint path not found: {path}")
    if not path.is_dir():
        raise CheckpointFormatError(f"checkpoint path is neither a file nor a directory: {path}")
    candidates = sorted(path.glob("*_model_states.pt"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise CheckpointFormatError(
            f"{path} holds several *_model_states.pt files; pass one of them explicitly: "
            f"{[c.name for c in candidates]}"
        )
    bare = path / f"pytorch_model_{load_key}.pt"
    if bare.is_file():  # HunyuanVideo's bare-state-dict layout
        return bare
    present = sorted(p.name for p in path.glob("*.pt"))
    raise CheckpointFormatError(
        f"{path} holds no *_model_states.pt (nor pytorch_model_{load_key}.pt); .pt files present: {present}. "
        f"FP8 checkpoints must be passed as the ..._fp8.pt file itself."
    )


def _is_flat_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, load_key: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path} does not hold a dict (got {type(obj).__name__})")
    if load_key in obj:
        sd = obj[load_key]
        if not isinstance(sd, Mapping):
            raise CheckpointFormatError(f"{path}[{load_key!r}] is a {type(sd).__name__}, not a state dict")
    elif _is_flat_tensor_dict(obj) and "module" not in obj and "ema" not in obj:
        # A bare state dict (HunyuanVideo's pytorch_model_*.pt); the release loads these unwrapped too.
        sd = obj
    else:
        raise CheckpointFormatError(
            f"{path} has no {load_key!r} entry; its top-level keys are {sorted(map(str, obj.keys()))}"
        )
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointFormatError(f"{path}[{load_key!r}] holds non-tensor entries: {bad}")
    return dict(sd)


def _fp8_map_path(fp8_path: Path) -> Path:
    return fp8_path.with_name(fp8_path.name[: -len(".pt")] + "_map.pt")


def _unwrap_fp8_map(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"fp8 map {path} does not hold a dict (got {type(obj).__name__})")
    if "module" in obj and isinstance(obj["module"], Mapping):
        obj = obj["module"]  # HunyuanCustom
    # else: HunyuanVideo's flat {linear_name: scale}
    return {(k[: -len(".weight")] if k.endswith(".weight") else k): v for k, v in obj.items()}


def _check_fp8(fp8_sd: Mapping[str, torch.Tensor], fp8_map: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Every float8_e4m3fn `<linear>.weight` with its scale: {linear: fp32 scale, () per-tensor or [out]
    per output channel}. Every problem of the pair is listed in one CheckpointFormatError."""
    from hcustom_mc.model.fp8 import Fp8Error, check_scale

    scales = _unwrap_fp8_map(fp8_map, Path(source))
    out: dict[str, torch.Tensor] = {}
    no_scale, not_weight, bad_scale, e5m2 = [], [], [], []
    for key, t in fp8_sd.items():
        if t.dtype == torch.float8_e5m2:
            e5m2.append(key)
            continue
        if t.dtype != FP8_DTYPE:
            continue
        if not key.endswith(".weight") or t.ndim != 2:
            not_weight.append(key)
            continue
        name = key[: -len(".weight")]
        if name not in scales:
            no_scale.append(name)
            continue
        try:
            out[name] = check_scale(scales[name], t.shape[0], name)
        except Fp8Error as err:
            bad_scale.append(str(err))
    errors = []
    if e5m2:
        errors.append(f"float8_e5m2 tensors (the release format is float8_e4m3fn): {e5m2}")
    if not_weight:
        errors.append(f"float8 tensors that are not Linear weights: {not_weight}")
    if no_scale:
        errors.append(f"float8 weights with no scale in the fp8 map: {no_scale}")
    errors += bad_scale
    # A scale whose weight is stored un-quantised is ambiguous (the release would cast it to fp8
    # without scaling and then multiply by the scale); refuse rather than guess.
    unscaled = sorted(
        n for n in scales if f"{n}.weight" in fp8_sd and fp8_sd[f"{n}.weight"].dtype != FP8_DTYPE
    )
    if unscaled:
        errors.append(f"the fp8 map has scales for weights not stored as float8_e4m3fn: {unscaled}")
    if errors:
        raise CheckpointFormatError(f"{source}: invalid fp8 checkpoint:\n  - " + "\n  - ".join(errors))
    return out


def fp8_effective_scale(scale: torch.Tensor, mode: str = "release") -> torch.Tensor:
    """The fp32 scale a dequantisation in `mode` multiplies by (release: the scale rounded to bf16, as the
    released runtime; fp32: as stored)."""
    if mode not in FP8_DEQUANT_MODES:
        raise CheckpointFormatError(f"fp8 dequant mode must be one of {FP8_DEQUANT_MODES}, got {mode!r}")
    return scale.to(torch.bfloat16).to(torch.float32) if mode == "release" else scale.to(torch.float32)


def dequantize_release_fp8(
    fp8_sd: Mapping[str, torch.Tensor],
    fp8_map: Mapping[str, Any],
    mode: str = "release",
    *,
    source: str = "<state dict>",
) -> dict[str, torch.Tensor]:
    """Dequantise every float8_e4m3fn `<linear>.weight` with its scale to bfloat16.

    `fp8_map` maps linear names (with or without `.weight`; optionally wrapped in `"module"`) to
    scales: one value (per-tensor, the release) or a 1-D [out] tensor (per output channel, our
    `convert --fp8 per-channel` export). Tensors that are not fp8 are returned unchanged (same objects).

    mode="release" (default) reproduces the released runtime bit for bit: it keeps the scale as
    `scale.to(bf16)` and computes `w_fp8.to(bf16) * scale_bf16`. That product is computed exactly
    in fp32 (4-bit x 8-bit significands) and rounded once to bf16, on any device, so we compute
    `(w.float() * scale.to(bf16).float()).to(bf16)`.
    mode="fp32": `(w.float() * scale_fp32).to(bf16)`: keeps the full-precision scale (closer to the
    weights the map was made from when the stored scales are fp32, but not what the release runs).
    The two agree whenever the stored scale is already bf16-representable (per-channel exports are).
    """
    from hcustom_mc.model.fp8 import dequantize_weight

    if mode not in FP8_DEQUANT_MODES:
        raise CheckpointFormatError(f"fp8 dequant mode must be one of {FP8_DEQUANT_MODES}, got {mode!r}")
    scales = _check_fp8(fp8_sd, fp8_map, source)
    out: dict[str, torch.Tensor] = {}
    for key, t in fp8_sd.items():
        name = key[: -len(".weight")]
        if t.dtype == FP8_DTYPE:
            out[key] = dequantize_weight(t, fp8_effective_scale(scales[name], mode), torch.bfloat16)
        else:
            out[key] = t
    return out


def read_release_fp8(
    path: str | os.PathLike, load_key: str = "module"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An `..._fp8.pt` file and its `..._fp8_map.pt`, NOT dequantised: (state dict with the float8_e4m3fn
    weights as stored, memory-mapped, {linear: fp32 scale as stored, () or [out]}), checked as
    `dequantize_release_fp8` checks them."""
    file = _resolve_checkpoint_path(Path(path), load_key)
    if not file.name.endswith("_fp8.pt"):
        raise CheckpointFormatError(f"{file} is not an fp8 checkpoint (..._fp8.pt with its ..._fp8_map.pt)")
    map_file = _fp8_map_path(file)
    if not map_file.is_file():
        raise CheckpointFormatError(f"{file} is an fp8 checkpoint but its scale map {map_file} is missing")
    sd = _unwrap(_safe_torch_load(file), load_key, file)
    return sd, _check_fp8(sd, _safe_torch_load(map_file), str(file))


def is_release_fp8(path: str | os.PathLike) -> bool:
    """Whether `path` names a release fp8 weights file (`..._fp8.pt`)."""
    p = Path(path)
    return p.is_file() and p.name.endswith("_fp8.pt")


def load_release_state_dict(
    path: str | os.PathLike, load_key: str = "module", *, fp8_dequant: str = "release"
) -> dict[str, torch.Tensor]:
    """Load a released (or release-layout) DiT state dict.

    `path`: a `*_model_states.pt` file, a `pytorch_model_{module,ema}.pt` file, a directory holding
    exactly one `*_model_states.pt` (falling back to `pytorch_model_{load_key}.pt`), or an
    `..._fp8.pt` file, whose sibling `..._fp8_map.pt` must exist; fp8 weights are then dequantised
    to bfloat16 (see `dequantize_release_fp8` for `fp8_dequant`).
    `load_key`: the entry holding the weights (`"module"` or `"ema"`); a bare flat state dict of
    tensors (HunyuanVideo's `pytorch_model_*.pt`) is returned as is.
    Tensors are memory-mapped from the file where the file format allows it (not the fp8 weights,
    which are materialised by the dequantisation).
    """
    file = _resolve_checkpoint_path(Path(path), load_key)
    if file.name.endswith("_fp8_map.pt"):
        raise CheckpointFormatError(f"{file} is an fp8 scale map; pass the matching ..._fp8.pt weights file instead")
    sd = _unwrap(_safe_torch_load(file), load_key, file)
    if file.name.endswith("_fp8.pt"):
        map_file = _fp8_map_path(file)
        if not map_file.is_file():
            raise CheckpointFormatError(f"{file} is an fp8 checkpoint but its scale map {map_file} is missing")
        return dequantize_release_fp8(sd, _safe_torch_load(map_file), fp8_dequant, source=str(file))
    fp8 = sorted(k for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    if fp8:
        raise CheckpointFormatError(
            f"{file} holds float8 tensors but is not named ..._fp8.pt, so no scale map can be found: {fp8[:20]}"
        )
    return sd


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage; copy views so each file holds only its own bytes."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _check_state_dict(sd: Mapping[str, Any]) -> None:
    if not isinstance(sd, Mapping):
        raise CheckpointFormatError(f"expected a dict of tensors, got {type(sd).__name__}")
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointFormatError(f"state dict entries that are not str -> Tensor: {bad}")


def _target_file(path: str | os.PathLike, default_name: str) -> Path:
    p = Path(path)
    if p.is_dir() or str(path).endswith(os.sep):
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def save_release_state_dict(
    sd: Mapping[str, torch.Tensor], path: str | os.PathLike, load_key: str = "module",
    extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `{load_key: sd, **extra}` with torch.save (e.g. `extra={"ema": ema_sd}`, as the release stores its
    EMA weights); a directory path gets `mp_rank_00_model_states.pt`."""
    entries = {load_key: sd, **(extra or {})}
    for entry in entries.values():
        _check_state_dict(entry)
    file = _target_file(path, MODEL_STATES_NAME)
    torch.save({key: {k: _standalone(v) for k, v in entry.items()} for key, entry in entries.items()}, file)
    return file


def is_fp8_quantized_weight(name: str, t: torch.Tensor) -> bool:
    """The release quantises every nn.Linear weight whose module name contains double_/single_blocks."""
    return (
        name.endswith(".weight")
        and t.ndim == 2
        and t.is_floating_point()
        and any(m in name for m in FP8_BLOCK_MARKERS)
    )


def quantize_release_fp8(
    sd: Mapping[str, torch.Tensor], granularity: str = "per-tensor",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Produce the release's fp8 pair from a (bf16/fp32) state dict.

    Every 2-D `.weight` whose name contains `double_blocks` or `single_blocks` (the Linear weights
    of the blocks; the RMSNorm weights are 1-D) becomes float8_e4m3fn with
    `q = clamp(w.float() / scale, -448, 448).to(float8_e4m3fn)` (round to nearest even), scale:
    - per-tensor (the release's): one fp32 `amax / 448` (amax over |w| in fp32; an all-zero weight gets
      1.0 instead of 0), a 0-d tensor in the map;
    - per-channel: one scale per output row, a 1-D [out] fp32 tensor in the map, rounded up to a
      bf16-representable value (hcustom_mc.model.fp8.quantize_weight says why).
    Everything else is returned unchanged (same tensor objects).
    Returns `(fp8_sd, fp8_map)` with `fp8_map = {linear_name: scale}` (no `"module"` wrapper;
    `save_release_fp8` adds it).
    """
    from hcustom_mc.model.fp8 import GRANULARITIES, Fp8Error, quantize_weight

    if granularity not in GRANULARITIES:
        raise CheckpointFormatError(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _check_state_dict(sd)
    fp8_sd: dict[str, torch.Tensor] = {}
    fp8_map: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointFormatError(f"{key} is already a float8 tensor; quantise a bf16/fp32 state dict")
        if not is_fp8_quantized_weight(key, t):
            fp8_sd[key] = t
            continue
        try:
            fp8_sd[key], fp8_map[key[: -len(".weight")]] = quantize_weight(t.detach().cpu(), granularity)
        except Fp8Error as err:
            raise CheckpointFormatError(f"cannot quantise {key}: {err}") from None
    return fp8_sd, fp8_map


def save_release_fp8(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     granularity: str = "per-tensor") -> tuple[Path, Path]:
    """Quantise `sd` (`granularity`: see quantize_release_fp8) and write `mp_rank_00_model_states_fp8.pt` (`{"module": fp8_sd}`) and
    `mp_rank_00_model_states_fp8_map.pt` (`{"module": {linear_name: scale}}`) into directory `path`."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointFormatError(f"save_release_fp8 needs a directory, got the file {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    fp8_sd, fp8_map = quantize_release_fp8(sd, granularity)
    weights = save_release_state_dict(fp8_sd, directory / FP8_NAME)
    scales = directory / FP8_MAP_NAME
    torch.save({"module": fp8_map}, scales)
    return weights, scales
