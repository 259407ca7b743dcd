"""Generate videos with HunyuanCustom on one process or many (TP x CP x CFG-parallel).

    python -m hcustom_mc.sample --checkpoint CKPT --encoders-dir ENC --task identity \\
        --prompt "A man is playing guitar." --image man=ref.png --out outputs/
    torchrun --nproc-per-node 8 -m hcustom_mc.sample --tp 2 --cp 2 --cfg-parallel 2 ... --jobs jobs.yaml

CKPT: a training run folder (its `latest`), a megatron-core checkpoint, a released `*_model_states.pt`
(or fp8 pair) or a diffusers folder. --jobs takes a YAML/JSON list of job mappings (SampleJob fields);
command-line job flags (--image included) are the defaults every listed job starts from, so a t2v entry
next to --image sets `subjects: []`. Every job is validated on every
rank before the model is loaded. Per job: `NAME.mp4` (+ the audio track for audio jobs), `NAME.png`
(contact sheet), `NAME.json` (all settings, seed, timings, peak memory) and `NAME.latents.pt`. On one GPU too
small for everything at once, `--offload encoders` loads the encoders in turn and `--offload blocks` also streams
the DiT's blocks from host memory; `--offload auto` (the default) asks the memory planner (`python -m
hcustom_mc.plan --sample` prints its estimates). `--fp8-weights on` keeps the blocks' weights in fp8 and
`--cache-threshold T` skips the deep blocks on steps where they change little (README "Sampling on one GPU").
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from hcustom_mc import console
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY, VERIFY_MODES, flag_help
from hcustom_mc.model.config import ConfigError

log = logging.getLogger("hcustom_mc")
JOB_FLAGS = ("task", "prompt", "negative_prompt", "audio", "source_video", "mask_video", "edit_mode", "mask_dilation",
             "height", "width", "frames", "seed", "steps", "shift", "cfg_scale", "embedded_guidance", "ip_cfg_scale",
             "audio_strength", "fps")


# the folders --encoders-dir is searched for: our short names, then the released download's (README "Released weights")
ENCODER_FOLDERS = {"llava": ("llava", "llava-llama-3-8b-v1_1"), "clip": ("clip", "openai_clip-vit-large-patch14"),
                   "whisper": ("whisper", "whisper-tiny"), "vae": ("vae", "vae_3d/hyvae_v1_0801")}


def parse_args(argv=None) -> argparse.Namespace:
    from hcustom_mc.console import ArgumentParser

    p = ArgumentParser(prog="python -m hcustom_mc.sample", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", required=True, type=Path, help="training run folder (its `latest`), megatron-core "
                   "checkpoint, released *_model_states.pt or diffusers folder (required)")
    m.add_argument("--checkpoint-format", default="auto", choices=("auto", "mcore", "release", "diffusers"),
                   help="format of --checkpoint; auto tells them apart by their files (default: auto)")
    m.add_argument("--load-key", default="module", choices=("module", "ema"),
                   help="module (the trained weights) or ema (their moving average, from --ema-decay or a release "
                   "file) (default: module)")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapters merged into the DiT weights after loading, times SCALE (default scale 1); repeat "
                        "for several: an `hcustom_mc.checkpoint.lora export --format original` file or a training "
                        "checkpoint (default: none)")
    m.add_argument("--verify-checkpoint", default=DEFAULT_VERIFY, choices=VERIFY_MODES,
                   help=flag_help("mcore checkpoints: "))
    m.add_argument("--model-config", default=None, help="tiny | 13b | file; for checkpoints without a config "
                   "(default: not set: the checkpoint's own config)")
    m.add_argument("--variant", default="base", choices=("base", "audio", "editing"),
                   help="model variant, with --model-config (default: base)")
    m.add_argument("--mode", default="release", choices=("release", "paper"),
                   help="release or paper conditioning, with --model-config (default: release)")
    m.add_argument("--identity-rope", default=None, choices=("paper", "release_spatial"),
                   help="paper mode: the identity images' RoPE positions, paper (t=-k, h=i+H', w=j+W') or "
                        "release_spatial (t=-k, h=i, w=j+W'); for checkpoints without a config (default: not set: the "
                        "checkpoint's own, else paper)")
    m.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="DiT dtype (default: not set: bfloat16 on GPU, float32 on CPU)")
    wg = p.add_argument_group("weights", "How the DiT's weights are held in memory (README: fp8 weights).")
    wg.add_argument("--fp8-weights", default="off", choices=("off", "on"),
                    help="on: keep the blocks' linear weights in float8_e4m3fn with their scales, upcast to --dtype just "
                         "before each matmul: an fp8 checkpoint (..._fp8.pt) as stored, any other checkpoint quantised "
                         "on load per output channel (after merging --lora); --lora on an fp8 checkpoint runs as a side "
                         "adapter (default: off)")
    wg.add_argument("--fp8-matmul", default="upcast", choices=("upcast", "auto"),
                    help="with --fp8-weights on: upcast (exactly the dequantised weights' result) or auto (torch's fp8 "
                         "GEMM, torch._scaled_mm, on GPUs with fp8 tensor cores, sm_89/sm_90+, activations quantised to "
                         "fp8 per token; upcast elsewhere) (default: upcast)")
    e = p.add_argument_group("encoders (local folders; nothing is downloaded)")
    e.add_argument("--encoders-dir", type=Path, help="folder holding llava/ clip/ whisper/ vae/, or the released "
                   "download's llava-llama-3-8b-v1_1/ openai_clip-vit-large-patch14/ whisper-tiny/ vae_3d/hyvae_v1_0801/ "
                   "(default: not set: give each folder below)")
    for name, folders in ENCODER_FOLDERS.items():
        e.add_argument(f"--{name}", type=Path, help=f"{name} folder (default: --encoders-dir/{folders[0]} or "
                       f"--encoders-dir/{folders[1]})")
    e.add_argument("--text-len", type=int, default=256, help="LLaVA prompt tokens (default: 256, as the release)")
    lay = p.add_argument_group("parallel layout (world = TP x CP x CFG-parallel)")
    lay.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: 1)")
    lay.add_argument("--cp", type=int, default=1, help="context-parallel size: the video tokens split by latent "
                     "frames (default: 1)")
    lay.add_argument("--cp-mode", default="ulysses", choices=("ulysses", "ring"),
                     help="context-parallel attention: ulysses (all-to-all) or ring (default: ulysses)")
    lay.add_argument("--cfg-parallel", type=int, default=1,
                     help="guidance branches run side by side: 1, or the number of branches (default: 1)")
    j = p.add_argument_group("job", "Defaults for every --jobs entry. Unset values take the task's defaults "
                             "(TASK_DEFAULTS in hcustom_mc/inference/scheduler.py: 30 steps, shift 13, cfg 7.5, 25 fps; "
                             "editing: 50 steps, shift 5).")
    j.add_argument("--jobs", type=Path, help="YAML/JSON list of jobs (SampleJob fields) (default: not set: one job "
                   "from the flags below)")
    j.add_argument("--task", default=None, choices=("t2v", "identity", "multi_identity", "audio", "editing"),
                   help="what to generate (default: identity with --image, else t2v)")
    j.add_argument("--prompt", help="the caption (default: not set: empty)")
    j.add_argument("--negative-prompt", help="the unconditional branch's prompt (default: the release's negative prompt)")
    j.add_argument("--image", action="append", default=[], metavar="NAME=PATH",
                   help="identity image, NAME as in the prompt (repeat for K > 1) (default: none)")
    j.add_argument("--audio", type=Path, help="audio task: the driving audio file (default: not set)")
    j.add_argument("--source-video", type=Path, help="editing task: the video to edit (default: not set)")
    j.add_argument("--mask-video", type=Path, help="editing task: the mask of the region to edit (default: not set)")
    j.add_argument("--edit-mode", choices=("replace", "insert"), help="editing task (default: replace)")
    j.add_argument("--mask-dilation", type=int, help="editing: mask dilation in output pixels (default: the edit mode's)")
    sizes = {"height": "pixels, a multiple of 16", "width": "pixels, a multiple of 16", "frames": "4k+1",
             "seed": "noise seed (default: 0)", "steps": "denoising steps"}
    for flag, what in sizes.items():
        j.add_argument(f"--{flag}", type=int, help=what if flag == "seed" else f"{what} (default: the task's)")
    floats = {"shift": "flow shift", "cfg-scale": "classifier-free guidance scale (1 = off)",
              "embedded-guidance": "guidance-distilled checkpoints only", "ip-cfg-scale": "> 0 adds the identity "
              "guidance branch", "audio-strength": "audio task: lambda_A (default: the model config's)",
              "fps": "frame rate of the mp4"}
    for flag, what in floats.items():
        j.add_argument(f"--{flag}", type=float, help=what if "default" in what else f"{what} (default: the task's)")
    c = p.add_argument_group("step cache", "Reuse the deep DiT blocks' residual on steps where it is predicted to "
                             "change little (hcustom_mc/inference/cache.py); the identity tokens run through the probe "
                             "blocks on every step. The sidecar's `cache` entry counts the steps computed per branch.")
    c.add_argument("--cache-threshold", type=float, default=0.0, metavar="T",
                   help="cache a step when the deep residual's predicted relative L1 change since it was computed is "
                        "below T, in every guidance branch (default: 0: off, full sampling bit for bit)")
    c.add_argument("--cache-warmup", type=int, default=None, metavar="W",
                   help="the first W steps are always computed and calibrate the prediction, >= 2 (default: 20%% of "
                        "the job's steps, at least 2)")
    c.add_argument("--cache-probe-blocks", type=int, default=1, metavar="P",
                   help="blocks run on every step, on the whole sequence; their residual's change is the signal "
                        "(default: 1)")
    c.add_argument("--cache-max-skips", type=int, default=3, metavar="N",
                   help="at most N cached steps in a row (default: 3)")
    mem = p.add_argument_group("memory", "How the DiT and the encoders share the device (hcustom_mc/inference/memory.py; "
                               "`python -m hcustom_mc.plan --sample` shows the estimates).")
    mem.add_argument("--offload", default="auto", choices=("auto", "none", "encoders", "blocks"),
                     help="none: everything resident; encoders: the DiT resident, the encoders loaded in turn (text "
                          "encoders and VAE for every job's conditions, then released; the VAE again for decoding); "
                          "blocks: as encoders, and the DiT's blocks streamed from host memory, the guidance branches "
                          "one per forward; auto: the fastest that fits this GPU's free memory by the planner's "
                          "estimate (none on the CPU) (default: auto)")
    mem.add_argument("--offload-ahead", type=int, default=1, metavar="N",
                     help="blocks copied to the GPU ahead of the one running, overlapping its compute; at most N + 1 "
                          "blocks are on the device at once (default: 1)")
    o = p.add_argument_group("output and console")
    o.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    o.add_argument("--overwrite", action="store_true", help="replace existing output files (switch; default: off: "
                   "a job whose files exist is refused before anything runs)")
    o.add_argument("--no-progress", action="store_true", help="no per-step progress line (switch; default: off)")
    o.add_argument("--verbose", action="store_true", help="show known third-party warnings and every rank's "
                   "warnings (switch; default: off)")
    return p.parse_args(argv)


def build_jobs(args) -> list:
    from hcustom_mc.inference.inputs import SampleJob, read_job_list

    base = {k: getattr(args, k) for k in JOB_FLAGS if getattr(args, k) is not None}
    base = {k: str(v) if isinstance(v, Path) else v for k, v in base.items()}
    if args.image:
        subjects = []
        for item in args.image:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--image expects NAME=PATH, got {item!r}")
            subjects.append([name, path])
        base["subjects"] = subjects
    entries = [{}] if args.jobs is None else read_job_list(args.jobs)
    jobs, outputs = [], {}
    for n, entry in enumerate(entries):
        merged = {**base, **entry}
        merged["output"] = output_stem(args.out, merged.get("output"), f"{n:03d}_{merged.get('task', 'job')}")
        # compare the files each job writes, resolved (./a, a, links to a): two jobs must never share one
        for written in _output_files(merged["output"]):
            if written in outputs:
                raise ConfigError(f"job {n}: output {merged['output']} writes {written}, which job {outputs[written]} "
                                  f"also writes; give each job its own output")
            outputs[written] = n
        _refuse_existing(n, merged["output"], args.overwrite)
        try:
            jobs.append(SampleJob.from_dict(merged))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"job {n}: {exc}") from None
    return jobs


def output_stem(out: Path, given, default: str) -> str:
    """Where a job's NAME.mp4 / .png / .json / .latents.pt go: a job's `output` relative to --out (absolute as
    given), without a trailing .mp4 (the stem names all four files); none given: --out/NNN_task."""
    stem = Path(str(given)).expanduser() if given else Path(default)
    if stem.suffix.lower() == ".mp4":
        stem = stem.with_suffix("")
    return str(stem if stem.is_absolute() else out / stem)


def _refuse_existing(n: int, output, overwrite: bool) -> None:
    """Never replace an earlier run's results silently."""
    for written in _output_files(output):
        if Path(written).exists() and not overwrite:
            raise ConfigError(f"job {n}: {written} exists (an earlier run's output); pass another --out or --overwrite")


