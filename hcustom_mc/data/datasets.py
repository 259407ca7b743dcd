"""The datasets training reads, behind one interface (`LatentDataset` + `group_of` + `path_of`):

  synthetic  SyntheticLatentDataset (data/synthetic.py): learnable random latents, no files
  shards     ShardLatentDataset (data/shards.py): what tools/preprocess.py wrote, the fast path
  manifest   ManifestDataset (here): raw videos, images and audio, encoded online by the same SampleEncoder
             preprocessing uses (slow: every model-parallel rank encodes its DP rank's samples)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hcustom_mc.device import uses_cuda

from hcustom_mc.data.encode import ClipSpec, SampleEncoder, group_key, sample_shape
from hcustom_mc.data.errors import DataError
from hcustom_mc.data.manifest import load_manifest

log = logging.getLogger(__name__)


def encoder_dtype(name: str) -> torch.dtype:
    """`auto`: fp16 on GPU (as the release runs LLaVA and the VAE), fp32 on CPU."""
    if name == "auto":
        return torch.float16 if uses_cuda() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def clip_spec(data) -> ClipSpec:
    return ClipSpec(frames=data.frames, stride=data.frame_stride, short_side=data.short_side, backend=data.video_backend,
                    audio_rate=data.audio_rate)


def index_manifest(entries, spec: ClipSpec, tasks: set[str]) -> tuple[list, list[int], list[str], list[DataError]]:
    """Index the entries of wanted tasks by batch-shape group.

    Returns (entries, their manifest positions, group keys, unreadable): the position seeds a sample's
    random choices, so online encoding gives exactly what tools/preprocess.py stores. An entry whose video
    cannot be probed stays in the index, in its task's most common group (so one file going bad between
    runs does not reshuffle every later sample or block a resume); reading it fails and it is replaced.
    """
    kept, positions, keys, bad, unsized = [], [], [], [], []
    for pos, e in enumerate(entries):
        if e.task not in tasks:
            continue
        try:
            key = group_key(e.task, sample_shape(e, spec), spec.frames, len(e.subjects))
        except DataError as err:
            bad.append(err)
            key = None
            unsized.append(len(kept))
        kept.append(e)
        positions.append(pos)
        keys.append(key)
    for i in unsized:
        e = kept[i]
        peers = sorted(k for k in keys if k is not None and k.startswith(f"{e.task}|") and k.endswith(f"|{len(e.subjects)}id"))
        keys[i] = max(set(peers), key=lambda k: (peers.count(k), k)) if peers else group_key(e.task, (0, 0), spec.frames,
                                                                                             len(e.subjects))
    return kept, positions, keys, bad


class ManifestDataset:
    def __init__(self, manifest: str | Path, data, mode: str, max_identity: int, tasks: set[str], device="cpu"):
        spec = clip_spec(data)
        self.entries, self.positions, self.keys, self.unusable = index_manifest(load_manifest(manifest), spec, tasks)
        if not self.entries:
            raise ValueError(f"{manifest}: no usable samples for tasks {sorted(tasks)} "
                             f"({len(self.unusable)} unreadable)")
        self.encoder = SampleEncoder(data.encoders, mode=mode, text_len=data.text_len, max_identity=max_identity,
                                     spec=spec, seed=data.seed, device=device, dtype=encoder_dtype(data.encoder_dtype))
        self.null_prompt, self.max_identity = data.null_prompt, max_identity

    def null_conditions(self):
        from hcustom_mc.data.nulls import encode_null_conditions, latent_sizes_of_groups

        sizes = latent_sizes_of_groups(self.keys, self.encoder.vae.spatial)
        return encode_null_conditions(self.encoder, self.null_prompt, sizes, self.max_identity)

    def __len__(self) -> int:
        return len(self.entries)

    def task_of(self, index: int) -> str:
        return self.entries[index].task

    def group_of(self, index: int) -> str:
        return self.keys[index]

    def path_of(self, index: int) -> str:
        return self.entries[index].video

    def __getitem__(self, index: int):
        return self.encoder.encode(self.entries[index], self.positions[index])
