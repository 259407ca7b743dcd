"""Decode a clip, resize it to cover its bucket, centre-crop, normalise to [-1, 1].

Backends (`read_clip(..., backend=)`):
  dali-gpu  NVDEC decoding (`fn.decoders.video`, device "mixed") + `fn.resize` + `fn.crop_mirror_normalize`
            on the GPU. Chosen by "auto" when CUDA and nvidia-dali are both present.
  dali-cpu  the same DALI ops on the CPU. DALI's CPU decoder reads VP8/VP9/MJPEG only, so h264 and
            everything else is decoded by PyAV and fed in through `fn.external_source`.
  pyav      PyAV decoding + torch antialiased bilinear resize: the fallback without DALI.
PyAV frames are converted to RGB with the same swscale flags DALI's CPU decoder uses
(bilinear + full chroma interpolation + accurate rounding), so a VP9 clip gives identical RGB
frames whichever decoder read it; backends then differ only in their resize kernels.

Every problem with a *file* becomes `DataError(kind, path, reason)`; misuse (a bad argument, a
backend that is not installed) stays a ValueError / RuntimeError.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from hcustom_mc.console import log_once
from hcustom_mc.data.buckets import BUCKET_RATIOS, bucket_for, center_anchor, cover_size, fit_size  # noqa: F401 (re-exported)
from hcustom_mc.data.errors import DataError
from hcustom_mc.device import uses_cuda

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "pyav")
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})  # what DALI's bundled libavcodec decodes on CPU
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg4"})  # NVDEC
# DALI's CPU decoder converts with these swscale flags; PyAV frames go through the same filter.
_RGB_FILTER = "w=iw:h=ih:flags=bilinear+full_chroma_int+accurate_rnd"


# ---------------------------------------------------------------- probing and clip sampling


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    codec: str


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError("missing", path, "no such file")


def _open(path: str):
    """av.open with every failure mapped to a DataError, plus the first video stream."""
    import av

    _check_exists(path)
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise DataError("corrupt", path, f"cannot open container: {e}") from None
    if not container.streams.video:
        container.close()
        raise DataError("corrupt", path, "no video stream")
    return container, container.streams.video[0]


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps, size and codec, checked by demuxing every packet (no decoding).

    Container headers lie or say nothing: WebM has no frame count (stream.frames == 0) and a cut-off
    MP4 with its index up front still claims every frame. Counting packets is exact for the codecs
    we read (one packet per frame) and catches truncation. Cached per (path, size, mtime).
    """
    path = str(path)
    _check_exists(path)
    st = os.stat(path)
    return _probe_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _probe_cached(path: str, _size: int, _mtime: int) -> VideoInfo:
    import av

    container, stream = _open(path)
    try:
        ctx = stream.codec_context  # None when this FFmpeg build has no decoder for the stream
        if ctx is None:
            raise DataError("codec", path, "no decoder for the video stream's codec")
        codec = ctx.name
        declared = stream.frames
        count, end = 0, None
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end carries no frame
                continue
            count += 1
            if packet.pts is not None:
                stop = packet.pts + (packet.duration or 0)
                end = stop if end is None else max(end, stop)
        single_stream = len(container.streams) == 1
        container_duration = container.duration
        # the stream's own fields, read while the container is open (PyAV 19 refuses them after close)
        rate = stream.average_rate or stream.guessed_rate or 0
        time_base, stream_duration, start = stream.time_base, stream.duration, stream.start_time or 0
        height, width = stream.height, stream.width
    except av.error.FFmpegError as e:
        raise DataError("corrupt", path, f"demux failed: {e}") from None
    finally:
        container.close()
    if count == 0:
        raise DataError("corrupt", path, "no video packets (empty or truncated file)")
    if declared and count < declared:
        raise DataError("corrupt", path, f"truncated: header lists {declared} frames, file holds {count}")
    fps = float(rate) if rate else 0.0
    # No frame count in the header (WebM): compare the packets' end time with the declared duration.
    duration = stream_duration * time_base if stream_duration else None
    if duration is None and container_duration and single_stream:
        duration = container_duration / 1_000_000
    if not declared and duration and end is not None and fps:
        covered = float((end - start) * time_base)
        if covered < float(duration) - 1.5 / fps:
            raise DataError("corrupt", path, f"truncated: packets cover {covered:.3f}s of {float(duration):.3f}s")
    return VideoInfo(num_frames=count, fps=fps, height=height, width=width, codec=codec)


