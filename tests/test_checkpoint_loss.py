"""No checkpoint lost (issue 20): pruning keeps only sound checkpoints (item 1), the default verification
catches same-size damage (item 2), a folder that lost its manifest is not loaded silently (item 3), a full
disk during a save is one line and leaves nothing behind (item 4), and the save lock is never seen empty
(item 8)."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.test_checkpoint_integrity import TRAIN, ck, saved  # noqa: F401  (fixtures: iter_1..3 of a tiny run)
from tests.test_checkpoint_integrity import _flip_bit as _flip_byte
from tests.torchrun import run_python


def _zero_block(path: Path) -> None:
    """A 4 KiB block of zeros in the middle of the file (the size stays the same)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 2048)
    data[start:start + 4096] = bytes(min(4096, len(data) - start))
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _iters(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_"))


# ----------------------------------------------------------------------------- item 1: pruning after a fallback
@pytest.mark.parametrize("keep_last,damage", [pytest.param(1, _truncate, marks=pytest.mark.slow), (2, _zero_block)],
                         ids=["keep1-truncated", "keep2-zeroed"])  # the default run keeps one: both damages are read alike
def test_pruning_after_a_fallback_keeps_sound_checkpoints(ck, tmp_path, keep_last, damage):
    # iter_1 sound, iter_2 gone, iter_3 (and for keep-last 2 also iter_4) damaged: the run falls back to iter_1,
    # trains and saves iter_2; pruning used to keep the damaged newest folders and delete iter_1 and iter_2
    shutil.rmtree(ck / "iter_0000002")
    damage(ck / "iter_0000003" / "__0_0.distcp")
    damaged = ["iter_0000003"]
    if keep_last == 2:
        shutil.copytree(ck / "iter_0000003", ck / "iter_0000004")
        (ck / "latest").write_text("iter_0000004\n")
        damaged.append("iter_0000004")
    out = run_python(*TRAIN, "--train-iters", 4, "--override-schedule", "--exit-after-iters", 1, "--load", ck, "--save", ck,
                     "--save-interval", 1, "--keep-last", keep_last, "--run-dir", tmp_path / "a")
    assert "loaded checkpoint " + str(ck / "iter_0000001") in out, out[-3000:]
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    # the one just written and the one loaded are kept; the damaged ones are moved aside and said so
    assert _iters(ck) == ["iter_0000001", "iter_0000002"] + [f"{d}.damaged" for d in damaged]
    for d in damaged:
        assert f"checkpoint {ck / d} is damaged" in out and f"moved aside to {d}.damaged" in out
    from hcustom_mc.checkpoint.integrity import verify_folder

    assert verify_folder(ck / "iter_0000002", "full") == []
    # a restart resumes from `latest`
    out = run_python(*TRAIN, "--train-iters", 4, "--override-schedule", "--exit-after-iters", 1, "--load", ck,
                     "--save", ck, "--save-interval", 1, "--keep-last", keep_last, "--run-dir", tmp_path / "b")
    assert "loaded checkpoint " + str(ck / "iter_0000002") in out and (ck / "latest").read_text().strip() == "iter_0000003"
    assert (ck / "iter_0000002").is_dir() and (ck / "iter_0000003").is_dir()


def test_prune_never_counts_or_deletes_wrongly(ck, caplog):
    """In process: damaged folders are moved aside (not counted), the loaded and the written ones stay, older
    sound ones beyond --keep-last go, and `latest` names an existing folder."""
    import logging

    from hcustom_mc.training.checkpoint import _prune

    for n in (4, 5):
        shutil.copytree(ck / "iter_0000003", ck / f"iter_000000{n}")
    _truncate(ck / "iter_0000005" / "__0_0.distcp")  # newest, damaged
    (ck / "iter_0000004" / "manifest.json").unlink()  # lost its manifest: unverified, not a keeper
    (ck / "latest").write_text("iter_0000003\n")
    with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
        _prune(ck, 1, ck / "iter_0000003", loaded=ck / "iter_0000001")
    assert _iters(ck) == ["iter_0000001", "iter_0000003", "iter_0000004", "iter_0000005.damaged"]
    assert "iter_0000005 is damaged" in caplog.text and "truncated" in caplog.text
    assert (ck / (ck / "latest").read_text().strip()).is_dir()


# ----------------------------------------------------------------------------- item 2: default verification
FILES = {"distcp": "__0_0.distcp", "metadata": ".metadata", "rng": "rng/rank00000.pt", "common.pt": "common.pt"}


@pytest.mark.parametrize("damage", [_zero_block, _flip_byte], ids=["zeroed-4KiB", "flipped-byte"])
@pytest.mark.parametrize("which", FILES)
def test_default_verification_catches_same_size_damage(ck, caplog, which, damage):
    import logging

    from hcustom_mc.checkpoint.integrity import STATE_FILE, select_checkpoint

    target = ck / "iter_0000003" / FILES[which]
    if not target.exists():
        pytest.skip(f"this megatron-core writes no {FILES[which]}")
    size = target.stat().st_size
    damage(target)
    assert target.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
        chosen = select_checkpoint(ck, complete=STATE_FILE)  # the default mode
    assert chosen == ck / "iter_0000002"
    assert f"{target}: sha256 mismatch" in caplog.text


def test_default_verification_in_every_entry_point():
    from hcustom_mc.checkpoint import compare, convert, lora
    from hcustom_mc.checkpoint.verify_modes import VERIFY_HELP
    from hcustom_mc.sample import parse_args
    from hcustom_mc.training.config import TrainConfig

    assert TrainConfig().checkpoint.verify == "full"
    assert parse_args(["--checkpoint", "x"]).verify_checkpoint == "full"
    assert "s per GB" in VERIFY_HELP  # the measured cost is in --help
    for module in (compare, convert, lora):
        assert 'default="size"' not in Path(module.__file__).read_text()


def test_training_falls_back_from_a_flipped_byte_by_default(ck, tmp_path):
    _flip_byte(ck / "iter_0000003" / "__0_0.distcp")
    out = run_python(*TRAIN, "--train-iters", 4, "--override-schedule", "--load", ck, "--run-dir", tmp_path / "a")
    assert "loaded checkpoint " + str(ck / "iter_0000002") in out and "sha256 mismatch" in out, out[-3000:]


# ----------------------------------------------------------------------------- item 3: no manifest
def test_folder_without_its_manifest_is_not_loaded_silently(ck, caplog):
    import logging

    from hcustom_mc.checkpoint.integrity import STATE_FILE, select_checkpoint
    from hcustom_mc.checkpoint.safe_load import CheckpointReadError, preflight

    (ck / "iter_0000003" / "manifest.json").unlink()
    _flip_byte(ck / "iter_0000003" / "__0_0.distcp")
    for mode in ("full", "size"):
        with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
            assert select_checkpoint(ck, mode, complete=STATE_FILE) == ck / "iter_0000002"
        assert "no manifest.json" in caplog.text and "--verify-checkpoint off" in caplog.text
        with pytest.raises(CheckpointReadError, match="--verify-checkpoint off"):
            select_checkpoint(ck / "iter_0000003", mode, complete=STATE_FILE)
    # asked for explicitly: loaded unverified
    assert select_checkpoint(ck / "iter_0000003", "off", complete=STATE_FILE) == ck / "iter_0000003"
    # a truncated file under it is named by file: with fallback, and by the loader's preflight when asked for
    _truncate(ck / "iter_0000003" / "__0_0.distcp")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
        assert select_checkpoint(ck, "full", complete=STATE_FILE) == ck / "iter_0000002"
    assert f"{ck / 'iter_0000003' / '__0_0.distcp'} has 100 bytes, its .metadata needs" in caplog.text
    with pytest.raises(CheckpointReadError, match=r"__0_0\.distcp has 100 bytes"):
        preflight(ck / "iter_0000003")


def test_training_does_not_load_a_folder_without_manifest(ck, tmp_path):
    (ck / "iter_0000003" / "manifest.json").unlink()
    out = run_python(*TRAIN, "--train-iters", 4, "--override-schedule", "--load", ck / "iter_0000003",
                     "--run-dir", tmp_path / "a", expect_ok=False)
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no manifest.json" in out and "--verify-checkpoint off" in out, out[-3000:]
    assert "Traceback" not in out


# ----------------------------------------------------------------------------- item 4: disk full
# pretrain_custom.py with the checkpoint writer failing the way torch's zip writer fails on a full disk (the
# errno is lost), and the disk reporting almost no room from then on
_FULL_DISK = """
import functools, os, runpy, shutil, sys
import megatron.core.dist_checkpointing.strategies.filesystem_async as fa
real_usage, real_write, mark = shutil.disk_usage, fa._write_item, os.environ["FULL_MARK"]
def usage(path):
    u = real_usage(path)
    return u._replace(free=1000) if os.path.exists(mark) else u
@functools.wraps(real_write)
def write_item(*args, **kwargs):
    if any("iter_0000002.tmp" in str(getattr(a, "name", "")) for a in args):  # the stream of step 2's file
        open(mark, "w").close()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return real_write(*args, **kwargs)
fa._write_item, shutil.disk_usage = write_item, usage
sys.argv = ["pretrain_custom.py", *sys.argv[1:]]
runpy.run_path("pretrain_custom.py", run_name="__main__")
"""


def test_disk_full_during_a_save_is_one_line_and_leaves_nothing(tmp_path):
    ck = tmp_path / "ck"
    out = run_python("-c", _FULL_DISK, *TRAIN[1:], "--train-iters", 3, "--save-interval", 1, "--save", ck,
                     "--run-dir", tmp_path / "a", expect_ok=False, env={"FULL_MARK": str(tmp_path / "full")})
    errors = [ln for ln in out.splitlines() if "disk full" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: disk full: cannot write checkpoint "), out[-3000:]
    assert str(ck / "iter_0000002.tmp") in errors[0] and "bytes)" in errors[0] and "Traceback" not in out
    assert not list(ck.glob("*.tmp")) and (ck / "latest").read_text().strip() == "iter_0000001"
    out = run_python(*TRAIN, "--train-iters", 3, "--save-interval", 1, "--load", ck, "--save", ck, "--run-dir", tmp_path / "b")
    assert "loaded checkpoint " + str(ck / "iter_0000001") in out and (ck / "latest").read_text().strip() == "iter_0000003"


def test_save_checks_free_space_before_writing(single_process, tmp_path, monkeypatch):
    import shutil as sh

    from hcustom_mc.checkpoint.integrity import CheckpointWriteError
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.model.config import get_model_config
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.training import checkpoint

    model = HunyuanCustomDiT(get_model_config("tiny"))
    initialize_weights(model, seed=0, zero_init=False)
    checkpoint.save_checkpoint(tmp_path, 1, [model], None, None, {}, keep_last=1)
    real = sh.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    written = []
    monkeypatch.setattr("megatron.core.dist_checkpointing.save", lambda *a, **k: written.append(1))
    with pytest.raises(CheckpointWriteError, match=r"^disk full: cannot write checkpoint .*iter_0000002\.tmp.*"
                                                   r"it needs about .* \(\d+ bytes\)") as err:
        checkpoint.save_checkpoint(tmp_path, 2, [model], None, None, {}, keep_last=1)
    assert "\n" not in str(err.value) and not written
    assert _iters(tmp_path) == ["iter_0000001"] and (tmp_path / "latest").read_text().strip() == "iter_0000001"


def test_stale_tmp_of_a_killed_save_is_removed_at_the_next_start(tmp_path):
    ck = tmp_path / "ck"
    run_python(*TRAIN, "--train-iters", 3, "--save-interval", 1, "--save", ck, "--run-dir", tmp_path / "a",
               env={"HCUSTOM_FAULT_KILL_IN_SAVE": "2"}, expect_ok=False)
    assert (ck / "iter_0000002.tmp").is_dir() and (ck / "latest").read_text().strip() == "iter_0000001"
    out = run_python(*TRAIN, "--train-iters", 3, "--save-interval", 1, "--load", ck, "--save", ck,
                     "--run-dir", tmp_path / "b")
    assert f"removed {ck / 'iter_0000002.tmp'}" in out and "unfinished save" in out, out[-3000:]
    assert not (ck / "iter_0000002.tmp").exists()


# ----------------------------------------------------------------------------- item 8: the lock in one step
def test_lock_is_never_seen_empty(tmp_path, monkeypatch):
    """A slow lock write (the content takes 0.5 s to produce): a second job arriving meanwhile must not find an
    empty lock and take it over as stale. Exactly one of the two holds the lock."""
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training import save_lock

    real_dumps = save_lock.json.dumps
    slow = threading.Event()

    def dumps(obj, *a, **k):
        if not slow.is_set():
            slow.set()
            time.sleep(0.5)
        return real_dumps(obj, *a, **k)

    monkeypatch.setattr(save_lock.json, "dumps", dumps)
    results = {}

    def take(name):
        try:
            lock = save_lock.SaveLock(tmp_path)
            lock.acquire()
            results[name] = lock
        except ConfigError as exc:
            results[name] = exc

    first = threading.Thread(target=take, args=("first",))
    first.start()
    slow.wait(5)
    time.sleep(0.1)
    take("second")
    first.join()
    held = [r for r in results.values() if isinstance(r, save_lock.SaveLock)]
    try:
        assert len(held) == 1, results
        assert json.loads((tmp_path / save_lock.LOCK_FILE).read_text())["pid"] == held[0].me["pid"]
    finally:
        for lock in held:
            lock.release()
