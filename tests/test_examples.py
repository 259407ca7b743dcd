"""The example scripts never delete or overwrite user data: a new folder per invocation, an existing non-empty
folder refused, runnable from any directory. (train_tiny_3d.sh twice in a row is in test_training_runs.py; the
full twice-in-a-row runs of every example are `slow`.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torchrun import REPO, _free_port, backend_env, child_pythonpath

EXAMPLES = REPO / "examples"
SCRIPTS = ("train_tiny_3d.sh", "train_tiny_data.sh", "finetune_tiny.sh", "lora_tiny.sh", "convert_and_compare.sh",
           "infer_parallel.sh", "train_tiny_validation.sh", "multi_subject_tiny.sh")


def _env(tmp_path, **extra):
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"  # this interpreter's python
    return {"OMP_NUM_THREADS": "1", "PATH": path, "PYTHONPATH": child_pythonpath(), "HC_RUNS": str(tmp_path / "runs"),
            "MASTER_PORT": str(_free_port()), **backend_env(8), **extra}


def _snapshot(folder: Path) -> dict:
    """Every file's size and mtime; not through the `latest` symlinks (os.walk does not follow them)."""
    files = (Path(d) / f for d, _, names in os.walk(folder) for f in names)
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in files if not p.is_symlink()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_existing_folder_is_refused_and_left_as_it_was(script, tmp_path):
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "latest").write_text("iter_0000060\n")
    before = _snapshot(earlier)
    env = _env(tmp_path)
    args = [str(earlier)]
    if script == "infer_parallel.sh":  # its output folder is OUT; with CHECKPOINT it trains nothing first
        env.update(OUT=str(earlier), CHECKPOINT=str(tmp_path), ENCODERS=str(tmp_path), JOBS=str(tmp_path / "j.yaml"))
        args = []
    proc = subprocess.run(["bash", str(EXAMPLES / script), *args, "--train-iters", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{earlier} exists and is not empty" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert _snapshot(earlier) == before and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_runs_twice_from_another_directory_keeping_the_first_outputs(script, tmp_path):
    env = _env(tmp_path)
    extra = {"train_tiny_3d.sh": ["--train-iters", "4"], "train_tiny_data.sh": ["--train-iters", "2"]}.get(script, [])
    if script == "infer_parallel.sh":
        env["EXTRA"] = "--height 32 --width 48 --frames 9 --steps 2 --text-len 256"
    runs = tmp_path / "runs"
    first = subprocess.run(["bash", str(EXAMPLES / script), *extra], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _snapshot(runs)
    assert before, f"{script} wrote nothing under HC_RUNS"
    env["MASTER_PORT"] = str(_free_port())
    second = subprocess.run(["bash", str(EXAMPLES / script), *extra], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _snapshot(runs)
    assert {k: v for k, v in after.items() if k in before} == before  # every file of the first run as it was
    assert len(after) > len(before)  # and the second run wrote its own
    last = (second.stdout.strip().splitlines() or [""])[-1]
    assert str(runs) in second.stdout, f"{script} does not say where its outputs are: {last}"
