"""Throughput accounting (model FLOPs, MFU), the console progress line, and MLflow logging (rank 0)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from hcustom_mc.device import peak_memory, uses_cuda
from hcustom_mc.model.flops import model_flops_per_sample  # noqa: F401  (the loop reads it from here)

log = logging.getLogger("hcustom_mc")

# Dense peak TFLOP/s per device (bf16 tensor cores, and fp32 via TF32), from the vendor data sheets (the
# sparsity figures halved), keyed by the exact torch.cuda.get_device_name(): one product line holds cards of
# different peaks (H100 SXM 989, NVL 835, PCIe 756), so a name that merely contains "H100" says nothing.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": (989.0, 494.7),  # H100 SXM5
    "NVIDIA H100 NVL": (835.0, 417.5),
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H200": (989.0, 494.7),  # H200 SXM
    "NVIDIA H200 NVL": (835.0, 417.5),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0),
}


def peak_tflops(bf16: bool, override: float | None) -> float | None:
    """Per-device peak for MFU: `override`, else this card's data-sheet figure, else None (no MFU reported)."""
    if override:
        return override
    if not uses_cuda():
        return None
    name = torch.cuda.get_device_name()
    if name not in PEAK_TFLOPS:
        log.warning("no MFU: the peak TFLOP/s of %r is not known here; pass --peak-tflops", name)
        return None
    bf16_peak, tf32_peak = PEAK_TFLOPS[name]
    return bf16_peak if bf16 else tf32_peak


def peak_memory_gib() -> float:
    return peak_memory()[0] / 2**30


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Tracker:
    """Rank 0's console progress and MLflow run; other ranks construct it as a no-op."""

    def __init__(self, enabled: bool, run_dir: str, tracking_uri: str | None, experiment: str,
                 run_name: str | None, run_id: str | None = None):
        self.enabled, self.run = enabled, None
        self.start_time, self.start_step = time.time(), None
        if not enabled:
            return
        import mlflow

        from hcustom_mc import console

        console.quiet_third_party_loggers()  # mlflow sets its own logger's level when imported
        run_path = Path(run_dir).resolve()
        run_path.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or f"sqlite:///{run_path / 'mlflow.db'}"
        mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(run_path / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        if run_id is not None:  # resume the run the checkpoint was written by, if this store has it
            try:
                mlflow.get_run(run_id)
            except Exception:
                log.info("MLflow run %s of the checkpoint is not in %s: starting a new run", run_id, self.tracking_uri)
                run_id = None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.mlflow = mlflow
        log.info("MLflow run %s at %s", self.run.info.run_id, self.tracking_uri)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        flat = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = str(value)[:500]

        walk("", params)
        existing = self.mlflow.get_run(self.run_id).data.params
        self.mlflow.log_params({k: v for k, v in flat.items() if k not in existing})

    def log_step(self, step: int, total: int, task: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.time() - metrics.get("step_time_s", 0.0)
        done = step - self.start_step
        eta = (time.time() - self.start_time) / max(done, 1) * (total - step)
        parts = [f"step {step}/{total}", f"task {task}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()] + [f"ETA {_fmt_time(eta)}"]
        print(" | ".join(parts), file=sys.stdout, flush=True)
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, folder, artifact_path: str) -> None:
        if self.enabled:
            self.mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def finish(self) -> None:
        if self.enabled and self.run is not None:
            self.mlflow.end_run()
            self.run = None


def default_run_name(cfg, info) -> str:
    """The MLflow run name when --run-name is not given: what the run trains, its layout and its run folder
    (`13b audio tp4-pp2-cp2-dp2 20261207-031500`), instead of MLflow's random words."""
    p = cfg.parallel
    folder = f" {Path(cfg.logging.run_dir).name}" if cfg.logging.run_dir else ""
    return (f"{Path(str(cfg.model)).stem} {cfg.variant} tp{p.tensor_parallel}-pp{p.pipeline_parallel}-"
            f"cp{p.context_parallel}-dp{info.dp_size}{folder}")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def mlflow_ui_command(tracking_uri: str | None) -> str | None:
    """The command that shows a run's store in a browser; None for a store that is already a server."""
    if not tracking_uri or tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def summary_lines(history: dict) -> list[str]:
    """The closing summary of a training run (rank 0): what ran, where it is, how to look at it."""
    from hcustom_mc import console

    losses, steps = history.get("losses", []), history.get("step", 0)
    done = steps - history.get("start_step", 0)
    head = f"done: {done} steps (to step {steps}/{history.get('total_steps', steps)}) in {_fmt_time(history.get('elapsed_s', 0))}"
    if len(losses) >= 2:
        k = min(5, len(losses) // 2)
        head += f"; loss {sum(losses[:k]) / k:.4g} -> {sum(losses[-k:]) / k:.4g} (mean of the first / last {k})"
    lines = [head, f"run folder: {history.get('run_dir')}",
             f"checkpoint: {history.get('checkpoint') or 'none (no --save)'}"]
    if history.get("mlflow_run_id"):
        lines.append(f"MLflow run {history['mlflow_run_id']} (experiment {history.get('experiment')}) "
                     f"in {history.get('tracking_uri')}")
        command = mlflow_ui_command(history.get("tracking_uri"))
        if command:
            lines.append(f"open it: {command}   (needs full mlflow: pip install 'hcustom-mc[ui]')")
    if history.get("validation_runs"):
        share = history["validation_s"] / max(history.get("elapsed_s") or 0.0, 1e-9)
        spent = history["validation_s"]
        lines.append(f"validation: {history['validation_runs']} runs in "
                     f"{f'{spent:.1f} s' if spent < 100 else _fmt_time(spent)} "
                     f"({share:.0%} of the run); videos and scores in {history.get('validation_dir')}"
                     + (f"; {history['validation_failed']} of them failed (see the warnings)"
                        if history.get("validation_failed") else ""))
    if history.get("skipped_steps"):
        lines.append(f"skipped non-finite steps: {history['skipped_steps']}")
    note = console.hidden_note()
    if note:
        lines.append(note)
    return lines


def print_summary(history: dict) -> None:
    print("\n".join(summary_lines(history)), file=sys.stdout, flush=True)
