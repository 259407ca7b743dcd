"""Weights-only initialisation of a (parallel) model from a released, diffusers or megatron-core checkpoint.

`--pretrained PATH` for fine-tuning: no optimizer state, no step, any TP/PP/VPP/CP/DP layout. Every rank
checks the source's keys and shapes against the WHOLE model (so each rank reports the same complete list),
then reads only its own part:

  release   `*_model_states.pt` (`module` or `ema`), memory-mapped; each rank copies its TP slices of the
            tensors its pipeline stage holds (only those pages are read)
  diffusers a HunyuanVideoTransformer3DModel folder; each rank opens the safetensors lazily and fuses only
            the release tensors its stage holds (q/k/v -> qkv etc., see diffusers_format)
  mcore     a megatron-core checkpoint (ours, or a `--save` folder's iter_*); megatron reads this rank's
            shards; `ema` reads the EMA weights a training run saved

Modules the source lacks (fine-tuning the base model into the audio or editing variant) are initialised as a
fresh model initialises them (hcustom_mc.model.init: AudioNet's output projection zero, so the new branch
starts as the identity) only when named by `allow_missing` prefixes; any other missing or unexpected key or
shape mismatch raises PretrainedError with the full list, before any weight is touched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hcustom_mc.parallel.sharding import get_tp_split, shard_full_tensor

log = logging.getLogger("hcustom_mc")
FORMATS = ("auto", "release", "diffusers", "mcore")
KEYS = ("module", "ema")
MCORE_PREFIX = {"module": "model.", "ema": "ema."}


class PretrainedError(ValueError):
    """The pretrained source does not fit the model (message lists every problem) or cannot be read."""


def detect_format(path: str | Path) -> str:
    """release (a .pt file or a folder of one), diffusers (config.json + safetensors) or mcore (metadata.json)."""
    path = Path(path)
    if not path.exists():
        raise PretrainedError(f"--pretrained {path} does not exist")
    if path.is_file():
        if path.suffix == ".pt":
            return "release"
        raise PretrainedError(f"--pretrained {path}: a file must be a released *.pt checkpoint")
    if (path / "metadata.json").is_file():
        return "mcore"
    if (path / "latest").is_file():
        raise PretrainedError(f"--pretrained {path} is a training --save folder: name one of its iter_* folders")
    if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
        return "diffusers"
    if any(path.glob("*_model_states.pt")) or any(path.glob("pytorch_model_*.pt")):
        return "release"
    raise PretrainedError(f"--pretrained {path}: not a release .pt, a diffusers folder or a megatron-core checkpoint; "
                          "pass --pretrained-format")


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """Full (release-layout, TP=1) shapes of every tensor, and a reader of one full tensor."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor] | None  # None for mcore: megatron reads the shards itself
    description: str
    close: Callable[[], None] = field(default=lambda: None)


def _release_source(path: Path, key: str) -> Source:
    from hcustom_mc.checkpoint.release import load_release_state_dict

    sd = load_release_state_dict(path, load_key=key)  # memory-mapped; fp8 files are dequantised
    return Source({k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__, f"release {path} [{key}]")


def _diffusers_source(path: Path) -> Source:
    from safetensors import safe_open

    from hcustom_mc.checkpoint.diffusers_format import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, diffusers_rows, fuse_release_tensor

    folder = path if (path / "config.json").is_file() else path / "transformer"
    if (folder / WEIGHTS_NAME).is_file():
        handles = {WEIGHTS_NAME: safe_open(str(folder / WEIGHTS_NAME), framework="pt")}
        where = {k: WEIGHTS_NAME for k in handles[WEIGHTS_NAME].keys()}
    elif (folder / WEIGHTS_INDEX_NAME).is_file():
        where = json.loads((folder / WEIGHTS_INDEX_NAME).read_text()).get("weight_map") or {}
        files = set(where.values())
        bad = sorted(f for f in files if Path(f).name != f or not (folder / f).is_file())
        if bad:
            raise PretrainedError(f"{folder / WEIGHTS_INDEX_NAME} names shards that are not files in {folder}: {bad}")
        handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
    else:
        raise PretrainedError(f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    rows = diffusers_rows(where)
    known = {d for _, difs, _ in rows for d in difs}
    shapes, rules = {}, {}
    for rel, difs, kind in rows:
        if not all(d in where for d in difs):
            continue  # reported as a missing release key
        part_shapes = [tuple(handles[where[d]].get_slice(d).get_shape()) for d in difs]
        shape = list(part_shapes[0])
        if len(difs) > 1:  # fused along dim 0 (q/k/v, linear1)
            shape[0] = sum(s[0] for s in part_shapes)
        shapes[rel], rules[rel] = tuple(shape), (difs, kind)
    for k in where:
        if k not in known:
            shapes[f"<diffusers>{k}"] = tuple(handles[where[k]].get_slice(k).get_shape())  # reported as unexpected

    def read(rel: str) -> torch.Tensor:
        difs, kind = rules[rel]
        return fuse_release_tensor(rel, difs, kind, [handles[where[d]].get_tensor(d) for d in difs], copy=False)

    return Source(shapes, read, f"diffusers {folder}")


def _mcore_source(path: Path, key: str, model_params: dict[str, torch.Tensor]) -> Source:
    from hcustom_mc.checkpoint.safe_load import dist_load_tensors_metadata

    prefix = MCORE_PREFIX[key]
    meta = dist_load_tensors_metadata(path)
    stored: dict[str, list] = {}
    for k, t in meta.items():
        if k.startswith(prefix):
            base, _, seg = k[len(prefix):].partition("#seg")
            stored.setdefault(base, []).append((int(seg or 0), tuple(t.global_shape)))
    if not stored:
        found = sorted({k.split(".", 1)[0] for k in meta})
        raise PretrainedError(f"{path} holds no {key!r} weights (no {prefix}* tensors; prefixes found: {found})")
    shapes = {}
    for name, segs in stored.items():
        segs = [s for _, s in sorted(segs)]
        split = get_tp_split(model_params[name]) if name in model_params else None
        if len(segs) == 1 or split is None:
            shapes[name] = segs[0]
        else:
            full = list(segs[0])
            full[split.dim] = sum(s[split.dim] for s in segs)
            shapes[name] = tuple(full)
    return Source(shapes, None, f"mcore {path} [{key}]")


# ----------------------------------------------------------------------------- checking
def full_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> full (TP=1) shape of every weight of `model` (a meta build is fine)."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        shape = list(t.shape)
        split = get_tp_split(t)
        if split is not None:
            shape[split.dim] = sum(split.segments)
        out[name] = tuple(shape)
    return out


def check_fit(expected: dict[str, tuple[int, ...]], source: dict[str, tuple[int, ...]],
              allow_missing: tuple[str, ...], what: str) -> list[str]:
    """Raise PretrainedError listing every problem; return the (allowed) missing names."""
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected))
    allowed = [m for m in missing if m.startswith(allow_missing)]
    refused = [m for m in missing if not m.startswith(allow_missing)]
    shapes = [f"{n}: source {source[n]} != model {expected[n]}" for n in sorted(set(expected) & set(source))
              if tuple(source[n]) != tuple(expected[n])]
    problems = []
    if refused:
        hint = sorted({m.split(".", 1)[0] + "." for m in refused})
        problems.append(f"missing keys ({len(refused)}; if these modules are new in this model, initialise them with "
                        f"--pretrained-allow-missing {' '.join(hint)}): {refused}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {[u.replace('<diffusers>', '') for u in unexpected]}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes}")
    if problems:
        raise PretrainedError(f"{what} does not fit the model:\n  - " + "\n  - ".join(problems))
    return allowed


