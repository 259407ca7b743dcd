"""Writing samples: uint8 frames, mp4 (h264 + optional AAC), contact sheet, JSON sidecar, progress.

PyAV bundles its own ffmpeg (libx264 + native aac), so nothing here needs a system ffmpeg.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, TextIO

import numpy as np
import torch
from einops import rearrange

__all__ = [
    "to_uint8_frames",
    "write_mp4",
    "read_mp4",
    "write_contact_sheet",
    "write_sidecar",
    "StepProgress",
    "LABEL_HEIGHT",
]

LABEL_HEIGHT = 14  # px strip under each contact-sheet tile; fixed so the sheet size is predictable


def to_uint8_frames(video) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] (tensor or array) -> uint8 [F, H, W, 3], rounded and clamped."""
    v = torch.as_tensor(video).detach().to("cpu", torch.float32)
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"expected a [3, F, H, W] video, got shape {tuple(v.shape)}")
    # Round rather than truncate (the release truncates): truncation biases every pixel down by 0.5.
    v = ((v + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(v, "c f h w -> f h w c").contiguous().numpy()


def _as_fraction(fps) -> Fraction:
    # An exact rational rate keeps the mp4 timestamps exact (25 -> 1/25 s per frame, 24000/1001 stays so).
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return rate


def _atomic_target(path) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename on one filesystem; keep the suffix for format sniffing.
    return path, path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_mp4(path, frames_uint8: np.ndarray, fps, audio: Optional[np.ndarray] = None,
              audio_rate: int = 16000, crf: int = 18) -> Path:
    """Encode uint8 [F, H, W, 3] frames as h264/yuv420p; optional mono float audio in [-1, 1] as AAC.

    The audio is trimmed or zero-padded to exactly the video duration F/fps so that players do not
    show a frozen last frame. H and W must be even (yuv420p subsamples chroma 2x2); our sizes are
    multiples of 16, so we refuse odd sizes instead of silently padding.
    """
    import av

    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"h264/yuv420p needs even H and W, got {height}x{width}")
    rate = _as_fraction(fps)
    path, tmp = _atomic_target(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=rate)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.codec_context.time_base = 1 / rate
            # a fixed thread count: x264's output depends on it, and "auto" follows the CPUs this process sees, so
            # the same frames gave different files from one run to the next (compare's PSNR would count that)
            video.options = {"crf": str(int(crf)), "threads": "4"}
            astream = None
            if audio is not None:
                astream = container.add_stream("aac", rate=int(audio_rate))
                astream.layout = "mono"
            for i, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts, frame.time_base = i, 1 / rate
                container.mux(video.encode(frame))
            container.mux(video.encode())  # flush delayed (B-)frames
            if astream is not None:
                _encode_audio(container, astream, audio, audio_rate, num_frames / rate)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _encode_audio(container, stream, audio, audio_rate: int, duration: Fraction) -> None:
    import av

    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    wanted = int(round(duration * audio_rate))
    samples = np.pad(samples[:wanted], (0, max(0, wanted - samples.size)))
    chunk = stream.codec_context.frame_size or 1024  # the aac encoder wants fixed-size frames
    for start in range(0, wanted, chunk):
        piece = samples[start:start + chunk]
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = audio_rate, start, Fraction(1, audio_rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def read_mp4(path) -> tuple[np.ndarray, Fraction, Optional[np.ndarray], Optional[int]]:
    """Decode an mp4: (uint8 [F, H, W, 3], fps, mono float32 samples or None, audio rate or None)."""
    import av

    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        fps = vstream.average_rate or vstream.guessed_rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(vstream)])
    audio, audio_rate = None, None
    with av.open(str(path)) as container:
        if container.streams.audio:
            astream = container.streams.audio[0]
            audio_rate = astream.rate
            # planar float frames decode to [channels, n]; we write mono, so keep channel 0
            parts = [np.atleast_2d(f.to_ndarray())[0] for f in container.decode(astream)]
            audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return frames, Fraction(fps), audio, audio_rate


def _clipped(draw, label: str, room: float) -> str:
    """The label cut to fit its tile (ending in '.' when cut), so neighbouring names never overprint."""
    if draw.textlength(label) <= room:
        return label
    while len(label) > 1 and draw.textlength(label + ".") > room:
        label = label[:-1]
    return label + "."