def claim_outputs(jobs, overwrite: bool) -> list:
    """Collective, before the model loads: rank 0 locks every output folder (the training save lock: one
    writer, a stale lock of a dead job taken over with a warning) and then checks again that no output exists,
    so of two samplers started with one --out exactly one runs; the other is refused with one line. Returns
    the locks (rank 0) to release when done."""
    from hcustom_mc.checkpoint.integrity import gather_objects
    from hcustom_mc.training.save_lock import SaveLock

    locks, error = [], None
    if console.rank() == 0:
        try:
            for folder in sorted({Path(_output_files(job.output)[0]).parent for job in jobs}):
                folder.mkdir(parents=True, exist_ok=True)
                lock = SaveLock(folder, flag="--out", what="outputs")
                lock.acquire()
                locks.append(lock)
            for n, job in enumerate(jobs):  # a run that finished before we took the lock
                _refuse_existing(n, job.output, overwrite)
        except (ConfigError, OSError) as exc:
            error = str(exc) if isinstance(exc, ConfigError) else f"--out: cannot create {exc.filename}: {exc.strerror}"
            for lock in locks:
                lock.release()
            locks = []
    error = gather_objects(error)[0]
    if error:
        raise ConfigError(error)
    return locks


def _named(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)  # not with_suffix: "clip.v2" must not become "clip.mp4"


