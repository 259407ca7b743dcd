"""Global batch `step` -> this DP rank's micro batches, with broken samples replaced, counted and named.

Every rank of a DP group builds the same micro batches (same sampler, same seed), so TP/PP/CP ranks agree
without communication. Real datasets use the bucketed sampler (one shape per global batch; its position is
saved in checkpoints); the synthetic dataset keeps its step-addressed task sampler.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hcustom_mc.data.errors import DataError
from hcustom_mc.data.synthetic import SyntheticLatentDataset, TaskBatchSampler, collate, drop_conditions
from hcustom_mc.training.objective import add_noise, sample_noise_and_t
from hcustom_mc.device import compute_device

log = logging.getLogger("hcustom_mc")


def build_dataset(cfg, model_cfg):
    data = cfg.data
    if data.dataset == "synthetic":
        return SyntheticLatentDataset(model_cfg, data)
    tasks = {t for t, w in data.task_weights.items() if w > 0}
    if data.dataset == "shards":
        from hcustom_mc.data.shards import ShardLatentDataset, check_shard_settings

        check_shard_settings(data.path, cfg, model_cfg)
        return ShardLatentDataset(data.path, tasks=tasks, check_finite=data.check_shards)
    from hcustom_mc.data.datasets import ManifestDataset

    device = compute_device()
    return ManifestDataset(data.path, data, mode=model_cfg.mode, max_identity=model_cfg.max_identity_images,
                           tasks=tasks, device=device)


class BadSamples:
    """path -> {kind, reason, count}: every broken sample met, for the log and the end-of-run summary."""

    def __init__(self):
        self.seen: dict[str, dict] = {}

    def add(self, err: DataError, count: int = 1) -> None:
        entry = self.seen.setdefault(err.path, {"kind": err.kind, "reason": err.reason, "count": 0})
        entry["count"] += count

    def merged_over_dp(self) -> dict[str, dict]:
        """Union over data-parallel ranks (each met different samples); same result on every rank."""
        from megatron.core import parallel_state as ps

        if not dist.is_initialized() or ps.get_data_parallel_world_size() == 1:
            return {k: dict(v) for k, v in self.seen.items()}
        parts = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, self.seen, group=ps.get_data_parallel_group(with_context_parallel=False))
        merged: dict[str, dict] = {}
        for part in parts:
            for path, e in part.items():
                m = merged.setdefault(path, {"kind": e["kind"], "reason": e["reason"], "count": 0})
                m["count"] += e["count"]
        return merged


def _any_rank_of_replica(flag: bool) -> bool:
    """True if `flag` is set on any rank holding the same data (TP x PP x CP of one DP replica)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return flag
    groups = [g for g, n in ((ps.get_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
                              * ps.get_pipeline_model_parallel_world_size()),
                             (ps.get_context_parallel_group(), ps.get_context_parallel_world_size())) if n > 1]
    if not groups:
        return flag
    device = compute_device()
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    for g in groups:  # max over TP x PP, then over CP: the max over the whole replica
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
    return bool(t.item())


