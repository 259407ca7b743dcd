"""Scoring samples with every metric whose models are present, and summarising per metric and per task."""

from __future__ import annotations

import importlib
import logging
import math
import time
from pathlib import Path
from typing import Iterable

from hcustom_mc.eval.common import MissingModelError, VideoSample

log = logging.getLogger("hcustom_mc")

# metric name -> (module under hcustom_mc.eval.metrics, class); the order of the table's columns
METRICS = {
    "face_sim": ("face", "FaceSim"),
    "dino_sim": ("dino", "DinoSim"),
    "clip_score": ("clip_score", "ClipScore"),
    "temporal_consistency": ("dino", "TemporalConsistency"),
    "dynamic_degree": ("motion", "DynamicDegree"),
}


# besides each metric's own value: the values summarised and shown in the table (all of them are in the JSON)
SECONDARY = {"face_sim": ["face_sim_min", "face_sim_no_face_frames"], "dino_sim": ["dino_sim_min"],
             "temporal_consistency": ["temporal_consistency_vbench"],
             "dynamic_degree": ["motion_magnitude"]}


def reported(names: Iterable[str]) -> list[str]:
    """The value keys of metrics `names` that tables and summaries show: each metric's own, then its SECONDARY."""
    return [key for name in names for key in (name, *SECONDARY.get(name, []))]


def metric_class(name: str):
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    module, cls = METRICS[name]
    return getattr(importlib.import_module(f"hcustom_mc.eval.metrics.{module}"), cls)


def metric_options_from(frames: int, face_backend: str = "auto", face_pack: str = "buffalo_l",
                        flow_backend: str = "auto") -> dict[str, dict]:
    """Each metric's constructor options (the CLI's flags and validation's config give the same)."""
    return {"face_sim": {"backend": face_backend, "pack": face_pack, "num_frames": frames},
            "dino_sim": {"frames": frames}, "clip_score": {"frames": frames},
            "dynamic_degree": {"backend": flow_backend}}


def load_metrics(models_dir: str | Path | None, device="cpu", names: Iterable[str] | None = None,
                 options: dict[str, dict] | None = None) -> tuple[list, dict[str, str]]:
    """(the metrics that loaded, {name: why not} for those that did not). A missing model costs that metric
    only: it is named with its expected path and how to get it, and the others still run."""
    models_dir = Path(models_dir) if models_dir else Path("/nonexistent-models-folder")
    loaded, skipped = [], {}
    for name in METRICS if names is None else names:
        try:
            loaded.append(metric_class(name)(models_dir, device, **(options or {}).get(name, {})))
        except MissingModelError as exc:  # the caller reports it (the CLI with the table, validation once)
            skipped[name] = str(exc)
    return loaded, skipped


def score_samples(metrics: list, samples: Iterable[VideoSample], progress: bool = False) -> list[dict]:
    """One row per sample: its name, task and every metric's values (None where a metric does not apply)."""
    rows = []
    for n, sample in enumerate(samples):
        t0 = time.time()
        row = {"name": sample.name, "task": sample.task, "frames": int(sample.frames.shape[0])}
        for metric in metrics:
            row.update(metric.score(sample))
        row["score_s"] = round(time.time() - t0, 3)
        rows.append(row)
        if progress:
            log.info("scored %d: %s (%s) in %.1fs", n, sample.name, sample.task, row["score_s"])
    return rows


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    # the sample standard deviation (n - 1): the spread of what another draw of jobs would give
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def summarize(rows: list[dict], names: Iterable[str] | None = None) -> dict:
    """{"overall": {metric: stats}, "by_task": {task: {metric: stats}}}: the mean, the spread (sample standard
    deviation), the range and the count of the jobs where the metric applies (a None value is left out and the
    count says so)."""
    names = list(METRICS if names is None else names)

    def block(subset):
        out = {}
        for name in names:
            values = [float(r[name]) for r in subset if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
            if values:
                out[name] = _stats(values)
        return out

    tasks = sorted({r["task"] for r in rows})
    return {"overall": block(rows), "by_task": {t: block([r for r in rows if r["task"] == t]) for t in tasks}}


def flat_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """The summary's means as MLflow metric keys: PREFIX/metric and PREFIX/task/metric."""
    out = {f"{prefix}{name}": s["mean"] for name, s in summary["overall"].items()}
    for task, block in summary["by_task"].items():
        out.update({f"{prefix}{task}/{name}": s["mean"] for name, s in block.items()})
    return out
