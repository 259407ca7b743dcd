"""Validation during training: sample fixed jobs with the weights being trained, score them, log both.

`--eval-jobs FILE` (the sampler's --jobs format) with `--eval-interval N`: after every N-th step (and the last),
each data-parallel replica samples its share of the jobs (job n on replica n mod DP) with the training model
itself, on its TP x PP x CP ranks (ParallelSampler; under PP the stages run in order, inference/stages.py): no
second copy of the model. With --ema-decay the EMA weights are swapped in for the sampling and the trained weights
put back bit for bit. The first rank of each replica decodes, writes NAME.mp4 / NAME.png (contact sheet) /
NAME.json into RUN_DIR/validation/step_N/ and scores its videos with the metrics that have models; rank 0 gathers
the rows, writes scores.json / scores.md there and logs the metrics (val/METRIC, val/TASK/METRIC) and the folder
to MLflow.

The conditions (LLaVA / CLIP text states, identity latents, audio features) do not depend on the DiT: rank 0
encodes them once, before the model is built, and the encoders are freed; only the VAE is loaded again, for
decoding. Training is not disturbed: the jobs draw their noise from their own seeded generators, every RNG state
is saved and restored around validation, the data order is not touched, and the model's modes and per-job
settings (lambda_A) are restored, so losses and checkpoints equal those of a run without validation.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hcustom_mc import console
from hcustom_mc.device import encoder_dtype
from hcustom_mc.errors import ConfigError

log = logging.getLogger("hcustom_mc")


def _broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _gather_object(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
        from megatron.core import tensor_parallel

        states["megatron"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return states


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(states["megatron"])


def load_validation_jobs(path: str, model_cfg, tp: int, cp: int, cp_mode: str) -> list:
    """The jobs, filled in and checked against the model and the training layout (one replica: TP x CP ranks
    sample a job, with its branches as one batch)."""
    from hcustom_mc.inference.inputs import InputError, SampleJob, read_job_list, resolve_job, validate_job

    jobs = []
    for n, entry in enumerate(read_job_list(path, "--eval-jobs")):
        try:
            job = SampleJob.from_dict({**entry, "output": f"{n:03d}_{entry.get('task', 'job')}"})
            validate_job(job, model_cfg, tp * cp, tp, cp, 1, cp_mode=cp_mode)
        except (InputError, TypeError, ValueError) as exc:
            raise ConfigError(f"--eval-jobs {path}: job {n}: {exc}") from None
        jobs.append(resolve_job(job))
    return jobs


class Validation:
    """Built before the model (it encodes the jobs' conditions on rank 0 while the device is still free)."""

    def __init__(self, cfg, model_cfg, info, dtype: torch.dtype):
        v = cfg.validation
        self.cfg, self.model_cfg, self.info, self.dtype = cfg, model_cfg, info, dtype
        self.interval, self.models = v.interval, v.models
        self.run_dir = Path(cfg.logging.run_dir)
        self.total_s, self.runs, self.failed_runs = 0.0, 0, 0
        self.jobs = load_validation_jobs(v.jobs, model_cfg, info.tp_size, info.cp_size, cfg.parallel.cp_mode)
        rng = _rng_states()  # building the encoders draws random initial weights before loading theirs
        try:
            self.conditions = self._encode()
        finally:
            _restore_rng(rng)

    def _encode(self) -> list[dict]:
        """Rank 0 runs the encoders over every job once; every rank receives the DiT inputs (on the CPU)."""
        from hcustom_mc.inference.inputs import EncoderSet, prepare_conditions

        out, error = None, None
        if self.info.rank == 0:
            t0 = time.time()
            device = self.info.device
            try:
                encoders = EncoderSet.from_paths(
                    self.cfg.data.encoders, needs_audio=any(j.task == "audio" for j in self.jobs), device=device,
                    dtype=encoder_dtype(device), mode=self.model_cfg.mode,
                    max_subjects=self.model_cfg.max_identity_images, text_len=self.cfg.validation.text_len)
                out = []
                for n, job in enumerate(self.jobs):
                    try:
                        cond = prepare_conditions(job, encoders, self.model_cfg, device, self.dtype)
                    except ValueError as exc:  # e.g. a prompt too long for --eval-text-len
                        raise ConfigError(f"--eval-jobs job {n}: {exc}") from None
                    cond["branches"] = {b: {k: t.cpu() for k, t in inputs.items()}
                                        for b, inputs in cond["branches"].items()}
                    out.append(cond)
                del encoders
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log.info("validation: %d jobs encoded in %.1fs", len(out), time.time() - t0)
            except ConfigError as exc:
                error = str(exc)
        error = _broadcast_object(error)
        if error:
            raise ConfigError(error)
        return _broadcast_object(out)

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.interval and step % self.interval == 0)

    # ------------------------------------------------------------------ one validation
    @torch.no_grad()
    def run(self, step: int, model, ema, tracker) -> dict:
        """Collective over all ranks. Returns rank 0's summary ({} elsewhere)."""
        from hcustom_mc.training.checkpoint import unwrap
        from hcustom_mc.training.param_sync import params_ready

        t0 = time.time()
        rng = _rng_states()
        params_ready(model)  # under overlap_param_gather the weights are complete only after the next forward
        chunks = [unwrap(m) for m in model]
        saved = ema.swap_into_model() if ema is not None else None
        modes, cfgs = [c.training for c in chunks], [c.cfg for c in chunks]
        folder = self.run_dir / "validation" / f"step_{step:07d}"
        try:
            for c in chunks:
                c.eval()
            rows, failed = self._sample_and_score(step, chunks, folder, "ema" if ema is not None else "model")
        finally:
            for c, mode, c_cfg in zip(chunks, modes, cfgs):
                c.train(mode)
                c.cfg = c_cfg
            if saved is not None:
                ema.restore_model(saved)
            _restore_rng(rng)
        parts = _gather_object((rows, failed))
        rows = [r for part, _ in parts for r in part]
        failures = [f for _, part in parts for f in part]
        elapsed = time.time() - t0
        self.total_s += elapsed
        self.runs += 1
        if self.info.rank != 0:
            return {}
        if failures:  # a long run is worth more than one validation: say it, keep training
            self.failed_runs += 1
            log.warning("validation at step %d failed (training goes on; scores of the other jobs follow): %s", step,
                        "; ".join(failures))
        return self._report(step, rows, folder, elapsed, tracker)

    def _sample_and_score(self, step: int, chunks, folder: Path, weights: str) -> tuple[list[dict], list[str]]:
        from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout, with_audio_strength
        from hcustom_mc.inference.stages import StagedModel

        info = self.info
        mine = [n for n in range(len(self.jobs)) if n % info.dp_size == info.dp_rank]
        writer = info.tp_rank == 0 and info.cp_rank == 0 and info.pp_rank == 0  # one per data-parallel replica
        whole = info.pp_size == 1 and len(chunks) == 1
        model = chunks[0] if whole else StagedModel(chunks)
        sampler = ParallelSampler(model, SamplerLayout(info.tp_size, info.cp_size, self.cfg.parallel.cp_mode, 1))
        vae, metrics, rows, failed = None, [], [], []
        if writer and mine:
            try:
                vae, metrics = self._writer_tools()
            except Exception as exc:  # noqa: BLE001  (reported by run(); this rank still samples with its replica)
                failed.append(f"loading the VAE or the metrics: {type(exc).__name__}: {exc}")
        for n in mine:
            job, cond = self.jobs[n], self.conditions[n]
            for c in chunks:
                with_audio_strength(c, job.audio_strength)
            branches = {b: {k: t.to(info.device) for k, t in inputs.items()} for b, inputs in cond["branches"].items()}
            noise = torch.randn(cond["latent_shape"], generator=torch.Generator().manual_seed(job.seed))[None]
            t_job = time.time()
            latents = sampler.sample(noise, branches, job.steps, job.shift, job.cfg_scale, job.ip_cfg_scale,
                                     job.embedded_guidance)
            if writer and vae is not None:
                try:
                    rows.append(self._write_and_score(step, n, job, latents, vae, metrics, folder, weights,
                                                      time.time() - t_job))
                except Exception as exc:  # noqa: BLE001  (the other ranks of the replica are already sampling on)
                    failed.append(f"job {n} ({job.output}): {type(exc).__name__}: {exc}")
        del vae, metrics
        return rows, failed

    def _writer_tools(self):
        from hcustom_mc.encoders.vae import VideoVAE
        from hcustom_mc.eval.score import load_metrics, metric_options_from

        device = self.info.device
        vae = VideoVAE.from_pretrained(self.cfg.data.encoders.vae, device=device, dtype=encoder_dtype(device))
        v = self.cfg.validation
        options = metric_options_from(v.frames, v.face_backend, flow_backend=v.flow_backend)
        metrics, self.skipped = load_metrics(self.models, device, v.metrics, options)
        for why in self.skipped.values():
            console.log_once(f"validation: not scored: {why}")
        return vae, metrics

    def _write_and_score(self, step, n, job, latents, vae, metrics, folder: Path, weights: str, sample_s: float) -> dict:
        from hcustom_mc.eval.common import VideoSample
        from hcustom_mc.eval.score import score_samples
        from hcustom_mc.inference.output import to_uint8_frames, write_contact_sheet, write_mp4, write_sidecar

        frames = to_uint8_frames(vae.decode(latents)[0].float().cpu())
        audio = None
        if job.task == "audio":
            from hcustom_mc.data.encode import read_audio

            audio = read_audio(job.audio, sample_rate=16000).numpy()
        base = folder / job.output
        write_mp4(base.with_name(base.name + ".mp4"), frames, job.fps, audio=audio, audio_rate=16000)
        write_contact_sheet(base.with_name(base.name + ".png"), frames, references=job.subjects)
        write_sidecar(base.with_name(base.name + ".json"), {
            "job": dataclasses.replace(job, output=str(base)).to_dict(), "step": step, "weights": weights,
            "run_dir": str(self.run_dir), "model": self.model_cfg.to_dict(), "sample_s": sample_s})
        sample = VideoSample(name=job.output, task=job.task, prompt=job.prompt, frames=frames, fps=float(job.fps),
                             subjects=list(job.subjects),
                             subject_box=tuple(job.subject_box) if job.subject_box else None,
                             source_video=job.source_video, audio=job.audio)
        return score_samples(metrics, [sample])[0]

    def _report(self, step: int, rows: list[dict], folder: Path, elapsed: float, tracker) -> dict:
        from hcustom_mc.eval.report import write_report
        from hcustom_mc.eval.score import METRICS, flat_metrics, reported, summarize

        rows.sort(key=lambda r: r["name"])
        names = reported(m for m in METRICS if m in self.cfg.validation.metrics)
        summary = summarize(rows, names)
        columns = ["name", "task", "frames", *names]
        info = {"step": step, "models": self.models, "not_scored": getattr(self, "skipped", {}),
                "elapsed_s": round(elapsed, 2)}
        write_report(folder, rows, summary, columns, info)
        metrics = flat_metrics(summary, "val/")
        metrics["validation_s"] = elapsed
        tracker.log_metrics(step, metrics)
        tracker.log_artifacts(folder, f"validation/step_{step:07d}")
        scored = ", ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items() if k.count("/") == 1)
        log.info("validation at step %d: %d jobs in %.1fs -> %s%s", step, len(rows), elapsed, folder,
                 f"; {scored}" if scored else "")
        return summary
