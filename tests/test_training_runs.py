"""Whole training runs: exact resume, resume at another layout, SIGTERM and SIGKILL safety, bad
configs failing fast on every rank, and the README demo with its MLflow run read back."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchrun import REPO, _free_port, backend_env, child_pythonpath, launch_command

ARGS = ["--config", "examples/tiny_3d.yaml", "--set", "zero_init=false", "--set", "checkpoint.save_interval=0"]
ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": child_pythonpath()}


def launch(nproc: int, *args, env=None, **popen):
    """pretrain_custom.py with the tiny config, in one process or under torchrun."""
    cmd = launch_command(nproc, "pretrain_custom.py", *ARGS, *args)
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, **backend_env(nproc, env), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def run(nproc: int, *args, expect_ok=True, env=None, timeout=300) -> str:
    proc = launch(nproc, *args, env=env)
    out, _ = proc.communicate(timeout=timeout)
    assert (proc.returncode == 0) == expect_ok, f"exit {proc.returncode}\n{out[-6000:]}"
    return out


def losses(run_dir: Path) -> list[float]:
    return json.loads((run_dir / "history.json").read_text())["losses"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 uninterrupted single-process steps: the reference."""
    d = tmp_path_factory.mktemp("straight")
    run(1, "--train-iters", 6, "--run-dir", d)
    return losses(d)


def test_resume_is_exact(straight, tmp_path):
    ck = tmp_path / "ck"
    run(1, "--train-iters", 6, "--exit-after-iters", 3, "--save", ck, "--run-dir", tmp_path / "a")
    assert (ck / "latest").read_text().strip() == "iter_0000003"
    run(1, "--train-iters", 6, "--load", ck, "--save", ck, "--run-dir", tmp_path / "b")
    assert losses(tmp_path / "a") == straight[:3]
    assert losses(tmp_path / "b") == straight[3:], "resumed steps differ from the uninterrupted run"


@pytest.mark.slow
def test_resume_tp2_pp2_checkpoint_at_tp1_pp1(straight, tmp_path):
    ck = tmp_path / "ck"
    run(4, "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--train-iters", 6,
        "--exit-after-iters", 3, "--save", ck, "--run-dir", tmp_path / "a")
    out = run(1, "--train-iters", 6, "--exit-after-iters", 1, "--load", ck, "--run-dir", tmp_path / "b")
    assert "layout" in out and "differs" in out  # says what it did not restore
    (next_loss,) = losses(tmp_path / "b")
    assert abs(next_loss - straight[3]) <= 1e-5 * abs(straight[3]), (next_loss, straight[3])


def test_sigterm_leaves_a_complete_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    proc = launch(2, "--train-iters", 100000, "--save", ck, "--run-dir", tmp_path / "a", start_new_session=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training is under way
        seen.append(line)
        if line.startswith("step 3/") or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)  # like a scheduler preempting the job: every process gets it
    out, _ = proc.communicate(timeout=240)
    text = "".join(seen) + out
    assert "stopping after step" in text, text[-4000:]
    # DP 2 with the distributed optimizer: megatron-core 0.19 warns when DDP's caller leaves it the param layout
    assert "full_param_layout not provided" not in text
    latest = (ck / "latest").read_text().strip()
    assert (ck / latest / "train_state.json").is_file() and not list(ck.glob("*.tmp"))
    step = json.loads((ck / latest / "train_state.json").read_text())["step"]
    assert step >= 3
    run(1, "--train-iters", 100000, "--exit-after-iters", 1, "--load", ck, "--run-dir", tmp_path / "b")


def test_sigkill_during_save_keeps_previous_checkpoint(straight, tmp_path):
    ck = tmp_path / "ck"
    run(2, "--train-iters", 6, "--save", ck, "--save-interval", 2, "--run-dir", tmp_path / "a",
        expect_ok=False, env={"HCUSTOM_FAULT_KILL_IN_SAVE": "4"})
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    assert (ck / "iter_0000004.tmp").is_dir()  # the interrupted save, never pointed at
    run(1, "--train-iters", 6, "--load", ck, "--run-dir", tmp_path / "b")
    for a, b in zip(losses(tmp_path / "b"), straight[2:]):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)


