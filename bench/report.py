"""What every benchmark writes with --out: a markdown file with the exact command that produced it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def write_report(out: Path | None, title: str, text: str, argv=None) -> None:
    """Print `text`; with `out`, also write it under `# title` with the command line (argv None = sys.argv)."""
    print("\n" + text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out.write_text(f"# {title}\n\ncommand: `{cmd}`\n\n{text}\n")


def append_jsonl(path: Path | None, record: dict) -> None:
    """With --jsonl: append one measurement as one JSON line the moment it is taken, so a run cut off later (a
    time box, a killed GPU lease) still leaves every measurement before it."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def median_seconds(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median wall seconds of `fn()` over `iters` calls after `warmup` calls; `cuda`: the work is on a GPU, so
    wait for it before reading the clock."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
