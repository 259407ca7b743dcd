"""The datasets training reads, behind one interface (`LatentDataset` + `group_of` + `path_of`):

  synthetic  SyntheticLatentDataset (data/synthetic.py): learnable random latents, no files
  shards     ShardLatentDataset (data/shards.py): what tools/preprocess.py wrote, the fast path
  manifest   ManifestDataset (here): raw videos, images and audio, encoded online by the same SampleEncoder
             preprocessing uses (slow: every model-parallel rank encodes its DP rank's samples)
"""

from __future__ import annotations

import logging
from pathlib import Path

from hcustom_mc.data.encode import ClipSpec, SampleEncoder, group_key, sample_shape
from hcustom_mc.data.errors import DataError
from hcustom_mc.data.manifest import load_manifest

log = logging.getLogger(__name__)


def clip_spec(data) -> ClipSpec:
    return ClipSpec(frames=data.frames, stride=data.frame_stride, short_side=data.short_side, backend=data.video_backend,
                    audio_rate=data.audio_rate)


def index_manifest(entries, spec: ClipSpec, tasks: set[str]) -> tuple[list, list[int], list[str], list[DataError]]:
    """Keep the entries of wanted tasks whose video can be sized.

    Returns (entries, their manifest positions, group keys, unusable): the position seeds a sample's random
    choices, so online encoding gives exactly what tools/preprocess.py stores.
    """
    kept, positions, keys, bad = [], [], [], []
    for pos, e in enumerate(entries):
        if e.task not in tasks:
            continue
        try:
            size = sample_shape(e, spec)
        except DataError as err:  # unreadable at indexing time: never sampled, reported with the rest
            bad.append(err)
            continue
        kept.append(e)
        positions.append(pos)
        keys.append(group_key(e.task, size, spec.frames, len(e.subjects)))
    return kept, positions, keys, bad


class ManifestDataset:
    def __init__(self, manifest: str | Path, data, mode: str, max_identity: int, tasks: set[str], device="cpu"):
        spec = clip_spec(data)
        self.entries, self.positions, self.keys, self.unusable = index_manifest(load_manifest(manifest), spec, tasks)
        if not self.entries:
            raise ValueError(f"{manifest}: no usable samples for tasks {sorted(tasks)} "
                             f"({len(self.unusable)} unreadable)")
        self.encoder = SampleEncoder(data.encoders, mode=mode, text_len=data.text_len, max_identity=max_identity,
                                     spec=spec, seed=data.seed, device=device)

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
