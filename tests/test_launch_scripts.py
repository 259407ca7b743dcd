"""examples/13b launchers: the multi-node torchrun command spelled out, the SLURM script's wiring of the
allocation into it (with stand-in srun/scontrol), and a real 2-process run through the launcher."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.torchrun import REPO, _free_port, child_pythonpath

MULTINODE = REPO / "examples" / "13b" / "train_multinode.sh"
SBATCH = REPO / "examples" / "13b" / "train.sbatch"


def _bash(script, *args, env=None, cwd=None, timeout=60):
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": os.environ["PATH"], "PYTHONPATH": child_pythonpath(), **(env or {})})


def test_multinode_command_spells_out_the_rendezvous_from_any_directory(tmp_path):
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("model: tiny\n")
    proc = _bash(MULTINODE, "recipes/r.yaml", "--train-iters", "5", cwd=tmp_path,
                 env={"DRY_RUN": "1", "NNODES": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "python", "-m", "hcustom_mc.launch", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        "node0:29600", "--rdzv-id", "hcustom-r", "--max-restarts", "0", str(REPO / "pretrain_custom.py"),
        "--config", str(recipe), "--train-iters", "5"]


@pytest.mark.parametrize("env, message", [({"MASTER_ADDR": "h"}, "usage"), ({"NNODES": "2"}, "usage")])
def test_multinode_needs_nodes_and_master(env, message):
    proc = _bash(MULTINODE, REPO / "examples" / "tiny_3d.yaml", env={"DRY_RUN": "1", **env})
    assert proc.returncode != 0 and message in proc.stderr


def test_multinode_refuses_a_missing_recipe(tmp_path):
    proc = _bash(MULTINODE, tmp_path / "nope.yaml", env={"DRY_RUN": "1", "NNODES": "1", "MASTER_ADDR": "h"})
    assert proc.returncode == 2 and "no recipe file" in proc.stderr


def test_sbatch_runs_one_launcher_per_node_with_the_allocation(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stand-ins: scontrol lists the allocation's hosts; srun runs its command once, as one node would
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "srun $1"\nshift\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1", "SLURM_NNODES": "2",
           "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "4711",
           "SLURM_SUBMIT_DIR": str(REPO)}
    proc = _bash(SBATCH, "examples/tiny_3d.yaml", "--lr", "1e-5", cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    first, command = proc.stdout.splitlines()
    assert first == "srun --kill-on-bad-exit=1"
    assert command.split()[:14] == ["python", "-m", "hcustom_mc.launch", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                                    "--rdzv-endpoint", "gpu-a17:29500", "--rdzv-id", "4711", "--max-restarts"]
    assert command.split()[-4:] == ["--config", str(REPO / "examples" / "tiny_3d.yaml"), "--lr", "1e-5"]


def test_sbatch_outside_the_repository_says_so(tmp_path):
    proc = _bash(SBATCH, "r.yaml", env={"SLURM_SUBMIT_DIR": str(tmp_path)})
    assert proc.returncode == 2 and "submit from the repository" in proc.stderr


@pytest.mark.slow
def test_multinode_launcher_really_trains_on_one_node(tmp_path):
    """The spelled-out rendezvous works: one node of 2 workers (TP 2) trains 2 steps through the launcher."""
    env = {"NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    proc = _bash(MULTINODE, REPO / "examples" / "tiny_3d.yaml", "--tensor-model-parallel-size", "2",
                 "--train-iters", "2", "--global-batch-size", "1", "--run-dir", tmp_path / "run", cwd=tmp_path,
                 env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "TP 2" in proc.stdout + proc.stderr
