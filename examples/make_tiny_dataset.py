"""Write a small real dataset (videos, identity images, audio tones, edit masks) and its manifest.jsonl.

    python examples/make_tiny_dataset.py --out runs/tiny_data/dataset --num-samples 16 --encoders
    python examples/make_tiny_dataset.py --out /tmp/broken --broken-fraction 0.5   # with broken files
    python examples/make_tiny_dataset.py --out /tmp/multi --tasks identity multi_identity --multi-subjects 2 3
    python examples/make_tiny_dataset.py --out /tmp/raw --tasks multi_identity --frames 17 --boxes-from-frame 9

Moving coloured shapes on white, h264 (.mp4) and VP9 (.webm) alternating; tasks cycle identity,
multi_identity, t2v, audio, editing. Broken samples (if any) are listed on stdout and in broken.json.
The generator lives in hcustom_mc/data/tiny_dataset.py so tests can import it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcustom_mc import console  # noqa: E402

console.setup(console.verbose_requested())  # before the import below loads megatron (its import-time warnings)
from hcustom_mc.data.tiny_dataset import TASK_CYCLE, make_tiny_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl goes at its top)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--size", default="64x48", help="frame size WxH, even numbers (default 64x48)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=list(TASK_CYCLE), metavar="TASK",
                   help=f"the tasks samples cycle through (default: {' '.join(TASK_CYCLE)})")
    p.add_argument("--multi-subjects", nargs="+", type=int, default=[2], metavar="K",
                   help="subjects per multi_identity sample, cycled (default: 2)")
    p.add_argument("--boxes-from-frame", type=int, default=None, metavar="F",
                   help="subjects get no identity image, only their box in a frame from F on (the one where the "
                        "shape is least covered): input for tools/extract_subjects.py, which cuts the images "
                        "(default: images written)")
    p.add_argument("--encoders", action="store_true",
                   help="also write tiny random LLaVA, CLIP, Whisper and VAE folders (shaped for the tiny DiT) "
                        "to OUT/encoders, as examples/tiny_data.yaml expects")
    p.add_argument("--broken-fraction", type=float, default=0.0,
                   help="fraction of samples given one broken file (truncated, missing, garbage, too short, "
                        "unreadable image, 8 kHz audio)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    broken = make_tiny_dataset(args.out, num_samples=args.num_samples, size=args.size, frames=args.frames,
                               seed=args.seed, broken_fraction=args.broken_fraction, tasks=tuple(args.tasks),
                               multi_subjects=tuple(args.multi_subjects), boxes_from_frame=args.boxes_from_frame)
    print(f"wrote {args.num_samples} samples to {args.out / 'manifest.jsonl'} in {time.perf_counter() - start:.1f}s")
    print(f"broken ids ({len(broken)}): {' '.join(broken) if broken else 'none'}")
    if args.encoders:
        from hcustom_mc.encoders.tiny import save_tiny_encoders
        from hcustom_mc.model.config import get_model_config

        paths = save_tiny_encoders(args.out / "encoders", get_model_config("tiny", "audio"), seed=args.seed)
        print("tiny encoders: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
