"""Memory estimates for sampling, checked before anything is allocated, and the choice of a sampling mode.

Three sampling modes (`--offload`), each with the DiT's weights in bf16 (2 bytes a parameter; fp32 4 on the CPU) or
fp8 (1 byte, kept fp8 and upcast per block; the blocks only, the small modules around them stay 2 bytes):

    resident   the whole DiT and every encoder (LLaVA, CLIP, the VAE, Whisper for audio) stay on the device
    encoders   the whole DiT on the device, the encoders loaded in turn (as in blocks mode); branches batched
    blocks     the DiT's blocks stream from host memory, `ahead` + 1 on the device at once (inference/offload.py);
               the guidance branches run one per forward; the encoders are loaded in turn: LLaVA, CLIP and the
               VAE for every job's conditions, then released; the DiT denoises; the VAE alone decodes

The estimate of a mode is the largest of its three phases, each the sum of what is on the device then:

    encode    encoders' weights (+ in resident mode the DiT's) + the VAE encoding one tile of the conditions
    denoise   DiT weights on the device + activations of one forward + latents (+ in resident mode the encoders)
              + the step cache's stored residuals when it is on
    decode    the VAE (+ in resident mode the DiT and the other encoders) + one decode tile + the decoded video

    DiT weights       parameters (exact: model/parameters.py) x bytes / TP; blocks mode: the non-block
                      modules + (ahead + 1) x the largest block; fp8 adds one largest block upcast to bf16
    encoders          their weight files on disk when the folders are given, else the released encoders'
                      parameter counts (ENCODER_PARAMS) x 2 bytes (fp16, as sample.py loads them on a GPU)
    DiT activations   branches per forward x tokens per rank x (7 H + 3 M) x activation bytes: a single-stream
                      block's largest live set (its input, linear1's output 3 H + M whose chunks are views, the
                      attention output, the GELU output and their concatenation H + M, and one H of q/k norm
                      copies), which is larger than a double block's; attention runs in segments (no S x S matrix)
    latents           noise, latents, one velocity per branch, fp32
    video (rank 0)    frames x H x W x 3 x 9 bytes (the decoded fp32 video, its blended copy, uint8 frames)
    VAE tile          one spatial/temporal decode tile: 16 x 256 x 256 pixels x 128 channels x 4 B x 6 buffers;
                      encoding identity images uses a 1/16 of that per image (one frame of the tile)

Not counted: the conditions themselves (text states, identity latents: a few MB), allocator fragmentation (the
HEADROOM fraction), the CUDA context and library workspaces (RUNTIME_ALLOWANCE when planning for a GPU's total
memory; the sampler measures free memory after its context exists).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hcustom_mc.checkpoint.integrity import human_bytes

VAE_TILE_BYTES = 16 * 256 * 256 * 128 * 4 * 6
HEADROOM = 0.9  # of the free memory a job may plan to use
RUNTIME_ALLOWANCE = 2 * 2**30  # CUDA context, cuBLAS / NCCL workspaces: on the GPU, not in torch's allocator
GIB = 2**30
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
OFFLOAD_MODES = ("resident", "encoders", "blocks")
# Fastest first. Resident bf16 does no extra work. Encoders in turn costs one load of LLaVA (16 GB) and the VAE per
# run, not per step: seconds against the minutes a 13B video takes. Resident fp8 adds one upcast of each block's
# weights per forward, a device-local pass at HBM bandwidth (TB/s), on every step (and costs quality). Blocks
# offload copies every block's weights over PCIe (~25 GB/s) per forward and runs the guidance branches one by one: hidden behind the compute where a block's compute outlasts
# its copy (large videos), a clear slowdown where it does not, and never faster than resident. Offload fp8 copies
# half the bytes but adds the upcast and fp8's rounding, so at a fit bf16 comes first (fp8 costs quality, too).
MODE_ORDER = (("resident", "bf16"), ("encoders", "bf16"), ("resident", "fp8"), ("encoders", "fp8"), ("blocks", "bf16"),
              ("blocks", "fp8"))
# The released encoders' parameter counts (architectures from their config.json files, counted on the meta device):
# LLaVA-LLaMA-3-8B v1.1 (LlavaForConditionalGeneration: Llama-3-8B with vocabulary 128320, CLIP ViT-L/14-336
# vision tower, projector), CLIP ViT-L/14 text model, HunyuanVideo's 884-16c VAE (diffusers
# AutoencoderKLHunyuanVideo, default config) and whisper-tiny (WhisperModel).
ENCODER_PARAMS = {"llava": 8_355_272_704, "clip": 123_060_480, "vae": 246_478_803, "whisper": 37_760_640}
ENCODER_BYTES_PER_PARAM = 2


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class DiTSize:
    """Parameters of the whole DiT and of each block (in run order), at TP = 1."""

    total: int
    blocks: tuple[int, ...]

    @property
    def non_block(self) -> int:
        return self.total - sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks)


def dit_size(model_cfg) -> DiTSize:
    """By arithmetic on the config (model/parameters.py): no model is built, so no process group is needed."""
    from hcustom_mc.model.parameters import block_parameters, total_parameters

    return DiTSize(total=total_parameters(model_cfg), blocks=block_parameters(model_cfg))


def encoder_sizes(paths) -> dict[str, int]:
    """Bytes of the encoders' weight files on disk (LLaVA, CLIP, VAE, Whisper), for the folders that exist."""
    out = {}
    for name in ("llava", "clip", "vae", "whisper"):
        folder = getattr(paths, name, None) if paths is not None else None
        if not folder or not Path(folder).exists():
            continue
        root = Path(folder)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()
                                                and p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
        out[name] = sum(p.stat().st_size for p in files)
    return out


