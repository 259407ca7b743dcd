"""Flow-matching Euler sampler, guidance combination and per-task sampling defaults.

Conventions (training side, `training/objective.py`): x_t = σ·noise + (1−σ)·x0 and the DiT
predicts the velocity v = noise − x0, so sampling integrates dx/dσ = v from σ = 1 (pure noise)
down to σ = 0 (data). The timestep fed to the model is σ·1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "FlowMatchEulerScheduler",
    "TaskDefaults",
    "TASK_DEFAULTS",
    "GUIDANCE_DISTILLED_T2V",
    "NEGATIVE_PROMPT",
    "task_defaults",
    "ip_cfg_weight",
    "branches_needed",
    "guide",
]


class FlowMatchEulerScheduler:
    """The release's `FlowMatchDiscreteScheduler` (reverse=True, Euler solver), without its state machine.

    sigmas     = linspace(1, 0, N+1)                   (torch fp32, as the release computes it)
    sigmas'    = s·σ / (1 + (s−1)·σ)                   (shift s, evaluated in fp32 like the release)
    timesteps  = sigmas'[:-1] · 1000                   (float; what the DiT's timestep embedder sees)
    step i     : x ← x + v·(sigmas'[i+1] − sigmas'[i]) (fp32)

    Everything stays fp32 on purpose: recomputing in float64 and rounding would differ from the
    release in the last bit of a few sigmas, and with shift 13 the late sigmas are tiny, so the
    fp32 values *are* the reference. `step` upcasts the running latents and the velocity to fp32
    and returns fp32 (the release also keeps the running latents fp32 between steps; only the
    model input is cast down to bf16 by the caller).
    """

    def __init__(self, num_steps: int, shift: float):
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not shift > 0:  # also rejects NaN
            raise ValueError(f"flow shift must be > 0, got {shift!r}")
        self.num_steps = int(num_steps)
        self.shift = float(shift)
        sigmas = torch.linspace(1, 0, self.num_steps + 1, dtype=torch.float32)
        self.sigmas = (self.shift * sigmas) / (1 + (self.shift - 1) * sigmas)
        self.timesteps = (self.sigmas[:-1] * 1000).to(torch.float32)

    def __len__(self) -> int:
        return self.num_steps

    def dt(self, i: int) -> torch.Tensor:
        """σ'[i+1] − σ'[i] (negative: we move towards the data)."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} outside [0, {self.num_steps})")
        return self.sigmas[i + 1] - self.sigmas[i]

    def step(self, velocity: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        """One Euler step from σ'[i] to σ'[i+1]; returns fp32 latents."""
        dt = self.dt(i).to(latents.device)
        return latents.to(torch.float32) + velocity.to(torch.float32) * dt

    def __repr__(self) -> str:
        return f"FlowMatchEulerScheduler(num_steps={self.num_steps}, shift={self.shift})"


@dataclass(frozen=True)
class TaskDefaults:
    steps: int
    flow_shift: float
    cfg_scale: float  # real CFG; 1.0 = off (no uncond forward pass)
    embedded_guidance: Optional[float]  # only for guidance-distilled checkpoints (guidance_in present)
    fps: int  # frame rate of the saved mp4
    ip_cfg_scale: float = 0.0  # release default: ip-cfg off


# HunyuanCustom scripts (facts 3.1 and 2.5). The checkpoints have no guidance_in -> embedded None.
_IDENTITY = TaskDefaults(steps=30, flow_shift=13.0, cfg_scale=7.5, embedded_guidance=None, fps=25)

TASK_DEFAULTS: dict[str, TaskDefaults] = {
    # Text-only prompting of a HunyuanCustom checkpoint: the release ships no separate t2v settings,
    # and the weights are the identity model's, so we use the identity settings with no image.
    "t2v": _IDENTITY,
    "identity": _IDENTITY,
    # Multi-subject is not released (facts 2.2/2.6); it is the identity model with k reference
    # latents, so the identity settings are the only defensible starting point.
    "multi_identity": _IDENTITY,
    "audio": _IDENTITY,
    "editing": TaskDefaults(steps=50, flow_shift=5.0, cfg_scale=7.5, embedded_guidance=None, fps=25),
}

# HunyuanVideo t2v (cfg-distilled, has guidance_in): no real CFG, guidance 6.0 embedded (×1000 by the
# caller, as the release does), saved at 24 fps by sample_video.py.
GUIDANCE_DISTILLED_T2V = TaskDefaults(steps=50, flow_shift=7.0, cfg_scale=1.0, embedded_guidance=6.0, fps=24)

NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
    "bad teeth, bad eyes, bad limbs, distortion, blurring, text, subtitles, static, picture, black border."
)


