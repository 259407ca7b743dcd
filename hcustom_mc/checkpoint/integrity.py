"""Checkpoint integrity: a manifest of every file's size and sha256, fsync before publishing, verification
on load, and choosing the checkpoint to load from a save folder (with fallback past damaged ones).

    DIR/iter_0000030/manifest.json   {"algorithm": "sha256", "files": {"__0_0.distcp": {"size": .., "sha256": ..}, ..}}

Saving (collective, `seal_folder`): after every rank has written its files, each rank hashes and fsyncs the
files it wrote itself (`__R_*.distcp`, `rng/rankR.pt`; rank 0 the shared ones) while they are still in the page
cache, rank 0 gathers the pieces, writes the manifest and fsyncs every folder. `publish` then renames the
folder into place, fsyncs the save root, and replaces `latest` (written, fsynced, renamed, root fsynced), so
after a power cut `latest` never names a folder whose files are not on disk.

Loading: `verify_folder` checks sizes and hashes (`full`, the default: each rank hashes the files it owns,
`__R_*.distcp` and `rng/rankR.pt` on rank R % world, the shared ones on rank 0, and the findings are shared so
every rank decides alike; its cost: verify_modes.VERIFY_COST) or sizes only (`size`, one stat per file: misses same-size damage).
`select_checkpoint` follows `latest` when it is sound and otherwise falls back to the newest complete,
verified `iter_*`, warning what it skipped and why; a checkpoint folder named explicitly never falls back. A
folder this project wrote (train_state.json or hcustom_model.json) without its manifest is unverified: it is
skipped (or, named explicitly, refused) unless verification is turned off (`--verify-checkpoint off`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from hcustom_mc.checkpoint.safe_load import CheckpointReadError
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY, VERIFY_MODES

log = logging.getLogger("hcustom_mc")
MANIFEST_FILE = "manifest.json"
STATE_FILE = "train_state.json"  # a training checkpoint's step, schedule and LoRA metadata (written last)
MODEL_CONFIG_FILE = "hcustom_model.json"  # the model config this project writes beside its mcore checkpoints
OURS = (STATE_FILE, MODEL_CONFIG_FILE)  # files that say this project wrote the folder (and so sealed it)
ALGORITHM = "sha256"  # ~1.2 GB/s per core with SHA-NI (measured; see README); hashlib releases the GIL
ITER_RE = re.compile(r"^iter_(\d+)$")
_RANK_FILE = (re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"^rank(\d+)\.pt$"))


class CheckpointWriteError(RuntimeError):
    """A save that cannot be completed (non-finite values, disk full, permissions); nothing was published."""


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj):
    """Every rank's `obj`, on every rank (a list of one without a process group)."""
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- write errors
_ERRNO_HELP = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only",
}


def explain_write_error(exc: BaseException, folder: Path, need_bytes: int | None = None) -> str | None:
    """A plain sentence (one line) for a disk-full / permission error found anywhere in `exc` (torch wraps
    per-rank failures in CheckpointException), or None when it is something else. A full disk starts with
    "disk full" and says the bytes the checkpoint needs (`need_bytes`, when known)."""
    fix = ("nothing was published and `latest` still names the last complete checkpoint. Free space or fix the "
           "permissions, or pass another --save, then resume.")

    def say(code: int, what: str, detail: str) -> str:
        if code not in (errno.ENOSPC, errno.EDQUOT):
            return f"cannot write checkpoint {folder}: {what} ({detail}); {fix}"
        need = f"; it needs about {human_bytes(need_bytes)} ({need_bytes} bytes)" if need_bytes else ""
        return f"disk full: cannot write checkpoint {folder}: {what} ({detail}){need}; {fix}"

    chain, todo = [], [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is c for c in chain):
            continue
        chain.append(e)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # {rank: (exception, traceback summary)}
            todo += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
        todo += [e.__cause__, e.__context__]
    for e in chain:  # the OSError itself names the file
        if isinstance(e, OSError) and e.errno in _ERRNO_HELP:
            return say(e.errno, _ERRNO_HELP[e.errno], f"{e.strerror}: {e.filename or folder}")
    for e in chain:  # only its text survived (re-raised as another type by a writer thread)
        for code, what in _ERRNO_HELP.items():
            if os.strerror(code) in str(e):
                return say(code, what, os.strerror(code))
    return None


@contextlib.contextmanager
def write_errors_explained(folder: Path, need_bytes: int | None = None):
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (OSError, CheckpointException, RuntimeError) as exc:
        message = explain_write_error(exc, Path(folder), need_bytes)
        if message is None and need_bytes and _free_bytes(Path(folder)) < need_bytes:
            # torch's zip writer loses the errno ("enforce fail at inline_container.cc ... unexpected pos"): a
            # write that failed while the disk has less room left than the checkpoint needs ran out of space
            free = human_bytes(_free_bytes(Path(folder)))
            message = explain_write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{folder}, {free} free "
                                                  f"when the write failed"), Path(folder), need_bytes)
        if message is None:
            raise
        raise CheckpointWriteError(message) from exc


