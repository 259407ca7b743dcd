"""Benchmark clip reading: decoded-and-resized frames per second for each video backend.

    python bench/data.py                                   # 1280x720 h264 + VP9 clips, 33 frames, bucket 720x1280
    python bench/data.py --size 64x48 --frames 17          # tiny: proves every path runs (CPU, seconds)
    python bench/data.py --video my_clip.mp4 --out bench/results/data_h100.md

Rows (each where it can run here):
  dali-gpu   NVDEC decode + DALI resize/crop on the GPU (CUDA + nvidia-dali), h264 and VP9
  dali-cpu   DALI's CPU decoder (VP9) / PyAV decode fed to DALI (h264); DALI resize/crop on CPU
  pyav       PyAV decode + torch antialiased bilinear resize/crop
One row = `read_clip` of a whole clip (decode, cover-resize to the bucket, centre-crop, normalise),
median over --iters after --warmup; the probe is cached, as in training. frames/s = clip frames /
seconds per clip.

    python bench/data.py --loader-config examples/tiny_data.yaml [--set data.dataset=manifest ...]

measures instead what the training loop waits for per step: the trainer's own BatchMaker (the loop loads
each global batch synchronously, so this is its data wait; training logs the same figure as data_wait_s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.checkout import use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed

from bench.report import median_seconds, write_report  # noqa: E402

from hcustom_mc.data.buckets import bucket_for  # noqa: E402
from hcustom_mc.data.tiny_dataset import write_video  # noqa: E402
from hcustom_mc.device import uses_cuda  # noqa: E402
from hcustom_mc.data.video import (  # noqa: E402
    DALI_CPU_CODECS, DALI_GPU_CODECS, dali_available, probe_video, read_clip,
)


def make_clip(path: Path, height: int, width: int, frames: int, fps: int = 25) -> Path:
    """A textured test clip (gradient + noise + a moving square) so the encoder has real work to do."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx + yy) % 256], -1)
    video = np.empty((frames, height, width, 3), np.uint8)
    side = max(4, min(height, width) // 4)
    for f in range(frames):
        img = base + rng.integers(-12, 13, base.shape)
        x = (f * max(1, (width - side) // max(1, frames - 1))) % max(1, width - side)
        img[height // 3:height // 3 + side, x:x + side] = (220, 40, 40)
        video[f] = np.clip(img, 0, 255)
    write_video(path, video, fps=fps)
    return path


def measure_frames_per_s(backend: str, path: str | os.PathLike, clip_frames: int, size: tuple[int, int],
                         stride: int = 1, decoder: str = "auto", warmup: int = 1, iters: int = 3) -> float:
    """Decoded-and-resized frames per second of `read_clip` with one backend (median of `iters` clips)."""
    # the warm-up builds and caches the DALI pipeline and warms the probe cache
    seconds = median_seconds(lambda: read_clip(path, clip_frames, stride, size, start=0, backend=backend,
                                               decoder=decoder), warmup, iters, uses_cuda())
    return clip_frames / seconds


def rows_for(clips: dict[str, Path]) -> list[tuple[str, str, str, Path]]:
    """(label, backend, decoder, path) for every path that can run on this machine."""
    cuda, dali = uses_cuda(), dali_available()
    rows = []
    for path in clips.values():
        codec = probe_video(path).codec
        if cuda and dali and codec in DALI_GPU_CODECS:
            rows.append((f"dali-gpu: NVDEC {codec} + DALI resize (GPU)", "dali-gpu", "dali", path))
        if dali and codec in DALI_CPU_CODECS:
            rows.append((f"dali-cpu: DALI decode {codec} + DALI resize", "dali-cpu", "dali", path))
        if dali:
            rows.append((f"dali-cpu: PyAV decode {codec} -> DALI resize", "dali-cpu", "pyav", path))
        rows.append((f"pyav: PyAV decode {codec} + torch resize", "pyav", "auto", path))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, help="benchmark this file instead of generated h264 + VP9 clips")
    p.add_argument("--size", default="1280x720", help="generated clip size WxH (default 1280x720)")
    p.add_argument("--frames", type=int, default=33, help="generated clip length and clip frames (made 4k+1)")
    p.add_argument("--short-side", type=int, default=None,
                   help="bucket short side (default: the clip's short side rounded down to 16 -> 720x1280)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="default 5 (3 for clips under 256 px)")
    p.add_argument("--out", type=Path, help="also write the table (markdown, with the command) here")
    p.add_argument("--loader-config", type=Path, help="training YAML: time its BatchMaker per step instead")
    p.add_argument("--set", action="append", default=[], help="training-config overrides (with --loader-config)")
    p.add_argument("--loader-steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.loader_config:
        return loader_wait(args, argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.video:
            clips = {"given": args.video}
        else:
            w, h = (int(v) for v in args.size.lower().split("x"))
            clips = {ext: make_clip(Path(tmp) / f"bench{ext}", h, w, args.frames) for ext in (".mp4", ".webm")}
        info = probe_video(next(iter(clips.values())))
        clip_frames = (min(args.frames, info.num_frames) - 1) // 4 * 4 + 1
        short = args.short_side or max(16, min(info.height, info.width) // 16 * 16)
        size = bucket_for(info.height, info.width, short)
        iters = args.iters or (5 if min(info.height, info.width) >= 256 else 3)
        device = torch.cuda.get_device_name() if uses_cuda() else f"CPU ({os.cpu_count()} cores)"
        lines = [f"device: {device}; source {info.width}x{info.height} ({info.num_frames} frames); clip {clip_frames} "
                 f"frames -> bucket {size[0]}x{size[1]} (HxW); median of {iters} after {args.warmup} warmup",
                 "", "| path | ms / clip | frames/s |", "|---|---|---|"]
        for label, backend, decoder, path in rows_for(clips):
            fps = measure_frames_per_s(backend, path, clip_frames, size, decoder=decoder, warmup=args.warmup,
                                       iters=iters)
            lines.append(f"| {label} | {clip_frames / fps * 1e3:.1f} | {fps:.1f} |")
            print(lines[-1], flush=True)
    write_report(args.out, "Clip reading benchmark", "\n".join(lines), argv)
    return 0


def loader_wait(args, argv) -> int:
    """Seconds the training loop waits for each global batch, from the trainer's BatchMaker (one DP rank)."""
    from hcustom_mc.training.batches import BatchMaker
    from hcustom_mc.training.config import build_config

    cfg = build_config(["--config", str(args.loader_config), *[x for kv in args.set for x in ("--set", kv)]])
    model_cfg = cfg.model_config()
    batches = BatchMaker(cfg, model_cfg, dp_rank=0, dp_size=1, num_micro=cfg.num_microbatches(1), log_events=False)
    waits = []
    for step in range(1, args.loader_steps + 1):
        batches.microbatches(step)
        waits.append(batches.data_wait_s)
    first, rest = waits[0], sorted(waits[1:]) or [waits[0]]
    text = (f"dataset {cfg.data.dataset} ({cfg.data.path}), global batch {cfg.global_batch_size}, "
            f"{args.loader_steps} steps: first step {first * 1e3:.1f} ms, median of the rest "
            f"{rest[len(rest) // 2] * 1e3:.1f} ms, max {max(rest) * 1e3:.1f} ms")
    write_report(args.out, "Training-loop data wait", text, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