OUTPUT_SUFFIXES = (".mp4", ".png", ".json", ".latents.pt")


def _output_files(output) -> list[str]:
    out = Path(str(output)).expanduser().resolve()
    return [str(_named(out, suffix)) for suffix in OUTPUT_SUFFIXES]


def encoder_paths(args):
    from hcustom_mc.data.config import EncoderPaths

    root = args.encoders_dir
    if root is not None and not root.is_dir():
        raise ConfigError(f"--encoders-dir {root} is not a folder")
    paths = EncoderPaths()
    for name, folders in ENCODER_FOLDERS.items():
        given = getattr(args, name)
        if given is None and root is not None:
            given = next((root / f for f in folders if (root / f).exists()), None)
        setattr(paths, name, str(given) if given is not None else None)
    missing = [n for n in ("llava", "clip", "vae") if getattr(paths, n) is None]
    if missing and root is not None:
        looked = "; ".join(f"{n}: {' or '.join(f + '/' for f in ENCODER_FOLDERS[n])}" for n in missing)
        raise ConfigError(f"--encoders-dir {root} has no {', '.join(missing)} encoder ({looked}); give the folder "
                          f"that holds them, or --{missing[0]} PATH")
    if missing:
        raise ConfigError(f"encoders not given: {', '.join(missing)} (--encoders-dir or --{missing[0]})")
    return paths


