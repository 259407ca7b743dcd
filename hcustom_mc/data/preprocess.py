"""Offline preprocessing: manifest -> shards of VAE latents, LLaVA/CLIP text states and Whisper features.

    torchrun --nproc-per-node 8 tools/preprocess.py --config train.yaml --data-path data/manifest.jsonl --out shards/

The manifest's samples of the tasks the config trains on, [k*S, (k+1)*S), form shard k; rank r encodes shards r, r+W, r+2W, ... and skips every shard
whose file already exists (shards are renamed into place only when complete), so a crashed or killed run
restarted with the same command finishes the job and writes byte-identical shards: each sample's random
choices depend only on (seed, manifest position). Rank 0 writes index.json once every shard exists.
Samples whose files are broken are recorded in their shard (kind, path, reason) and listed in the index.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from hcustom_mc.data import shards
from hcustom_mc.data.datasets import clip_spec, encoder_dtype
from hcustom_mc.data.encode import SampleEncoder, group_key, sample_shape
from hcustom_mc.data.errors import DataError
from hcustom_mc.data.manifest import load_manifest
from hcustom_mc.data.nulls import NULLS_FILE, encode_null_conditions, latent_sizes_of_groups
from hcustom_mc.device import compute_device

log = logging.getLogger("hcustom_mc.preprocess")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def settings_of(cfg, manifest: Path, shard_size: int, dtype: str) -> dict:
    """Everything that changes the shards' bytes; a restart must match it exactly."""
    from hcustom_mc.data.video import resolve_backend

    d = cfg.data
    return {"video_backend": resolve_backend(d.video_backend), "encoder_dtype": str(encoder_dtype(d.encoder_dtype)),"manifest": str(manifest.resolve()), "shard_size": shard_size, "dtype": dtype, "mode": cfg.mode,
            "model": cfg.model, "variant": cfg.variant, "frames": d.frames, "frame_stride": d.frame_stride,
            "short_side": d.short_side, "tasks": sorted(t for t, w in d.task_weights.items() if w > 0), "audio_rate": d.audio_rate, "text_len": d.text_len, "seed": d.seed, "null_prompt": d.null_prompt,
            "encoders": {k: v for k, v in vars(d.encoders).items()}, "max_identity_images": cfg.model_config().max_identity_images}


def _claim_settings(out: Path, settings: dict, rank: int) -> None:
    path = out / shards.CONFIG_FILE
    if rank == 0:
        for stale in out.glob("shard_*.safetensors.tmp*"):  # a killed run's half-written shard
            stale.unlink()
        if not path.exists():
            path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if dist.is_initialized():
        dist.barrier()
    found = json.loads(path.read_text())
    if found != settings:
        diff = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
        raise ValueError(f"{out} holds shards made with other settings (differ in: {', '.join(diff)}); "
                         f"use a new --out folder or the original settings")


def encode_shard(encoder: SampleEncoder, items: list, dtype: torch.dtype) -> list[dict]:
    """items: (manifest position, entry) pairs; the position seeds the sample's random choices."""
    records = []
    for position, entry in items:
        try:
            tensors = encoder.encode(entry, position)
        except DataError as err:
            log.warning("skipping %s: %s", entry.id, err)
            records.append({"id": entry.id, "error": {"kind": err.kind, "path": err.path, "reason": err.reason}})
            continue
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        # the same key online training gives the sample (encode() checked its video fits that bucket)
        group = group_key(entry.task, sample_shape(entry, encoder.spec), encoder.spec.frames, len(entry.subjects))
        records.append({"id": entry.id, "task": entry.task, "group": group, "tensors": tensors})
    return records


def preprocess(cfg, manifest: str | Path, out: str | Path, shard_size: int = 64, dtype: str = "float32",
               progress: bool = True) -> dict | None:
    """Run on every rank (or alone). Returns the index on rank 0, None elsewhere."""
    from tqdm import tqdm

    manifest, out = Path(manifest), Path(out)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    tasks = sorted(t for t, w in cfg.data.task_weights.items() if w > 0)
    # only the tasks this config trains on (others may not even be encodable, e.g. K > 1 in release mode)
    everything = load_manifest(manifest)
    entries = [(pos, e) for pos, e in enumerate(everything) if e.task in tasks]
    left_out = Counter(e.task for e in everything if e.task not in tasks)
    if left_out and rank == 0:  # said, never silent: a sample the config does not train on is not encoded
        log.warning("%d of %d manifest samples left out: their task is not trained by this config (task_weights %s): %s",
                    sum(left_out.values()), len(everything), cfg.data.task_weights,
                    ", ".join(f"{t} {n}" for t, n in sorted(left_out.items())))
    num_shards = (len(entries) + shard_size - 1) // shard_size
    out.mkdir(parents=True, exist_ok=True)
    _claim_settings(out, settings_of(cfg, manifest, shard_size, dtype), rank)

    mine = [s for s in range(rank, num_shards, world)]
    todo = [s for s in mine if not shards.shard_path(out, s).exists()]
    if rank == 0:
        log.info("preprocess %s -> %s: %d samples, %d shards of %d, %d ranks; this rank: %d shards, %d already done",
                 manifest, out, len(entries), num_shards, shard_size, world, len(mine), len(mine) - len(todo))
    mcfg = cfg.model_config()

    def make_encoder():
        return SampleEncoder(cfg.data.encoders, mode=cfg.mode, text_len=cfg.data.text_len,
                             max_identity=mcfg.max_identity_images, spec=clip_spec(cfg.data), seed=cfg.data.seed,
                             device=compute_device(), dtype=encoder_dtype(cfg.data.encoder_dtype))

    encoder = None
    if todo:
        encoder = make_encoder()
        kill_after = int(os.environ.get("HCUSTOM_FAULT_KILL_AFTER_SHARDS", "0"))  # fault injection for tests
        bar = tqdm(total=len(todo), desc=f"rank {rank} shards", unit="shard", disable=not progress,
                   position=rank, file=sys.stderr)
        t0, done = time.time(), 0
        for n, s in enumerate(todo):
            first = s * shard_size
            records = encode_shard(encoder, entries[first : first + shard_size], DTYPES[dtype])
            shards.write_shard(out, s, records)
            done += len(records)
            bar.set_postfix(samples_per_s=f"{done / (time.time() - t0):.2f}")
            bar.update(1)
            if kill_after and n + 1 >= kill_after:
                os._exit(137)  # simulate a crash right after a shard landed
        bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    index = shards.write_index(out, num_shards)
    nulls_file = out / NULLS_FILE
    if not nulls_file.exists():  # guidance dropout's null conditions, encoded once (see data/nulls.py)
        encoder = encoder or make_encoder()
        sizes = latent_sizes_of_groups([s["group"] for s in index["samples"]], encoder.vae.spatial)
        encode_null_conditions(encoder, cfg.data.null_prompt, sizes, mcfg.max_identity_images).save(nulls_file)
    log.info("preprocess done: %d samples usable, %d skipped (%s)", len(index["samples"]), len(index["skipped"]),
             ", ".join(f"{r['id']}: {r['error']['kind']}" for r in index["skipped"]) or "none")
    return index
