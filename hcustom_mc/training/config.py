"""Training configuration: typed dataclasses, a YAML file, Megatron-style command-line overrides.

Precedence: dataclass defaults < `--config FILE.yaml` < `--set key=value` < named flags. Every flag maps to one
field (FLAGS below), so `--help` and the YAML keys describe the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcustom_mc.model.config import ConfigError, load_yaml
from hcustom_mc.data.config import TASKS, DataConfig, EncoderPaths  # noqa: F401 (part of the training config)
from hcustom_mc.parallel.config import ParallelConfig
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY, VERIFY_HELP


def _lora_default_targets():
    from hcustom_mc.model.lora import DEFAULT_TARGETS

    return DEFAULT_TARGETS


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01  # not applied to biases and norm weights
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True  # ZeRO-1 over data parallel ranks (used only at DP > 1)
    overlap_grad_reduce: bool = True  # DP > 1: reduce gradient buckets during backward (training/overlap.py)
    overlap_param_gather: bool = True  # distributed optimizer: gather parameters during the next forward


@dataclass
class ObjectiveConfig:
    """Flow matching (paper): x_t = t*noise + (1-t)*x0, target = noise - x0, t ~ logit-normal, shifted."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # t <- s*t / (1 + (s-1)*t); 1 = no shift


@dataclass
class CheckpointConfig:
    save: str | None = None  # folder of iter_XXXXXXX checkpoints + `latest`
    load: str | None = None  # a folder written by --save (resumes from its `latest`)
    save_interval: int = 0  # steps; 0 = only at the end and on SIGTERM/SIGINT
    keep_last: int = 2
    # weights-only start for fine-tuning (used when --load has no checkpoint yet): release .pt, diffusers, mcore
    pretrained: str | None = None
    pretrained_format: str = "auto"  # auto | release | diffusers | mcore
    pretrained_key: str = "module"  # module | ema (release files and our checkpoints)
    pretrained_allow_missing: list[str] = field(default_factory=list)  # name prefixes initialised fresh
    override_schedule: bool = False  # resume with a changed LR schedule / length (continues from the step)
    verify: str = DEFAULT_VERIFY  # loading: full (sizes + sha256 against the manifest) | size | off


@dataclass
class LoggingConfig:
    log_interval: int = 1
    mlflow_tracking_uri: str | None = None  # default: sqlite store inside the run folder
    mlflow_experiment: str = "hcustom-mc"
    run_name: str | None = None
    run_dir: str = "runs/default"
    peak_tflops: float | None = None  # per device, for MFU; default: known GPUs only
    verbose: bool = False  # --verbose: known third-party warnings, every rank's warnings, the full config


@dataclass
class ValidationConfig:
    """Sampling fixed jobs with the weights being trained, scored with the metrics (training/validation.py)."""

    jobs: str | None = None  # a YAML/JSON list of sampling jobs (the sampler's --jobs format); None = no validation
    interval: int = 0  # every N steps, and at the end of training; 0 = at the end only
    models: str | None = None  # the metrics' models folder (README "Scoring videos"); None: the no-download metrics
    metrics: list[str] = field(default_factory=lambda: ["face_sim", "dino_sim", "clip_score", "temporal_consistency",
                                                        "dynamic_degree"])
    frames: int = 32  # frames scored per video by the per-frame metrics
    text_len: int = 256  # LLaVA tokens of a job's prompt (the sampler's --text-len; the release uses 256)
    face_backend: str = "auto"  # auto | insightface | dlib
    flow_backend: str = "auto"  # auto | raft | farneback