def cache_settings(args):
    """The step cache's settings from the flags, checked (ConfigError) against the model's block count."""
    from hcustom_mc.inference.cache import CacheSettings

    return CacheSettings(threshold=args.cache_threshold, warmup=args.cache_warmup,
                         probe_blocks=args.cache_probe_blocks, max_skips=args.cache_max_skips)


def _peak_memory_entry() -> dict:
    """The sidecar's peak memory of this rank so far in the run (GPU: the allocator's; CPU: the process's)."""
    from hcustom_mc.device import peak_memory

    peak, what = peak_memory()
    return {"bytes": peak, "gib": round(peak / 2**30, 3), "what": what}


def _write_outputs(job, n, video, latents, ckpt, fmt, model_cfg, layout, world, dtype, timing, decode_s, t0,
                   modes: dict) -> None:
    """`modes`: the sidecar's entries for how the job was sampled (weights, step cache, ...)."""
    import torch

    from hcustom_mc.inference.output import to_uint8_frames, write_contact_sheet, write_mp4, write_sidecar

    frames = to_uint8_frames(video)
    audio = None
    if job.task == "audio":
        from hcustom_mc.data.encode import read_audio

        audio = read_audio(job.audio, sample_rate=16000).numpy()
    out = Path(job.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(_named(out, ".mp4"), frames, job.fps, audio=audio, audio_rate=16000)
    write_contact_sheet(_named(out, ".png"), frames, references=job.subjects)
    write_sidecar(_named(out, ".json"), {
        "job": job.to_dict(), "checkpoint": str(ckpt), "checkpoint_format": fmt, "model": model_cfg.to_dict(),
        "layout": vars(layout), "world_size": world, "dtype": str(dtype), **modes, "denoise": timing,
        "decode_s": decode_s, "total_s": time.time() - t0, "peak_memory": _peak_memory_entry()})
    torch.save(latents.cpu(), _named(out, ".latents.pt"))
    log.info("job %d: wrote %s (%d frames at %g fps) in %.1fs", n, _named(out, ".mp4"), frames.shape[0], job.fps,
             time.time() - t0)


def check_prompts(jobs, llava_path, model_cfg, text_len: int) -> None:
    """Every prompt (and negative prompt) must fit --text-len with its identity phrases: checked with the
    tokenizer alone, before the model and encoders load."""
    from hcustom_mc.encoders.text import LlavaTextEncoder
    from hcustom_mc.inference.inputs import DEFAULT_NEGATIVE_PROMPT
    from hcustom_mc.model.model import InputError

    checker = LlavaTextEncoder.tokenizer_only(llava_path, mode=model_cfg.mode, text_len=text_len,
                                              max_subjects=model_cfg.max_identity_images)
    problems = []
    for n, job in enumerate(jobs):
        names = [name for name, _ in job.subjects]
        for what, text in (("prompt", job.prompt), ("negative prompt",
                                                      DEFAULT_NEGATIVE_PROMPT if job.negative_prompt is None else job.negative_prompt)):
            try:
                checker.tokenize([text], [names])
            except ValueError as exc:
                problems.append(f"job {n} {what}: {exc}")
    if problems:
        raise InputError("prompts that do not fit:\n  - " + "\n  - ".join(problems))


def run(args) -> int:
    import torch  # here, not at the top: `--help` returns without loading torch

    from hcustom_mc.inference.inputs import resolve_job, validate_job
    from hcustom_mc.inference.pipeline import SamplerLayout, model_config_for, resolve_checkpoint
    from hcustom_mc.model.config import get_model_config, mode_overrides
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import initialize_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fp8_matmul != "upcast" and args.fp8_weights != "on":
        raise ConfigError(f"--fp8-matmul {args.fp8_matmul} needs --fp8-weights on")
    if args.offload_ahead < 0:
        raise ConfigError(f"--offload-ahead must be >= 0 blocks, got {args.offload_ahead}")
    fmt, ckpt = resolve_checkpoint(args.checkpoint, args.checkpoint_format, args.verify_checkpoint)
    fallback = None
    if args.model_config:
        fallback = get_model_config(args.model_config, args.variant,
                                    **mode_overrides(args.mode, identity_rope=args.identity_rope))
    model_cfg = model_config_for(ckpt, fmt, fallback)
    if args.identity_rope and model_cfg.identity_rope != args.identity_rope:
        # the weights learned the identity positions they were trained with: the saved config is the truth
        raise ConfigError(f"--identity-rope {args.identity_rope}: {args.checkpoint} was trained with identity_rope="
                          f"{model_cfg.identity_rope} (its saved model config); drop the flag")
    layout = SamplerLayout(args.tp, args.cp, args.cp_mode, args.cfg_parallel)
    cache_settings(args).check(model_cfg.num_double_blocks + model_cfg.num_single_blocks)
    paths = encoder_paths(args)
    jobs = [resolve_job(j) for j in build_jobs(args)]
    # everything that can be checked without the model is checked now, on every rank
    for n, job in enumerate(jobs):
        validate_job(job, model_cfg, world, args.tp, args.cp, args.cfg_parallel, cp_mode=args.cp_mode)
        if job.task == "audio" and paths.whisper is None:
            raise ConfigError(f"job {n} is an audio job: pass --whisper (or --encoders-dir with whisper/)")
    check_prompts(jobs, paths.llava, model_cfg, args.text_len)

    info = initialize_parallel(ParallelConfig(tensor_parallel=args.tp, context_parallel=args.cp, cp_mode=args.cp_mode),
                               model_cfg, dp_name="CFG-parallel")  # the data-parallel factor runs the CFG branches
    from hcustom_mc.checkpoint.lora import load_specs

    loras = load_specs(args.lora, args.checkpoint)  # bad FILE:SCALE, another base: fail before the model loads
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    mode, why = offload_mode(args, jobs, model_cfg, dtype, info, paths)
    from hcustom_mc.checkpoint.integrity import gather_objects
    from hcustom_mc.inference.memory import check_jobs_fit
    from hcustom_mc.model.model import InputError

    # before the model and encoders are allocated (the parameter count needs the parallel layout). Each rank measures
    # its own free memory: a rank short of it tells every rank, which all stop here instead of waiting for it later
    error = None
    try:
        check_jobs_fit(jobs, model_cfg, dtype, info.device, args.tp, args.cp, args.cfg_parallel, paths, world,
                       args.text_len, mode=mode, ahead=args.offload_ahead, weights=weights_option(args, dtype),
                       step_cache=cache_settings(args).enabled)
    except InputError as exc:
        error = f"rank {info.rank}: {exc}" if world > 1 else str(exc)
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise InputError(errors[0])
    locks = claim_outputs(jobs, args.overwrite)
    try:
        if mode in ("encoders", "blocks"):
            return _generate_in_turn(args, jobs, ckpt, fmt, model_cfg, layout, paths, loras, info, dtype, world, why,
                                     stream_blocks=mode == "blocks")
        return _generate(args, jobs, ckpt, fmt, model_cfg, layout, paths, loras, info, dtype, world)
    finally:
        for lock in locks:
            lock.release()


def weights_option(args, dtype) -> str:
    """The planner's name for the DiT weights this run keeps: fp8 (--fp8-weights on), else the dtype's."""
    from hcustom_mc.inference.memory import weights_of

    return "fp8" if args.fp8_weights == "on" else weights_of(dtype)


def offload_mode(args, jobs, model_cfg, dtype, info, paths) -> tuple[str, str]:
    """(resident | encoders | blocks, why) for --offload, the same on every rank: when the ranks' free memory gives different
    answers, all offload (the collectives of the two paths differ)."""
    from hcustom_mc.checkpoint.integrity import gather_objects
    from hcustom_mc.inference.memory import OFFLOAD_MODES, resolve_offload

    mode, why = resolve_offload(args.offload, jobs, model_cfg, dtype, info.device, args.tp, args.cp,
                                args.cfg_parallel, paths, args.text_len, args.offload_ahead,
                                weights=weights_option(args, dtype), step_cache=cache_settings(args).enabled)
    answers = gather_objects((mode, why))
    # the most frugal answer of any rank (OFFLOAD_MODES runs from the most memory to the least)
    mode, why = max(answers, key=lambda a: OFFLOAD_MODES.index(a[0]))
    if info.rank == 0:
        log.info("memory: %s (%s)", {"resident": "everything resident", "encoders": "the DiT resident, the encoders "
                                     "in turn", "blocks": "block offload"}[mode], why)
    return mode, why


def _finish_job(job, n, video, latents, ckpt, fmt, model_cfg, layout, world, dtype, timing, decode_s, t0, rank0,
                device, modes: dict) -> None:
    """Rank 0 writes the job's files; every rank learns whether that worked (so none waits forever)."""
    import torch

    failed = None
    if rank0:
        try:
            _write_outputs(job, n, video[0].float().cpu(), latents, ckpt, fmt, model_cfg, layout, world, dtype,
                           timing, decode_s, t0, modes)
        except Exception as exc:  # other ranks must not wait forever in the next collective
            failed = exc
    if torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if failed else 0.0], device=device)
        torch.distributed.all_reduce(flag)
        if flag.item() and failed is None:
            raise RuntimeError(f"job {n}: writing the outputs failed on rank 0")
    if failed is not None:
        raise failed


