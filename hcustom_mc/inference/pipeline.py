"""The parallel denoising loop: the training model, loaded by the training loaders, under TP x CP x CFG.

Layout: world = TP x CP x CFG. megatron's parallel_state is initialised exactly as for training with
PP = 1 (the checkpoint loaders read it), and the model is built on that layout's process groups
(hcustom_mc.parallel.groups.layout_process_groups): its data-parallel group `dp` *is* the CFG group. With
CFG-parallel 2 (or 3 for ip-cfg) each of its ranks runs one guidance branch, otherwise every rank runs all
branches as one batch. The sampler reads every group from the model's collection. Per step:

    velocity of my branches  (TP: megatron's column/row-parallel linears; CP: my latent frames only)
    -> all-gather frames over CP -> all-gather branches over CFG -> guidance -> Euler step in fp32

Every rank ends each step with identical latents. Weights are never all-gathered: TP ranks load only
their shards (megatron dist checkpoints reshard on load; release/diffusers files are sliced per rank).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hcustom_mc.inference.scheduler import FlowMatchEulerScheduler, branches_needed, guide
from hcustom_mc.model import HunyuanCustomDiT
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY
from hcustom_mc.model.config import ConfigError, ModelConfig
from hcustom_mc.device import compute_device
from hcustom_mc.parallel.groups import group_rank, group_size, process_groups_of

log = logging.getLogger("hcustom_mc")
CHECKPOINT_FORMATS = ("auto", "mcore", "release", "diffusers")


class NonFiniteError(FloatingPointError):
    """The latents became NaN/inf while sampling: the job stopped and wrote nothing."""


@dataclass
class SamplerLayout:
    """world = TP x CP x CFG-parallel; checked with the job by inputs.validate_job before anything loads."""

    tensor_parallel: int = 1
    context_parallel: int = 1
    cp_mode: str = "ulysses"
    cfg_parallel: int = 1


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | Path, fmt: str = "auto", verify: str = DEFAULT_VERIFY) -> tuple[str, Path]:
    """(format, path to load): a training save folder resolves to its `latest` checkpoint (or, when that is
    damaged, the newest sound iter_*); an mcore checkpoint is verified against its manifest (`verify`)."""
    from hcustom_mc.checkpoint.integrity import iter_folders, select_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if fmt not in CHECKPOINT_FORMATS:
        raise ConfigError(f"checkpoint format must be one of {CHECKPOINT_FORMATS}, got {fmt!r}")
    if fmt in ("auto", "mcore") and path.is_dir() and not (path / "metadata.json").is_file() and (
            (path / "latest").exists() or iter_folders(path)):
        path = select_checkpoint(path, verify) or path
    elif fmt in ("auto", "mcore") and path.is_dir() and (path / "metadata.json").is_file():
        select_checkpoint(path, verify)  # named explicitly: verified, never replaced
    if fmt != "auto":
        return fmt, path
    if path.is_dir() and (path / "metadata.json").is_file():
        return "mcore", path
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "diffusers", path
    if path.is_file() or any(path.glob("*_model_states*.pt")) or any(path.glob("pytorch_model_*.pt")):
        return "release", path
    if path.is_dir() and not any(path.iterdir()):
        raise ConfigError(f"checkpoint folder {path} is empty (expected a training save folder, an mcore checkpoint, "
                          f"a release *_model_states.pt or its folder, or a diffusers folder)")
    raise ConfigError(f"cannot tell the format of checkpoint {path}: it has no latest / iter_* (training save), "
                      f"metadata.json (mcore), config.json with *.safetensors (diffusers) or *_model_states*.pt "
                      f"(release); if it is one of these, pass --checkpoint-format")


def model_config_for(path: Path, fmt: str, fallback: ModelConfig | None) -> ModelConfig:
    """The checkpoint's own config when it carries one (mcore, diffusers), else the given one."""
    if fmt == "mcore":
        from hcustom_mc.checkpoint.mcore import read_mcore_model_config

        cfg = read_mcore_model_config(path)
        if cfg is not None:
            return cfg
    if fmt == "diffusers":
        import json

        from hcustom_mc.checkpoint.diffusers_format import model_config_from_diffusers_config

        overrides = {} if fallback is None else {k: getattr(fallback, k) for k in (
            "mode", "max_identity_images", "identity_rope", "audio", "video_condition")}
        return model_config_from_diffusers_config(json.loads((path / "config.json").read_text()), **overrides)
    if fallback is None:
        raise ConfigError(f"{path} ({fmt}) carries no model config: pass --model-config (tiny, 13b or a file)")
    return fallback