def clip_indices(num_frames: int, clip_frames: int, stride: int, start: int, path: str = "") -> list[int]:
    """Frame indices start, start+stride, ... of a clip of clip_frames = 4k+1 frames (VAE: 1 + 4 per latent)."""
    if clip_frames < 1 or (clip_frames - 1) % 4:
        raise ValueError(f"clip_frames must be 4k+1, got {clip_frames}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    span = (clip_frames - 1) * stride + 1
    if num_frames < span:
        raise DataError("too_short", path, f"{num_frames} frames, a {clip_frames}-frame clip at stride {stride} needs {span}")
    if not 0 <= start <= num_frames - span:
        raise ValueError(f"start {start} outside [0, {num_frames - span}] for {num_frames} frames, span {span}")
    return list(range(start, start + span, stride))


def choose_start(num_frames: int, clip_frames: int, stride: int, seed: int, index: int, path: str = "") -> int:
    """A start frame that is a pure function of (seed, index): same clip on every rank and rerun."""
    span = (clip_frames - 1) * stride + 1
    if num_frames < span:
        raise DataError("too_short", path, f"{num_frames} frames, a {clip_frames}-frame clip at stride {stride} needs {span}")
    g = torch.Generator().manual_seed(zlib.crc32(repr(("clip_start", seed, index)).encode()))
    return int(torch.randint(0, num_frames - span + 1, (1,), generator=g))


# ---------------------------------------------------------------- PyAV decoding


def decode_frames(path: str | os.PathLike, indices: list[int]) -> np.ndarray:
    """Frames `indices` (presentation order, ascending) as uint8 [F, H, W, 3], RGB exactly as DALI converts.

    Decodes sequentially from the start and stops after the last wanted frame; only wanted frames are
    colour-converted.
    """
    import av

    path = str(path)
    wanted = set(indices)
    last = max(wanted)
    container, stream = _open(path)
    stream.thread_type = "AUTO"
    graph = av.filter.Graph()
    chain = [graph.add_buffer(template=stream), graph.add("scale", _RGB_FILTER), graph.add("format", "rgb24"),
             graph.add("buffersink")]
    for a, b in zip(chain, chain[1:]):
        a.link_to(b)
    graph.configure()
    got: dict[int, np.ndarray] = {}
    try:
        pos = 0
        for frame in container.decode(stream):
            if pos in wanted:
                graph.push(frame)
                got[pos] = graph.pull().to_ndarray()
            pos += 1
            if pos > last:
                break
    except av.error.FFmpegError as e:
        raise DataError("corrupt", path, f"decode failed at frame {pos}: {e}") from None
    finally:
        container.close()
    if len(got) < len(wanted):
        raise DataError("corrupt", path, f"decoded {pos} frames, needed frame {last}")
    return np.stack([got[i] for i in indices])


# ---------------------------------------------------------------- torch resize (the pyav backend)


def torch_resize_crop(frames: torch.Tensor, size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
    """uint8 [F, h, w, 3] -> float [3, F, H, W] in [-1, 1]: cover-resize, centre-crop, normalise.

    Bilinear with antialias (a triangle filter widened when shrinking, as DALI's), rounded back to
    uint8 levels as DALI's uint8 resize output is; "nearest" samples pixel centres like DALI's NN.
    """
    H, W = size
    x = rearrange(frames, "f h w c -> f c h w").float()
    h, w = x.shape[-2:]
    rh, rw = cover_size(h, w, H, W)
    if (rh, rw) != (h, w):
        if nearest:
            x = F.interpolate(x, size=(rh, rw), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)
    top, left = center_anchor(rh, H), center_anchor(rw, W)
    x = x[..., top:top + H, left:left + W]
    return rearrange(_normalise(x), "f c h w -> c f h w").contiguous()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1], computed as DALI's crop_mirror_normalize does ((x - mean) * (1 / std)), so an
    unresized frame comes out bit-identical on every backend."""
    return (x - 127.5) * (1.0 / 127.5)


# ---------------------------------------------------------------- backend choice


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend for `backend`; RuntimeError when an explicit one cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r} (choose from {BACKENDS})")
    cuda, dali = uses_cuda(), dali_available()
    if backend == "auto":
        if cuda and dali:
            backend, why = "dali-gpu", "CUDA and nvidia-dali are available"
        elif dali:
            backend, why = "dali-cpu", "nvidia-dali is installed but CUDA is not available"
        else:
            backend, why = "pyav", "nvidia-dali is not installed"
        log_once(f"video backend: {backend} ({why})", log.name)
        return backend
    if backend == "dali-gpu" and not (cuda and dali):
        missing = " and ".join(n for n, ok in (("CUDA (this process computes on the CPU: no GPU, or HCUSTOM_DIST_BACKEND=gloo)", cuda),
                                               ("nvidia-dali", dali)) if not ok)
        raise RuntimeError(f"video backend 'dali-gpu' needs {missing}; use backend='auto', 'dali-cpu' or 'pyav'")
    if backend == "dali-cpu" and not dali:
        raise RuntimeError("video backend 'dali-cpu' needs nvidia-dali (pip install nvidia-dali-cuda130); "
                           "use backend='auto' or 'pyav'")
    return backend


# ---------------------------------------------------------------- DALI pipelines


class _DaliClip:
    """One built DALI pipeline (batch of one) for a fixed (device, source, output size, interpolation).

    source "decode": inputs are the file's bytes and the frame indices; DALI decodes.
    source "frames": input is decoded uint8 [F, h, w, 3] frames (from PyAV).
    The clip length is not baked in: indices and frames arrive per run, so one pipeline serves any F.
    """

    def __init__(self, gpu: bool, source: str, size: tuple[int, int], nearest: bool):
        from nvidia.dali import fn, pipeline_def, types

        self.gpu, self.source, self.lock = gpu, source, threading.Lock()
        H, W = size
        decoder = getattr(fn.decoders, "video", None) or fn.experimental.decoders.video  # moved in DALI 1.4x

        # Synchronous, no prefetch: each run consumes exactly the one sample just fed to it.
        @pipeline_def(batch_size=1, num_threads=max(1, min(4, os.cpu_count() or 1)),
                      device_id=torch.cuda.current_device() if gpu else None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            if source == "decode":
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                frames = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
                video = decoder(encoded, device="mixed" if gpu else "cpu", frames=frames)
            else:
                video = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC")
                video = video.gpu() if gpu else video
            # subpixel_scale=False: scale by the rounded output size, as torch's interpolate does.
            interp = types.INTERP_NN if nearest else types.INTERP_LINEAR
            video = fn.resize(video, size=[H, W], mode="not_smaller", interp_type=interp,
                              antialias=not nearest, subpixel_scale=False)
            return fn.crop_mirror_normalize(video, crop=(H, W), crop_pos_x=0.5, crop_pos_y=0.5, mean=127.5,
                                            std=127.5, dtype=types.FLOAT, output_layout="CFHW")

        self.pipe = pipe()
        self.pipe.build()

    def run(self, *, encoded: np.ndarray | None = None, indices: list[int] | None = None,
            frames: np.ndarray | None = None) -> torch.Tensor:
        with self.lock:
            if self.source == "decode":
                self.pipe.feed_input("encoded", [encoded])
                self.pipe.feed_input("indices", [np.asarray(indices, dtype=np.int32)])
            else:
                self.pipe.feed_input("frames", [np.ascontiguousarray(frames)])
            (out,) = self.pipe.run()
            if not self.gpu:
                return torch.from_numpy(np.array(out[0]))
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            result = torch.empty(t.shape()[1:], dtype=torch.float32, device=torch.device("cuda"))
            feed_ndarray(t, result.view(1, *result.shape), cuda_stream=torch.cuda.current_stream())
            return result


_pipelines: dict[tuple, _DaliClip] = {}
_pipelines_lock = threading.Lock()
_owner_pid = os.getpid()
_inherited: list[_DaliClip] = []  # pipelines a forked worker inherited: their threads are gone, never run them


def _key(gpu: bool, source: str, size: tuple[int, int], nearest: bool) -> tuple:
    """Cache key: the device (a GPU pipeline is bound to one), decoder source, output size, interpolation."""
    return (f"cuda:{torch.cuda.current_device()}" if gpu else "cpu", source, tuple(size), nearest)


def _pipeline(gpu: bool, source: str, size: tuple[int, int], nearest: bool) -> _DaliClip:
    global _owner_pid
    key = _key(gpu, source, size, nearest)
    with _pipelines_lock:
        if os.getpid() != _owner_pid:  # a DataLoader worker forked after the parent built pipelines
            _inherited.extend(_pipelines.values())  # kept referenced: destroying them here could hang
            _pipelines.clear()
            _owner_pid = os.getpid()
        if key not in _pipelines:
            _pipelines[key] = _DaliClip(gpu, source, tuple(size), nearest)
        return _pipelines[key]


def _dali_reason(e: Exception) -> str:
    """DALI errors carry the pipeline traceback; keep the useful line."""
    text = re.sub(r"\s+", " ", str(e))
    m = re.search(r"(Assert on .*?|Error in .*?)(Stacktrace|$)", text)
    return (m.group(1) if m else text)[:300]


def dali_resize_crop(frames: np.ndarray, size: tuple[int, int], nearest: bool = False, gpu: bool = False) -> torch.Tensor:
    """The DALI resize + crop + normalise ops on already decoded uint8 [F, h, w, 3] frames."""
    return _run_dali(gpu, "frames", size, nearest, "<frames>", frames=frames)


def _run_dali(gpu: bool, source: str, size, nearest: bool, path: str, **inputs) -> torch.Tensor:
    pipeline = _pipeline(gpu, source, size, nearest)
    try:
        return pipeline.run(**inputs)
    except torch.cuda.OutOfMemoryError:
        raise  # not the data's fault: must not be turned into a skipped sample
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise  # DALI's own allocation failures: a machine problem, not bad data
        # A failed DALI pipeline is "no longer valid": drop it so the next sample builds a fresh one.
        key = _key(gpu, source, size, nearest)
        with _pipelines_lock:
            if _pipelines.get(key) is pipeline:
                del _pipelines[key]
        raise DataError("corrupt", path, f"DALI decode failed: {_dali_reason(e)}") from None


# ---------------------------------------------------------------- public readers


def _read(path, clip_frames, stride, size, start, backend, decoder, nearest) -> torch.Tensor:
    path = str(path)
    backend = resolve_backend(backend)
    if decoder not in ("auto", "dali", "pyav"):
        raise ValueError(f"decoder must be 'auto', 'dali' or 'pyav', got {decoder!r}")
    info = probe_video(path)
    indices = clip_indices(info.num_frames, clip_frames, stride, start, path=path)
    if backend == "pyav":
        return torch_resize_crop(torch.from_numpy(decode_frames(path, indices)), size, nearest)
    gpu = backend == "dali-gpu"
    dali_codecs = DALI_GPU_CODECS if gpu else DALI_CPU_CODECS
    if decoder == "dali" and info.codec not in dali_codecs:
        raise DataError("codec", path, f"{backend} cannot decode {info.codec} (DALI decodes {sorted(dali_codecs)})")
    if decoder == "pyav" or info.codec not in dali_codecs:
        if decoder == "auto":
            log_once(f"{backend}: {info.codec} is decoded by PyAV and fed to DALI "
                     f"(DALI's {'GPU' if gpu else 'CPU'} decoder reads {', '.join(sorted(dali_codecs))})", log.name)
        return _run_dali(gpu, "frames", size, nearest, path, frames=decode_frames(path, indices))
    encoded = np.fromfile(path, dtype=np.uint8)
    return _run_dali(gpu, "decode", size, nearest, path, encoded=encoded, indices=indices)


def read_clip(path: str | os.PathLike, clip_frames: int, stride: int, size: tuple[int, int], start: int = 0,
              backend: str = "auto", decoder: str = "auto") -> torch.Tensor:
    """Frames start, start+stride, ... of `path` as float32 [3, F, H, W] in [-1, 1] (on the GPU for dali-gpu).

    Resized aspect-preserving to cover size=(H, W), centre-cropped to it. `decoder` only matters for
    the DALI backends: "auto" lets DALI decode what it can, "pyav" always feeds PyAV frames, "dali"
    refuses codecs DALI cannot decode.
    """
    return _read(path, clip_frames, stride, size, start, backend, decoder, nearest=False)


def read_mask_clip(path: str | os.PathLike, clip_frames: int, stride: int, size: tuple[int, int], start: int = 0,
                   backend: str = "auto", decoder: str = "auto") -> torch.Tensor:
    """A mask video as float32 [1, F, H, W] in {0, 1}: same frames and crop as read_clip, nearest resize,
    binarised at 127.5 (mean of RGB) so compression noise around the edges does not leak through."""
    x = _read(path, clip_frames, stride, size, start, backend, decoder, nearest=True)
    return (x.mean(0, keepdim=True) > 0).float()


def read_image(path: str | os.PathLike, size: tuple[int, int], fit: str = "pad", pad_value: int = 255) -> torch.Tensor:
    """An identity image as float32 [3, H, W] in [-1, 1].

    fit="pad": resize to fit inside (H, W), centre it on a pad_value canvas (the release pads with
    white to the output video size). fit="crop": cover-resize and centre-crop like a video frame.
    Transparent pixels are composited onto pad_value, not left black.
    """
    from PIL import Image, UnidentifiedImageError

    if fit not in ("pad", "crop"):
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    path = str(path)
    _check_exists(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (pad_value,) * 3 + (255,))
                im = Image.alpha_composite(canvas, im)
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError("image", path, f"cannot read image: {e}") from None
    x = torch.from_numpy(rgb.copy())[None]  # [1, h, w, 3]
    H, W = size
    if fit == "crop":
        return torch_resize_crop(x, size)[:, 0]
    h, w = rgb.shape[:2]
    rh, rw = fit_size(h, w, H, W)
    img = rearrange(x, "1 h w c -> 1 c h w").float()
    if (rh, rw) != (h, w):
        img = F.interpolate(img, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False).round().clamp(0, 255)
    out = torch.full((3, H, W), float(pad_value))
    top, left = (H - rh) // 2, (W - rw) // 2
    out[:, top:top + rh, left:left + rw] = img[0]
    return _normalise(out)