def _load_dit(args, ckpt, fmt, model_cfg, dtype, loras, rank0: bool, device=None):
    """(the DiT with the LoRAs applied, the sidecar's `weights` entry), on `device` (default: the compute device;
    "cpu" for block offload). fp8: LoRAs merged before quantising, or side adapters on an fp8 checkpoint."""
    from hcustom_mc.checkpoint.lora import merge_into_model
    from hcustom_mc.inference.pipeline import load_model

    weights = {"fp8_weights": args.fp8_weights}
    if args.fp8_weights == "on":
        from hcustom_mc.inference.fp8 import load_fp8_model

        model, report = load_fp8_model(ckpt, fmt, model_cfg, dtype, args.cp_mode, args.load_key, loras,
                                       matmul=args.fp8_matmul, device=device)
        weights.update(fp8_matmul=args.fp8_matmul, fp8_source=report.source, fp8_granularity=report.granularity,
                       dit_bytes_per_rank=report.bytes)
        if rank0:
            log.info("%s", report.describe())
        return model, weights
    model = load_model(ckpt, fmt, model_cfg, dtype, args.cp_mode, args.load_key, device=device)
    for adapters, scale in loras:  # merged: no cost per step; W + sum of scale_i * B_i A_i, added in fp32
        merge_into_model(model, adapters, scale)
        if rank0:
            log.info("merged LoRA %s x %g (%d modules)", adapters.source, scale, len(adapters.tensors))
    return model, weights


