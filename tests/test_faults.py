"""Fault injection on a 4-process layout (TP 2 x PP 2): SIGKILLs at random moments and inside saves, each
resume loading and continuing bit-identically; workers dying with their killed torchrun agent; two jobs on
one --save folder (issue 13, items 4, 5 and the kill/resume acceptance).

Bit-identical means: every checkpoint any segment published has the same bytes (sha256 from its manifest) as
the uninterrupted run's checkpoint of that step, for every tensor file, RNG file and common.pt, and every
logged step line (loss, grad norm, task) equals the uninterrupted run's. The short trial runs by default; the
long one (>= 8 kills) is marked slow.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchrun import REPO, _free_port, child_pythonpath

ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": child_pythonpath()}
TRAIN_ITERS = 16  # every trial keeps the reference's LR schedule (it spans --train-iters)
LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
STEP = re.compile(r"^step (\d+)/\d+ \| task (\S+) \| loss (\S+) \| grad_norm (\S+)")
COMPARED = re.compile(r"^(__\d+_\d+\.distcp|common\.pt|rng/rank\d+\.pt)$")  # .metadata holds a save id and path


def launch(nproc: int, *args, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "pretrain_custom.py", "--config", "examples/tiny_3d.yaml",
           "--set", "zero_init=false", *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the agent and every worker (they live in their own sessions); returns the workers' pids."""
    workers = children(proc.pid)
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return workers


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def steps_of(text: str) -> dict[int, tuple]:
    found = {}
    for line in text.splitlines():
        m = STEP.match(line)
        if m:
            found[int(m.group(1))] = m.groups()[1:]
    return found


