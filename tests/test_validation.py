"""Validation during training (--eval-jobs): it samples with the training model on the training ranks, the videos
equal what the sampler makes from the saved checkpoint, the metrics and videos reach MLflow, and training is not
disturbed: losses and checkpoints equal a run without validation, and kill-and-resume with validation is exact."""

import json
import math
import os
import sqlite3
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.torchrun import REPO, backend_env, child_pythonpath, launch_command

ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": child_pythonpath()}
# PP 2 (the stages run in order for sampling) with EMA (swapped in for sampling and back): the hardest case
LAYOUT = ["--config", "examples/tiny_3d.yaml", "--set", "zero_init=false", "--set", "checkpoint.save_interval=0",
          "--pipeline-model-parallel-size", "2", "--ema-decay", "0.9", "--train-iters", "4"]
JOB_NAMES = ["000_t2v", "001_identity", "002_audio"]


def run(nproc: int, script: str, *args, expect_ok: bool = True) -> str:
    cmd = launch_command(nproc, script, *args)
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, **backend_env(nproc)}, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, f"exit {proc.returncode}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny random encoders shaped for the tiny audio DiT, an identity image, a tone, and three jobs."""
    from PIL import Image

    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.model.config import get_model_config

    root = tmp_path_factory.mktemp("validation_assets")
    enc = save_tiny_encoders(root / "encoders", get_model_config("tiny", "audio"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "subject.png")
    with wave.open(str(root / "tone.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        t = np.arange(16000) / 16000
        w.writeframes((0.3 * np.sin(2 * math.pi * 440 * t) * 32767).astype(np.int16).tobytes())
    size = {"height": 32, "width": 48, "frames": 9, "steps": 3}
    jobs = [{"task": "t2v", "prompt": "A yellow circle moves up.", "seed": 1, **size},
            {"task": "identity", "prompt": "A man walks.", "subjects": [["man", str(root / "subject.png")]],
             "seed": 2, **size},
            {"task": "audio", "prompt": "A man sings.", "subjects": [["man", str(root / "subject.png")]],
             "audio": str(root / "tone.wav"), "audio_strength": 0.8, "seed": 3, **size}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    encoders = "data.encoders={" + ", ".join(f"{k}: {v}" for k, v in enc.items()) + "}"
    return {"root": root, "jobs": root / "jobs.json", "encoders_set": encoders, "encoders_dir": root / "encoders"}


def train(assets, out: Path, *extra) -> str:
    return run(2, "pretrain_custom.py", *LAYOUT, "--set", assets["encoders_set"], "--run-dir", out / "run",
               "--save", out / "ck", *extra)


def with_validation(assets):
    # dynamic_degree with Farneback flow needs no model folder; the others are named as not scored
    return ["--eval-jobs", assets["jobs"], "--eval-interval", "2", "--eval-metrics", "dynamic_degree",
            "--eval-flow-backend", "farneback"]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    base = tmp_path_factory.mktemp("validation_runs")
    out = {"with": base / "with", "without": base / "without"}
    out["with_log"] = train(assets, out["with"], *with_validation(assets))
    train(assets, out["without"])
    return out


def history(folder: Path) -> dict:
    return json.loads((folder / "run" / "history.json").read_text())


def frames_of(path: Path) -> np.ndarray:
    from hcustom_mc.inference.output import read_mp4

    return read_mp4(path)[0]


def sheet(folder: Path, name: str) -> np.ndarray:
    """The contact sheet: every frame of these 9-frame videos, lossless. (libx264 with threads may encode the same
    frames into different bytes from run to run on a loaded machine, so the mp4s are not compared for equality.)"""
    from PIL import Image

    return np.asarray(Image.open(folder / f"{name}.png"))


def test_validation_leaves_losses_and_checkpoint_bit_identical(runs):
    assert history(runs["with"])["losses"] == history(runs["without"])["losses"]
    a, b = runs["with"] / "ck" / "iter_0000004", runs["without"] / "ck" / "iter_0000004"
    shards = sorted(p.name for p in a.glob("*.distcp"))
    assert shards and shards == sorted(p.name for p in b.glob("*.distcp"))
    for name in shards + [f"rng/{p.name}" for p in (a / "rng").iterdir()]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs with validation on"


def test_validation_writes_videos_scores_and_reports_its_time(runs):
    log = runs["with_log"]
    for step in (2, 4):
        folder = runs["with"] / "run" / "validation" / f"step_{step:07d}"
        for name in JOB_NAMES:
            assert frames_of(folder / f"{name}.mp4").shape == (9, 32, 48, 3)
            assert (folder / f"{name}.png").stat().st_size > 0
            assert json.loads((folder / f"{name}.json").read_text())["weights"] == "ema"
        scores = json.loads((folder / "scores.json").read_text())
        assert sorted(r["name"] for r in scores["jobs"]) == JOB_NAMES
        assert all(r["motion_flow_backend"] == "farneback" for r in scores["jobs"])
        assert f"validation at step {step}: 3 jobs in" in log
    assert "validation: 2 runs in" in log  # the closing summary


def test_validation_video_equals_the_sampler_on_the_saved_ema_weights(runs, assets, tmp_path):
    """The same jobs sampled afterwards from the final checkpoint by `hcustom_mc.sample` (one process, the whole
    model, --load-key ema): the videos the PP 2 training run wrote at its last step are the same, frame for frame."""
    run(1, "-m", "hcustom_mc.sample", "--checkpoint", runs["with"] / "ck", "--load-key", "ema", "--encoders-dir",
        assets["encoders_dir"], "--jobs", assets["jobs"], "--out", tmp_path / "sampled", "--text-len", "256",
        "--no-progress")
    for name in JOB_NAMES:
        np.testing.assert_array_equal(sheet(tmp_path / "sampled", name),
                                      sheet(runs["with"] / "run" / "validation" / "step_0000004", name))


def test_metrics_loss_per_task_and_videos_reach_mlflow(runs):
    db = runs["with"] / "run" / "mlflow.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("select key, step, value from metrics").fetchall()
    keys = {(k, s) for k, s, _ in rows}
    for step in (2, 4):
        assert ("val/dynamic_degree", step) in keys and ("validation_s", step) in keys
        assert ("val/t2v/dynamic_degree", step) in keys and ("val/audio/dynamic_degree", step) in keys
    tasks = {k.split("/", 1)[1] for k, _, _ in rows if k.startswith("loss/")}
    assert tasks and tasks <= {"t2v", "identity", "audio"}
    overall = {s: v for k, s, v in rows if k == "loss"}
    per_task = {s: v for k, s, v in rows if k.startswith("loss/")}
    assert per_task == overall  # one task per step: its loss is the step's loss, logged under its task
    artifacts = runs["with"] / "run" / "mlartifacts"
    videos = sorted(p.name for p in artifacts.rglob("validation/step_0000004/*.mp4"))
    assert videos == [f"{n}.mp4" for n in JOB_NAMES]


def test_kill_and_resume_with_validation_is_exact(runs, assets, tmp_path):
    train(assets, tmp_path / "a", *with_validation(assets), "--exit-after-iters", "2")
    # the resumed run saves step 4 into its own new folder
    resumed = train(assets, tmp_path / "b", *with_validation(assets), "--load", tmp_path / "a" / "ck")
    assert "validation at step 2" not in resumed  # done before the stop, not again
    assert history(tmp_path / "a")["losses"] + history(tmp_path / "b")["losses"] == history(runs["with"])["losses"]
    for step, part in ((2, "a"), (4, "b")):
        for name in JOB_NAMES:
            np.testing.assert_array_equal(sheet(tmp_path / part / "run" / "validation" / f"step_{step:07d}", name),
                                          sheet(runs["with"] / "run" / "validation" / f"step_{step:07d}", name))
    a = runs["with"] / "ck" / "iter_0000004"
    b = tmp_path / "b" / "ck" / "iter_0000004"
    for shard in a.glob("*.distcp"):
        assert shard.read_bytes() == (b / shard.name).read_bytes()


def test_bad_eval_settings_fail_before_training(assets, tmp_path):
    out = run(1, "pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--eval-interval", "2",
              "--run-dir", tmp_path / "r", expect_ok=False)
    assert "--eval-interval needs --eval-jobs" in out and "step 1/" not in out
    out = run(1, "pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--eval-jobs", tmp_path / "none.yaml",
              "--run-dir", tmp_path / "r", expect_ok=False)
    assert "--eval-jobs" in out and "does not exist" in out and "needs data.encoders.{llava, clip, vae}" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"task": "identity", "prompt": "x", "height": 32, "width": 48, "frames": 9}]))
    out = run(1, "pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--set", assets["encoders_set"],
              "--eval-jobs", bad, "--run-dir", tmp_path / "r", expect_ok=False)
    assert f"--eval-jobs {bad}: job 0:" in out and "identity image" in out and "step 1/" not in out


def test_a_failing_validation_is_reported_and_training_goes_on(assets, tmp_path):
    """A broken metric model (a config.json that is not JSON) fails the writer's scoring: it is reported, and
    training finishes."""
    models = tmp_path / "models"
    (models / "clip-vit-base-patch32").mkdir(parents=True)
    (models / "clip-vit-base-patch32" / "config.json").write_text("{not json")
    out = run(1, "pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--set", "zero_init=false", "--set",
              assets["encoders_set"], "--train-iters", "2", "--run-dir", tmp_path / "r", "--eval-jobs", assets["jobs"],
              "--eval-models", models, "--eval-metrics", "clip_score")
    assert "validation at step 2 failed (training goes on" in out and "clip" in out
    assert "1 of them failed" in out and "done: 2 steps" in out
