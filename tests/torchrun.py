"""Run a test script under torchrun and fail with its output if any rank fails.

With fewer GPUs than ranks (always on a CPU host; on a one-GPU host for any multi-process test) the
ranks run gloo on CPU tensors: `HCUSTOM_DIST_BACKEND=gloo` (hcustom_mc.device) is set for them, so
no two NCCL ranks share a GPU. A caller's own HCUSTOM_DIST_BACKEND (in `env` or the environment) wins.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from bench.checkout import REPO, pythonpath as child_pythonpath  # noqa: F401  (the one child PYTHONPATH)
from hcustom_mc.device import BACKEND_ENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(nproc: int, script: str, *args) -> list[str]:
    """`python script args` for one process, else the same under torchrun on `nproc` local processes."""
    if nproc == 1:
        return [sys.executable, script, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", script, *map(str, args)]


def backend_env(nproc: int, env: dict | None = None) -> dict:
    """The HCUSTOM_DIST_BACKEND entry for `nproc` ranks: none when `env` sets it, this process's own when
    set, else gloo when this host has fewer GPUs than ranks (for launchers that pass a clean env)."""
    if BACKEND_ENV in (env or {}):
        return {}
    if BACKEND_ENV in os.environ:
        return {BACKEND_ENV: os.environ[BACKEND_ENV]}
    return {BACKEND_ENV: "gloo"} if torch.cuda.device_count() < nproc else {}


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 600, env: dict | None = None) -> str:
    """Launch `script` on `nproc` local processes; return combined output, raise AssertionError on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath(), **backend_env(nproc, env),
                **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"torchrun {script} timed out after {timeout}s\n{exc.stdout}\n{exc.stderr}") from exc
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}\n{out[-8000:]}")
    return out


def run_python(*args, expect_ok: bool = True, env: dict | None = None, timeout: float = 300) -> str:
    """`python ARGS` in the repository with a minimal environment (the tree on PYTHONPATH, one OpenMP thread);
    asserts the exit status is zero or not as `expect_ok` says and returns stdout + stderr."""
    base = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, f"exit {proc.returncode}\n{out[-5000:]}"
    return out