def _denoise(args, sampler, model, job, n, cond, rank0: bool):
    """One job's denoising loop (with a fresh step cache when --cache-threshold > 0): (latents, timing, cache entry)."""
    import torch

    from hcustom_mc.inference.cache import StepCache, cache_off_report
    from hcustom_mc.inference.output import StepProgress
    from hcustom_mc.inference.pipeline import NonFiniteError, with_audio_strength

    settings = cache_settings(args)
    with_audio_strength(model, job.audio_strength)
    noise = torch.randn(cond["latent_shape"], generator=torch.Generator().manual_seed(job.seed))[None]
    progress = StepProgress(job.steps, enabled=rank0 and not args.no_progress, desc=f"job {n} ({job.task})")
    cache = StepCache(settings) if settings.enabled else None
    try:
        latents = sampler.sample(noise, cond["branches"], job.steps, job.shift, job.cfg_scale, job.ip_cfg_scale,
                                 job.embedded_guidance, progress, cache=cache)
    except NonFiniteError as exc:
        raise NonFiniteError(f"job {n}: {exc}") from None
    if cache is not None and rank0:
        log.info("job %d: %s", n, cache.summary())
    return latents, progress.close(), cache.report() if cache is not None else cache_off_report()


def _load_encoders(args, paths, jobs, model_cfg, device):
    """The EncoderSet the jobs need (Whisper only for audio jobs), on `device` in its encoder dtype."""
    from hcustom_mc.device import encoder_dtype
    from hcustom_mc.inference.inputs import EncoderSet

    return EncoderSet.from_paths(paths, needs_audio=any(j.task == "audio" for j in jobs), device=device,
                                 dtype=encoder_dtype(device), mode=model_cfg.mode,
                                 max_subjects=model_cfg.max_identity_images, text_len=args.text_len)


