"""Score sampled videos with the paper's metrics, or compare two folders of the same jobs.

    python -m hcustom_mc.eval FOLDER --models MODELS            # FOLDER: a sampler --out folder
    python -m hcustom_mc.eval compare FOLDER_A FOLDER_B --models MODELS

FOLDER holds `NAME.mp4` + `NAME.json` per job, as `python -m hcustom_mc.sample` writes them; the sidecar names the
prompt, identity images, audio and condition video of each job. Writes OUT/scores.json (per-job values, the summary
per metric and per task, the backends and models used) and OUT/scores.md (the same as tables), prints both, and with
--mlflow logs them to an MLflow run. A metric whose model is not under --models is named with the path it expected
and how to fill it; the others still run. `compare` adds PSNR and SSIM per frame between the two folders' videos
of each job and each metric's delta (B - A): what a faster sampling mode costs.

Metrics (README "Scoring videos"): face_sim (ArcFace / dlib identity similarity, OpenS2V-Eval), dino_sim (DINOv2
subject similarity), clip_score (CLIP-B text-video, torchmetrics CLIPScore's scale), temporal_consistency
(consecutive frames' features), dynamic_degree (VBench, optical flow).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from hcustom_mc import console
from hcustom_mc.errors import ConfigError

log = logging.getLogger("hcustom_mc")
METRIC_NAMES = ("face_sim", "dino_sim", "clip_score", "temporal_consistency", "dynamic_degree")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=None, help="folder of the metrics' models (README \"Scoring "
                   "videos\" gives its layout and the commands that fill it) (default: not set: only the metrics that "
                   "need no download: face_sim with dlib, dynamic_degree with Farneback flow)")
    p.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, default=list(METRIC_NAMES), metavar="NAME",
                   help=f"metrics to compute, of {', '.join(METRIC_NAMES)} (default: all)")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly per video for the per-frame "
                   "metrics (OpenS2V-Eval uses 32) (default: 32)")
    p.add_argument("--face-backend", default="auto", choices=("auto", "insightface", "dlib"),
                   help="face_sim: insightface (MODELS/insightface/models/PACK) or dlib (no download); auto: "
                   "insightface when the pack is there (default: auto)")
    p.add_argument("--face-pack", default="buffalo_l", choices=("buffalo_l", "antelopev2"),
                   help="face_sim: the insightface model pack (default: buffalo_l)")
    p.add_argument("--flow-backend", default="auto", choices=("auto", "raft", "farneback"),
                   help="dynamic_degree: RAFT as VBench (MODELS/raft) or OpenCV Farneback (no download); auto: RAFT "
                   "when its weights are there (default: auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda when there is one (default: auto)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: FOLDER/eval, compare: "
                   "FOLDER_B/compare)")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log the scores to an MLflow run in URI (without URI: sqlite:///OUT/mlflow.db) (default: off)")
    p.add_argument("--mlflow-experiment", default="hcustom-mc-eval", help="(default: hcustom-mc-eval)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: the folder's name)")
    p.add_argument("--verbose", action="store_true", help="known third-party warnings too (switch; default: off)")


def parse_args(argv=None) -> argparse.Namespace:
    from hcustom_mc.console import ArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    compare = bool(argv) and argv[0] == "compare"
    prog = "python -m hcustom_mc.eval" + (" compare" if compare else "")
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if compare:
        p.add_argument("folder_a", type=Path, metavar="FOLDER_A", help="the reference: e.g. full sampling")
        p.add_argument("folder_b", type=Path, metavar="FOLDER_B", help="the same jobs another way: e.g. a faster mode")
        argv = argv[1:]
    else:
        p.add_argument("folder", type=Path, metavar="FOLDER", help="a sampler output folder (NAME.mp4 + NAME.json)")
    _common(p)
    args = p.parse_args(argv)
    args.compare = compare
    if args.frames < 1:
        p.error(f"--frames must be >= 1, got {args.frames}")
    return args


def metric_options(args) -> dict[str, dict]:
    from hcustom_mc.eval.score import metric_options_from

    return metric_options_from(args.frames, args.face_backend, args.face_pack, args.flow_backend)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this host has no CUDA GPU")
    return device


def score_folder(folder: Path, metrics: list) -> list[dict]:
    from hcustom_mc.eval.folder import find_jobs, read_sample
    from hcustom_mc.eval.score import score_samples

    return score_samples(metrics, (read_sample(s) for s in find_jobs(folder)), progress=True)


def compare_folders(folder_a: Path, folder_b: Path, metrics: list) -> list[dict]:
    """One row per job name in either folder: PSNR and SSIM between the two videos (jobs in both, of one size) and
    every metric's A, B and delta (B - A)."""
    from hcustom_mc.eval.folder import find_jobs, read_sample
    from hcustom_mc.eval.metrics.compare import compare_tables, frame_psnr_ssim

    rows_a, rows_b = score_folder(folder_a, metrics), score_folder(folder_b, metrics)
    tasks = {r["name"]: r["task"] for r in rows_a + rows_b}
    sidecars = {folder: {p.name[: -len(".json")]: p for p in find_jobs(folder)} for folder in (folder_a, folder_b)}
    out = []
    for row in compare_tables(rows_a, rows_b):
        row = {"name": row["name"], "task": tasks[row["name"]], **{k: v for k, v in row.items() if k != "name"}}
        if row["in"] == "both":
            a = read_sample(sidecars[folder_a][row["name"]]).frames
            b = read_sample(sidecars[folder_b][row["name"]]).frames
            if a.shape == b.shape:
                pair = frame_psnr_ssim(a, b)
                row.update(psnr=pair["psnr"], ssim=pair["ssim"], psnr_identical_frames=pair["psnr_identical_frames"])
            else:
                row["note"] = f"videos of different shapes {a.shape} and {b.shape}: no PSNR/SSIM"
        out.append(row)
    return out


