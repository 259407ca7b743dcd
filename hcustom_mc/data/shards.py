"""Preprocessed-sample shards: the fast path training reads.

Layout of a shard folder:
    config.json                  the preprocessing settings (a restart with other settings is refused)
    shard_00000.safetensors      manifest samples [0, S), then [S, 2S), ...; written to a temporary name and
    shard_00001.safetensors      renamed when complete, so a file that exists is a finished shard
    index.json                   every usable sample: id, task, group key, shard, slot; and every skipped one

Inside a shard, sample slot j's tensors are named "j.<name>" (latents, text_states, text_mask, text_pooled,
identity_latents, audio_features, video_condition); the safetensors metadata "samples" holds, per slot,
{"id", "task", "group"} or {"id", "error": {"kind", "path", "reason"}} for a sample that could not be encoded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hcustom_mc.data.errors import DataError
from hcustom_mc.model.config import ConfigError

INDEX_FILE = "index.json"
CONFIG_FILE = "config.json"


def shard_path(root: str | Path, shard: int) -> Path:
    return Path(root) / f"shard_{shard:05d}.safetensors"


def write_shard(root: str | Path, shard: int, records: list[dict]) -> Path:
    """records[j] = {"id", "task", "group", "tensors": {...}} or {"id", "error": {...}}; atomic."""
    tensors, meta = {}, []
    for j, rec in enumerate(records):
        if "error" in rec:
            meta.append({"id": rec["id"], "error": rec["error"]})
            continue
        meta.append({"id": rec["id"], "task": rec["task"], "group": rec["group"]})
        for name, t in rec["tensors"].items():
            tensors[f"{j}.{name}"] = t.detach().cpu().contiguous()
    final = shard_path(root, shard)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"samples": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, final)  # atomic: a crash leaves either no shard or a whole one
    return final


def read_shard_samples(path: str | Path) -> list[dict]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["samples"])


def write_index(root: str | Path, num_shards: int) -> dict:
    """Collect the per-shard sample lists into index.json (run once, after every shard exists)."""
    root = Path(root)
    samples, skipped = [], []
    for s in range(num_shards):
        for j, rec in enumerate(read_shard_samples(shard_path(root, s))):
            if "error" in rec:
                skipped.append(rec)
            else:
                samples.append({**rec, "shard": s, "slot": j})
    index = {"num_shards": num_shards, "samples": samples, "skipped": skipped}
    tmp = root / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / INDEX_FILE)
    return index


def check_shard_settings(root: str | Path, cfg, model_cfg) -> None:
    """Refuse shards made for another model shape or clip setting (they would fail late or train wrongly)."""
    from hcustom_mc.model.config import ConfigError

    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a tools/preprocess.py shard folder")
    made = json.loads(path.read_text())
    want = {"mode": cfg.mode, "frames": cfg.data.frames, "frame_stride": cfg.data.frame_stride,
            "short_side": cfg.data.short_side, "text_len": cfg.data.text_len,
            "max_identity_images": model_cfg.max_identity_images}
    diff = [f"{k}: shards {made.get(k)!r}, training {v!r}" for k, v in want.items() if made.get(k) != v]
    if diff:
        raise ConfigError(f"{root} was preprocessed with other settings than this training run:\n  - " + "\n  - ".join(diff))


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REQUIRED = ("latents", "text_states", "text_mask", "text_pooled")
NDIM = {"latents": 4, "text_states": 2, "text_mask": 1, "text_pooled": 1, "identity_latents": 4, "video_condition": 4}


def _slot_problem(f, slot: int, check_finite: bool) -> str | None:
    """What is wrong with sample `slot` of an open shard (header-level: names, dtypes, shapes; values when
    `check_finite`), or None."""
    prefix = f"{slot}."
    names = {k[len(prefix):]: k for k in f.keys() if k.startswith(prefix)}
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        return f"slot {slot} lacks {missing}"
    shapes, dtypes = {}, {}
    for name, key in names.items():
        sl = f.get_slice(key)
        shapes[name] = tuple(sl.get_shape())
        dtypes[name] = sl.get_dtype()
        if name in NDIM and len(shapes[name]) != NDIM[name]:
            return f"slot {slot} {name} has shape {shapes[name]}, expected {NDIM[name]} dimensions"
    for name, dt in dtypes.items():
        wants_int = name == "text_mask"
        if wants_int != (dt in ("BOOL", "I8", "U8", "I16", "I32", "I64")) or (not wants_int and dt not in ("F32", "BF16", "F16")):
            return f"slot {slot} {name} has dtype {dt}"
    lat = shapes["latents"]
    if shapes["text_mask"][0] != shapes["text_states"][0]:
        return f"slot {slot} text_mask {shapes['text_mask']} does not match text_states {shapes['text_states']}"
    if "identity_latents" in shapes and (shapes["identity_latents"][0] != lat[0] or shapes["identity_latents"][2:] != lat[2:]):
        return f"slot {slot} identity_latents {shapes['identity_latents']} does not match latents {lat}"
    if "video_condition" in shapes and shapes["video_condition"][1:] != lat[1:]:
        return f"slot {slot} video_condition {shapes['video_condition']} does not match latents {lat}"
    if check_finite:
        for name, key in names.items():
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"slot {slot} {name} holds NaN/inf values"
    return None


def check_shard(path: Path, slots: dict[int, str], check_finite: bool = False) -> tuple[str | None, dict[int, str]]:
    """(a reason the whole shard is unusable, {slot: reason} for single bad samples)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads(f.metadata()["samples"])
            bad = {}
            for slot, sample_id in slots.items():
                if slot >= len(stored) or stored[slot].get("id") != sample_id:
                    bad[slot] = f"slot {slot} is not sample {sample_id} (the shard does not match index.json)"
                    continue
                problem = _slot_problem(f, slot, check_finite)
                if problem:
                    bad[slot] = problem
            return None, bad
    except FileNotFoundError:
        return "the shard file is missing", {}
    except Exception as exc:  # SafetensorError (bad header, truncated), JSON, KeyError on the metadata
        return f"unreadable shard ({type(exc).__name__}: {exc})", {}