BAD = {
    "world size": (2, ["--tensor-model-parallel-size", 4], "world size 2 is not divisible"),
    "heads": (3, ["--tensor-model-parallel-size", 3], "num_heads 4 is not divisible by tensor_parallel 3"),
    "stages": (2, ["--pipeline-model-parallel-size", 2, "--virtual-pipeline-model-parallel-size", 4],
               "8 pipeline stages (PP 2 x VPP 4) exceed the 4 transformer blocks"),
    "batch": (2, ["--global-batch-size", 3], "global_batch_size 3 is not divisible by micro_batch_size 1 x data parallel 2"),
    "checkpoint": (2, ["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt does not exist"),
    "sequence parallel": (2, ["--sequence-parallel"], "sequence_parallel needs tensor_parallel > 1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_fails_fast_on_every_rank(tmp_path, case):
    nproc, args, message = BAD[case]
    start = time.time()
    out = run(nproc, *args, "--run-dir", tmp_path, expect_ok=False, timeout=120)
    assert out.count(message) == 1, out[-4000:]  # every rank fails (exit 2); the message is said once
    assert time.time() - start < 90


def _demo(cwd, *args, env=None, timeout=600):
    return subprocess.run(["bash", str(REPO / "examples" / "train_tiny_3d.sh"), *map(str, args)], cwd=cwd,
                          env={**ENV, **backend_env(8), "MASTER_PORT": str(_free_port()), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_readme_demo_trains_and_logs_to_mlflow(tmp_path):
    """The 3D demo from another directory: a short console (layout, a line per step, the summary), then a second
    invocation into a new folder that leaves the first run as it was."""
    runs = {"HC_RUNS": str(tmp_path / "runs")}
    proc = _demo(tmp_path, "--train-iters", 8, "--save-interval", 4, env=runs)  # flags only: a new folder
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (demo,) = [p for p in (tmp_path / "runs" / "tiny_3d").iterdir() if not p.is_symlink()]
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in (proc.stdout + proc.stderr).splitlines()]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 8 and all("ETA" in line for line in steps)
    assert len(lines) - len(steps) < 30, "\n".join(lines)  # the 60-step demo: 60 step lines + the same < 100
    assert len(set(lines)) == len(lines), "repeated lines:\n" + "\n".join(sorted(line for line in lines if lines.count(line) > 1))
    assert "Warning" not in proc.stderr and any(line.startswith("INFO layout: world 8 = TP 2 x PP 2") for line in lines)
    tail = proc.stdout.strip().splitlines()[-6:]  # the closing summary
    assert tail[0].startswith("done: 8 steps") and tail[1] == f"run folder: {demo}"
    assert tail[2] == f"checkpoint: {demo / 'checkpoints' / 'iter_0000008'}"
    assert tail[4].startswith(f"open it: mlflow ui --backend-store-uri sqlite:///{demo / 'mlflow.db'}")
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}
    again = _demo(tmp_path, "--train-iters", 1, env={**runs, "NPROC": "4"})  # (4 processes: DP 1, quicker)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len([p for p in (tmp_path / "runs" / "tiny_3d").iterdir() if not p.is_symlink()]) == 2
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before  # the first run untouched
    refused = _demo(tmp_path, demo, env=runs, timeout=60)  # an existing run folder given: refused, not reused
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{demo / 'mlflow.db'}")
    (run_,) = client.search_runs([client.get_experiment_by_name("hcustom-mc").experiment_id])
    assert run_.data.params["parallel.tensor_parallel"] == "2"
    assert run_.data.params["world_size"] == "8" and run_.data.params["data_parallel"] == "2"
    assert run_.info.run_name == f"tiny audio tp2-pp2-cp1-dp2 {demo.name}"  # not MLflow's random words
    for key in ("loss", "grad_norm", "lr", "step_time_s", "tokens_per_s", "tflops_per_device", "peak_mem_gib"):
        assert len(client.get_metric_history(run_.info.run_id, key)) == 8, key
    assert (demo / "checkpoints" / "latest").read_text().strip() == "iter_0000008"
    # a training checkpoint converts to the release format like any megatron checkpoint
    proc = subprocess.run([sys.executable, "-m", "hcustom_mc.checkpoint.convert", "--src",
                           str(demo / "checkpoints" / "iter_0000008"), "--src-format", "mcore", "--dst",
                           str(tmp_path / "release"), "--dst-format", "release", "--model-config", "tiny",
                           "--variant", "audio"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "release" / "mp_rank_00_model_states.pt").is_file()