def nominal_encoder_sizes(audio: bool) -> dict[str, int]:
    """The released encoders' bytes as loaded on a GPU (fp16): what the planner assumes without the folders."""
    return {k: n * ENCODER_BYTES_PER_PARAM for k, n in ENCODER_PARAMS.items() if audio or k != "whisper"}


@dataclass(frozen=True)
class JobSize:
    """What of a sampling job the estimate reads."""

    width: int
    height: int
    frames: int
    identity_images: int = 1
    branches: int = 2  # guidance branches: uncond + cond (+ ip)
    text_len: int = 256
    encodes_video: bool = False  # editing: the source video goes through the VAE encoder

    @classmethod
    def of(cls, job, text_len: int = 256) -> "JobSize":
        """Of a resolved, validated SampleJob."""
        from hcustom_mc.inference.scheduler import branches_needed

        return cls(job.width, job.height, job.frames, len(job.subjects),
                   len(branches_needed(job.cfg_scale, job.ip_cfg_scale)), text_len, job.task == "editing")


# ----------------------------------------------------------------------------- the estimate
@dataclass
class ModeEstimate:
    mode: str  # resident | blocks
    weights: str  # fp32 | bf16 | fp8
    ahead: int
    phases: dict[str, dict[str, int]]  # encode / denoise / decode -> term -> bytes
    budget: int | None = None  # usable bytes it was compared with

    @property
    def name(self) -> str:
        return f"{self.mode} {self.weights}" + (f" (ahead {self.ahead})" if self.mode == "blocks" else "")

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def peak(self) -> int:
        return sum(self.phases[self.peak_phase].values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def terms(self, fmt=human_bytes) -> str:
        """The peak phase's terms (in the module docstring's order)."""
        return ", ".join(f"{k} {fmt(v)}" for k, v in self.phases[self.peak_phase].items() if v)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def sampling_estimate(model_cfg, job: JobSize, mode: str = "resident", weights: str = "bf16", *,
                      dit: DiTSize | None = None, encoders: dict[str, int] | None = None, tp: int = 1, cp: int = 1,
                      cfg_parallel: int = 1, ahead: int = 1, rank0: bool = True,
                      step_cache: bool = False) -> ModeEstimate:
    """Bytes on one rank's device in each phase of sampling `job` in `mode` (module docstring). `step_cache`: the
    sampler's step cache is on, which runs the branches batched in every mode (its one decision per step needs every
    branch's probe blocks) and keeps two residuals (probe and deep blocks) of the image tokens per branch."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"mode must be one of {OFFLOAD_MODES}, got {mode!r}")
    if weights not in WEIGHT_BYTES:
        raise ValueError(f"weights must be one of {tuple(WEIGHT_BYTES)}, got {weights!r}")
    dit = dit or dit_size(model_cfg)
    encoders = nominal_encoder_sizes(model_cfg.audio) if encoders is None else encoders
    wb = WEIGHT_BYTES[weights]
    act = 4 if weights == "fp32" else 2  # fp8 weights compute in bf16
    small = 4 if weights == "fp32" else 2  # the non-block modules are never fp8
    upcast = dit.largest_block * 2 // tp if weights == "fp8" else 0
    if mode in ("resident", "encoders"):
        dit_device = (dit.non_block * small + sum(dit.blocks) * wb) // tp + upcast
    else:
        dit_device = (dit.non_block * small + (ahead + 1) * dit.largest_block * wb) // tp + upcast

    _, ph, pw = model_cfg.patch_size
    K = job.identity_images
    lat_f = (job.frames - 1) // model_cfg.temporal_compression + 1
    lat_h, lat_w = job.height // 8, job.width // 8
    tokens = math.ceil((K + lat_f) / cp) * (lat_h // ph) * (lat_w // pw) + job.text_len  # whole frames per CP rank
    batched = job.branches if cfg_parallel == 1 else 1
    per_forward = 1 if mode == "blocks" and not step_cache else batched
    H, M = model_cfg.hidden_size, model_cfg.mlp_hidden
    activations = per_forward * tokens * (7 * H + 3 * M) * act
    image_tokens = tokens - job.text_len
    cached = batched * 2 * image_tokens * H * act if step_cache else 0
    latents = model_cfg.in_channels * (K + lat_f) * lat_h * lat_w * 4 * (2 + job.branches)
    video = job.frames * job.height * job.width * 3 * 9 if rank0 else 0
    encode_tile = VAE_TILE_BYTES if job.encodes_video else VAE_TILE_BYTES * max(K, 1) // 16
    all_encoders = sum(encoders.values())
    if mode == "resident":
        phases = {
            "encode": {"DiT weights": dit_device, "encoders": all_encoders, "VAE tile": encode_tile},
            "denoise": {"DiT weights": dit_device, "encoders": all_encoders, "DiT activations": activations,
                        "latents": latents, "step cache": cached},
            "decode": {"DiT weights": dit_device, "encoders": all_encoders, "latents": latents, "video": video,
                       "VAE tile": VAE_TILE_BYTES},
        }
    else:
        phases = {
            "encode": {"DiT weights": 0, "encoders": all_encoders, "VAE tile": encode_tile},
            "denoise": {"DiT weights": dit_device, "encoders": 0, "DiT activations": activations, "latents": latents,
                        "step cache": cached},
            "decode": {"DiT weights": 0, "encoders": encoders.get("vae", 0), "latents": latents, "video": video,
                       "VAE tile": VAE_TILE_BYTES},
        }
    return ModeEstimate(mode, weights, ahead, phases)


def budget_of(capacity: int) -> int:
    """Usable bytes of a GPU with `capacity` bytes in all: less the runtime allowance, times HEADROOM."""
    return int(max(capacity - RUNTIME_ALLOWANCE, 0) * HEADROOM)


@dataclass
class ModeChoice:
    rows: list[ModeEstimate]
    chosen: ModeEstimate | None
    reason: str
    budget: int = 0

    def table(self) -> str:
        lines = [f"{'mode':<22} {'DiT GiB':>8} {'encode':>7} {'denoise':>8} {'decode':>7} {'peak GiB':>9}  "
                 f"fits {gib(self.budget)}"]
        for r in self.rows:
            phase = [sum(r.phases[p].values()) / GIB for p in ("encode", "denoise", "decode")]
            lines.append(f"{r.name:<22} {r.phases['denoise']['DiT weights'] / GIB:8.2f} {phase[0]:7.2f} {phase[1]:8.2f} "
                         f"{phase[2]:7.2f} {r.peak / GIB:9.2f}  {'yes' if r.fits else 'no'}")
        return "\n".join(lines)


def choose_mode(model_cfg, job: JobSize, budget: int, weights: tuple[str, ...] = ("bf16", "fp8"),
                modes: tuple[str, ...] = OFFLOAD_MODES, **kw) -> ModeChoice:
    """Estimate every mode (modes x weights, fastest first as MODE_ORDER) and pick the first that fits `budget`."""
    kw.setdefault("dit", dit_size(model_cfg))
    rows = []
    for mode, kind in MODE_ORDER:  # fp32 (the CPU, or --dtype float32) takes bf16's places
        for w in weights:
            if mode in modes and (w == kind or (kind == "bf16" and w not in ("bf16", "fp8"))):
                est = sampling_estimate(model_cfg, job, mode, w, **kw)
                est.budget = budget
                rows.append(est)
    chosen = next((r for r in rows if r.fits), None)
    usable = f"the {gib(budget)} usable"
    if chosen is None:
        least = min(rows, key=lambda r: r.peak)
        reason = (f"nothing fits: the smallest, {least.name}, needs {gib(least.peak)} ({least.peak_phase}: "
                  f"{least.terms(gib)}), more than {usable}; lower the size or frames, or split the model over GPUs (--tp)")
    else:
        faster = rows[: rows.index(chosen)]
        why = "the fastest mode" if not faster else "the fastest mode that fits: " + ", ".join(
            f"{r.name} needs {gib(r.peak)}" for r in faster) + f", more than {usable}"
        reason = (f"{chosen.name}: {why}; it needs {gib(chosen.peak)} at its peak ({chosen.peak_phase}: "
                  f"{chosen.terms(gib)})")
        if not faster:
            reason += f", within {usable}"
    return ModeChoice(rows, chosen, reason, budget)


def weights_of(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}.get(dtype, "bf16")


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


def resolve_offload(requested: str, jobs, model_cfg, dtype: torch.dtype, device: torch.device, tp: int, cp: int,
                    cfg_parallel: int, paths=None, text_len: int = 256, ahead: int = 1, weights: str | None = None,
                    step_cache: bool = False) -> tuple[str, str]:
    """(`resident` or `blocks`, why) for `--offload auto|none|blocks`: auto asks choose_mode with this device's free
    memory for the largest job, for the weights the user chose (`weights`: default the dtype's; fp8 changes the
    numbers, so auto never picks it); on the CPU there is nowhere to offload to."""
    if requested == "none":
        return "resident", "--offload none"
    if requested in ("encoders", "blocks"):
        return requested, f"--offload {requested}"
    if requested != "auto":
        raise ValueError(f"offload must be auto, none, encoders or blocks, got {requested!r}")
    if device.type != "cuda":
        return "resident", "auto: the compute device is the CPU, whose memory also holds the weights: nothing to offload"
    free, what = available_bytes(device)
    budget = int(free * HEADROOM)
    dit = dit_size(model_cfg)
    enc = encoder_sizes(paths)  # the folders the sampler was given (as check_jobs_fit counts them)
    sizes = [JobSize.of(j, text_len) for j in jobs]
    weights = weights or weights_of(dtype)
    largest = max(sizes, key=lambda s: sampling_estimate(model_cfg, s, "resident", weights, dit=dit, encoders=enc,
                                                         tp=tp, cp=cp, cfg_parallel=cfg_parallel,
                                                         step_cache=step_cache).peak)
    choice = choose_mode(model_cfg, largest, budget, weights=(weights,), dit=dit, encoders=enc, tp=tp,
                         cp=cp, cfg_parallel=cfg_parallel, ahead=ahead, step_cache=step_cache)
    if choice.chosen is None:  # check_jobs_fit then says which jobs cannot run
        return "blocks", f"auto ({what}): {choice.reason}"
    return choice.chosen.mode, f"auto ({what}): {choice.reason}"


def check_jobs_fit(jobs, model_cfg, dtype: torch.dtype, device: torch.device, tp: int, cp: int, cfg_parallel: int,
                   paths=None, world_size: int = 1, text_len: int = 256, mode: str = "resident",
                   ahead: int = 1, weights: str | None = None, step_cache: bool = False) -> None:
    """Raise InputError for every job whose estimate in `mode` exceeds what this device has free (one message)."""
    from hcustom_mc.model.model import InputError

    dit = dit_size(model_cfg)
    enc = encoder_sizes(paths)
    free, what = available_bytes(device)
    # on the CPU the host memory holds every weight whatever the mode
    mode = "resident" if device.type == "cpu" else mode
    # ranks of one host share its memory on CPU; each GPU has its own
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if device.type == "cpu" else 1
    budget = free * HEADROOM
    problems = []
    for n, job in enumerate(jobs):
        est = sampling_estimate(model_cfg, JobSize.of(job, text_len), mode, weights or weights_of(dtype), dit=dit,
                                encoders=enc, tp=tp, cp=cp, cfg_parallel=cfg_parallel, ahead=ahead,
                                step_cache=step_cache)
        video = est.phases[est.peak_phase].get("video", 0)
        need = est.peak + (local - 1) * (est.peak - video)
        if need > budget:
            per = f" x {local} ranks on this host" if local > 1 else ""
            problems.append(f"job {n} ({job.width}x{job.height}, {job.frames} frames) needs about {human_bytes(need)} "
                            f"({est.terms()}{per}; {est.name}, {est.peak_phase}), more than the {human_bytes(budget)} "
                            f"usable of the {human_bytes(free)} {what}: lower width/height/frames, or add ranks "
                            f"(--tp/--cp){', or --offload blocks' if mode != 'blocks' and device.type == 'cuda' else ''}")
    if problems:
        raise InputError("jobs that cannot fit in memory (estimated before loading anything):\n  - " + "\n  - ".join(problems))