class BatchMaker:
    def __init__(self, cfg, model_cfg, dp_rank: int, dp_size: int, num_micro: int, log_events: bool = True):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.dp_rank, self.dp_size, self.num_micro = dp_rank, dp_size, num_micro
        self.log_events = log_events
        self.dataset = build_dataset(cfg, model_cfg)
        self.nulls = self.dataset.null_conditions()  # what guidance dropout substitutes (data/nulls.py)
        self.bad = BadSamples()
        self.data_wait_s = 0.0
        # per micro batch of the last step: its samples' names, and those whose data holds NaN/inf (named when the
        # loss is non-finite: the shard, slot and sample id, not only the micro batch)
        self.sources: list[list[str]] = []
        self.nonfinite_sources: list[list[str]] = []
        self._used = 0
        if isinstance(self.dataset, SyntheticLatentDataset):
            self.sampler = TaskBatchSampler(self.dataset, cfg.data.task_weights, cfg.global_batch_size, cfg.data.seed)
            self.bucketed = False
        else:
            from hcustom_mc.data.sampler import BucketBatchSampler

            self.sampler = BucketBatchSampler([self.dataset.group_of(i) for i in range(len(self.dataset))],
                                              cfg.global_batch_size, cfg.data.seed)
            self.bucketed = True
            # samples that could not even be indexed (unreadable video) are reported once, by DP rank 0
            if dp_rank == 0:
                for err in getattr(self.dataset, "unusable", []):
                    self._report(err, "unreadable at indexing (replaced whenever drawn)")

    def _report(self, err: DataError, what: str) -> None:
        self.bad.add(err)
        if self.log_events:
            log.warning("bad sample (%s) %s: %s: %s", err.kind, what, err.path, err.reason)

    def _load(self, index: int, step: int) -> dict:
        self._used = index  # the sample actually used (a replacement's, below), for `sources`
        if not self.bucketed:  # synthetic samples cannot be broken
            return self.dataset[index]
        original = index
        for attempt in range(self.cfg.data.max_bad_sample_retries + 1):
            sample, err = None, None
            self._used = index
            try:
                sample = self.dataset[index]
            except DataError as exc:
                err = exc
            if not _any_rank_of_replica(err is not None):
                return sample
            # every rank of this DP replica replaces the sample, even one that read it fine (a transient
            # failure on one TP/CP/PP rank must not leave the ranks computing on different inputs)
            replacement = self.sampler.replacement(original, attempt)  # keyed on the original: no cycles
            self._report(err or DataError("corrupt", self.dataset.path_of(index), "failed on another rank of "
                                          "this replica"), f"at step {step}, replaced by sample {replacement}")
            index = replacement
        raise RuntimeError(f"step {step}: {self.cfg.data.max_bad_sample_retries + 1} broken samples in a row in "
                           f"group {self.dataset.group_of(index)!r}; the data is too damaged to continue")

    def _global_batch(self, step: int) -> tuple[str, list[int]]:
        if not self.bucketed:
            return self.sampler.global_batch_indices(step)
        group, indices = self.sampler.next_batch()
        return group.split("|", 1)[0], indices

    def microbatches(self, step: int) -> tuple[str, list[dict]]:
        t0 = time.time()
        task, indices = self._global_batch(step)
        mbs, out = self.cfg.micro_batch_size, []
        dev = compute_device()
        self.sources, self.nonfinite_sources = [], []
        for m in range(self.num_micro):
            start = (m * self.dp_size + self.dp_rank) * mbs  # same global sample order at any DP size
            keys = [(step, p) for p in range(start, start + mbs)]
            samples, names, bad = [], [], []
            for i in indices[start : start + mbs]:
                samples.append(self._load(i, step))
                names.append(self._name(self._used))
                fields = [k for k, v in samples[-1].items() if torch.is_tensor(v) and v.is_floating_point()
                          and not bool(torch.isfinite(v).all())]
                if fields:
                    bad.append(f"{names[-1]} (NaN/inf in {', '.join(fields)})")
            self.sources.append(names)
            self.nonfinite_sources.append(bad)
            batch = collate(samples)
            drop_conditions(batch, self.cfg.data, keys, self.nulls)
            x0 = batch.pop("latents")
            noise, t = sample_noise_and_t(tuple(x0.shape[1:]), keys, self.cfg.objective, self.cfg.data.seed)
            xt, target = add_noise(x0, noise, t)
            inputs = {"latents": xt, "timestep": t * 1000.0, **batch}
            if self.model_cfg.guidance_embed:
                inputs["guidance"] = torch.full_like(t, 6.0 * 1000.0)
            out.append({"inputs": {k: v.to(dev) for k, v in inputs.items()}, "target": target.to(dev)})
        self.data_wait_s = time.time() - t0
        return task, out

    def _name(self, index: int) -> str:
        path_of = getattr(self.dataset, "path_of", None)
        return path_of(index) if path_of is not None else f"synthetic sample {index}"

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Collective over DP (bad-sample union); the sampler position is the same on every rank."""
        return {"sampler": self.sampler.state_dict() if self.bucketed else {},
                "bad_samples": self.bad.merged_over_dp()}

    def load_state_dict(self, state: dict, step: int) -> None:
        if self.bucketed and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])
        elif self.bucketed and step > 0:
            # a checkpoint without the sampler position (older, or trained on another dataset type):
            # continue where `step` full batches would have left an uninterrupted run of this data
            sd = self.sampler.state_dict()
            sd["epoch"], sd["position"] = divmod(step, self.sampler.batches_per_epoch)
            self.sampler.load_state_dict(sd)
            log.warning("the checkpoint holds no data-sampler position: continuing at epoch %d, batch %d (as if "
                        "this dataset had been used from step 0)", sd["epoch"], sd["position"])
        self.bad = BadSamples()
        if self.dp_rank == 0:  # the saved union is re-counted once, so later unions stay exact
            for path, e in state.get("bad_samples", {}).items():
                self.bad.add(DataError(e["kind"], path, e["reason"]), e["count"])

    def summarize(self, run_dir: str | Path, is_rank0: bool) -> dict:
        """Collective. Logs the table of broken samples and writes run_dir/bad_samples.json."""
        merged = self.bad.merged_over_dp()
        if is_rank0:
            total = sum(e["count"] for e in merged.values())
            if merged:
                lines = [f"  {e['count']:4d} x {e['kind']:<11} {p}: {e['reason']}" for p, e in sorted(merged.items())]
                log.warning("data: %d broken samples met (%d files), all skipped and replaced:\n%s", total,
                            len(merged), "\n".join(lines))
            else:
                log.info("data: no broken samples met")
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "bad_samples.json").write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
        return merged
