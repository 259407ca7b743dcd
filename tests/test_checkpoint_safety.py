"""Loading a megatron-core checkpoint never runs code stored in it (issue 13, item 1), and damaged checkpoint
files are named (item 9): the restricted `.metadata` unpickler, weights_only everywhere else, at every entry
point that reads checkpoints (training --load, convert --src-format mcore, sample --checkpoint, compare)."""

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import mcore_writes_common_pt
from tests.torchrun import REPO, run_python


class _Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-step training checkpoint (model + optimizer), tiny encoders, and a tiny diffusers folder."""
    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.model.config import get_model_config

    root = tmp_path_factory.mktemp("safety")
    run_python("pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--train-iters", 2, "--save", root / "ck",
               "--run-dir", root / "run", expect_ok=True)
    save_tiny_encoders(root / "enc", get_model_config("tiny", "audio"))
    run_python("examples/make_tiny_diffusers.py", root / "diffusers", "--seed", 3, expect_ok=True)
    return root


def _poisoned(setup, tmp_path, which: str) -> tuple[Path, Path]:
    """A copy of the save folder whose checkpoint has a code-running `.metadata` or `common.pt`."""
    ck = tmp_path / "ck"
    shutil.copytree(setup / "ck", ck)
    folder = ck / "iter_0000002"
    marker = tmp_path / "PWNED"
    if which == ".metadata":
        # a real Metadata object carrying the payload, so the first globals the reader meets are legitimate
        from torch.distributed.checkpoint.metadata import Metadata

        meta = pickle.loads((folder / ".metadata").read_bytes())
        assert isinstance(meta, Metadata)
        meta.planner_data = _Payload(marker)
        (folder / ".metadata").write_bytes(pickle.dumps(meta))
    else:  # 0.19 saves no common.pt but reads one it finds: planting it there is the attack
        common = torch.load(folder / "common.pt", weights_only=True) if mcore_writes_common_pt() else {}
        common["extra"] = _Payload(marker)
        torch.save(common, folder / "common.pt")
    return ck, marker


ENTRY_POINTS = {
    "training --load": lambda s, ck, t: ("pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--train-iters", 3, "--override-schedule",
                                         "--load", ck, "--verify-checkpoint", "off", "--run-dir", t / "run"),
    "convert --src-format mcore": lambda s, ck, t: ("-m", "hcustom_mc.checkpoint.convert", "--src", ck / "iter_0000002",
                                                    "--src-format", "mcore", "--dst", t / "out", "--dst-format", "release",
                                                    "--model-config", "tiny", "--variant", "audio",
                                                    "--verify-checkpoint", "off"),
    "sample --checkpoint": lambda s, ck, t: ("-m", "hcustom_mc.sample", "--checkpoint", ck, "--encoders-dir", s / "enc",
                                             "--task", "t2v", "--prompt", "A circle.", "--height", 32, "--width", 48,
                                             "--frames", 5, "--steps", 1, "--out", t / "out", "--no-progress",
                                             "--verify-checkpoint", "off"),
    "compare": lambda s, ck, t: ("-m", "hcustom_mc.checkpoint.compare", "--reference-diffusers", s / "diffusers",
                                 "--ckpt", ck / "iter_0000002", "--ckpt-format", "mcore", "--verify-checkpoint", "off"),
}


@pytest.mark.parametrize("which", [".metadata", "common.pt"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_malicious_checkpoint_runs_no_code(setup, tmp_path, entry, which):
    # verification off: the unpickler itself must refuse (with the manifest, the changed size is caught first)
    ck, marker = _poisoned(setup, tmp_path, which)
    out = run_python(*ENTRY_POINTS[entry](setup, ck, tmp_path), expect_ok=False)
    assert not marker.exists(), f"{entry}: code in {which} ran"
    assert f"refusing to load {ck / 'iter_0000002' / which}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_malicious_metadata_caught_by_the_manifest_first(setup, tmp_path):
    ck, marker = _poisoned(setup, tmp_path, ".metadata")
    out = run_python("-m", "hcustom_mc.checkpoint.convert", "--src", ck / "iter_0000002", "--src-format", "mcore",
                     "--dst", tmp_path / "out", "--dst-format", "release", "--model-config", "tiny", "--variant", "audio", expect_ok=False)
    assert not marker.exists()
    assert "fails verification" in out and ".metadata has" in out, out[-3000:]


# ----------------------------------------------------------------------------- the readers, in process
def test_allowlist_reads_real_metadata_exactly(setup):
    from hcustom_mc.checkpoint.safe_load import load_metadata_file

    path = setup / "ck" / "iter_0000002" / ".metadata"
    assert load_metadata_file(path) == pickle.loads(path.read_bytes())


def test_patched_torch_and_megatron_readers_refuse_payloads(setup, tmp_path):
    """Not only our preflight: the readers megatron and torch call themselves are safe after install."""
    from megatron.core.dist_checkpointing.strategies import common as mcore_common
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from hcustom_mc.checkpoint.safe_load import UnsafeCheckpointError, install_safe_readers

    install_safe_readers()
    marker = tmp_path / "PWNED"
    for which in (".metadata", "common.pt"):
        ck, marker = _poisoned(setup, tmp_path / which.strip("."), which)
        folder = ck / "iter_0000002"
        with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
            if which == ".metadata":
                FileSystemReader(str(folder)).read_metadata()
            elif hasattr(mcore_common, "TorchCommonLoadStrategy"):  # megatron-core 0.16
                mcore_common.TorchCommonLoadStrategy().load_common(folder)
            else:  # 0.19: a module function, reading through maybe_msc.torch
                mcore_common.load_common(folder)
        assert not marker.exists()
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    planner = DefaultLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}

    class Item:
        class dest_index:
            fqn = "x"

    with pytest.raises(UnsafeCheckpointError):
        planner.load_bytes(Item, buf)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not utf-8", "empty"])
@pytest.mark.parametrize("name", [".metadata", "common.pt", "metadata.json", "train_state.json"])
def test_damaged_files_are_named(setup, tmp_path, name, damage):
    from hcustom_mc.checkpoint.safe_load import CheckpointReadError, preflight, read_json

    folder = tmp_path / "iter_0000002"
    shutil.copytree(setup / "ck" / "iter_0000002", folder)
    if name == "common.pt" and not mcore_writes_common_pt():  # 0.19 reads a legacy common.pt it finds
        torch.save({"step": 2}, folder / name)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x04garbage" * 7,
                                 "not utf-8": b"\xff\xfe\x00bad", "empty": b""}[damage])
    with pytest.raises(CheckpointReadError) as err:
        if name == "train_state.json":
            read_json(folder / name)
        else:
            preflight(folder)
    assert str(folder / name) in str(err.value)
    assert "damaged" in str(err.value) or "not megatron-core" in str(err.value)


def test_damaged_training_checkpoint_is_named_on_load(setup, tmp_path):
    """Raw EOFError / JSONDecodeError tracebacks were seen here: the message names the file instead."""
    ck = tmp_path / "ck"
    shutil.copytree(setup / "ck", ck)
    (ck / "iter_0000002" / "train_state.json").write_text('{"step": 2, ')
    out = run_python("pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--train-iters", 3, "--override-schedule", "--load",
                     ck / "iter_0000002", "--verify-checkpoint", "off", "--run-dir", tmp_path / "run", expect_ok=False)
    assert f"cannot read {ck / 'iter_0000002' / 'train_state.json'} (JSONDecodeError" in out, out[-3000:]
    assert "Traceback" not in out
