"""The dataset interface training reads, a deterministic synthetic latent dataset behind it, and the
task-batch sampler.

A dataset yields one sample as a dict of latent-space tensors (what the encoders and VAE produce):
  latents [C, f, h, w] (clean video latents x0), text_states [L, text_dim], text_mask [L],
  text_pooled [pooled_dim], and per task: identity_latents [C, K, h, w], audio_features
  [N, window, layers, channels], video_condition [Cv, f, h, w].
`task_of(i)` names the sample's task and `group_of(i)` its shape group ('task|Kid'), so a batch never mixes
shapes: multi_identity samples have K = 2..max_identity_images identity images (cycling in blocks of samples),
and a batch holds one K. The real data pipeline implements the same methods.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import torch

from hcustom_mc.model.conditions import audio_frames_expected
from hcustom_mc.data.nulls import NullConditions, stand_in_null_conditions
from hcustom_mc.model.config import ModelConfig
from hcustom_mc.data.config import TASKS, DataConfig

IDENTITY_COUNT = {"t2v": 0, "identity": 1, "multi_identity": 2, "audio": 1, "editing": 0}  # multi_identity: at least


class LatentDataset(Protocol):
    def __len__(self) -> int: ...

    def task_of(self, index: int) -> str: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


def _gen(*keys: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(keys).encode()))


class SyntheticLatentDataset:
    """Learnable synthetic samples: 8 classes, each a fixed latent pattern named by a fixed caption.

    Sample i is a pure function of (seed, i): class i % 8 plus small noise; the task cycles
    through the tasks with positive weight. Same sample on every rank and at every layout.
    """

    CLASSES = 8

    def __init__(self, model: ModelConfig, data: DataConfig):
        self.model, self.data = model, data
        self.tasks = [t for t in TASKS if data.task_weights.get(t, 0) > 0]
        self.latent_frames = (data.frames - 1) // 4 + 1
        C, f, h, w = model.in_channels, self.latent_frames, data.latent_height, data.latent_width
        g = _gen("bank", data.seed)
        self.patterns = torch.randn(self.CLASSES, C, f, h, w, generator=g)
        self.captions = torch.randn(self.CLASSES, data.text_len, model.text_dim, generator=g)
        self.pooled = torch.randn(self.CLASSES, model.pooled_text_dim, generator=g)

    def __len__(self) -> int:
        return self.data.num_samples

    def task_of(self, index: int) -> str:
        return self.tasks[(index // self.CLASSES) % len(self.tasks)]

    def identity_count(self, index: int) -> int:
        """K of sample `index`; multi_identity cycles K = 2..max_identity_images, one K per block of samples."""
        task = self.task_of(index)
        if task != "multi_identity":
            return IDENTITY_COUNT[task]
        choices = max(1, self.model.max_identity_images - 1)
        return 2 + (index // (self.CLASSES * len(self.tasks))) % choices

    def group_of(self, index: int) -> str:
        return f"{self.task_of(index)}|{self.identity_count(index)}id"

    def null_conditions(self) -> NullConditions:
        d = self.data
        return stand_in_null_conditions(self.model, d.text_len, (d.latent_height, d.latent_width), d.seed,
                                        self.model.max_identity_images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        m, d, task = self.model, self.data, self.task_of(index)
        g = _gen("sample", d.seed, index)
        c = index % self.CLASSES
        x0 = self.patterns[c] + 0.1 * torch.randn(self.patterns[c].shape, generator=g)
        L = d.text_len
        valid = 1 + c % L
        mask = torch.arange(L) < valid
        sample = {
            "latents": x0,
            "text_states": self.captions[c] * mask[:, None],
            "text_mask": mask.long(),
            "text_pooled": self.pooled[c].clone(),
        }
        K = self.identity_count(index)
        if K:  # the subject: a still of the clip, shifted per image
            sample["identity_latents"] = torch.stack([x0[:, 0] + 0.05 * k for k in range(K)], dim=1)
        if task == "audio":
            n = audio_frames_expected(self.latent_frames, K, m.mode)
            sample["audio_features"] = torch.randn(n, m.audio_window, m.audio_layers, m.audio_channels, generator=g)
        if task == "editing":
            sample["video_condition"] = torch.randn(m.video_condition_channels, *x0.shape[1:], generator=g)
        return sample


class TaskBatchSampler:
    """Global batch `step` = one task (drawn by weight), one of its shape groups (drawn uniformly; only
    multi_identity has several, one per K) and `global_batch` sample indices of that group.

    A pure function of (seed, step): resuming at step s continues with exactly the batches an
    uninterrupted run would have drawn, so the sampler's saved position is just the step.
    """

    def __init__(self, dataset: LatentDataset, weights: dict[str, float], global_batch: int, seed: int):
        self.pools: dict[str, list[int]] = {}
        self.groups: dict[str, dict[str, list[int]]] = {}  # task -> group -> indices
        group_of = getattr(dataset, "group_of", dataset.task_of)
        for i in range(len(dataset)):
            task = dataset.task_of(i)
            self.pools.setdefault(task, []).append(i)
            self.groups.setdefault(task, {}).setdefault(group_of(i), []).append(i)
        self.tasks = [t for t in self.pools if weights.get(t, 0) > 0]
        if not self.tasks:
            raise ValueError(f"no samples for any task with positive weight {weights}")
        self.weights = torch.tensor([float(weights[t]) for t in self.tasks])
        self.global_batch, self.seed = global_batch, seed

    def global_batch_indices(self, step: int) -> tuple[str, list[int]]:
        g = _gen("batch", self.seed, step)
        task = self.tasks[int(torch.multinomial(self.weights, 1, generator=g))]
        groups = sorted(self.groups[task])
        # a task of one group draws nothing more: its batches are those of the sampler before groups existed
        pool = self.groups[task][groups[int(torch.randint(len(groups), (1,), generator=g))] if len(groups) > 1 else groups[0]]
        picks = torch.randint(len(pool), (self.global_batch,), generator=g)
        return task, [pool[int(i)] for i in picks]


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def drop_conditions(batch: dict[str, torch.Tensor], data: DataConfig, keys: list[tuple[int, int]],
                    nulls: NullConditions) -> None:
    """Classifier-free-guidance dropout, in place; shapes never change (K stays K: a batch is one K bucket).

    A dropped condition becomes what the sampler's unconditional branch feeds (hcustom_mc.data.nulls): text =
    the null prompt's LLaVA (with K white images) + CLIP encoding, identity = the white image's VAE latent,
    audio = zeros. Text and audio drop per sample; identity images drop per subject: each of a sample's K
    images is replaced by the white-image latent (the release's null identity, `uncond_ref_latents`) with
    probability `identity_drop`, independently, so a K-subject model learns to go on without any one of them.
    All K drop together with probability identity_drop**K. The text is untouched by an identity drop: a
    dropped subject keeps its "The T_k looks like <image>" LLaVA encoding (shards hold the text encoded once).
    `keys` are (step, position in global batch): the same sample drops the same way at any parallel layout.
    """
    K = batch["identity_latents"].shape[2] if "identity_latents" in batch else 0
    for row, (step, pos) in enumerate(keys):
        u = torch.rand(3, generator=_gen("drop", data.seed, step, pos))
        subjects = u[1:2]  # subject 1 keeps the draw single-subject runs always used
        if K > 1:  # subjects 2..K draw from their own stream
            subjects = torch.cat([subjects, torch.rand(K - 1, generator=_gen("drop-subjects", data.seed, step, pos))])
        if u[0] < data.text_drop:
            null = nulls.text_for(K)
            for name in ("text_states", "text_mask", "text_pooled"):
                if null[name].shape != batch[name][row].shape:
                    raise ValueError(f"null {name} has shape {tuple(null[name].shape)}, the batch's is "
                                     f"{tuple(batch[name][row].shape)} (text_len changed since preprocessing?)")
                batch[name][row] = null[name]
        dropped = (subjects[:K] < data.identity_drop).nonzero().flatten()
        if len(dropped):
            white = nulls.identity_for(1, *batch["identity_latents"].shape[-2:])  # [C, 1, h, w]
            batch["identity_latents"][row, :, dropped] = white.to(batch["identity_latents"].dtype)
        if "audio_features" in batch and u[2] < data.audio_drop:
            batch["audio_features"][row].zero_()
