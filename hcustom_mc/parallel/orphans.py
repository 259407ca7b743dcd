"""Workers never outlive their torchrun agent.

torchrun starts each worker in its own session (so a signal to the agent's process group misses them); if
the agent is SIGKILLed, the workers would keep training and saving into the folder a restarted job reads.
Two guards, installed once per worker process started by torchrun (TORCHELASTIC_RUN_ID is set):

  * Linux: prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills the worker the moment its parent exits.
    (The signal follows the parent *thread* that forked us; torchrun forks from its main thread.)
  * everywhere: a daemon thread polling getppid() every POLL_S; a changed parent means we were
    reparented (the agent died), so the worker says so and kills itself.

Processes a worker forks itself (megatron-core's checkpoint writers, DataLoader workers) get no thread
and lose the death signal at fork, so a killed worker would leave them hanging on its locks, holding its
stdout and memory. An at-fork hook gives each of them PR_SET_PDEATHSIG towards the process that forked it
(any process, torchrun or not, that called install_orphan_guard).

Saves are atomic (a checkpoint folder is published only when complete), so being killed at any moment
loses at most the step in progress.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

POLL_S = 1.0
PR_SET_PDEATHSIG = 1
_installed = False
_fork_hook = False
_forking_pid: int | None = None  # set just before each fork; the child reads its copy


def _die(why: str) -> None:
    rank = os.environ.get("RANK", "?")
    try:
        sys.stderr.write(f"error: rank {rank}: {why}; exiting so that no orphaned worker keeps training\n")
        sys.stderr.flush()
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            _die(f"the torchrun agent (pid {parent}) is gone")


def _set_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux; False where it is not available or failed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _before_fork() -> None:
    global _forking_pid
    # the death signal follows the forking *thread*: a fork from a helper thread would kill the child when
    # that thread ends, so only children forked from the main thread are tied (the writers and loaders are)
    _forking_pid = os.getpid() if threading.current_thread() is threading.main_thread() else None


def _in_forked_child() -> None:
    if _forking_pid is None:
        return
    _set_death_signal()
    if os.getppid() != _forking_pid:  # the parent died between the fork and the prctl
        os._exit(1)


def guard_forked_children() -> None:
    """Idempotent: every child this process forks from now on dies when it does (Linux)."""
    global _fork_hook
    if not _fork_hook and sys.platform.startswith("linux"):
        os.register_at_fork(before=_before_fork, after_in_child=_in_forked_child)
        _fork_hook = True


def install_orphan_guard() -> bool:
    """Idempotent; returns whether the worker guard is active (only under torchrun). The forked-children
    guard is installed in every process."""
    global _installed
    guard_forked_children()
    if _installed:
        return True
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False  # a plain `python script.py`: its parent is a shell, which may come and go
    parent = os.getppid()
    if sys.platform.startswith("linux") and not _set_death_signal():
        sys.stderr.write(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); "
                         f"relying on the parent watchdog\n")
    # the agent may have died before prctl took effect: then we were reparented already (to init, pid 1)
    if parent == 1:
        _die("the torchrun agent died before this worker started")
    threading.Thread(target=_watch, args=(parent,), name="orphan-guard", daemon=True).start()
    _installed = True
    return True