def run(args) -> int:
    from hcustom_mc.eval.folder import find_jobs
    from hcustom_mc.eval.report import summary_lines, table_lines, write_report
    from hcustom_mc.eval.score import load_metrics, reported, summarize

    folders = [args.folder_a, args.folder_b] if args.compare else [args.folder]
    for folder in folders:
        find_jobs(folder)  # a wrong folder fails now, before any model loads
    device = resolve_device(args.device)
    t0 = time.time()
    metrics, skipped = load_metrics(args.models, device, args.metrics, metric_options(args))
    names = [m.name for m in metrics]
    info = {"folders": [str(f.resolve()) for f in folders], "models": str(args.models) if args.models else None,
            "device": str(device), "frames": args.frames, "metrics": names, "not_scored": skipped}
    if args.compare:
        rows = compare_folders(args.folder_a, args.folder_b, metrics)
        out = args.out or args.folder_b / "compare"
        deltas = [c for r in rows for c in r if c.endswith("_delta")]
        columns = list(dict.fromkeys(["name", "task", "in", "psnr", "ssim", *deltas, "note"]))
        summary = summarize(rows, ["psnr", "ssim", *dict.fromkeys(deltas)])
    else:
        rows = score_folder(args.folder, metrics)
        out = args.out or args.folder / "eval"
        columns = ["name", "task", "frames", *reported(names)]  # every value and backend is in the JSON
        summary = summarize(rows, reported(names))
    info["elapsed_s"] = round(time.time() - t0, 2)
    files = write_report(out, rows, summary, columns, info)
    print("\n".join(table_lines(rows, columns) + [""] + summary_lines(summary)), flush=True)
    for name, why in skipped.items():
        print(f"not scored: {why}", flush=True)
    print(f"scores: {files['json']} and {files['table']}", flush=True)
    if args.mlflow is not None:
        from hcustom_mc.eval.tracking import log_to_mlflow

        uri = args.mlflow or f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"
        run_id = log_to_mlflow(uri, args.mlflow_experiment, args.run_name or folders[-1].resolve().name, info,
                               summary, files)
        print(f"MLflow run {run_id} in {uri}", flush=True)
    return 0


def main(argv=None) -> int:
    console.setup(console.verbose_requested(argv))
    return run(parse_args(argv))


def _user_errors() -> tuple:
    return ConfigError, FileNotFoundError


if __name__ == "__main__":
    console.run_entry_point(main, _user_errors)
