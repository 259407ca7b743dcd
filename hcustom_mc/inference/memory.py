"""A memory estimate for one sampling job on one rank, checked before anything is allocated.

The estimate is deliberately simple and errs high only where the terms are exact (weights, buffers); it
exists to refuse jobs that cannot fit at all (a 100000x100000 video, 400001 frames), not to pack a device:

    DiT weights       parameters x dtype bytes / TP (replicated parts counted once per rank: a little high)
    encoders          the weight files' sizes on disk (LLaVA, CLIP, VAE, Whisper), loaded on every rank
    DiT activations   per forward, branches x tokens-per-rank x (6 H + 2 M) x dtype bytes (one block's
                      qkv / mlp / output working set; attention runs in segments, no S x S matrix)
    latents           noise, latents, one velocity per branch, fp32
    video (rank 0)    frames x H x W x 3 x 9 bytes (the decoded fp32 video, its blended copy, uint8 frames)
    VAE tile          one spatial/temporal decode tile: 16 x 256 x 256 pixels x 128 channels x 4 B x 6 buffers
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from hcustom_mc.checkpoint.integrity import human_bytes

VAE_TILE_BYTES = 16 * 256 * 256 * 128 * 4 * 6
HEADROOM = 0.9  # of the free memory a job may plan to use


def dit_parameters(model_cfg) -> int:
    from hcustom_mc.model import HunyuanCustomDiT

    total = model_cfg.num_double_blocks + model_cfg.num_single_blocks
    model = HunyuanCustomDiT(model_cfg, layers=range(total), device="meta")
    return sum(p.numel() for p in model.parameters())


def encoder_bytes(paths) -> int:
    total = 0
    for name in ("llava", "clip", "vae", "whisper"):
        folder = getattr(paths, name, None) if paths is not None else None
        if not folder or not Path(folder).exists():
            continue
        root = Path(folder)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()
                                                and p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
        total += sum(p.stat().st_size for p in files)
    return total


def job_bytes(job, model_cfg, params: int, dtype_bytes: int, tp: int, cp: int, cfg_parallel: int,
              branches: int, encoders: int = 0, rank0: bool = True, text_len: int = 256) -> dict[str, int]:
    """The estimate's terms for a resolved, validated job (sizes are positive integers)."""
    pt, ph, pw = model_cfg.patch_size
    K = len(job.subjects)
    lat_f = (job.frames - 1) // 4 + 1
    lat_h, lat_w = job.height // 8, job.width // 8
    tokens = math.ceil((K + lat_f) // pt * (lat_h // ph) * (lat_w // pw) / cp) + text_len
    per_rank_branches = branches if cfg_parallel == 1 else 1
    H, M = model_cfg.hidden_size, model_cfg.mlp_hidden
    latent_elems = model_cfg.in_channels * (K + lat_f) * lat_h * lat_w
    pixels = job.frames * job.height * job.width
    return {
        "DiT weights": params * dtype_bytes // tp,
        "encoders": encoders,
        "DiT activations": per_rank_branches * tokens * (6 * H + 2 * M) * dtype_bytes,
        "latents": latent_elems * 4 * (2 + branches),
        "video": pixels * 3 * 9 if rank0 else 0,
        "VAE tile": VAE_TILE_BYTES,
    }


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(free bytes, what was measured) on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], "available host memory (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available host memory"


def check_jobs_fit(jobs, model_cfg, dtype: torch.dtype, device: torch.device, tp: int, cp: int, cfg_parallel: int,
                   paths=None, world_size: int = 1, text_len: int = 256) -> None:
    """Raise InputError for every job whose estimate exceeds what this device has free (one message)."""
    from hcustom_mc.inference.scheduler import branches_needed
    from hcustom_mc.model.model import InputError

    params = dit_parameters(model_cfg)
    dtype_bytes = torch.finfo(dtype).bits // 8
    enc = encoder_bytes(paths)
    free, what = available_bytes(device)
    # ranks of one host share its memory on CPU; each GPU has its own
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if device.type == "cpu" else 1
    budget = free * HEADROOM
    problems = []
    for n, job in enumerate(jobs):
        branches = len(branches_needed(job.cfg_scale, job.ip_cfg_scale))
        terms = job_bytes(job, model_cfg, params, dtype_bytes, tp, cp, cfg_parallel, branches, enc, text_len=text_len)
        need = sum(terms.values()) + (local - 1) * (sum(terms.values()) - terms["video"])
        if need > budget:
            parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in terms.items() if v)
            per = f" x {local} ranks on this host" if local > 1 else ""
            problems.append(f"job {n} ({job.width}x{job.height}, {job.frames} frames) needs about {human_bytes(need)} "
                            f"({parts}{per}), more than the {human_bytes(budget)} usable of the {human_bytes(free)} {what}: "
                            f"lower width/height/frames, or add ranks (--tp/--cp)")
    if problems:
        raise InputError("jobs that cannot fit in memory (estimated before loading anything):\n  - " + "\n  - ".join(problems))