def write_contact_sheet(path, frames_uint8: np.ndarray, columns: Optional[int] = None,
                        max_frames: int = 16, references: Sequence[tuple[str, str]] = ()) -> Path:
    """PNG grid of up to `max_frames` evenly spaced frames, each tile labelled with its frame index.

    Tile = one frame (W x H) above a LABEL_HEIGHT strip, so labels never cover the content.
    Sheet size = (columns*W, rows*(H + LABEL_HEIGHT)); columns defaults to ceil(sqrt(n)). `references` (the job's
    (subject name, identity image) pairs) come first, on rows of their own, each image fitted into a tile (aspect
    kept, grey around it) and labelled with its subject's name, so a sheet shows what the video was asked to match.
    """
    from PIL import Image, ImageDraw

    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    total, height, width, _ = frames.shape
    picks = sorted(set(np.linspace(0, total - 1, min(total, max_frames)).round().astype(int).tolist()))
    cols = columns or math.ceil(math.sqrt(len(picks)))
    ref_rows = math.ceil(len(references) / cols)
    rows = ref_rows + math.ceil(len(picks) / cols)
    tile_h = height + LABEL_HEIGHT
    sheet = Image.new("RGB", (cols * width, rows * tile_h), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    tiles = [(_fitted(image, width, height), f"ref: {name}") for name, image in references]
    tiles += [(Image.fromarray(frames[idx]), f"f{idx}") for idx in picks]
    for k, (tile, label) in enumerate(tiles):
        row = k // cols if k < len(references) else ref_rows + (k - len(references)) // cols
        col = k % cols if k < len(references) else (k - len(references)) % cols
        x, y = col * width, row * tile_h
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + height + 1), _clipped(draw, label, width - 4), fill=(255, 255, 255))
    path, tmp = _atomic_target(path)
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _fitted(image_path: str, width: int, height: int):
    """The image scaled to fit width x height (aspect kept), centred on grey."""
    from PIL import Image

    with Image.open(image_path) as image:
        image = image.convert("RGB")
        scale = min(width / image.width, height / image.height)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    tile = Image.new("RGB", (width, height), (128, 128, 128))
    tile.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return tile


def _jsonable(value):
    """json.dumps fallback: paths, dtypes, devices, Fractions -> str; arrays/sets -> lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)  # Path, torch.dtype, torch.device, Fraction, enums, ...


def write_sidecar(path, settings: dict) -> Path:
    """Settings as pretty JSON with sorted keys (tuples become lists), written atomically."""
    text = json.dumps(settings, sort_keys=True, indent=2, default=_jsonable)
    path, tmp = _atomic_target(path)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class StepProgress:
    """One status line per denoising step: `denoise 3/30 | step 1.20s | mean 1.18s | ETA 00:32`.

    On a terminal the line is redrawn in place (\\r, like tqdm); otherwise (logs, torchrun) each step
    gets its own line so the log keeps the per-step timings. The caller times the step itself (it
    knows where the device synchronises), we only report.
    """

    def __init__(self, total: int, enabled: bool = True, desc: str = "denoise", stream: Optional[TextIO] = None):
        if total < 1:
            raise ValueError("total must be >= 1")
        self.total, self.enabled, self.desc = int(total), enabled, desc
        self.stream = stream if stream is not None else sys.stderr
        self.times: list[float] = []
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.perf_counter()

    def update(self, step_seconds: float) -> None:
        self.times.append(float(step_seconds))
        if not self.enabled:
            return
        done, mean = len(self.times), sum(self.times) / len(self.times)
        eta = mean * max(0, self.total - done)
        line = (f"{self.desc} {done}/{self.total} | step {step_seconds:.2f}s | "
                f"mean {mean:.2f}s | ETA {_clock(eta)}")
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        self.stream.flush()

    def summary(self) -> dict:
        steps = len(self.times)
        total = sum(self.times)
        return {"steps": steps, "total_s": total, "mean_s_per_step": total / steps if steps else 0.0,
                "step_s": [round(t, 4) for t in self.times], "wall_s": time.perf_counter() - self._started}

    def close(self) -> dict:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
        return self.summary()
