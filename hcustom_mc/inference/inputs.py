"""One sampling job: its description (`SampleJob`), up-front validation, and the per-branch DiT inputs.

`validate_job` runs before any model is loaded and reports every problem at once (cheap checks only:
file headers, PIL verify, demuxing). `prepare_conditions` then runs the encoders and returns the DiT
keyword inputs (batch 1, same keys and shapes in every branch so the sampler can batch them; latents,
timestep and embedded guidance are the sampler's) of each guidance branch, following the release
(facts 2.1-2.5, 3.1), in the sampler's order:

  "uncond"  LLaVA.encode_negative(negative prompt, the job's subject names): all-white image(s) whose
            image tokens are masked out (release), CLIP pooled of the negative prompt, the SAME identity
            latents and video condition as "cond" (the release duplicates them), zero audio features.
  "cond"    LLaVA(prompt + "The {name} looks like<image>" with the identity image(s)), CLIP pooled of the
            prompt, identity latents = VAE posterior sample (generator from job.seed) of the reference
            image(s) white-padded to the video size, one latent frame each, audio features, video condition.
  "ip"      (only when ip_cfg_scale > 0) the cond inputs with the real identity latents. In that case the
            release pipeline feeds `uncond_ref_latents` = VAE(all-white image) to both "uncond" and "cond"
            (`ref_latents = cat([uncond_ref, uncond_ref, ref])`), so cond - uncond is the text direction
            and ip - cond the identity image's; this module follows that reading.

A missing `negative_prompt` takes the caller's default (`prepare_conditions(negative_prompt=...)`,
the release scripts' prompt by default); other None fields are filled by `resolve_job`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hcustom_mc.data.errors import DataError
from hcustom_mc.inference.scheduler import NEGATIVE_PROMPT as DEFAULT_NEGATIVE_PROMPT
from hcustom_mc.inference.scheduler import TASK_DEFAULTS
from hcustom_mc.model.model import InputError
from hcustom_mc.data.config import TASKS
EDIT_MODES = ("replace", "insert")
# The work a job may ask for (checked before anything loads; the memory estimate alone let 100001 frames at
# 32x48 through): the release's range, 129 frames (5 s at 25 fps) at up to 720x1280 either way round, and the
# flow scheduler's 1000 training timesteps as the most denoising steps
MAX_FRAMES = 129
MAX_SIDE, MAX_PIXELS = 1280, 720 * 1280
MAX_STEPS = 1000
# replace: the new subject must cover the old one's silhouette, so the drawn mask is grown a little;
# insert: the mask marks where the new subject goes, exactly as drawn.
DEFAULT_DILATION = {"replace": 8, "insert": 0}
DEFAULT_SIZE, DEFAULT_FRAMES = (512, 896), 129  # release argparse defaults


@dataclass
class SampleJob:
    task: str
    prompt: str
    negative_prompt: str | None = None
    subjects: list[tuple[str, str]] = field(default_factory=list)  # (name, image path), one per identity
    audio: str | None = None
    source_video: str | None = None
    mask_video: str | None = None
    edit_mode: str = "replace"
    mask_dilation: int | None = None  # pixels of the output video; None: DEFAULT_DILATION[edit_mode]
    height: int | None = None  # multiples of 16; editing: the source video's size when None
    width: int | None = None
    frames: int | None = None  # 4k+1; editing: the largest 4k+1 <= the source length when None
    seed: int = 0
    steps: int | None = None
    shift: float | None = None
    cfg_scale: float | None = None
    embedded_guidance: float | None = None  # only for guidance-distilled models (guidance_embed)
    ip_cfg_scale: float = 0.0  # > 0 adds the "ip" branch
    audio_strength: float | None = None  # lambda_A; None: the model config's
    output: str = "output"  # the files' stem (NAME.mp4, .png, .json, .latents.pt); the sampler puts a relative one under --out
    fps: float | None = None  # editing: the source's fps when None, else 25
    # where the subject is, (x0, y0, x1, y1) as fractions of the frame: read by the metrics (DINO-Sim scores that
    # region against the identity image), not by sampling
    subject_box: list[float] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleJob":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise InputError(f"unknown job keys {unknown}; known keys: {names}")
        missing = [k for k in ("task", "prompt") if k not in d]
        if missing:
            raise InputError(f"job is missing required keys {missing}")
        d = dict(d)
        subjects = []
        for s in d.get("subjects") or []:
            # JSON has no tuples: accept [name, path] pairs and {"name", "image"} objects
            if isinstance(s, dict) and set(s) == {"name", "image"}:
                subjects.append((str(s["name"]), str(s["image"])))
            elif isinstance(s, (list, tuple)) and len(s) == 2:
                subjects.append((str(s[0]), str(s[1])))
            else:
                raise InputError(f"subject {s!r} must be [name, image path] or {{'name': ..., 'image': ...}}")
        d["subjects"] = subjects
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["subjects"] = [[n, p] for n, p in self.subjects]
        return d


def read_job_list(path, flag: str = "--jobs") -> list[dict[str, Any]]:
    """The job mappings of a YAML (or JSON) list file, checked to be a non-empty list of mappings; errors name `flag`."""
    from hcustom_mc.model.config import ConfigError, load_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path} does not exist")
    entries = load_yaml(path.read_text(), f"{flag} {path}")  # JSON is YAML
    if not isinstance(entries, list) or not entries or not all(isinstance(x, dict) for x in entries):
        raise ConfigError(f"{flag} {path} must hold a non-empty list of mappings")
    return entries


def resolve_job(job: SampleJob) -> SampleJob:
    """A copy with every None default filled in (editing probes the source video; an unreadable one
    leaves its fields None for validate_job to report)."""
    out = dataclasses.replace(job, subjects=list(job.subjects))
    defaults = TASK_DEFAULTS.get(job.task)  # an unknown task is left for validate_job to report
    if defaults is not None:
        for key, value in (("steps", defaults.steps), ("shift", defaults.flow_shift), ("cfg_scale", defaults.cfg_scale)):
            if getattr(out, key) is None:
                setattr(out, key, value)
    default_fps = float(defaults.fps if defaults is not None else TASK_DEFAULTS["identity"].fps)
    if out.mask_dilation is None:
        out.mask_dilation = DEFAULT_DILATION.get(out.edit_mode, 0)
    source = None
    if job.task == "editing" and job.source_video:
        try:
            from hcustom_mc.data.video import probe_video

            source = probe_video(job.source_video)
        except DataError:
            source = None
    # only an unset (None) value takes a default: 0 or a negative size is the user's and validate_job reports it
    if source is not None:
        # Floor to multiples of 16: read_clip centre-crops the few leftover pixels.
        _default(out, "height", source.height // 16 * 16)
        _default(out, "width", source.width // 16 * 16)
        _default(out, "frames", (source.num_frames - 1) // 4 * 4 + 1)
        _default(out, "fps", source.fps or default_fps)
    elif job.task != "editing":
        _default(out, "height", DEFAULT_SIZE[0])
        _default(out, "width", DEFAULT_SIZE[1])
        _default(out, "frames", DEFAULT_FRAMES)
        _default(out, "fps", default_fps)
    return out


def _default(job: SampleJob, key: str, value) -> None:
    if getattr(job, key) is None:
        setattr(job, key, value)


INT_FIELDS = ("height", "width", "frames", "seed", "steps", "mask_dilation")
FLOAT_FIELDS = ("shift", "cfg_scale", "embedded_guidance", "ip_cfg_scale", "audio_strength", "fps")


def _type_errors(job: SampleJob) -> list[str]:
    """Wrong types and NaN/inf settings (a NaN guidance scale would give a NaN video)."""
    errors = []
    for key in INT_FIELDS:
        v = getattr(job, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            errors.append(f"{key} must be an integer, got {v!r}")
    for key in FLOAT_FIELDS:
        v = getattr(job, key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            errors.append(f"{key} must be a number, got {v!r}")
        elif not math.isfinite(v):
            errors.append(f"{key} must be a finite number, got {v!r}")
    box = job.subject_box
    if box is not None:
        ok = (isinstance(box, (list, tuple)) and len(box) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in box))
        if not ok or not (box[0] < box[2] and box[1] < box[3]):
            errors.append(f"subject_box must be [x0, y0, x1, y1], fractions of the frame with x0 < x1 and y0 < y1, "
                          f"got {box!r}")
    return errors


# ------------------------------------------------------------------------------------------ validation


def _audio_seconds(path: str) -> float:
    """Duration from the container/stream metadata, or by decoding when the file does not say."""
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            raise DataError("corrupt", path, "no audio stream")
        stream = container.streams.audio[0]
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if container.duration:
            return container.duration / 1_000_000
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / (stream.codec_context.sample_rate or stream.rate)


def _check_output(path: str) -> str | None:
    target = Path(path)
    if target.is_dir():
        return f"output {path} is a directory; give a file path"
    parent = target.parent.resolve()
    while not parent.exists():  # missing folders are created later: the first existing one must be writable
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"output folder {parent} (for {path}) is not writable"
    return None


def validate_job(job: SampleJob, model_cfg, world_size: int = 1, tp: int = 1, cp: int = 1, cfg_parallel: int = 1,
                 cp_mode: str = "ulysses") -> None:
    """Raise InputError listing every problem of `job` for this model and parallel layout; touches no model.
    `cp_mode` matters for the heads rule: Ulysses splits each TP rank's heads over CP, ring does not."""
    from PIL import Image

    from hcustom_mc.data.video import probe_video
    from hcustom_mc.parallel.config import ParallelConfig

    errors: list[str] = []
    if job.task not in TASKS:
        raise InputError(f"invalid job:\n  - task must be one of {TASKS}, got {job.task!r}")
    errors = _type_errors(job)
    if errors:  # the checks below compare numbers
        raise InputError("invalid job:\n  - " + "\n  - ".join(errors))
    r = resolve_job(job)
    if not isinstance(job.prompt, str) or not job.prompt.strip():
        errors.append("prompt is empty")

    # -- the model variant and the identity images
    if job.task == "audio" and not model_cfg.audio:
        errors.append("task 'audio' needs an audio model (variant 'audio'); this model has no AudioNet")
    if job.task == "editing" and not model_cfg.video_condition:
        errors.append("task 'editing' needs an editing model (variant 'editing'); this model has no video-condition branch")
    K = len(job.subjects)
    if job.task == "t2v":
        if K:
            errors.append(f"task 't2v' takes no identity images, got {K}")
        if job.ip_cfg_scale > 0:
            errors.append("ip_cfg_scale > 0 needs an identity image; task 't2v' has none")
    elif model_cfg.mode == "release" and K != 1:
        what = "multi-subject customization is not released; use mode='paper'" if job.task == "multi_identity" else ""
        errors.append(f"{K} identity images for task {job.task!r}: release mode takes exactly 1 {what}".rstrip())
    elif not 1 <= K <= model_cfg.max_identity_images:
        errors.append(f"{K} identity images for task {job.task!r}: this paper-mode model takes 1..{model_cfg.max_identity_images}")
    for name, path in job.subjects:
        if not os.path.isfile(path):
            errors.append(f"identity image {path} ({name!r}): file not found")
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for unreadable files
            errors.append(f"identity image {path} ({name!r}): unreadable ({e})")

    if K > 1 and isinstance(job.prompt, str):
        # several subjects: LLaVA ties image k to its phrase ("The {name} looks like <image>"); a phrase the prompt
        # never names gives that subject no part in the video
        absent = [name for name, _ in job.subjects if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", job.prompt, re.I)]
        if absent:
            errors.append(f"subject phrase(s) {', '.join(repr(n) for n in absent)} not in the prompt {job.prompt!r}: "
                          f"with several subjects each must be named there")
        names = [name.lower() for name, _ in job.subjects]
        if len(set(names)) < len(names):
            errors.append(f"subject names must differ (each image is tied to its phrase), got {[n for n, _ in job.subjects]}")

    # -- sizes
    if r.frames is not None and (r.frames < 1 or (r.frames - 1) % 4):
        errors.append(f"frames must be 4k+1 (1, 5, ..., 129) for the causal VAE, got {r.frames}")
    for key in ("height", "width"):
        value = getattr(r, key)
        if value is not None and (value < 16 or value % 16):
            errors.append(f"{key} must be a positive multiple of 16, got {value}")
    if r.fps is not None and not r.fps > 0:
        errors.append(f"fps must be positive, got {r.fps}")
    if r.frames is not None and r.frames > MAX_FRAMES:
        errors.append(f"frames {r.frames} is more than the model supports ({MAX_FRAMES}, 5 s at 25 fps): make "
                      f"several shorter jobs")
    too_big = [f"{key} {getattr(r, key)}" for key in ("height", "width") if (getattr(r, key) or 0) > MAX_SIDE]
    if too_big or (r.height or 0) * (r.width or 0) > MAX_PIXELS:
        errors.append(f"{r.width}x{r.height} is larger than the model supports (at most {MAX_SIDE} a side and "
                      f"720x1280 pixels in all{': ' + ', '.join(too_big) if too_big else ''})")
    if r.seed is not None and not 0 <= r.seed < 2**64:
        errors.append(f"seed must be between 0 and 2**64 - 1 (torch's generator seeds), got {r.seed}")
    if r.steps is not None and r.steps > MAX_STEPS:
        errors.append(f"steps {r.steps} is more than the scheduler's {MAX_STEPS} timesteps")

    # -- audio
    if job.task == "audio":
        if not job.audio:
            errors.append("task 'audio' needs an audio file (audio=...)")
        elif not os.path.isfile(job.audio):
            errors.append(f"audio {job.audio}: file not found")
        else:
            try:
                seconds = _audio_seconds(job.audio)
                need = r.frames / r.fps if r.frames and r.fps else 0.0
                if seconds + 1e-3 < need:
                    errors.append(f"audio {job.audio} lasts {seconds:.3f} s, shorter than the video "
                                  f"({r.frames} frames at {r.fps:g} fps = {need:.3f} s)")
            except Exception as e:  # av.error.FFmpegError, DataError
                errors.append(f"audio {job.audio}: unreadable ({e})")
        if r.fps:
            try:
                from hcustom_mc.encoders.audio import encoder_stride

                encoder_stride(r.fps)
            except ValueError as e:
                errors.append(f"audio task: {e}")
    elif job.audio:
        errors.append(f"audio given but task is {job.task!r} (only 'audio' uses it)")
    if job.audio_strength is not None and job.audio_strength < 0:
        errors.append(f"audio_strength must be >= 0, got {job.audio_strength}")

    # -- editing
    if job.task == "editing":
        if job.edit_mode not in EDIT_MODES:
            errors.append(f"edit_mode must be one of {EDIT_MODES}, got {job.edit_mode!r}")
        if r.mask_dilation is not None and r.mask_dilation < 0:
            errors.append(f"mask_dilation must be >= 0 pixels, got {r.mask_dilation}")
        infos = {}
        for key in ("source_video", "mask_video"):
            path = getattr(job, key)
            if not path:
                errors.append(f"task 'editing' needs {key}")
                continue
            try:
                infos[key] = probe_video(path)
            except DataError as e:
                errors.append(f"{key} {path}: {e.kind}: {e.reason}")
        src, mask = infos.get("source_video"), infos.get("mask_video")
        if src and mask:
            if (mask.height, mask.width) != (src.height, src.width):
                errors.append(f"mask_video is {mask.width}x{mask.height} but source_video is {src.width}x{src.height}")
            if mask.num_frames != src.num_frames:
                errors.append(f"mask_video has {mask.num_frames} frames but source_video has {src.num_frames}")
        if src and r.frames and r.frames > src.num_frames:
            errors.append(f"frames {r.frames} exceed the source video's {src.num_frames}")
    elif job.source_video or job.mask_video:
        errors.append(f"source_video/mask_video given but task is {job.task!r} (only 'editing' uses them)")

    # -- sampling settings
    if r.steps is not None and r.steps < 1:
        errors.append(f"steps must be >= 1, got {r.steps}")
    if r.shift is not None and not r.shift > 0:
        errors.append(f"shift must be positive, got {r.shift}")
    if job.embedded_guidance is not None and not model_cfg.guidance_embed:
        errors.append("embedded_guidance given but the model has no guidance embedder (guidance_embed=False); use cfg_scale")
    if job.embedded_guidance is None and model_cfg.guidance_embed:
        errors.append("this model embeds guidance (guidance_embed=True): set embedded_guidance (e.g. 6.0)")

    # -- guidance branches (the sampler's own rule: uncond only when cfg_scale != 1, ip when ip_cfg_scale > 0)
    names = None
    try:
        from hcustom_mc.inference.scheduler import branches_needed

        names = branches_needed(r.cfg_scale, job.ip_cfg_scale)
    except ValueError as e:
        errors.append(str(e))

    # -- parallel layout
    sizes = {"tp": tp, "cp": cp, "cfg_parallel": cfg_parallel}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
    if bad:
        errors.append(f"parallel sizes must be positive integers: {', '.join(bad)}")
    else:
        if tp * cp * cfg_parallel != world_size:
            errors.append(f"tp x cp x cfg_parallel = {tp} x {cp} x {cfg_parallel} = {tp * cp * cfg_parallel} "
                          f"must equal the world size {world_size} (torchrun --nproc-per-node {tp * cp * cfg_parallel})")
        if names and cfg_parallel not in (1, len(names)):
            errors.append(f"cfg_parallel must be 1 or the number of guidance branches ({len(names)}: "
                          f"{', '.join(names)}), got {cfg_parallel}")
        try:  # heads / hidden / MLP divisible by TP, Ulysses heads by CP: the training layout rules
            ParallelConfig(tensor_parallel=tp, context_parallel=cp, cp_mode=cp_mode).validate(tp * cp, model_cfg)
        except ValueError as e:
            errors += [line.strip()[2:] for line in str(e).splitlines()[1:]]
        if r.frames and (r.frames - 1) % 4 == 0 and cp > (r.frames - 1) // 4 + 1 + K:
            errors.append(f"context_parallel {cp} exceeds the {(r.frames - 1) // 4 + 1 + K} latent frames "
                          "(identity + video) it splits")

    problem = _check_output(job.output)
    if problem:
        errors.append(problem)
    if errors:
        raise InputError("invalid job:\n  - " + "\n  - ".join(errors))


# ------------------------------------------------------------------------------------------ conditions


@dataclass
class EncoderSet:
    llava: Any  # LlavaTextEncoder
    clip: Any  # ClipTextEncoder
    vae: Any  # VideoVAE
    whisper: Any = None  # WhisperAudioEncoder, audio task only
    video_backend: str = "auto"  # read_clip backend for the editing source/mask videos

    @classmethod
    def from_paths(cls, paths, needs_audio: bool, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   *, mode: str = "release", max_subjects: int = 1, text_len: int = 256,
                   video_backend: str = "auto") -> "EncoderSet":
        """Load the encoders of `paths` (EncoderPaths) the job needs: Whisper only when `needs_audio`."""
        from hcustom_mc.encoders.text import ClipTextEncoder, LlavaTextEncoder
        from hcustom_mc.encoders.vae import VideoVAE

        needed = ["llava", "clip", "vae"] + (["whisper"] if needs_audio else [])
        missing = [n for n in needed if not getattr(paths, n)]
        if missing:
            raise InputError(f"encoder paths not set: {missing}")
        whisper = None
        if needs_audio:
            from hcustom_mc.encoders.audio import WhisperAudioEncoder

            whisper = WhisperAudioEncoder.from_pretrained(paths.whisper, dtype=dtype, device=device)
        return cls(
            llava=LlavaTextEncoder.from_pretrained(paths.llava, mode=mode, dtype=dtype, device=device,
                                                   text_len=text_len, max_subjects=max_subjects),
            clip=ClipTextEncoder.from_pretrained(paths.clip, dtype=dtype, device=device),
            vae=VideoVAE.from_pretrained(paths.vae, dtype=dtype, device=device),
            whisper=whisper, video_backend=video_backend,
        )


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary mask [..., H, W] grown by `radius` pixels with a disc structuring element."""
    if radius <= 0:
        return mask
    r = torch.arange(-radius, radius + 1, device=mask.device, dtype=torch.float32)
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()[None, None]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    # a pixel is set when the disc centred on it touches any set pixel
    grown = F.conv2d(flat, disc, padding=radius) > 0.5
    return grown.reshape(mask.shape).to(mask.dtype)


def _generator(seed: int, what: str) -> torch.Generator:
    """CPU generator per encoded input, derived from the job seed: the same latents on any device."""
    return torch.Generator().manual_seed(zlib.crc32(f"{what}:{seed}".encode()))


def _open_subjects(job: SampleJob):
    from PIL import Image

    out = []
    for name, path in job.subjects:
        with Image.open(path) as im:
            out.append((name, im.convert("RGB")))
    return out


def prepare_conditions(job: SampleJob, encoders: EncoderSet, model_cfg, device, dtype,
                       negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> dict[str, Any]:
    """{"branches": {"uncond", "cond"[, "ip"]: DiT keyword inputs (batch 1) without latents, timestep and
    guidance (the sampler adds those)}, "latent_shape": (C, f, h, w) of the noise}. Branches as in the
    module docstring; "uncond" is always built, the sampler skips it when cfg_scale == 1."""
    from hcustom_mc.data.encode import editing_condition, read_audio
    from hcustom_mc.data.video import read_clip, read_image, read_mask_clip

    llava = encoders.llava
    if (llava.mode, llava.max_subjects) != (model_cfg.mode, model_cfg.max_identity_images):
        # the template and the text length depend on both: a mismatch would feed the DiT untrained inputs
        raise InputError(f"LLaVA encoder loaded for mode {llava.mode!r} with max_subjects {llava.max_subjects}, the "
                         f"model is {model_cfg.mode!r} with max_identity_images {model_cfg.max_identity_images}; "
                         "pass mode= and max_subjects= to EncoderSet.from_paths")
    if job.task == "audio" and encoders.whisper is None:
        raise InputError("audio job but the EncoderSet has no Whisper (from_paths(needs_audio=True))")
    job = resolve_job(job)
    H, W, frames = job.height, job.width, job.frames
    vae = encoders.vae
    f, h, w = vae.latent_shape(frames, H, W)
    subjects = _open_subjects(job)
    names = [n for n, _ in subjects]
    negative = job.negative_prompt if job.negative_prompt is not None else negative_prompt

    states, mask = llava.encode([job.prompt], [subjects])
    neg_states, neg_mask = llava.encode_negative([negative], len(subjects), names=[names])
    pooled, neg_pooled = encoders.clip.encode([job.prompt, negative]).split(1)
    cond = dict(text_states=states, text_mask=mask, text_pooled=pooled)
    uncond = dict(text_states=neg_states, text_mask=neg_mask, text_pooled=neg_pooled)
    ip = dict(cond) if job.ip_cfg_scale > 0 else None

    if subjects:
        # white-padded to the video size, one 1-frame video (one latent frame) per image, posterior sample
        real = torch.cat([vae.encode_image(read_image(p, (H, W), fit="pad")[None], generator=_generator(job.seed, f"identity{k}"))
                          for k, (_, p) in enumerate(job.subjects)], dim=2)
        if ip is None:
            cond["identity_latents"] = uncond["identity_latents"] = real
        else:
            white = torch.cat([vae.encode_image(torch.ones(1, 3, H, W), generator=_generator(job.seed, f"white{k}"))
                               for k in range(len(subjects))], dim=2)
            cond["identity_latents"] = uncond["identity_latents"] = white
            ip["identity_latents"] = real

    if job.task == "audio":
        feats = encoders.whisper.features_for_latents(read_audio(job.audio), f, num_identity=len(subjects),
                                                      mode=model_cfg.mode, fps=job.fps)[None]
        cond["audio_features"], uncond["audio_features"] = feats, torch.zeros_like(feats)
        if ip is not None:
            ip["audio_features"] = feats

    if job.task == "editing":
        size, backend = (H, W), encoders.video_backend
        # on the VAE's device: the disc convolution over every full-size frame is heavy on a CPU
        source = read_clip(job.source_video, frames, 1, size, backend=backend).to(vae.device, torch.float32)
        m = read_mask_clip(job.mask_video, frames, 1, size, backend=backend).to(vae.device, torch.float32)
        m = dilate_mask(m, job.mask_dilation)
        condition = editing_condition(
            source, m, lambda pixels, tag: vae.encode(pixels[None], generator=_generator(job.seed, tag))[0])[None]
        for branch in (cond, uncond, ip):
            if branch is not None:
                branch["video_condition"] = condition

    branches = {}
    for name, branch in (("uncond", uncond), ("cond", cond), ("ip", ip)):
        if branch is not None:
            branches[name] = {k: v.to(device) if k == "text_mask" else v.to(device, dtype) for k, v in branch.items()}
    return {"branches": branches, "latent_shape": (model_cfg.in_channels, f, h, w)}


__all__ = [
    "DEFAULT_NEGATIVE_PROMPT", "EncoderSet", "InputError", "SampleJob", "TASKS", "dilate_mask",
    "prepare_conditions", "resolve_job", "validate_job",
]
