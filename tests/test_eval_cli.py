"""`python -m hcustom_mc.eval`: a sampler output folder scored into a table and JSON, a missing model named while the
other metrics still run, `compare A B`, MLflow logging, and one-line errors for a wrong folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.torchrun import REPO, child_pythonpath

ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": child_pythonpath()}


def evaluate(*args, expect_ok: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "hcustom_mc.eval", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, f"exit {proc.returncode}\n{out[-5000:]}"
    return out


def write_job(folder: Path, name: str, job: dict, frames: np.ndarray) -> None:
    """A sampled video as `hcustom_mc.sample` leaves it: NAME.mp4 and the NAME.json sidecar holding its job."""
    from hcustom_mc.inference.output import write_mp4, write_sidecar

    write_mp4(folder / f"{name}.mp4", frames, 8)
    write_sidecar(folder / f"{name}.json", {"job": {"output": str(folder / name), **job}, "checkpoint": "x"})


def moving_square(shift: int, seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (size, size * 2, 3), dtype=np.uint8)
    return np.stack([texture[:, i * shift : i * shift + size] for i in range(9)])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    from hcustom_mc.eval.tiny import save_tiny_eval_models

    root = tmp_path_factory.mktemp("eval_cli")
    models = save_tiny_eval_models(root / "models")
    identity = root / "subject.png"
    Image.fromarray(moving_square(0)[0]).save(identity)
    jobs = {"000_t2v": ({"task": "t2v", "prompt": "a still texture"}, moving_square(0)),
            "001_identity": ({"task": "identity", "prompt": "the texture moves", "subjects": [["it", str(identity)]],
                              "subject_box": [0.0, 0.0, 0.5, 1.0]}, moving_square(3, seed=0))}
    for variant in ("a", "b"):
        (root / variant).mkdir()
        for name, (job, frames) in jobs.items():
            write_job(root / variant, name, job, frames if variant == "a" else np.clip(frames.astype(int) + 4, 0, 255)
                      .astype(np.uint8))
    return {"root": root, "models": models}


def test_scores_a_sampler_folder_into_a_table_and_json(folders):
    out = evaluate(folders["root"] / "a", "--models", folders["models"], "--frames", "4")
    report = json.loads((folders["root"] / "a" / "eval" / "scores.json").read_text())
    rows = {r["name"]: r for r in report["jobs"]}
    assert sorted(rows) == ["000_t2v", "001_identity"]
    assert rows["000_t2v"]["dino_sim"] is None and rows["001_identity"]["dino_sim_region"] == "box"
    assert rows["001_identity"]["face_sim"] is None and "no face" in rows["001_identity"]["face_sim_note"]
    assert rows["000_t2v"]["clip_score_frames"] == 4
    assert rows["000_t2v"]["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)  # identical frames
    assert report["summary"]["overall"]["clip_score"]["n"] == 2
    assert set(report["summary"]["by_task"]) == {"t2v", "identity"}
    assert report["info"]["not_scored"] == {}
    table = (folders["root"] / "a" / "eval" / "scores.md").read_text()
    assert "| 001_identity | identity | 9 |" in table and "# summary" in table
    assert "scores: " in out and "| all | clip_score |" in out


def test_a_missing_model_is_named_and_the_rest_still_run(folders, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(folders["models"], models)
    shutil.rmtree(models / "dinov2-base")
    out = evaluate(folders["root"] / "a", "--models", models, "--metrics", "dino_sim", "clip_score",
                   "--out", tmp_path / "report")
    assert f"dino_sim: no model at {models / 'dinov2-base'}" in out and "hf download facebook/dinov2-base" in out
    report = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert "dino_sim" in report["info"]["not_scored"] and report["info"]["metrics"] == ["clip_score"]
    assert all(isinstance(r["clip_score"], float) for r in report["jobs"])


def test_compare_gives_psnr_ssim_and_metric_deltas(folders, tmp_path):
    from hcustom_mc.eval.metrics.compare import frame_psnr_ssim
    from hcustom_mc.inference.output import read_mp4

    evaluate("compare", folders["root"] / "a", folders["root"] / "b", "--models", folders["models"], "--metrics",
             "temporal_consistency", "--out", tmp_path / "cmp")
    report = json.loads((tmp_path / "cmp" / "scores.json").read_text())
    for row in report["jobs"]:
        assert row["in"] == "both"
        a = read_mp4(folders["root"] / "a" / f"{row['name']}.mp4")[0]
        b = read_mp4(folders["root"] / "b" / f"{row['name']}.mp4")[0]
        expected = frame_psnr_ssim(a, b)
        assert row["psnr"] == pytest.approx(expected["psnr"]) and row["ssim"] == pytest.approx(expected["ssim"])
        assert 20 < row["psnr"] < 60  # a +4 offset through h264
        assert row["temporal_consistency_delta"] == pytest.approx(
            row["temporal_consistency_b"] - row["temporal_consistency_a"])
    assert report["summary"]["overall"]["psnr"]["n"] == 2


def test_compare_of_identical_folders_is_inf_psnr_and_zero_deltas_and_reaches_mlflow(folders, tmp_path):
    import sqlite3

    out = evaluate("compare", folders["root"] / "a", folders["root"] / "a", "--metrics", "dynamic_degree",
                   "--flow-backend", "farneback", "--out", tmp_path / "same", "--mlflow")
    report = json.loads((tmp_path / "same" / "scores.json").read_text())
    for row in report["jobs"]:
        assert row["psnr"] == "inf" and row["ssim"] == pytest.approx(1.0)  # JSON has no infinity: the string
        assert row["dynamic_degree_delta"] == 0 and row["motion_magnitude_delta"] == 0
    run_id = out.split("MLflow run ")[1].split()[0]
    with sqlite3.connect(tmp_path / "same" / "mlflow.db") as con:  # the store itself, as `mlflow ui` reads it
        metrics = dict(con.execute("select key, value from metrics where run_uuid = ?", (run_id,)).fetchall())
        params = dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
    assert metrics["ssim"] == pytest.approx(1.0) and metrics["t2v/dynamic_degree_delta"] == 0
    assert "psnr" not in metrics  # every frame identical: inf, which a metric store cannot hold, is left out
    assert params["metrics"] == "['dynamic_degree']"
    artifacts = {p.name for p in (tmp_path / "same" / "mlartifacts").rglob("scores.*")}
    assert artifacts == {"scores.json", "scores.md"}


def test_wrong_folders_are_one_line(tmp_path):
    out = evaluate(tmp_path / "nothing", expect_ok=False)
    assert out.strip() == f"error: {tmp_path / 'nothing'} is not a folder of sampled videos"
    (tmp_path / "empty").mkdir()
    out = evaluate(tmp_path / "empty", expect_ok=False)
    assert "holds no sampled videos" in out and len(out.strip().splitlines()) == 1
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    from hcustom_mc.inference.output import write_mp4

    write_mp4(lonely / "x.mp4", moving_square(0), 8)
    out = evaluate(lonely, expect_ok=False)
    assert "x.mp4 has no x.json sidecar" in out and len(out.strip().splitlines()) == 1
