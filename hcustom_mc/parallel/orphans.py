"""Workers never outlive their torchrun agent.

torchrun starts each worker in its own session (so a signal to the agent's process group misses them); if
the agent is SIGKILLed, the workers would keep training and saving into the folder a restarted job reads.
Two guards, installed once per worker process started by torchrun (TORCHELASTIC_RUN_ID is set):

  * Linux: prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills the worker the moment its parent exits.
    (The signal follows the parent *thread* that forked us; torchrun forks from its main thread.)
  * everywhere: a daemon thread polling getppid() every POLL_S; a changed parent means we were
    reparented (the agent died), so the worker says so and kills itself.

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


def install_orphan_guard() -> bool:
    """Idempotent; returns whether a guard is active (only under torchrun)."""
    global _installed
    if _installed:
        return True
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False  # a plain `python script.py`: its parent is a shell, which may come and go
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                sys.stderr.write(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); "
                                 f"relying on the parent watchdog\n")
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog alone
    # the agent may have died before prctl took effect: then we were reparented already (to init, pid 1)
    if parent == 1:
        _die("the torchrun agent died before this worker started")
    threading.Thread(target=_watch, args=(parent,), name="orphan-guard", daemon=True).start()
    _installed = True
    return True