# ----------------------------------------------------------------------------- loading
@dataclass
class PretrainedReport:
    description: str
    format: str
    loaded: int  # tensors loaded into this rank's chunks
    initialised: list[str]  # whole-model names initialised fresh (allowed missing)


def load_pretrained(chunks: list[torch.nn.Module], whole: torch.nn.Module, path: str | Path, fmt: str = "auto",
                    key: str = "module", allow_missing: tuple[str, ...] = (),
                    init: Callable[[torch.nn.Module, set[str]], None] | None = None) -> PretrainedReport:
    """Collective for mcore. Fill this rank's model `chunks` from `path`; `whole` is a meta build of the whole
    model (the key check). `init(chunk, names)` initialises the allowed missing parameters of a chunk."""
    path = Path(path)
    if fmt not in FORMATS:
        raise PretrainedError(f"--pretrained-format must be one of {FORMATS}, got {fmt!r}")
    if key not in KEYS:
        raise PretrainedError(f"--pretrained-key must be one of {KEYS}, got {key!r}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "diffusers" and key != "module":
        raise PretrainedError("--pretrained-key ema applies to release and mcore sources (diffusers folders hold one set)")
    expected = full_shapes(whole)
    whole_params = whole.state_dict(keep_vars=True)
    try:
        if fmt == "release":
            source = _release_source(path, key)
        elif fmt == "diffusers":
            source = _diffusers_source(path)
        else:
            source = _mcore_source(path, key, whole_params)
    except PretrainedError:
        raise
    except Exception as exc:  # a damaged or foreign file: name it
        raise PretrainedError(f"cannot read --pretrained {path} as {fmt}: {type(exc).__name__}: {exc}") from None
    missing = check_fit(expected, source.shapes, tuple(allow_missing), source.description)

    loaded = 0
    if fmt == "mcore":
        loaded = _load_mcore(chunks, path, MCORE_PREFIX[key], set(source.shapes))
    else:
        from megatron.core import parallel_state as ps

        rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        with torch.no_grad():
            for chunk in chunks:
                for name, param in chunk.state_dict(keep_vars=True).items():  # this stage's tensors only
                    if name.endswith("_extra_state") or name not in source.shapes:
                        continue
                    full = source.read(name)
                    split = get_tp_split(param)
                    part = full if split is None or tp == 1 else shard_full_tensor(full, split, rank, tp)
                    param.copy_(part)  # to the parameter's device and dtype
                    loaded += 1
    if missing and init is not None:
        for chunk in chunks:
            init(chunk, set(missing))
    return PretrainedReport(source.description, fmt, loaded, missing)


def _load_mcore(chunks, path: Path, prefix: str, present: set[str]) -> int:
    from hcustom_mc.checkpoint.mcore import model_sharded_state_dict
    from hcustom_mc.checkpoint.safe_load import dist_load

    sharded, targets = {}, {}
    for i, chunk in enumerate(chunks):
        names = {n for n in chunk.state_dict(keep_vars=True) if n in present}
        part = model_sharded_state_dict(chunk, prefix=prefix, keep_vars=False, names=names)
        sharded.update({f"chunk{i}.{n}": v for n, v in part.items()})
        targets.update({f"chunk{i}.{n}": (i, n) for n in part})
    loaded = dist_load(sharded, path, strict="assume_ok_unexpected")
    params = [chunk.state_dict(keep_vars=True) for chunk in chunks]
    with torch.no_grad():
        for k, tensor in loaded.items():
            i, name = targets[k]
            params[i][name].copy_(tensor)
    return len(loaded)