def _conditions(job, n, encoders, model_cfg, device, dtype) -> dict:
    from hcustom_mc.inference.inputs import prepare_conditions
    from hcustom_mc.model.model import InputError

    try:
        return prepare_conditions(job, encoders, model_cfg, device, dtype)
    except ValueError as exc:  # e.g. a prompt too long for --text-len: same on every rank
        raise InputError(f"job {n}: {exc}") from None


def _generate(args, jobs, ckpt, fmt, model_cfg, layout, paths, loras, info, dtype, world) -> int:
    """Everything resident: the DiT and the encoders loaded once; each job encoded, denoised and decoded in turn."""
    import torch

    from hcustom_mc.inference.decode import decode_across_ranks
    from hcustom_mc.inference.pipeline import ParallelSampler

    rank0 = info.rank == 0
    t_load = time.time()
    model, weights = _load_dit(args, ckpt, fmt, model_cfg, dtype, loras, rank0)
    encoders = _load_encoders(args, paths, jobs, model_cfg, info.device)
    if rank0:
        log.info("loaded %s (%s) and encoders in %.1fs; layout TP %d x CP %d (%s) x CFG-parallel %d; DiT dtype %s",
                 ckpt, fmt, time.time() - t_load, args.tp, args.cp, args.cp_mode, args.cfg_parallel, dtype)
    sampler = ParallelSampler(model, layout)
    for n, job in enumerate(jobs):
        t0 = time.time()
        cond = _conditions(job, n, encoders, model_cfg, info.device, dtype)
        latents, timing, cache = _denoise(args, sampler, model, job, n, cond, rank0)
        t_dec = time.time()
        video = decode_across_ranks(encoders.vae, latents)  # temporal tiles split over all ranks; video on rank 0
        _finish_job(job, n, video, latents, ckpt, fmt, model_cfg, layout, world, dtype, timing, time.time() - t_dec,
                    t0, rank0, info.device, {"weights": weights, "cache": cache, "memory": {"offload": "none"}})
    return 0