@dataclass
class ShardSample:
    id: str
    task: str
    group: str
    shard: int
    slot: int


class ShardLatentDataset:
    """Reads a preprocessed shard folder; implements the LatentDataset protocol plus `group_of`."""

    def __init__(self, root: str | Path, tasks: set[str] | None = None, check_finite: bool = False):
        self.root = Path(root)
        index_file = self.root / INDEX_FILE
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file}: no index (run tools/preprocess.py to completion first)")
        try:
            index = json.loads(index_file.read_text())
            samples = [ShardSample(str(s["id"]), str(s["task"]), str(s["group"]), int(s["shard"]), int(s["slot"]))
                       for s in index["samples"] if tasks is None or s["task"] in tasks]
            # samples preprocessing could not encode: reported by training with the rest of the bad data
            self.unusable = [DataError(r["error"]["kind"], r["error"]["path"], r["error"]["reason"])
                             for r in index["skipped"]]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            raise ConfigError(f"{index_file} is damaged ({what}): rerun tools/preprocess.py") from None
        # every shard's header checked now (and its values with check_finite): a corrupt shard's samples are
        # bad data, named and reported, instead of a SafetensorError mid-training
        by_shard: dict[int, dict[int, str]] = {}
        for s in samples:
            by_shard.setdefault(s.shard, {})[s.slot] = s.id
        broken: set[tuple[int, int]] = set()
        for shard, slots in sorted(by_shard.items()):
            path = shard_path(self.root, shard)
            whole, bad = check_shard(path, slots, check_finite)
            for slot, sample_id in slots.items():
                reason = whole or bad.get(slot)
                if reason:
                    broken.add((shard, slot))
                    self.unusable.append(DataError("corrupt", f"{path}#{slot} ({sample_id})", reason))
        self.samples = [s for s in samples if (s.shard, s.slot) not in broken]
        if not self.samples:
            raise ConfigError(f"{index_file}: no usable samples for tasks {sorted(tasks or [])} "
                             f"({len(self.unusable)} skipped in preprocessing)")
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def task_of(self, index: int) -> str:
        return self.samples[index].task

    def group_of(self, index: int) -> str:
        return self.samples[index].group

    def null_conditions(self):
        from hcustom_mc.data.nulls import NULLS_FILE, NullConditions

        return NullConditions.load(self.root / NULLS_FILE)

    def path_of(self, index: int) -> str:
        s = self.samples[index]
        return f"{shard_path(self.root, s.shard)}#{s.slot} ({s.id})"

    def _handle(self, shard: int):
        if shard not in self._open:  # memory-mapped; kept open for the life of the dataset
            self._open[shard] = safe_open(str(shard_path(self.root, shard)), framework="pt")
        return self._open[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.samples[index]
        try:
            f, prefix = self._handle(s.shard), f"{s.slot}."
            out = {}
            for key in f.keys():
                if key.startswith(prefix):
                    t = f.get_tensor(key)
                    out[key[len(prefix):]] = t.float() if t.is_floating_point() else t  # shards may hold bf16
        except Exception as exc:  # the file changed or broke after indexing: bad data, replaced by training
            self._open.pop(s.shard, None)
            raise DataError("corrupt", self.path_of(index), f"{type(exc).__name__}: {exc}") from None
        return out