def task_defaults(task: str, guidance_distilled: bool = False) -> TaskDefaults:
    """Defaults for `task`; a guidance-distilled checkpoint (HunyuanVideo t2v) only supports t2v."""
    if task not in TASK_DEFAULTS:
        raise KeyError(f"unknown task {task!r}; expected one of {sorted(TASK_DEFAULTS)}")
    if guidance_distilled:
        if task != "t2v":
            raise ValueError(f"a guidance-distilled (HunyuanVideo t2v) checkpoint cannot run task {task!r}")
        return GUIDANCE_DISTILLED_T2V
    return TASK_DEFAULTS[task]


def ip_cfg_weight(ip_cfg_scale: float, step: int, num_steps: int) -> float:
    """The release's linearly decaying identity weight s_i.

    Release: s_0 = ip_cfg_scale, s_{i+1} = s_i − (ip_cfg_scale − 1)/(N − 1 + 1e-3). The 1e-3 (there to
    avoid dividing by zero at N = 1) means the last step gets 1 + (ip−1)·1e-3/(N−1+1e-3), i.e. 1 to
    within ~1e-3·(ip−1)/(N−1); we keep it so that results match the release.
    """
    if not 0 <= step < num_steps:
        raise IndexError(f"step {step} outside [0, {num_steps})")
    decrement = (ip_cfg_scale - 1.0) / (num_steps - 1 + 1e-3)
    return ip_cfg_scale - step * decrement


def _check_scales(cfg_scale: float, ip_cfg_scale: float) -> None:
    # The release silently switches CFG off for scale <= 1; a scale < 1 is almost certainly a
    # mistake (it would *subtract* text guidance), so refuse it instead of ignoring it.
    if not cfg_scale >= 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 = off), got {cfg_scale!r}")
    if not ip_cfg_scale >= 0.0:
        raise ValueError(f"ip_cfg_scale must be >= 0 (0 = off), got {ip_cfg_scale!r}")


def branches_needed(cfg_scale: float, ip_cfg_scale: float = 0.0) -> list[str]:
    """Which model evaluations `guide` needs, always in the order ("uncond", "cond", "ip").

    Branch inputs (release `pipeline_hunyuan_video_custom.py`, ref = VAE identity latent,
    white = VAE(all-white image) = `uncond_ref_latents`, llava(img) = LLaVA text states with the
    identity image in the prompt; the editing bg latents are the same in every branch; the audio
    features are zeroed in uncond only):

    without ip-cfg   uncond : negative prompt (LLaVA image tokens masked out), ref, zero audio
                     cond   : prompt + llava(identity image),                   ref, audio
    with ip-cfg      uncond : negative prompt (image tokens masked),            white
                     cond   : prompt + llava(identity image),                   white
                     ip     : prompt + llava(identity image),                   ref

    With ip-cfg, "cond" and "ip" differ only in the VAE reference latent, so (ip − cond) isolates the
    identity latent's effect while (cond − uncond) stays a pure text/LLaVA direction. With
    cfg_scale == 1 the uncond term cancels (u + 1·(c − u) = c) and is not evaluated.
    """
    _check_scales(cfg_scale, ip_cfg_scale)
    names = ["uncond"] if cfg_scale != 1.0 else []
    names.append("cond")
    if ip_cfg_scale > 0:
        names.append("ip")
    return names


def guide(
    branches: dict[str, torch.Tensor],
    cfg_scale: float,
    ip_cfg_scale: float = 0.0,
    step: int = 0,
    num_steps: int = 1,
) -> torch.Tensor:
    """Combine branch velocities (fp32 result).

    2 branches: u + g·(c − u)
    3 branches: u + g·(c − u) + s_i·(ip − c),  s_i = ip_cfg_weight(ip_cfg_scale, step, num_steps)
    cfg_scale == 1 (no ip): c; the uncond branch may be absent. See `branches_needed` for what each
    branch's inputs are.
    """
    needed = branches_needed(cfg_scale, ip_cfg_scale)
    missing = [name for name in needed if name not in branches]
    if missing:
        raise KeyError(f"guide() needs branches {needed}, missing {missing}")
    c = branches["cond"].to(torch.float32)
    out = c
    if "uncond" in needed:
        u = branches["uncond"].to(torch.float32)
        out = u + cfg_scale * (c - u)
    if "ip" in needed:
        s = ip_cfg_weight(ip_cfg_scale, step, num_steps)
        out = out + s * (branches["ip"].to(torch.float32) - c)
    return out
