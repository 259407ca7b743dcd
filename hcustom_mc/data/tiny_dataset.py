"""A small *real* dataset on disk: encoded videos, identity images, audio tones, edit masks, manifest.

Every sample is a coloured shape crossing a white frame, so captions, identity crops, the audio
pitch (follows the shape's x position) and the edit mask are all exactly known. Videos alternate
between h264 (.mp4) and VP9 (.webm) so both decoding paths (PyAV-fed and DALI's own) get exercised.
Tasks cycle identity, multi_identity, t2v, audio, editing (or the `tasks` given); the n-th multi_identity sample
has multi_subjects[n % len(multi_subjects)] subjects (2 by default), of distinct colours, so each subject's
name ("red square") is a distinct phrase of the caption. With boxes_from_frame = f, subjects carry no identity image
but their box (the input of subject extraction, tools/extract_subjects.py) in the frame from f on where the fewest
of their pixels are covered by shapes drawn over them. With broken_fraction > 0 a
deterministic subset of samples gets one broken file each, of varied kinds, for the error-handling paths.

    from hcustom_mc.data.tiny_dataset import make_tiny_dataset
    broken = make_tiny_dataset("runs/tiny/dataset", num_samples=16, size="64x48", frames=17, seed=0)
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

FPS = 25  # the audio task's Whisper windows assume 25 fps clips
AUDIO_RATE = 16000
TASK_CYCLE = ("identity", "multi_identity", "t2v", "audio", "editing")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (150, 50, 180)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
# broken-file kind -> the DataError kind a reader raises for it
BROKEN_KINDS = {"truncated": "corrupt", "missing": "missing", "garbage": "corrupt", "too_short": "too_short",
                "bad_image": "image", "wrong_rate": "sample_rate"}


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """"WxH" (as on the command line, width first) or an (H, W) tuple -> (H, W)."""
    if isinstance(size, str):
        w, h = (int(v) for v in size.lower().split("x"))
    else:
        h, w = size
    if h % 2 or w % 2 or h < 16 or w < 16:
        raise ValueError(f"frame size must be even and at least 16x16 (yuv420p), got {w}x{h} (WxH)")
    return h, w


def _shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean [s, s] footprint of a shape of side s."""
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "circle":
        return (yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= (s / 2) ** 2
    return np.abs(xx - s / 2) <= yy / 2  # triangle, apex up


class _Mover:
    """One shape moving in a straight line across the frame, edge to edge, over the clip."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, taken: set):
        self.shape = SHAPES[int(rng.integers(len(SHAPES)))]
        self.color = str(rng.choice([c for c in COLORS if c not in taken]))
        self.direction = str(rng.choice(list(DIRECTIONS)))
        self.side = max(6, min(h, w) // 3)
        self.footprint = _shape_mask(self.shape, self.side)
        self.h, self.w = h, w
        self.offset = int(rng.integers(0, max(1, min(h, w) - self.side)))  # across the motion

    def position(self, t: float) -> tuple[int, int]:
        """Top-left (y, x) at time t in [0, 1]."""
        dx, dy = DIRECTIONS[self.direction]
        if dx:
            travel = self.w - self.side
            x = round(travel * (t if dx > 0 else 1 - t))
            return min(self.offset, self.h - self.side), x
        travel = self.h - self.side
        y = round(travel * (t if dy > 0 else 1 - t))
        return y, min(self.offset, self.w - self.side)

    def region(self, t: float) -> np.ndarray:
        mask = np.zeros((self.h, self.w), bool)
        y, x = self.position(t)
        mask[y:y + self.side, x:x + self.side] = self.footprint
        return mask

    def name(self) -> str:
        """The subject's phrase in the caption: colours differ within a clip, so names do too."""
        return f"{self.color} {self.shape}"

    def box(self, t: float) -> list[int]:
        """[x0, y0, x1, y1] in video pixels at time t (the extraction manifest's box)."""
        y, x = self.position(t)
        return [x, y, x + self.side, y + self.side]

    def phrase(self) -> str:
        return f"{self.name()} moves {'to the ' if self.direction in ('left', 'right') else ''}{self.direction}"


def _render(movers: list[_Mover], frames: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 video [F, h, w, 3] on white and the union mask [F, h, w] of the first mover."""
    video = np.full((frames, h, w, 3), 255, np.uint8)
    first = np.zeros((frames, h, w), bool)
    for f in range(frames):
        t = f / max(1, frames - 1)
        for k, m in enumerate(movers):
            region = m.region(t)
            video[f][region] = COLORS[m.color]
            if k == 0:
                first[f] = region
    return video, first


def _clearest_frame(movers: list[_Mover], k: int, candidates: range) -> int:
    """The candidate frame where the most of mover k's pixels show (shapes drawn after it cover it)."""
    frames = candidates.stop

    def visible(f: int) -> int:
        t = f / max(1, frames - 1)
        covered = np.zeros((movers[k].h, movers[k].w), bool)
        for later in movers[k + 1:]:
            covered |= later.region(t)
        return int((movers[k].region(t) & ~covered).sum())

    return max(candidates, key=lambda f: (visible(f), -f))


def write_video(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """uint8 [F, H, W, 3] -> h264 (.mp4) or VP9 (.webm) by suffix, yuv420p, high quality (masks survive)."""
    import av

    codec, options = {".mp4": ("libx264", {"preset": "veryfast", "crf": "12", "threads": "1"}),
                      ".webm": ("libvpx-vp9", {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8",
                                               "threads": "1"})}[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_tone(path: Path, mover: _Mover, frames: int, rate: int = AUDIO_RATE, fps: int = FPS) -> None:
    """Mono 16-bit WAV: a sine whose pitch follows the shape's x position (220 Hz left .. 880 Hz right)."""
    import av

    n = int(round(frames / fps * rate))
    t = np.arange(n) / rate * fps / max(1, frames - 1)  # clip time in [0, ~1]
    x = np.array([mover.position(min(1.0, v))[1] for v in np.linspace(0, 1, frames)], np.float64)
    xs = np.interp(t, np.linspace(0, 1, frames), x) / max(1, mover.w - mover.side)
    freq = 220.0 * 4.0 ** xs
    phase = 2 * np.pi * np.cumsum(freq) / rate  # integrate frequency: no clicks when the pitch moves
    samples = (0.3 * 32767 * np.sin(phase)).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_identity(path: Path, mover: _Mover, margin: int = 4) -> list[int]:
    """A PNG crop of the shape on white; returns its box [x0, y0, x1, y1] in the image's pixels."""
    from PIL import Image

    s = mover.side
    img = np.full((s + 2 * margin, s + 2 * margin, 3), 255, np.uint8)
    img[margin:margin + s, margin:margin + s][mover.footprint] = COLORS[mover.color]
    Image.fromarray(img).save(path)
    return [margin, margin, margin + s, margin + s]


def _break(kind: str, record: dict, root: Path, h: int, w: int, rng: np.random.Generator) -> None:
    """Replace one of the sample's files with a broken one of `kind`."""
    video = root / record["video"]
    if kind == "truncated":
        data = video.read_bytes()
        video.write_bytes(data[: len(data) // 2])
    elif kind == "missing":
        video.unlink()
    elif kind == "garbage":
        video.unlink()
        record["video"] = str(Path(record["video"]).with_suffix(".mp4"))
        (root / record["video"]).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "too_short":
        write_video(video, np.full((3, h, w, 3), 255, np.uint8))
    elif kind == "bad_image":
        (root / record["subjects"][0]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    elif kind == "wrong_rate":
        write_tone(root / record["audio"], record.pop("_mover"), record.pop("_frames"), rate=8000)
    else:
        raise ValueError(kind)


def _applicable(kind: str, record: dict) -> bool:
    if kind == "bad_image":
        return bool(record["subjects"]) and "image" in record["subjects"][0]
    if kind == "wrong_rate":
        return record["audio"] is not None
    return True


def make_tiny_dataset(out: str | os.PathLike, num_samples: int = 16, size: str | tuple[int, int] = "64x48",
                      frames: int = 17, seed: int = 0, broken_fraction: float = 0.0,
                      tasks: tuple[str, ...] = TASK_CYCLE, multi_subjects: tuple[int, ...] = (2,),
                      boxes_from_frame: int | None = None) -> list[str]:
    """Write the dataset and `manifest.jsonl` under `out`; return the ids of the broken samples.

    Also writes `broken.json` ({id: {"file_kind": ..., "error_kind": DataError kind}}) so tests know
    what each reader should raise. Same arguments -> same files.
    """
    if not 0.0 <= broken_fraction <= 1.0:
        raise ValueError(f"broken_fraction must be in [0, 1], got {broken_fraction}")
    if frames < 5:
        raise ValueError(f"frames must be at least 5 (one 4k+1 clip), got {frames}")
    problems = [f"unknown task {t!r} (known: {', '.join(TASK_CYCLE)})" for t in tasks if t not in TASK_CYCLE]
    problems += [f"multi_identity takes 2..{len(COLORS)} subjects (one colour each), got {n}" for n in multi_subjects
                 if not 2 <= n <= len(COLORS)]
    if boxes_from_frame is not None and not 0 <= boxes_from_frame < frames:
        problems.append(f"boxes_from_frame must be a frame of the clip (0..{frames - 1}), got {boxes_from_frame}")
    if not tasks or not multi_subjects or problems:
        raise ValueError("; ".join(problems or ["tasks and multi_subjects must not be empty"]))
    h, w = parse_size(size)
    root = Path(out)
    for sub in ("videos", "images", "audio", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records, multi = [], 0
    for i in range(num_samples):
        sid, task = f"s{i:04d}", tasks[i % len(tasks)]
        ext = ".mp4" if i % 2 == 0 else ".webm"
        movers: list[_Mover] = []
        count = 1
        if task == "multi_identity":
            count, multi = multi_subjects[multi % len(multi_subjects)], multi + 1
        for _ in range(count):
            for _ in range(100):  # a shape on another's path would hide behind it all clip long: draw again
                mover = _Mover(rng, h, w, taken={m.color for m in movers})
                if not any(mover.direction == m.direction and abs(mover.offset - m.offset) < mover.side
                           for m in movers):
                    break
            movers.append(mover)
        video, region = _render(movers, frames, h, w)
        record = {"id": sid, "task": task, "video": f"videos/{sid}{ext}",
                  "caption": "A " + " and a ".join(m.phrase() for m in movers) + ".",
                  "subjects": [], "audio": None, "source_video": None, "mask_video": None}
        write_video(root / record["video"], video)
        if task != "t2v":
            for k, m in enumerate(movers):
                if boxes_from_frame is not None:
                    f = _clearest_frame(movers, k, range(boxes_from_frame, frames))
                    box = m.box(f / max(1, frames - 1))
                    record["subjects"].append({"name": m.name(), "box": box, "frame": f})
                    continue
                image = f"images/{sid}_{k}.png"
                box = write_identity(root / image, m)
                record["subjects"].append({"name": m.name(), "image": image, "box": box})
        if task == "audio":
            record["audio"] = f"audio/{sid}.wav"
            write_tone(root / record["audio"], movers[0], frames)
            record["_mover"], record["_frames"] = movers[0], frames  # kept only to re-write a broken tone
        if task == "editing":
            source = video.copy()
            source[region] = 255  # the shape removed: what remains is the background to edit into
            mask = np.repeat(region[..., None].astype(np.uint8) * 255, 3, axis=-1)
            record["source_video"], record["mask_video"] = f"videos/{sid}_source{ext}", f"masks/{sid}{ext}"
            write_video(root / record["source_video"], source)
            write_video(root / record["mask_video"], mask)
        records.append(record)

    # Kinds are dealt in turn, each to the next sample (in a seeded order) that has that kind of file,
    # so any fraction >= 6/num_samples covers every kind.
    broken: dict[str, dict] = {}
    order = rng.permutation(num_samples).tolist()
    kinds = list(BROKEN_KINDS)
    for j in range(int(round(broken_fraction * num_samples))):
        kind = kinds[j % len(kinds)]
        free = [i for i in order if records[i]["id"] not in broken]
        fits = [i for i in free if _applicable(kind, records[i])]
        # keep the scarce files (audio, images) for the kinds that need them: least special samples first
        fits.sort(key=lambda i: sum(_applicable(k, records[i]) for k in ("bad_image", "wrong_rate")))
        if not fits:  # e.g. no audio sample left: fall back to a kind every sample has
            kind, fits = "truncated", free
        record = records[fits[0]]
        _break(kind, record, root, h, w, rng)
        broken[record["id"]] = {"file_kind": kind, "error_kind": BROKEN_KINDS[kind]}

    with open(root / "manifest.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in record.items() if not k.startswith("_")}) + "\n")
    with open(root / "broken.json", "w") as f:
        json.dump(broken, f, indent=1, sort_keys=True)
    return sorted(broken)
