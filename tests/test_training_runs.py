"""Whole training runs: exact resume, resume at another layout, SIGTERM and SIGKILL safety, bad
configs failing fast on every rank, and the README demo with its MLflow run read back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchrun import REPO, _free_port, backend_env, launch_command

ARGS = ["--config", "examples/tiny_3d.yaml", "--set", "zero_init=false", "--set", "checkpoint.save_interval=0"]
ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}


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
    "sequence parallel": (2, ["--tensor-model-parallel-size", 2, "--sequence-parallel"],
                          "--sequence-parallel is not available"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_fails_fast_on_every_rank(tmp_path, case):
    nproc, args, message = BAD[case]
    start = time.time()
    out = run(nproc, *args, "--run-dir", tmp_path, expect_ok=False, timeout=120)
    assert out.count(message) == 1, out[-4000:]  # every rank fails (exit 2); the message is said once
    assert time.time() - start < 90


def test_readme_demo_trains_and_logs_to_mlflow(tmp_path):
    proc = subprocess.run(["bash", "examples/train_tiny_3d.sh", str(tmp_path / "demo"), "--train-iters", "8",
                           "--save-interval", "4"], cwd=REPO, env={**ENV, **backend_env(8), "MASTER_PORT": str(_free_port())},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow run" in proc.stdout and "8 steps" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'demo' / 'mlflow.db').resolve()}")
    (run_,) = client.search_runs([client.get_experiment_by_name("hcustom-mc").experiment_id])
    assert run_.data.params["parallel.tensor_parallel"] == "2"
    for key in ("loss", "grad_norm", "lr", "step_time_s", "tokens_per_s", "tflops_per_device", "peak_mem_gib"):
        assert len(client.get_metric_history(run_.info.run_id, key)) == 8, key
    assert (tmp_path / "demo" / "checkpoints" / "latest").read_text().strip() == "iter_0000008"
    # a training checkpoint converts to the release format like any megatron checkpoint
    proc = subprocess.run([sys.executable, "-m", "hcustom_mc.checkpoint.convert", "--src",
                           str(tmp_path / "demo" / "checkpoints" / "iter_0000008"), "--src-format", "mcore", "--dst",
                           str(tmp_path / "release"), "--dst-format", "release", "--model-config", "tiny",
                           "--variant", "audio"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "release" / "mp_rank_00_model_states.pt").is_file()