def _generate_in_turn(args, jobs, ckpt, fmt, model_cfg, layout, paths, loras, info, dtype, world, why: str,
                      stream_blocks: bool) -> int:
    """--offload encoders / blocks: LLaVA, CLIP (Whisper) and the VAE encode every job's conditions and are released;
    the DiT, built in host memory, denoises every job, moved to the device whole (encoders) or with its blocks
    streamed there (blocks, inference/offload.py); then the VAE alone, tiled, decodes them. The DiT reaches the device
    only after the encoders left."""
    import torch

    from hcustom_mc.device import encoder_dtype
    from hcustom_mc.encoders.vae import VideoVAE
    from hcustom_mc.inference.decode import decode_across_ranks
    from hcustom_mc.inference.offload import BlockOffloader, free_device_memory
    from hcustom_mc.inference.pipeline import ParallelSampler

    rank0, device = info.rank == 0, info.device
    t_load = time.time()
    # host memory: the LoRAs merged (or fp8 side adapters attached) before the blocks are pinned and streamed
    model, weights = _load_dit(args, ckpt, fmt, model_cfg, dtype, loras, rank0, device=torch.device("cpu"))
    encoders = _load_encoders(args, paths, jobs, model_cfg, device)
    conditions = [_conditions(job, n, encoders, model_cfg, device, dtype) for n, job in enumerate(jobs)]
    del encoders
    free_device_memory(device)
    offloader = BlockOffloader.attach(model, device, args.offload_ahead) if stream_blocks else None
    if offloader is None:
        model = model.to(device)
    if rank0:
        where = (f"{len(offloader.blocks)} blocks streamed to {device}, {args.offload_ahead} ahead" if offloader
                 else f"the DiT moved to {device}")
        log.info("loaded %s (%s) into host memory and encoded %d job(s) in %.1fs; %s; layout TP %d x CP %d (%s) x "
                 "CFG-parallel %d; DiT dtype %s", ckpt, fmt, len(jobs), time.time() - t_load, where, args.tp, args.cp,
                 args.cp_mode, args.cfg_parallel, dtype)
    sampler = ParallelSampler(model, layout)
    # blocks: one branch's activations at a time (the planner's blocks estimate); encoders: batched, as resident
    sampler.branch_per_forward = stream_blocks
    denoised = []
    for n, (job, cond) in enumerate(zip(jobs, conditions)):
        t0 = time.time()
        latents, timing, cache = _denoise(args, sampler, model, job, n, cond, rank0)
        denoised.append((latents.cpu(), timing, cache, time.time() - t0))
    if offloader is not None:
        memory = {"offload": "blocks", "ahead": args.offload_ahead, "blocks_on_device_at_most": offloader.max_live,
                  "blocks": len(offloader.blocks), "why": why}
        offloader.detach()
    else:
        memory = {"offload": "encoders", "why": why}
    del sampler, model, offloader, conditions, cond, latents
    free_device_memory(device)
    vae = VideoVAE.from_pretrained(paths.vae, dtype=encoder_dtype(device), device=device, tiling=True)
    for n, (job, (latents, timing, cache, denoise_s)) in enumerate(zip(jobs, denoised)):
        t_dec = time.time()
        video = decode_across_ranks(vae, latents)  # temporal tiles split over all ranks; video on rank 0
        _finish_job(job, n, video, latents, ckpt, fmt, model_cfg, layout, world, dtype, timing, time.time() - t_dec,
                    t_dec - denoise_s, rank0, device, {"weights": weights, "cache": cache, "memory": memory})
    return 0


def main(argv=None) -> int:
    console.setup(console.verbose_requested(argv))  # before torch and megatron are imported
    args = parse_args(argv)
    from hcustom_mc.parallel.state import destroy_parallel

    try:
        return run(args)
    finally:
        destroy_parallel()


def _user_errors() -> tuple:
    """Bad jobs, inputs, files and checkpoints (CheckpointFormatError includes CheckpointReadError: a damaged or
    unsafe checkpoint file, named). Every rank checks the same jobs: said once, unless a rank's message differs."""
    from hcustom_mc.checkpoint.release import CheckpointFormatError
    from hcustom_mc.data.errors import DataError
    from hcustom_mc.inference.pipeline import NonFiniteError
    from hcustom_mc.model.model import InputError

    return ConfigError, InputError, FileNotFoundError, DataError, CheckpointFormatError, NonFiniteError


if __name__ == "__main__":
    console.run_entry_point(main, _user_errors)
