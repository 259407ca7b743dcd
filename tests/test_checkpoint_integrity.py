"""Checkpoint integrity (issue 13): the manifest and bit flips (item 2), fallback past a damaged `latest`
(item 3), the save lock (item 4), non-finite checkpoints never written (item 7), and the --save folder and
write errors explained (item 9)."""

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import mcore_writes_common_pt
from tests.torchrun import REPO, run_python

TRAIN = ["pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--set", "zero_init=false"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """iter_0000001..3 of a tiny run, every step saved."""
    root = tmp_path_factory.mktemp("integrity")
    run_python(*TRAIN, "--train-iters", 3, "--save-interval", 1, "--keep-last", 3, "--save", root / "ck",
               "--run-dir", root / "run")
    return root / "ck"


@pytest.fixture
def ck(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck"


def _flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- item 2: manifest, bit flips
def test_manifest_lists_every_file(saved):
    from hcustom_mc.checkpoint.integrity import MANIFEST_FILE, hash_file, verify_folder

    folder = saved / "iter_0000003"
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == files
    expected = {".metadata", "__0_0.distcp", "metadata.json", "train_state.json", "rng/rank00000.pt"}
    assert expected | ({"common.pt"} if mcore_writes_common_pt() else set()) <= set(files)
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (folder / rel).stat().st_size and entry["sha256"] == hash_file(folder / rel)
    assert verify_folder(folder, "full") == []


def test_bit_flip_detected_by_full_not_size(ck):
    from hcustom_mc.checkpoint.integrity import verify_folder

    target = ck / "iter_0000003" / "__0_0.distcp"
    _flip_bit(target)
    assert verify_folder(ck / "iter_0000003", "size") == []
    (problem,) = verify_folder(ck / "iter_0000003", "full")
    assert str(target) in problem and "sha256 mismatch" in problem


def test_truncation_detected_by_size(ck):
    from hcustom_mc.checkpoint.integrity import verify_folder

    target = ck / "iter_0000003" / "__0_0.distcp"
    target.write_bytes(target.read_bytes()[:100])
    (problem,) = verify_folder(ck / "iter_0000003", "size")
    assert str(target) in problem and "truncated" in problem


def test_bit_flip_training_falls_back_or_refuses_explicit(ck, tmp_path):
    _flip_bit(ck / "iter_0000003" / "__0_0.distcp")
    out = run_python(*TRAIN, "--train-iters", 4, "--override-schedule", "--load", ck, "--verify-checkpoint", "full", "--run-dir", tmp_path / "a")
    assert "loading " + str(ck / "iter_0000002") + " instead of `latest`" in out, out[-3000:]
    assert "iter_0000003, which is unusable" in out and "sha256 mismatch" in out
    assert "loaded checkpoint " + str(ck / "iter_0000002") in out
    # an explicitly named iteration never falls back
    out = run_python(*TRAIN, "--train-iters", 4, "--override-schedule", "--load", ck / "iter_0000003", "--verify-checkpoint", "full",
                     "--run-dir", tmp_path / "b", expect_ok=False)
    assert "fails verification" in out and "never replaced by another" in out and "Traceback" not in out


def test_converter_verifies_fully_by_default(ck, tmp_path):
    _flip_bit(ck / "iter_0000003" / "__0_0.distcp", offset=200)
    out = run_python("-m", "hcustom_mc.checkpoint.convert", "--src", ck / "iter_0000003", "--src-format", "mcore", "--dst",
                     tmp_path / "out", "--dst-format", "release", "--model-config", "tiny", "--variant", "audio",
               expect_ok=False)
    assert "__0_0.distcp: sha256 mismatch" in out, out[-3000:]


# ----------------------------------------------------------------------------- item 3: fallback
DAMAGED_LATEST = {
    "not text": (b"\xff\xfe\x80", "is not text"),
    "empty": (b"", "is empty"),
    "missing target": (b"iter_0000009\n", "does not exist"),
    "absolute path elsewhere": (b"/tmp\n", "not an iter_* folder inside"),
    "parent escape": (b"../iter_0000003\n", "not an iter_* folder inside"),
}


@pytest.mark.parametrize("case", DAMAGED_LATEST)
def test_damaged_latest_falls_back_to_newest_sound(ck, caplog, case):
    from hcustom_mc.checkpoint.integrity import select_checkpoint

    content, why = DAMAGED_LATEST[case]
    (ck / "latest").write_bytes(content)
    _flip_bit(ck / "iter_0000003" / "__0_0.distcp")  # the newest fails full verification too
    with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
        chosen = select_checkpoint(ck, "full", complete="train_state.json")
    assert chosen == ck / "iter_0000002"
    assert why in caplog.text and "iter_0000003: " in caplog.text and "sha256 mismatch" in caplog.text


def test_latest_symlink_out_of_root_is_not_followed(ck, tmp_path):
    from hcustom_mc.checkpoint.integrity import select_checkpoint

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ck / "iter_0000001", elsewhere)
    (ck / "iter_0000007").symlink_to(elsewhere)
    (ck / "latest").write_text("iter_0000007\n")
    assert select_checkpoint(ck, "size", complete="train_state.json") == ck / "iter_0000003"


def test_incomplete_folders_and_nothing_sound(ck):
    from hcustom_mc.checkpoint.integrity import select_checkpoint
    from hcustom_mc.checkpoint.safe_load import CheckpointReadError

    (ck / "iter_0000003" / "train_state.json").unlink()  # a save that never finished
    (ck / "latest").unlink()
    assert select_checkpoint(ck, "size", complete="train_state.json") == ck / "iter_0000002"
    for name in ("iter_0000001", "iter_0000002"):
        (ck / name / ".metadata").write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match="no sound checkpoint") as err:
        select_checkpoint(ck, "size", complete="train_state.json")
    assert "iter_0000003: " in str(err.value) and "incomplete" in str(err.value)
    empty = ck.parent / "empty"
    empty.mkdir()
    assert select_checkpoint(empty, "size", complete="train_state.json") is None  # nothing saved yet