def fingerprints(ck: Path) -> dict[str, dict[str, str]]:
    """iter name -> {compared file: sha256} for every published checkpoint."""
    out = {}
    for folder in sorted(ck.glob("iter_???????")):
        manifest = json.loads((folder / "manifest.json").read_text())
        out[folder.name] = {k: v["sha256"] for k, v in manifest["files"].items() if COMPARED.match(k)}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-process run, every step saved and kept."""
    root = tmp_path_factory.mktemp("reference")
    proc = launch(4, *LAYOUT, "--train-iters", TRAIN_ITERS, "--save-interval", 1, "--keep-last", 100, "--save", root / "ck",
                  "--run-dir", root / "run")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    return {"steps": steps_of(out), "ck": fingerprints(root / "ck")}


def published(ck: Path) -> int:
    """The newest published iteration in `ck` (0: none)."""
    return max((int(p.name[5:]) for p in ck.glob("iter_???????")), default=0)


def trial(reference, tmp_path, stop_at: int, plan: list, seed: int) -> int:
    """Run segments until training completes; `plan` says how each killed segment dies, counted from the newest
    published checkpoint `done` when the segment starts (how far the previous kill got is random):
    ("fault", k, phase) = HCUSTOM_FAULT_KILL_IN_SAVE inside the save of step done + k, ("random", k, delay_s) =
    SIGKILL of agent and workers `delay_s` after the line of step done + k. A kill that would land too close to
    the end (where the run could finish first) is left out. The last segment stops after step `stop_at`, or
    after the next step when a kill got that far. Returns the number of SIGKILLs."""
    ck, kills, log = tmp_path / "ck", 0, []
    for n, how in enumerate([*plan, None]):
        done = published(ck)
        at = None if how is None else done + how[1]
        if how is not None and at > stop_at - (3 if how[0] == "random" else 1):
            continue  # a random kill is up to ~3 steps late here; a fault needs a save of a later step
        args = [*LAYOUT, "--train-iters", TRAIN_ITERS, "--save-interval", 1, "--keep-last", 100, "--save", ck,
                "--run-dir", tmp_path / f"run{n}"]
        if (ck / "latest").exists() or done:  # a published checkpoint (not .tmp)
            args += ["--load", ck]
        if how is None:
            stop_at = min(TRAIN_ITERS, max(stop_at, done + 1))
            args += ["--exit-after-iters", stop_at - done]
        env = {"HCUSTOM_FAULT_KILL_IN_SAVE": f"{at}:{how[2]}"} if how and how[0] == "fault" else None
        proc = launch(4, *args, env=env)
        lines = []
        if how and how[0] == "random":
            for line in proc.stdout:
                lines.append(line)
                m = STEP.match(line)
                if m and int(m.group(1)) >= at:
                    break
            time.sleep(how[2])
            assert proc.poll() is None, f"segment {n} ended before its kill:\n{''.join(lines)[-3000:]}"
            kill_tree(proc)
            kills += 1
            lines.append(proc.stdout.read())
        else:
            out, _ = proc.communicate(timeout=600)
            lines.append(out)
            if how is not None:
                assert proc.returncode != 0, f"segment {n} ({how}, step {at}) was meant to die\n{out[-3000:]}"
                kills += 1
                leftover = children(proc.pid)
                assert not leftover, f"workers {leftover} outlived the failed job"
            else:
                assert proc.returncode == 0, f"seed {seed} final segment failed\n{out[-5000:]}"
        text = "".join(lines)
        log.append(f"--- segment {n} ({how}, step {at}):\n{text[-1500:]}")
        where = f"seed {seed}, segment {n} ({how}, step {at})\n" + "\n".join(log)[-6000:]
        if n > 0:
            assert "loaded checkpoint" in text or how is not None, where
        for step, got in steps_of(text).items():
            assert got == reference["steps"][step], f"step {step} differs from the uninterrupted run: {where}"
        for name, files in fingerprints(ck).items():
            assert files == reference["ck"][name], f"{name} differs from the uninterrupted run's: {where}"
    assert steps_of(text) and max(steps_of(text)) == stop_at
    assert fingerprints(ck).keys() == {f"iter_{s:07d}" for s in range(1, stop_at + 1)}
    return kills


def test_kill_resume_short(reference, tmp_path):
    """Two SIGKILLs: one inside a save (after its data, before the rename), one at a random moment."""
    rng = random.Random(13)
    plan = [("fault", 2, "written"), ("random", 2, rng.uniform(0, 1.2))]
    assert trial(reference, tmp_path, 6, plan, seed=13) == 2


@pytest.mark.slow
def test_kill_resume_long(reference, tmp_path):
    """Ten SIGKILLs: every phase of a save, and random moments (a save takes about as long as a step here,
    so random kills often land inside saves). A "written" or "sealed" kill publishes nothing, so the next
    segment starts from the same checkpoint; the others move on by one to three steps."""
    seed = int(os.environ.get("HCUSTOM_FAULT_SEED", "2024"))
    rng = random.Random(seed)
    plan = [("fault", 1, "written"), ("random", 1, rng.uniform(0, 1.5)), ("fault", 1, "sealed"),
            ("random", 1, rng.uniform(0, 1.5)), ("fault", 1, "published"), ("random", 1, rng.uniform(0, 1.5)),
            ("random", 1, rng.uniform(0, 1.5)), ("fault", 2, "written"), ("random", 1, rng.uniform(0, 1.5)),
            ("random", 1, rng.uniform(0, 1.5))]
    assert trial(reference, tmp_path, TRAIN_ITERS, plan, seed) >= 8


# ----------------------------------------------------------------------------- item 5: no orphans
def test_workers_die_with_their_agent(tmp_path):
    proc = launch(2, "--train-iters", 100000, "--save", tmp_path / "ck", "--run-dir", tmp_path / "run")
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                break
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the agent alone, like an OOM killer or a lost node daemon
        proc.wait(timeout=30)
        start = time.time()
        left = wait_gone(workers, timeout=10)
        assert not left, f"workers {left} still running 10s after their agent died"
        assert time.time() - start < 5, f"workers took {time.time() - start:.1f}s to exit"
    finally:
        for pid in children(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- item 4: two writers
@pytest.mark.slow
def test_second_job_on_the_same_save_folder_is_refused(tmp_path):
    ck = tmp_path / "ck"
    first = launch(2, "--train-iters", 100000, "--save", ck, "--save-interval", 2, "--run-dir", tmp_path / "a")
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        holder = json.loads((ck / ".writer.lock").read_text())
        second = launch(2, "--train-iters", 4, "--save", ck, "--run-dir", tmp_path / "b")
        out, _ = second.communicate(timeout=300)
        assert second.returncode != 0, out[-3000:]
        message = f"is being written by another job (host {holder['host']} pid {holder['pid']}"
        assert out.count(message) == 1, out[-3000:]  # every rank refuses; said once
        assert "step 1/" not in out and first.poll() is None  # refused before training; the first job goes on
    finally:
        kill_tree(first)
    # the holder is gone now (SIGKILLed, lock left behind): the next job takes the stale lock over
    out = subprocess.run([sys.executable, "pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--train-iters",
                          "1", "--save", str(ck), "--run-dir", str(tmp_path / "c")], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "taking over the stale lock" in out.stdout + out.stderr, out.stderr[-3000:]
    assert not (ck / ".writer.lock").exists()


FORKING_PARENT = """
import os, sys, time
from hcustom_mc.parallel.orphans import install_orphan_guard
install_orphan_guard()
pid = os.fork()
if pid == 0:  # a forked helper (like megatron's checkpoint writer) that would wait forever
    time.sleep(300)
    os._exit(0)
print(pid, flush=True)
time.sleep(300)
"""


def test_children_a_process_forks_die_with_it(tmp_path):
    """A SIGKILLed worker takes the processes it forked with it (they lose PDEATHSIG at fork otherwise)."""
    proc = subprocess.Popen([sys.executable, "-c", FORKING_PARENT], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert alive(child)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert not wait_gone([child], timeout=10), f"forked child {child} outlived its parent"
    finally:
        for pid in [proc.pid] + children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
