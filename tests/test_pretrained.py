"""--pretrained: weights-only init from release, diffusers and mcore sources at any layout.

The first training step's loss (computed before the optimizer moves anything) must equal the same batch's
loss from one process whose model was filled by `load_release_state_dict` + `load_full_state_dict`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun import REPO, child_pythonpath, torchrun

BASE = ["--config", "examples/tiny_3d.yaml", "--train-iters", "1", "--set", "checkpoint.save_interval=0",
        "--set", "logging.log_interval=1"]
BASE_VARIANT = ["--variant", "base", "--set", "data.task_weights={t2v: 1.0, identity: 1.0}"]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": child_pythonpath()}


def _python(*args, expect_ok=True):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def first_loss(nproc, run_dir, *args) -> float:
    argv = [*BASE, "--run-dir", str(run_dir), *map(str, args)]
    if nproc == 1:
        _python("pretrain_custom.py", *argv)
    else:
        torchrun(nproc, "pretrain_custom.py", *argv)
    return json.loads((run_dir / "history.json").read_text())["losses"][0]


def reference(tmp_path, release_file, *args) -> float:
    out = tmp_path / "reference.json"
    _python("tests/dist_scripts/pretrained_reference.py", release_file, out, *BASE, *map(str, args))
    return json.loads(out.read_text())["loss"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, single_process):
    """Random (non-zero-init) tiny models in every source format."""
    from hcustom_mc.checkpoint.diffusers_format import release_to_diffusers, save_diffusers_folder
    from hcustom_mc.checkpoint.mcore import save_mcore_checkpoint
    from hcustom_mc.checkpoint.release import save_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights

    root = tmp_path_factory.mktemp("sources")
    out = {}
    for variant in ("audio", "base"):
        cfg = get_model_config("tiny", variant)
        model = HunyuanCustomDiT(cfg)
        initialize_weights(model, seed=7, zero_init=False)
        sd = model.weight_state_dict()
        out[f"release_{variant}"] = save_release_state_dict(sd, root / f"{variant}.pt")
        if variant == "audio":
            save_mcore_checkpoint(model, root / "mcore_audio", cfg)
            out["mcore_audio"] = root / "mcore_audio"
        else:
            save_diffusers_folder(sd, cfg, root / "diffusers_base")
            out["diffusers_base"] = root / "diffusers_base"
    return out


@pytest.mark.parametrize("nproc,layout", [(1, []), pytest.param(4, ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2],
                                                                  marks=pytest.mark.slow)],
                         ids=["tp1", "tp2_pp2"])
def test_release_source_first_loss(sources, tmp_path, nproc, layout):
    want = reference(tmp_path, sources["release_audio"])
    got = first_loss(nproc, tmp_path / "run", "--pretrained", sources["release_audio"], *layout)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


@pytest.mark.slow
def test_mcore_source_first_loss(sources, tmp_path):
    want = reference(tmp_path, sources["release_audio"])
    got = first_loss(2, tmp_path / "run", "--pretrained", sources["mcore_audio"], "--pipeline-model-parallel-size", 2)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_diffusers_base_into_audio_model(sources, tmp_path):
    """Base (diffusers) -> audio variant: AudioNet initialised fresh, as the release initialises it."""
    want = reference(tmp_path, sources["release_base"])
    got = first_loss(2, tmp_path / "run", "--pretrained", sources["diffusers_base"], "--pretrained-allow-missing",
                     "audio_", "--tensor-model-parallel-size", 2)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_missing_modules_refused_with_the_full_list(sources, tmp_path):
    proc = _python("pretrain_custom.py", *BASE, "--run-dir", tmp_path, "--pretrained", sources["release_base"],
                   expect_ok=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "missing keys" in err and "audio_models.0.to_q.weight" in err and "audio_proj." in err, err[-3000:]
    assert "--pretrained-allow-missing audio_models. audio_proj." in err
    assert not (tmp_path / "history.json").exists()


def test_shape_mismatch_and_unexpected_keys_refused(sources, tmp_path):
    from hcustom_mc.checkpoint.release import load_release_state_dict, save_release_state_dict

    sd = dict(load_release_state_dict(sources["release_audio"]))
    sd["img_in.proj.bias"] = torch.zeros(3)
    sd["not_a_module.weight"] = torch.zeros(1)
    bad = save_release_state_dict(sd, tmp_path / "bad.pt")
    proc = _python("pretrain_custom.py", *BASE, "--run-dir", tmp_path / "r", "--pretrained", bad, expect_ok=False)
    assert "shape mismatches (1): ['img_in.proj.bias: source (3,)" in proc.stderr
    assert "unexpected keys (1): ['not_a_module.weight']" in proc.stderr


def test_detect_format(sources, tmp_path):
    from hcustom_mc.checkpoint.pretrained import PretrainedError, detect_format

    assert detect_format(sources["release_audio"]) == "release"
    assert detect_format(sources["mcore_audio"]) == "mcore"
    assert detect_format(sources["diffusers_base"]) == "diffusers"
    (tmp_path / "latest").write_text("iter_0000001\n")
    with pytest.raises(PretrainedError, match="training --save folder"):
        detect_format(tmp_path)
    with pytest.raises(PretrainedError, match="does not exist"):
        detect_format(tmp_path / "nope")


@pytest.mark.slow
def test_finetune_tiny_demo(tmp_path):
    """examples/finetune_tiny.sh from another directory: release checkpoint -> --pretrained -> EMA sample;
    a second run into the same ROOT is refused and leaves it as it was."""
    root = tmp_path / "ft"
    from tests.torchrun import _free_port

    # the scripts call `python` and `torchrun`: this interpreter's
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = {**ENV, "PATH": path, "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(["bash", str(REPO / "examples" / "finetune_tiny.sh"), str(root)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "initialised fresh (22)" in proc.stderr and "weights from release" in proc.stderr
    assert (root / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert len(list((root / "samples").glob("*.mp4"))) == 3
    assert "tiny random encoders: the pictures are meaningless" in proc.stdout
    again = subprocess.run(["bash", str(REPO / "examples" / "finetune_tiny.sh"), str(root)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
    assert (root / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