def load_model(path: Path, fmt: str, model_cfg: ModelConfig, dtype: torch.dtype, cp_mode: str,
               load_key: str = "module", device: torch.device | str | None = None,
               submodules=None) -> HunyuanCustomDiT:
    """Collective: build this rank's shard of the DiT (the training module) on the TP x CP x CFG layout's
    process groups and fill it from the checkpoint; `load_key="ema"` takes the EMA weights (a release
    file's `ema` entry, or a training run's --ema-decay). It is built on and left on `device` (default: the
    compute device): block offload builds it in host memory ("cpu") and streams the blocks (inference/offload.py),
    loaders that transform the weights before they go to the GPU do the same (inference/fp8.py). `submodules`
    (default: the model's choice of linear layers) is for the latter."""
    from hcustom_mc.parallel.groups import layout_process_groups
    from hcustom_mc.parallel.sharding import load_full_state_dict

    device = compute_device() if device is None else torch.device(device)
    model = HunyuanCustomDiT(model_cfg, submodules=submodules, params_dtype=dtype, cp_mode=cp_mode,
                             pg_collection=layout_process_groups(), device=device)
    if fmt == "mcore":
        from hcustom_mc.checkpoint.mcore import load_mcore_checkpoint

        load_mcore_checkpoint(model, path, prefix="ema." if load_key == "ema" else "model.",
                              verify="off")  # verified by resolve_checkpoint
    else:
        from hcustom_mc.checkpoint.convert import read_full_state_dict

        full, _ = read_full_state_dict(path, fmt, load_key)
        load_full_state_dict(model, {k: v.to(dtype) for k, v in full.items()})
        del full
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the loop
def _gather_frames(v: torch.Tensor, frames: range, total: int, group) -> torch.Tensor:
    """[B, C, f_here, H, W] on each rank of the CP `group` -> [B, C, total, H, W] on all of them."""
    cp = group_size(group)
    if cp == 1:
        return v
    starts = [torch.zeros(2, dtype=torch.long, device=v.device) for _ in range(cp)]
    dist.all_gather(starts, torch.tensor([frames.start, len(frames)], device=v.device), group=group)
    most = max(int(s[1]) for s in starts)
    padded = torch.zeros(*v.shape[:2], most, *v.shape[3:], dtype=v.dtype, device=v.device)
    padded[:, :, : v.shape[2]] = v
    parts = [torch.empty_like(padded) for _ in range(cp)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    out = torch.empty(*v.shape[:2], total, *v.shape[3:], dtype=v.dtype, device=v.device)
    for part, s in zip(parts, starts):
        start, n = int(s[0]), int(s[1])
        out[:, :, start : start + n] = part[:, :, :n]
    return out


class ParallelSampler:
    def __init__(self, model: HunyuanCustomDiT, layout: SamplerLayout):
        self.model, self.layout = model, layout
        self.groups = process_groups_of(model)  # cp: the frames' gather; dp: the CFG group (one branch per rank)
        self.cfg_rank = group_rank(self.groups.dp) if layout.cfg_parallel > 1 else 0
        self.device = next(model.parameters()).device
        self.cache = None  # the StepCache of the run in progress (sample(cache=...))
        # False: every guidance branch of this rank in one forward (batched); True: one forward per branch, which
        # holds one branch's activations (block offload, inference/memory.py) for more forwards per step. The step
        # cache always batches: its one decision per step needs every branch's probe blocks first.
        self.branch_per_forward = False

    def _my_branches(self, names: list[str]) -> list[str]:
        return names if self.layout.cfg_parallel == 1 else [names[self.cfg_rank]]

    @torch.no_grad()
    def velocities(self, latents: torch.Tensor, timestep: float, branches: dict[str, dict], names: list[str],
                   guidance: float | None) -> dict[str, torch.Tensor]:
        """The model's velocity for every branch in `names`, full frames, on every rank (fp32)."""
        mine = self._my_branches(names)
        B = latents.shape[0]
        dtype = next(self.model.parameters()).dtype
        batched = self.cache is not None or not self.branch_per_forward
        forwards = [mine] if batched else [[n] for n in mine]
        v = torch.cat([self._forward(latents, timestep, branches, part, guidance, dtype) for part in forwards])
        first = branches[mine[0]]
        K = first["identity_latents"].shape[2] if "identity_latents" in first else 0
        pt, ph, pw = self.model.cfg.patch_size
        f, hw = latents.shape[2] // pt, (latents.shape[3] // ph) * (latents.shape[4] // pw)
        frames = self.model.video_frames_here(K, f, hw)
        v = _gather_frames(v, range(frames.start * pt, frames.stop * pt), latents.shape[2], self.groups.cp)
        out = dict(zip(mine, v.split(B)))
        if self.layout.cfg_parallel > 1:  # each CFG rank computed one branch: share them
            parts = [torch.empty_like(v) for _ in range(self.layout.cfg_parallel)]
            dist.all_gather(parts, v.contiguous(), group=self.groups.dp)
            out = dict(zip(names, parts))
        return out

    def _forward(self, latents, timestep, branches, part: list[str], guidance, dtype) -> torch.Tensor:
        """One model forward of the branches `part`, batched (fp32 velocity); through the step cache when one runs."""
        inputs = {k: torch.cat([branches[n][k] for n in part]).to(self.device) for k in branches[part[0]]}
        x = latents.to(self.device, dtype).repeat(len(part), 1, 1, 1, 1)
        t = torch.full((x.shape[0],), timestep, device=self.device, dtype=torch.float32)
        g = None if guidance is None else torch.full_like(t, guidance * 1000.0)
        if self.cache is None:
            return self.model(x, t, guidance=g, **inputs).float()
        return self.cache.forward(self.model, x, t, guidance=g, **inputs).float()

    def _decision_groups(self) -> list:
        """The groups whose ranks must take one caching decision: TP and CP (they run one forward together) and,
        under CFG-parallel, the CFG group (one decision for all branches)."""
        return [self.groups.tp, self.groups.cp] + ([self.groups.dp] if self.layout.cfg_parallel > 1 else [])

    def sample(self, noise: torch.Tensor, branches: dict[str, dict], steps: int, shift: float, cfg_scale: float,
               ip_cfg_scale: float = 0.0, embedded_guidance: float | None = None, progress=None,
               cache=None) -> torch.Tensor:
        """Integrate from sigma 1 (noise) to 0; returns the clean latents (fp32, on every rank).
        `cache`: a StepCache (inference/cache.py) that may reuse the deep blocks' residual on some steps."""
        scheduler = FlowMatchEulerScheduler(steps, shift)
        names = branches_needed(cfg_scale, ip_cfg_scale)
        missing = [n for n in names if n not in branches]
        if missing:
            raise ValueError(f"guidance needs branches {names}; missing {missing}")
        if cache is not None:
            cache.start(steps, names, self._my_branches(names), self._decision_groups())
        self.cache = cache  # every run sets its own (None: plain forwards)
        latents = noise.float().to(self.device)
        for i, t in enumerate(scheduler.timesteps.tolist()):
            t0 = time.time()
            if self.cache is not None:
                self.cache.begin_step(i)
            v = self.velocities(latents, t, branches, names, embedded_guidance)
            velocity = guide(v, cfg_scale, ip_cfg_scale, step=i, num_steps=steps)
            latents = scheduler.step(velocity, i, latents)
            # every rank holds the same full latents, so every rank stops at the same step
            if not bool(torch.isfinite(latents).all()):
                raise NonFiniteError(f"the latents became non-finite (NaN/inf) at denoising step {i + 1}/{steps} "
                                     f"(t={t:g}); nothing was written. Check the checkpoint (--verify-checkpoint full; "
                                     f"non-finite weights) and the job's guidance / audio_strength settings")
            if progress is not None:
                progress.update(time.time() - t0)
        return latents


def with_audio_strength(model: HunyuanCustomDiT, strength: float | None) -> None:
    """lambda_A is read from the model config at every forward; a job may override it (None: the model's own)."""
    if not hasattr(model, "hc_default_audio_strength"):
        model.hc_default_audio_strength = model.cfg.audio_strength
    value = model.hc_default_audio_strength if strength is None else float(strength)
    model.cfg = dataclasses.replace(model.cfg, audio_strength=value)