@dataclass
class TrainConfig:
    model: str = "tiny"  # tiny | 13b | a ModelConfig JSON/YAML file
    variant: str = "base"  # base | audio | editing
    mode: str = "release"  # release | paper
    max_identity_images: int | None = None  # paper mode: None = 3 (PAPER_IDENTITY_IMAGES); release mode takes 1
    identity_rope: str = "paper"  # paper mode's identity RoPE positions: paper | release_spatial (model/rope.py)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_steps: int = 10
    exit_after_steps: int | None = None  # stop (and save) after this many steps of this invocation
    bf16: bool = False
    recompute_granularity: str | None = None  # None | full | selective
    recompute_method: str | None = None  # full only: None (every block) | uniform | block (as megatron)
    recompute_num_layers: int | None = None  # uniform: blocks per checkpointed run; block: first N blocks per chunk
    kernels: str = "auto"  # auto (Triton on CUDA) | triton | torch: the DiT's fused glue kernels
    trainable: str = "all"  # all | new (audio / video-condition branches only)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen
    init_seed: int = 0
    zero_init: bool = True  # release zero-inits modulations and the final layer
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.9999); None = off
    skip_nonfinite_steps: int = 0  # skip up to N steps with a non-finite loss or grad norm (0 = stop at the first)
    # LoRA (hcustom_mc/model/lora.py): rank 0 = off; on, only adapters (and with trainable=new the new modules) train
    lora_rank: int = 0
    lora_alpha: float | None = None  # None = rank (scale 1)
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(_lora_default_targets()))
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self, world_size: int) -> "TrainConfig":
        from hcustom_mc.training.config_check import field_errors

        errors = field_errors(self)  # every field's type and range (config_check.RANGES), generically
        if errors:  # the checks below compare values, which needs the right types
            raise ConfigError(_invalid(errors))
        dp = self.parallel.data_parallel(world_size) if world_size % (
            self.parallel.tensor_parallel * self.parallel.pipeline_parallel * self.parallel.context_parallel) == 0 else None
        if self.micro_batch_size < 1:
            errors.append(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        elif dp and self.global_batch_size % (self.micro_batch_size * dp):
            errors.append(f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                          f"{self.micro_batch_size} x data parallel {dp}")
        if self.train_steps < 1:
            errors.append(f"train_steps must be >= 1, got {self.train_steps}")
        if self.recompute_granularity not in (None, "full", "selective"):
            errors.append(f"recompute_granularity must be full or selective, got {self.recompute_granularity!r}")
        if self.recompute_method not in (None, "uniform", "block"):
            errors.append(f"recompute_method must be uniform or block, got {self.recompute_method!r}")
        elif self.recompute_method and self.recompute_granularity != "full":
            errors.append("--recompute-method needs --recompute-granularity full")
        if self.recompute_num_layers is not None and (self.recompute_num_layers < 0 or not self.recompute_method):
            errors.append("--recompute-num-layers needs --recompute-method and a value >= 0")
        if self.kernels not in ("auto", "triton", "torch"):
            errors.append(f"kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.trainable not in ("all", "new"):
            errors.append(f"trainable must be all or new, got {self.trainable!r}")
        if self.optim.decay_style not in ("cosine", "linear", "constant"):
            errors.append(f"decay_style must be cosine, linear or constant, got {self.optim.decay_style!r}")
        if (self.data.frames - 1) % 4:
            errors.append(f"data.frames must be 4k+1 (the causal VAE's frame rule), got {self.data.frames}")
        if self.data.dataset not in ("synthetic", "shards", "manifest"):
            errors.append(f"data.dataset must be synthetic, shards or manifest, got {self.data.dataset!r}")
        elif self.data.dataset != "synthetic" and not self.data.path:
            errors.append(f"data.dataset={self.data.dataset} needs data.path (--data-path)")
        elif self.data.path and not Path(self.data.path).exists():
            errors.append(f"data.path {self.data.path} does not exist")
        if self.data.dataset == "manifest":
            for name in ("llava", "clip", "vae"):
                if not getattr(self.data.encoders, name):
                    errors.append(f"data.dataset=manifest encodes online and needs data.encoders.{name}")
            if self.data.task_weights.get("audio", 0) > 0 and not self.data.encoders.whisper:
                errors.append("the audio task with data.dataset=manifest needs data.encoders.whisper")
        if self.data.encoder_dtype not in ("auto", "float32", "float16", "bfloat16"):
            errors.append(f"data.encoder_dtype must be auto, float32, float16 or bfloat16, got {self.data.encoder_dtype!r}")
        if self.data.video_backend not in ("auto", "dali-gpu", "dali-cpu", "pyav"):
            errors.append(f"data.video_backend must be auto, dali-gpu, dali-cpu or pyav, got {self.data.video_backend!r}")
        unknown = set(self.data.task_weights) - set(TASKS)
        if unknown:
            errors.append(f"unknown tasks in task_weights: {sorted(unknown)} (known: {TASKS})")
        if not any(w > 0 for w in self.data.task_weights.values()):
            errors.append("task_weights needs at least one task with a positive weight")
        wants = {t for t, w in self.data.task_weights.items() if w > 0}
        if "audio" in wants and self.variant != "audio":
            errors.append("the audio task needs variant=audio")
        if "editing" in wants and self.variant != "editing":
            errors.append("the editing task needs variant=editing")
        if "multi_identity" in wants and self.mode != "paper":
            errors.append("multi_identity (K > 1) needs mode=paper (the release supports one identity image)")
        if self.identity_rope != "paper" and self.mode != "paper":
            errors.append(f"identity_rope={self.identity_rope} (--identity-rope) is a paper-mode option: add --mode paper")
        if self.checkpoint.load and not Path(self.checkpoint.load).exists() and not self.checkpoint.pretrained:
            errors.append(f"--load {self.checkpoint.load} does not exist")
        ck = self.checkpoint
        if ck.pretrained and not Path(ck.pretrained).exists():
            errors.append(f"--pretrained {ck.pretrained} does not exist")
        if ck.pretrained_allow_missing and not ck.pretrained:
            errors.append("--pretrained-allow-missing needs --pretrained")

        if self.optim.min_lr > self.optim.lr:
            errors.append(f"optim.min_lr {self.optim.min_lr:g} is greater than optim.lr {self.optim.lr:g} (--min-lr "
                          f"must be <= --lr: the schedule decays from --lr to --min-lr)")
        if self.kernels == "triton" and not _triton_can_run():
            errors.append("kernels=triton (--kernels triton) needs a CUDA GPU and this host has none: use --kernels "
                          "auto or torch (or TRITON_INTERPRET=1, the slow Triton interpreter)")
        errors += _validation_errors(self)
        run_dir = Path(self.logging.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            errors.append(f"logging.run_dir {run_dir} is a file, not a folder (--run-dir): pass a folder")
        if errors:
            raise ConfigError(_invalid(errors))
        return self

    def model_config(self):
        """The DiT config this run trains (preprocessing uses it too, so shards match the model)."""
        from hcustom_mc.model.config import get_model_config, mode_overrides

        return get_model_config(self.model, self.variant, **mode_overrides(
            self.mode, self.max_identity_images, self.identity_rope if self.mode == "paper" else None))

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.parallel.data_parallel(world_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# flag -> (dotted field, type); type bool means a store_true switch.
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--tensor-model-parallel-size": ("parallel.tensor_parallel", int, "TP size"),
    "--pipeline-model-parallel-size": ("parallel.pipeline_parallel", int, "PP size"),
    "--virtual-pipeline-model-parallel-size": ("parallel.virtual_pipeline_parallel", int, "model chunks per PP rank (interleaved 1F1B)"),
    "--context-parallel-size": ("parallel.context_parallel", int, "CP size (image tokens split by whole latent frames)"),
    "--cp-comm-type": ("parallel.cp_mode", str, "ulysses (all-to-all), ring (K/V around the ring) or usp (both)"),
    "--ulysses-degree": ("parallel.ulysses_degree", int, "usp: Ulysses group size inside the CP group"),
    "--sequence-parallel": ("parallel.sequence_parallel", bool, "sequence parallel: split the tokens between TP regions over the TP group (needs TP > 1)"),
    "--micro-batch-size": ("micro_batch_size", int, "samples per micro batch"),
    "--global-batch-size": ("global_batch_size", int, "samples per optimizer step"),
    "--train-iters": ("train_steps", int, "optimizer steps"),
    "--exit-after-iters": ("exit_after_steps", int, "stop after N steps of this run, saving a checkpoint (the LR schedule still spans --train-iters)"),
    "--bf16": ("bf16", bool, "bf16 compute with fp32 main weights"),
    "--recompute-granularity": ("recompute_granularity", str, "full (block inputs only) or selective (norms, modulation, MLP activation, RoPE; never the attention core)"),
    "--recompute-method": ("recompute_method", str, "full only: uniform (runs of N blocks) or block (first N blocks per chunk)"),
    "--recompute-num-layers": ("recompute_num_layers", int, "N for --recompute-method"),
    "--kernels": ("kernels", str, "auto (Triton on CUDA) | triton | torch"),
    "--model": ("model", str, "tiny | 13b | ModelConfig file"),
    "--variant": ("variant", str, "base | audio | editing"),
    "--mode": ("mode", str, "release | paper"),
    "--max-identity-images": ("max_identity_images", int, "paper mode: the most identity images (subjects) a sample "
                              "may have; release mode takes exactly 1"),
    "--identity-rope": ("identity_rope", str, "paper mode: identity image k's RoPE positions: paper (t=-k, h=i+H', "
                        "w=j+W', the paper's eqs. 1-2) or release_spatial (t=-k, h=i, w=j+W': the spatial offsets the "
                        "released single-subject weights learned)"),
    "--trainable": ("trainable", str, "all | new"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--min-lr": ("optim.min_lr", float, "final learning rate"),
    "--lr-warmup-iters": ("optim.warmup_steps", int, "linear warmup steps"),
    "--lr-decay-style": ("optim.decay_style", str, "cosine | linear | constant"),
    "--weight-decay": ("optim.weight_decay", float, "AdamW weight decay (not on biases/norms)"),
    "--clip-grad": ("optim.clip_grad", float, "global gradient-norm clip"),
    "--no-distributed-optimizer": ("optim.use_distributed_optimizer", "false", "keep full optimizer state on every DP rank"),
    "--no-overlap-grad-reduce": ("optim.overlap_grad_reduce", "false", "reduce gradients after backward, not during it"),
    "--no-overlap-param-gather": ("optim.overlap_param_gather", "false", "gather parameters right after the step"),
    "--seed": ("data.seed", int, "data / noise seed"),
    "--data-type": ("data.dataset", str, "synthetic | shards | manifest"),
    "--data-path": ("data.path", str, "shard folder (shards) or manifest.jsonl (manifest)"),
    "--check-shards": ("data.check_shards", bool, "read every shard tensor at start; NaN/inf samples are bad data"),
    "--video-backend": ("data.video_backend", str, "auto | dali-gpu | dali-cpu | pyav"),
    "--init-seed": ("init_seed", int, "weight init seed"),
    "--save": ("checkpoint.save", str, "checkpoint folder"),
    "--load": ("checkpoint.load", str, "resume from this checkpoint folder"),
    "--pretrained": ("checkpoint.pretrained", str, "initialise the weights (only) from a release .pt, a diffusers folder or an "
                     "mcore checkpoint; ignored when --load holds a checkpoint (resume)"),
    "--pretrained-format": ("checkpoint.pretrained_format", str, "auto | release | diffusers | mcore"),
    "--pretrained-key": ("checkpoint.pretrained_key", str, "module | ema: which weights of a release file or our checkpoint"),
    "--pretrained-allow-missing": ("checkpoint.pretrained_allow_missing", list, "parameter-name prefixes the source may "
                                   "lack; initialised fresh (e.g. audio_ for base -> audio)"),
    "--override-schedule": ("checkpoint.override_schedule", bool, "resume with a changed --lr/--min-lr/--lr-decay-style/"
                            "--lr-warmup-iters/--train-iters: the new schedule continues from the resumed step"),
    "--ema-decay": ("ema_decay", float, "keep an EMA of the weights with this decay (saved, resumed, exportable)"),
    "--skip-nonfinite-steps": ("skip_nonfinite_steps", int, "skip up to N steps whose loss or grad norm is inf/NaN "
                               "(0: stop at the first, before the optimizer step)"),
    "--lora-rank": ("lora_rank", int, "train LoRA adapters of this rank on the frozen base (0 = off)"),
    "--lora-alpha": ("lora_alpha", float, "LoRA alpha (scale alpha/rank)"),
    "--lora-dropout": ("lora_dropout", float, "dropout on the adapters' input"),
    "--lora-targets": ("lora_targets", list, "module-name patterns (fnmatch) given adapters"),
    "--save-interval": ("checkpoint.save_interval", int, "save every N steps"),
    "--keep-last": ("checkpoint.keep_last", int, "checkpoints kept"),
    "--verify-checkpoint": ("checkpoint.verify", str, VERIFY_HELP.replace("the checkpoint about to be loaded", "--load")),
    "--log-interval": ("logging.log_interval", int, "console/MLflow logging every N steps"),
    "--mlflow-tracking-uri": ("logging.mlflow_tracking_uri", str, "MLflow tracking URI: a server or a store"),
    "--run-dir": ("logging.run_dir", str, "run folder (logs, MLflow store)"),
    "--run-name": ("logging.run_name", str, "MLflow run name"),
    "--peak-tflops": ("logging.peak_tflops", float, "per-device peak TFLOP/s for MFU"),
    "--eval-jobs": ("validation.jobs", str, "sample these jobs (a YAML/JSON list, the sampler's --jobs format) with the "
                    "weights being trained (the EMA when --ema-decay is on), on the training ranks, write the videos "
                    "to RUN_DIR/validation/step_N/, score them and log both to MLflow"),
    "--eval-interval": ("validation.interval", int, "validate every N steps and at the end (0: at the end only)"),
    "--eval-models": ("validation.models", str, "the metrics' models folder (README \"Scoring videos\")"),
    "--eval-metrics": ("validation.metrics", list, "metrics to log: face_sim dino_sim clip_score temporal_consistency "
                       "dynamic_degree"),
    "--eval-frames": ("validation.frames", int, "frames scored per video by the per-frame metrics"),
    "--eval-text-len": ("validation.text_len", int, "LLaVA tokens of the jobs' prompts (the sampler's --text-len)"),
    "--eval-face-backend": ("validation.face_backend", str, "face_sim: auto | insightface | dlib"),
    "--eval-flow-backend": ("validation.flow_backend", str, "dynamic_degree: auto | raft | farneback"),
}


# --help groups: a flag's section, from its field's section (top-level fields listed here)
TOP_LEVEL_GROUP = {"model": "model", "variant": "model", "mode": "model", "max_identity_images": "model",
                   "identity_rope": "model", "trainable": "model", "kernels": "model",
                   "bf16": "model", "recompute_granularity": "model", "recompute_method": "model",
                   "recompute_num_layers": "model", "init_seed": "model", "lora_rank": "model", "lora_alpha": "model",
                   "lora_dropout": "model", "lora_targets": "model", "ema_decay": "optimizer",
                   "micro_batch_size": "optimizer", "global_batch_size": "optimizer", "train_steps": "optimizer",
                   "exit_after_steps": "optimizer", "skip_nonfinite_steps": "optimizer"}
SECTION_GROUP = {"parallel": "parallel", "optim": "optimizer", "data": "data", "checkpoint": "checkpoint",
                 "logging": "logging", "validation": "validation"}
GROUPS = {"model": "model", "parallel": "parallel layout", "data": "data", "optimizer": "optimizer, batch and schedule",
          "checkpoint": "checkpoint", "logging": "logging and console",
          "validation": "validation during training (sampling and metrics)"}


def _validation_errors(cfg: TrainConfig) -> list[str]:
    """What can be checked of --eval-* before anything loads (the jobs themselves: training/validation.py)."""
    v, errors = cfg.validation, []
    if v.jobs is None:
        if v.interval:
            errors.append("--eval-interval needs --eval-jobs (the jobs to sample)")
        return errors
    if not Path(v.jobs).is_file():
        errors.append(f"--eval-jobs {v.jobs} does not exist")
    lacking = [name for name in ("llava", "clip", "vae") if not getattr(cfg.data.encoders, name)]
    if lacking:
        errors.append(f"--eval-jobs needs data.encoders.{{{', '.join(lacking)}}}: validation encodes its jobs' prompts "
                      f"and images and decodes the videos with the data's encoders")
    if v.models is not None and not Path(v.models).is_dir():
        errors.append(f"--eval-models {v.models} is not a folder")
    known = ("face_sim", "dino_sim", "clip_score", "temporal_consistency", "dynamic_degree")
    unknown = [m for m in v.metrics if m not in known]
    if unknown:
        errors.append(f"--eval-metrics: unknown {unknown}; known: {', '.join(known)}")
    if v.face_backend not in ("auto", "insightface", "dlib"):
        errors.append(f"--eval-face-backend must be auto, insightface or dlib, got {v.face_backend!r}")
    if v.flow_backend not in ("auto", "raft", "farneback"):
        errors.append(f"--eval-flow-backend must be auto, raft or farneback, got {v.flow_backend!r}")
    return errors


def _invalid(errors: list[str]) -> str:
    """One problem: one line. Several: a list."""
    if len(errors) == 1:
        return f"invalid training config: {errors[0]}"
    return "invalid training config:\n  - " + "\n  - ".join(errors)


def _triton_can_run() -> bool:
    import os

    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def field_default(dotted: str):
    """The dataclass default of a dotted TrainConfig field, without building a TrainConfig (which would import
    the LoRA module, and torch with it, before --help returns)."""
    cls, value = TrainConfig, None
    for part in dotted.split("."):
        f = {f.name: f for f in dataclasses.fields(cls)}[part]
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif dotted == "lora_targets":  # its factory imports the LoRA module (and torch)
            return "the attention and MLP projections (DEFAULT_TARGETS in hcustom_mc/model/lora.py)"
        else:
            value = f.default_factory()
        cls = type(value)
    return value


# what an unset (None) field means, for --help
UNSET_MEANS = {"checkpoint.save": "no checkpoints", "checkpoint.load": "a fresh start",
               "max_identity_images": "3 in paper mode, 1 in release mode",
               "checkpoint.pretrained": "random initialisation", "exit_after_steps": "run to --train-iters",
               "parallel.virtual_pipeline_parallel": "no interleaving", "parallel.ulysses_degree": "usp: the whole CP group",
               "recompute_granularity": "no recomputation", "recompute_method": "every block",
               "recompute_num_layers": "the method's own", "ema_decay": "no EMA", "logging.run_name": "MLflow's generated name",
               "data.path": "synthetic data needs none", "logging.peak_tflops": "known GPUs only, else no MFU",
               "logging.mlflow_tracking_uri": "sqlite:///RUN_DIR/mlflow.db", "lora_alpha": "the rank (scale 1)",
               "validation.jobs": "no validation", "validation.models": "only the metrics that need no download"}


def _default_text(dotted: str, typ) -> str:
    value = field_default(dotted)
    if typ is bool:
        return "switch; default: off"
    if typ == "false":
        return "switch; default: on"
    if value is None:
        return f"default: not set: {UNSET_MEANS[dotted]}" if dotted in UNSET_MEANS else "default: not set"
    if isinstance(value, list):
        return f"default: {' '.join(map(str, value)) or 'none'}"
    return f"default: {value}"


def training_parser(prog: str = "pretrain_custom.py", description: str | None = None) -> argparse.ArgumentParser:
    """The training-config flags in their --help groups (tools/preprocess.py adds its own to the same parser)."""
    from hcustom_mc.console import ArgumentParser

    p = ArgumentParser(prog=prog, usage="torchrun ... %(prog)s [--config FILE] [--set KEY=VALUE] [flags below]",
                       description=description or "Train HunyuanCustom with megatron-core (TP, PP, CP, DP); launch it "
                       "with torchrun or `python -m hcustom_mc.launch` (torchrun's flags, short console). "
                       "Precedence: defaults < --config < --set < flags.")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups["model"].add_argument("--config", type=Path, help="YAML file of TrainConfig fields (nested sections "
                                 "allowed), e.g. examples/tiny_3d.yaml (default: not set: the defaults below)")
    groups["model"].add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                                 help="any field by dotted name, value as YAML, e.g. data.task_weights='{t2v: 1}' "
                                 "(repeatable; default: none)")
    groups["logging"].add_argument("--verbose", action="store_true", help="show the known third-party warnings, "
                                   "every rank's warnings and the full config (switch; default: off)")
    for flag, (dest, typ, help_) in FLAGS.items():
        head = dest.split(".")[0]
        group = groups[SECTION_GROUP.get(head) or TOP_LEVEL_GROUP[head]]
        help_ = f"{help_} ({_default_text(dest, typ)})".replace("%", "%%")
        if typ is bool or typ == "false":
            group.add_argument(flag, action="store_true", default=None, help=help_)
        elif typ is list:
            group.add_argument(flag, nargs="+", default=None, metavar="NAME" if dest == "validation.metrics" else "PREFIX",
                               help=help_)
        else:
            group.add_argument(flag, type=typ, default=None, metavar=dest.split(".")[-1].upper(), help=help_)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return training_parser().parse_args(argv)


def _set(cfg, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    if not hasattr(obj, last):
        raise ConfigError(f"unknown config field {dotted!r}")
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):  # a section given as a mapping: merge
        for key, sub in value.items():
            try:
                _set(current, key, sub)
            except ConfigError:
                raise ConfigError(f"unknown config field {dotted}.{key}") from None
        return
    setattr(obj, last, value)


def _apply_mapping(cfg, data: dict, prefix: str = "") -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        target = cfg
        for part in name.split(".")[:-1]:
            target = getattr(target, part)
        current = getattr(target, name.split(".")[-1], None) if hasattr(target, name.split(".")[-1]) else None
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _apply_mapping(cfg, value, name + ".")
        else:
            _set(cfg, name, value)


def build_config(argv=None, args: argparse.Namespace | None = None) -> TrainConfig:
    """From the command line (`argv`), or from flags already parsed by training_parser() (`args`)."""
    args = parse_args(argv) if args is None else args
    cfg = TrainConfig()
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config} does not exist")
        data = load_yaml(args.config.read_text(errors="replace"), f"--config {args.config}")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of TrainConfig fields (name: value), "
                              f"got a {type(data).__name__}")
        _apply_mapping(cfg, data or {})
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        _set(cfg, key, load_yaml(raw, f"--set {item}"))
    if getattr(args, "verbose", False):  # (the console itself is set up from argv, before this runs)
        cfg.logging.verbose = True
    for flag, (dest, typ, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set(cfg, dest, False if typ == "false" else value)
    return cfg


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=str)