# ----------------------------------------------------------------------------- item 4: one writer
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_refused_naming_holder(tmp_path):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.save_lock import SaveLock

    first = SaveLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(ConfigError) as err:
            SaveLock(tmp_path).acquire()
        assert f"host {socket.gethostname()} pid {os.getpid()}" in str(err.value)
        assert "being written by another job" in str(err.value)
    finally:
        first.release()
    assert not (tmp_path / ".writer.lock").exists()
    second = SaveLock(tmp_path)
    second.acquire()  # free again after the release
    second.release()


@pytest.mark.parametrize("how", ["dead pid", "old heartbeat elsewhere", "unreadable"])
def test_stale_lock_taken_over_with_warning(tmp_path, caplog, how):
    from hcustom_mc.training.save_lock import LOCK_FILE, STALE_S, SaveLock

    holder = {"dead pid": {"host": socket.gethostname(), "pid": _dead_pid(), "start_time": time.time(),
                           "heartbeat": time.time()},
              "old heartbeat elsewhere": {"host": "other-host", "pid": 1, "start_time": 0,
                                          "heartbeat": time.time() - STALE_S - 5}}.get(how)
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder) if holder else "{garbage")
    with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
        lock = SaveLock(tmp_path)
        lock.acquire()
    assert "taking over the stale lock" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_live_lock_on_other_host_is_respected(tmp_path):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.save_lock import LOCK_FILE, SaveLock

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "other-host", "pid": 4242, "start_time": time.time() - 60,
                                                  "heartbeat": time.time() - 3}))
    with pytest.raises(ConfigError, match="host other-host pid 4242"):
        SaveLock(tmp_path).acquire()


# ----------------------------------------------------------------------------- item 7: non-finite never saved
def test_nonfinite_weights_are_never_saved(single_process, tmp_path):
    from hcustom_mc.checkpoint.integrity import CheckpointWriteError
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.model.config import get_model_config
    from hcustom_mc.training.checkpoint import save_checkpoint

    from hcustom_mc.model.init import initialize_weights

    model = HunyuanCustomDiT(get_model_config("tiny"))
    initialize_weights(model, seed=0, zero_init=False)  # parameters start uninitialised (torch.empty)
    save_checkpoint(tmp_path, 4, [model], None, None, {}, keep_last=1)
    with torch.no_grad():
        model.final_layer.linear.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointWriteError, match=r"refusing to save step 5 .*final_layer\.linear\.weight"):
        save_checkpoint(tmp_path, 5, [model], None, None, {}, keep_last=1)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000004"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter")) == ["iter_0000004"]


# ----------------------------------------------------------------------------- item 9: --save and write errors
def test_save_folder_checked_up_front(tmp_path, monkeypatch):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training import save_lock

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        save_lock.check_save_folder(tmp_path / "file", 10)
    with pytest.raises(ConfigError, match=r"disk has .* free, one checkpoint needs about 1.0 TB"):
        save_lock.check_save_folder(tmp_path / "ok", 10**12)
    monkeypatch.setattr(save_lock.os, "access", lambda *a: False)  # root ignores mode bits: pretend read-only
    with pytest.raises(ConfigError, match="permission denied"):
        save_lock.check_save_folder(tmp_path / "ro" / "ck", 10)


def test_save_that_is_a_file_fails_at_start(tmp_path):
    (tmp_path / "file").write_text("x")
    out = run_python(*TRAIN, "--train-iters", 2, "--save", tmp_path / "file", "--run-dir", tmp_path / "run", expect_ok=False)
    assert f"--save {tmp_path / 'file'} is a file, not a folder" in out and "step 1/" not in out


def test_disk_full_is_said_plainly():
    from torch.distributed.checkpoint.api import CheckpointException

    from hcustom_mc.checkpoint.integrity import CheckpointWriteError, write_errors_explained

    import traceback

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ck/__0_0.distcp")
    wrapped = CheckpointException("save failed", {0: (full, traceback.StackSummary())})  # as torch wraps it
    with pytest.raises(CheckpointWriteError, match=r"the disk is full .*No space left on device: /ck/__0_0.distcp"):
        with write_errors_explained(Path("/ck")):
            raise wrapped
    with pytest.raises(CheckpointWriteError, match="permission denied"):
        with write_errors_explained(Path("/ck")):
            raise PermissionError(errno.EACCES, "Permission denied", "/ck/x")
    with pytest.raises(KeyError):  # anything else is left alone
        with write_errors_explained(Path("/ck")):
            raise KeyError("bug")