def _free_bytes(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


# ----------------------------------------------------------------------------- hashing and fsync
def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # a rename or a new file is durable only once its folder's entry is flushed
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner(rel: str, world: int) -> int:
    name = rel.rsplit("/", 1)[-1]
    for pattern in _RANK_FILE:
        m = pattern.match(name)
        if m:
            return int(m.group(1)) % world
    return 0


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def seal_folder(folder: str | Path) -> dict:
    """Collective, after every rank has written and before the folder is published: hash + fsync each file
    on the rank that wrote it, write the manifest (rank 0), fsync all folders. Returns the manifest."""
    import time

    folder = Path(folder)
    rank, world = _rank_world()
    t0 = time.time()
    mine = {}
    for rel in _files(folder):
        if _owner(rel, world) == rank:
            path = folder / rel
            fsync_file(path)
            mine[rel] = {"size": path.stat().st_size, ALGORITHM: hash_file(path)}
    elapsed = time.time() - t0
    pieces = gather_objects((mine, elapsed))
    manifest = {"algorithm": ALGORITHM, "files": {}}
    for files, _ in pieces:
        manifest["files"].update(files)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    if rank == 0:
        tmp = folder / (MANIFEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST_FILE)
        for d in sorted({p for p in folder.rglob("*") if p.is_dir()} | {folder}, reverse=True):
            fsync_dir(d)
        total = sum(v["size"] for v in manifest["files"].values())
        log.debug("checkpoint manifest: %d files, %.1f MB hashed (%s) + fsynced in %.2fs (slowest rank)",
                 len(manifest["files"]), total / 1e6, ALGORITHM, max(e for _, e in pieces))
    return manifest


def write_latest(root: Path, name: str) -> None:
    """Point `latest` at `name`, durably: temp file, fsync, rename, fsync the folder."""
    tmp = root / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    fsync_dir(root)


def publish(tmp: Path, final: Path) -> None:
    """Rank 0: move a sealed folder into place and point `latest` at it."""
    os.replace(tmp, final)
    fsync_dir(final.parent)
    write_latest(final.parent, final.name)


# ----------------------------------------------------------------------------- verification
def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(isinstance(v.get("size"), int) for v in files.values())
    except Exception as exc:
        raise CheckpointReadError(f"cannot read {path} ({type(exc).__name__}: {exc}): the manifest is damaged") from None
    return manifest


def verify_folder(folder: str | Path, mode: str = DEFAULT_VERIFY, collective: bool = True) -> list[str]:
    """Problems found in `folder` against its manifest (empty: sound). Collective when a process group exists
    (every rank must call it for the same folder); every rank gets the same list. `full` hashes each file on
    the rank that owns it (`_owner`), so the ranks hash in parallel. A folder without a manifest yields no
    problems here; `select_checkpoint` decides what that means (`has_manifest`, `unverified_problems`).
    `collective=False`: this process alone checks every file (rank 0 pruning, say)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
    folder = Path(folder)
    problems: list[str] = []
    try:
        manifest = read_manifest(folder) if mode != "off" else None
    except CheckpointReadError as exc:
        manifest, problems = None, [str(exc)]
    if manifest is not None:
        rank, world = _rank_world() if collective else (0, 1)
        algorithm = manifest.get("algorithm", ALGORITHM)
        for rel, want in manifest["files"].items():
            path = folder / rel
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif path.stat().st_size != want["size"]:
                problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {want['size']} (truncated or damaged)")
            elif mode == "full" and _owner(rel, world) == rank:
                with open(path, "rb") as f:
                    got = hashlib.file_digest(f, algorithm).hexdigest()
                if got != want.get(algorithm):
                    problems.append(f"{path}: {algorithm} mismatch (the file's contents changed since it was saved: bit rot or tampering)")
    if not collective:
        return problems
    merged: list[str] = []
    for part in gather_objects(problems):
        merged += [p for p in part if p not in merged]
    return merged


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).exists()


# ----------------------------------------------------------------------------- choosing what to load
def _warn(msg: str, *args) -> None:
    if _rank_world()[0] == 0:
        log.warning(msg, *args)


def unverified_problems(folder: Path) -> list[str]:
    """Problems of a folder without a manifest: one this project wrote lost its manifest (it is unverified and
    is loaded only with `--verify-checkpoint off`); any such folder's files are checked against the byte
    ranges its `.metadata` records, so a truncated or missing file is named."""
    from hcustom_mc.checkpoint.safe_load import storage_problems

    problems = storage_problems(folder)
    ours = [name for name in OURS if (folder / name).is_file()]
    if ours:
        problems.insert(0, f"{folder} has {ours[0]} but no {MANIFEST_FILE}: this project writes a manifest with "
                           f"every checkpoint, so it was deleted or lost and the files cannot be verified (pass "
                           f"--verify-checkpoint off to load it unverified)")
    return problems


# the folders select_checkpoint found unusable in this process (resolved path -> why): pruning moves them aside
_REJECTED: dict[Path, list[str]] = {}


def rejected_folders() -> dict[Path, list[str]]:
    return dict(_REJECTED)


def _check_candidate(folder: Path, mode: str, complete: str) -> list[str]:
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not (folder / complete).is_file():
        problems = [f"{folder} is incomplete (no {complete}: the save did not finish)"]
    else:
        problems = verify_folder(folder, mode)
        if not problems and mode != "off" and not has_manifest(folder):
            problems = unverified_problems(folder)
            if not problems:
                _warn("%s has no %s (saved by another tool): its files cannot be verified", folder, MANIFEST_FILE)
    if problems:
        _REJECTED[folder.resolve()] = problems
    return problems


def read_latest(root: Path) -> tuple[Path | None, str | None]:
    """(the folder `latest` names, None) or (None, why it cannot be followed)."""
    pointer = root / "latest"
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{pointer} is not text (damaged)"
    except OSError as exc:
        return None, f"{pointer} cannot be read ({exc})"
    if not name:
        return None, f"{pointer} is empty (damaged)"
    # `latest` is written by this code as a bare folder name; anything else (an absolute path, `..`,
    # a link out of the folder) would make loading follow data from elsewhere
    target = root / name
    if "/" in name or name in (".", "..") or not ITER_RE.match(name):
        return None, f"{pointer} names {name!r}, which is not an iter_* folder inside {root}"
    if target.is_symlink() or target.resolve().parent != root.resolve():
        return None, f"{pointer} names {name!r}, which resolves outside {root}"
    return target, None


def iter_folders(root: Path) -> list[Path]:
    """The iter_* folders of a save root, newest first (links are not followed: a save writes real folders)."""
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := ITER_RE.match(p.name)) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(found, reverse=True)]


def is_checkpoint_folder(path: Path, complete: str) -> bool:
    return (Path(path) / complete).is_file() or bool(ITER_RE.match(Path(path).name))


def select_checkpoint(path: str | Path, mode: str = DEFAULT_VERIFY, complete: str = "metadata.json") -> Path | None:
    """The checkpoint folder to load from `path` (collective when a process group exists).

    `path` is a checkpoint folder (explicit: verified, never replaced by another) or a save root: its `latest`
    if sound, else the newest complete verified `iter_*`, with a warning naming what was skipped and why.
    None when a save root holds no checkpoint at all. `complete` is the file a finished save always has.
    """
    path = Path(path)
    if is_checkpoint_folder(path, complete):
        problems = _check_candidate(path, mode, complete)
        if problems:
            raise CheckpointReadError(f"checkpoint {path} fails verification (--verify-checkpoint {mode}):\n  - "
                                      + "\n  - ".join(problems) + "\n(an explicitly named checkpoint is never "
                                      "replaced by another: pass the save folder to load its newest sound checkpoint)")
        return path
    if not path.is_dir():
        raise CheckpointReadError(f"{path} is neither a checkpoint nor a folder of checkpoints")
    skipped: list[str] = []
    tried: set[Path] = set()
    if (path / "latest").exists():
        target, why = read_latest(path)
        if target is not None:
            tried.add(target)
            problems = _check_candidate(target, mode, complete)
            if not problems:
                return target
            why = f"{path / 'latest'} names {target.name}, which is unusable: " + "; ".join(problems)
        skipped.append(why)
    for folder in iter_folders(path):
        if folder in tried:
            continue
        problems = _check_candidate(folder, mode, complete)
        if not problems:
            if skipped:
                _warn("loading %s instead of `latest`; skipped:\n  - %s", folder, "\n  - ".join(skipped))
            return folder
        skipped.append(f"{folder.name}: " + "; ".join(problems))
    if not skipped:
        return None
    raise CheckpointReadError(f"no sound checkpoint in {path} (--verify-checkpoint {mode}):\n  - " + "\n  - ".join(skipped))


# ----------------------------------------------------------------------------- what is written is finite
def nonfinite_tensors(state, prefix: str = "", limit: int = 5) -> list[str]:
    """Names of (up to `limit`) tensors in a (sharded) state dict holding NaN or inf."""
    bad: list[str] = []

    def visit(obj, name):
        if len(bad) >= limit:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{name}[{i}]")
        else:
            t = obj if isinstance(obj, torch.Tensor) else getattr(obj, "data", None)
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
                if not bool(torch.isfinite(t.detach()).all()):
                    bad.append(getattr(obj, "key", None) or name)

    visit(state, prefix)
    return bad


def checkpoint_bytes_estimate(num_params: int, param_bytes: int, with_optimizer: bool) -> int:
    """Bytes one checkpoint takes: the weights, plus fp32 main weights and two Adam moments when saved."""
    return int(num_params * (param_bytes + (12 if with_optimizer else 0)) * 1.02)  # +2% metadata and rounding


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
