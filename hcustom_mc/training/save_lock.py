"""One writer per `--save` folder, and the folder checked usable before training starts.

`DIR/.writer.lock` holds the writing job's host, pid, process start time, start time and a heartbeat that a
daemon thread of rank 0 refreshes every HEARTBEAT_S. A second job is refused with a message naming the holder.
A lock is stale, and is taken over with a warning, when its holder is gone: on this host its pid is dead (or
now belongs to another process: the recorded process start time differs), on any host its heartbeat is older
than STALE_S. Creating the lock is atomic and carries its content (a temporary file hard-linked to the lock's
name), so no job ever reads an empty lock; a takeover happens under an flock so two jobs cannot both take over
the same stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from hcustom_mc.model.config import ConfigError

log = logging.getLogger("hcustom_mc")
LOCK_FILE = ".writer.lock"
HEARTBEAT_S = float(os.environ.get("HCUSTOM_LOCK_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("HCUSTOM_LOCK_STALE_S", "120"))
_HELD: list["SaveLock"] = []  # released by release_all() when the job ends, however it ends


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("start_time", 0))))
    return f"host {holder.get('host')} pid {holder.get('pid')}, started {started}, last heartbeat {age:.0f}s ago"


def stale_reason(holder: dict) -> str | None:
    """Why the lock's holder is gone, or None while it may still be writing."""
    age = time.time() - float(holder.get("heartbeat", 0))
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if not _alive(pid):
            return f"its process {pid} is not running"
        if holder.get("proc_start") and _proc_start(pid) != holder["proc_start"]:
            return f"pid {pid} now belongs to another process"
    if age > STALE_S:
        return f"its heartbeat is {age:.0f}s old (more than {STALE_S:.0f}s)"
    return None


class SaveLock:
    """`flag` and `what` word the refusal: the training --save folder's checkpoints, or the sampler's --out."""

    def __init__(self, root: str | Path, flag: str = "--save", what: str = "checkpoints"):
        self.root = Path(root)
        self.flag, self.what = flag, what
        self.path = self.root / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                   "start_time": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_new(self) -> bool:
        """Create the lock with its content in one step: write a private temporary file, then hard-link it to the
        lock's name (fails if the lock exists), so no reader ever sees an empty or half-written lock."""
        content = json.dumps(self.me) + "\n"
        tmp = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.new")
        try:
            with open(tmp, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError, OSError):
            return {}  # unreadable: a writer crashed mid-write long ago, or the file was damaged

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the job that holds it."""
        for _ in range(3):
            if self._write_new():
                break
            holder = self._read()
            if holder is None:  # released between our two looks
                continue
            why = stale_reason(holder) if holder else "the lock file is unreadable"
            if why is None:
                raise ConfigError(f"{self.flag} {self.root} is being written by another job ({describe(holder)}): two "
                                  f"jobs writing one folder replace each other's {self.what}. Wait for it to finish, "
                                  f"stop it, or pass another {self.flag} (if that job is surely gone, delete {self.path})")
            with self._guard():
                if self._read() == holder:  # nobody else took it over meanwhile
                    log.warning("taking over the stale lock %s (%s): %s", self.path,
                                describe(holder) if holder else "unreadable", why)
                    self.path.unlink(missing_ok=True)
        else:
            raise ConfigError(f"could not take the lock {self.path}: other jobs keep taking it")
        self._thread = threading.Thread(target=self._beat, name="save-lock-heartbeat", daemon=True)
        self._thread.start()
        _HELD.append(self)

    @contextlib.contextmanager
    def _guard(self):
        with open(self.root / (LOCK_FILE + ".guard"), "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._read() != self.me:
                log.error("the save lock %s was taken by another job; this job keeps running but its saves may "
                          "now collide", self.path)
                return
            self.me["heartbeat"] = time.time()
            tmp = self.path.with_name(LOCK_FILE + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.me) + "\n")
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S + 5)
        if self._read() == self.me:
            self.path.unlink(missing_ok=True)
        if self in _HELD:
            _HELD.remove(self)


def release_all() -> None:
    for lock in list(_HELD):
        lock.release()


def check_save_folder(root: str | Path, need_bytes: int) -> None:
    """Refuse a --save that can never hold a checkpoint: a file, not writable, or without room for one."""
    check_save_writable(root)
    check_free_space(root, need_bytes)


def check_save_writable(root: str | Path) -> None:
    """Refuse a --save that is a file or cannot be written; create it."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--save {root} is a file, not a folder: pass a folder for the checkpoints")
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save {root}: permission denied, {existing} is not writable by this user "
                          f"(fix its permissions or pass another --save)")
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write_test.{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--save {root} is not writable ({exc.strerror}): fix it or pass another --save") from None


def check_free_space(root: str | Path, need_bytes: int) -> None:
    from hcustom_mc.checkpoint.integrity import human_bytes

    root = Path(root)
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise ConfigError(f"--save {root}: the disk has {human_bytes(free)} free, one checkpoint needs about "
                          f"{human_bytes(need_bytes)} (estimated): free space or pass another --save")


def clear_stale_saves(root: str | Path) -> None:
    """With the lock held (no other job writes here): remove the `iter_*.tmp` folders a killed save left, with
    a warning, so they neither fill the disk nor block this start."""
    from hcustom_mc.checkpoint.integrity import human_bytes

    for tmp in sorted(Path(root).glob("iter_*.tmp")):
        if tmp.is_dir() and not tmp.is_symlink():
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("removed %s (%s), an unfinished save of a job that was stopped; it was never published",
                        tmp, human_bytes(size))


def prepare_save_folder(cfg, model_cfg) -> SaveLock | None:
    """Collective, at the start of training: check --save, take its lock on rank 0, remove unfinished saves
    (`iter_*.tmp`) and check the room for a checkpoint; every rank raises the same ConfigError when that
    fails. Returns the lock (rank 0) to release at the end."""
    import torch.distributed as dist

    from hcustom_mc.checkpoint.integrity import checkpoint_bytes_estimate, gather_objects

    if not cfg.checkpoint.save:
        return None
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            params = _num_params(model_cfg)
            check_save_writable(cfg.checkpoint.save)
            lock = SaveLock(cfg.checkpoint.save)
            lock.acquire()
            clear_stale_saves(cfg.checkpoint.save)
            check_free_space(cfg.checkpoint.save, checkpoint_bytes_estimate(params, 2 if cfg.bf16 else 4, True))
        except ConfigError as exc:
            error = str(exc)
            if lock is not None:
                lock.release()
                lock = None
    error = gather_objects(error)[0]
    if error:
        raise ConfigError(error)
    return lock


def _num_params(model_cfg) -> int:
    from hcustom_mc.model import HunyuanCustomDiT

    total = model_cfg.num_double_blocks + model_cfg.num_single_blocks
    return sum(p.numel() for p in HunyuanCustomDiT(model_cfg, layers=range(total), device="meta").parameters())
