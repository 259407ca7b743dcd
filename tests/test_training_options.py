"""Training options on one process: recomputation changes nothing, bf16 runs, --trainable new trains
only the new modules."""

import json
import subprocess
import sys

import pytest
import torch

from tests.test_training_runs import ENV, REPO, run


def history(d):
    return json.loads((d / "history.json").read_text())


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    run(1, "--train-iters", 2, "--run-dir", d)
    return history(d)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_the_same_step(plain, tmp_path, granularity):
    run(1, "--train-iters", 2, "--recompute-granularity", granularity, "--run-dir", tmp_path)
    got = history(tmp_path)
    assert got["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert got["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-6)


def test_bf16_trains_close_to_fp32(plain, tmp_path):
    run(1, "--train-iters", 2, "--bf16", "--run-dir", tmp_path)
    got = history(tmp_path)
    assert got["losses"] == pytest.approx(plain["losses"], rel=5e-2)


def _release_weights(ckpt_dir, out):
    proc = subprocess.run([sys.executable, "-m", "hcustom_mc.checkpoint.convert", "--src", str(ckpt_dir),
                           "--src-format", "mcore", "--dst", str(out), "--dst-format", "release", "--model-config",
                           "tiny", "--variant", "audio"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "mp_rank_00_model_states.pt", weights_only=True)["module"]


@pytest.mark.slow
def test_trainable_new_updates_only_new_modules(tmp_path):
    args = ["--train-iters", 2, "--trainable", "new", "--set", "data.task_weights={audio: 1.0}"]
    run(1, *args, "--save", tmp_path / "a", "--run-dir", tmp_path / "ra")
    run(1, *args, "--lr", 0.0, "--min-lr", 0.0, "--save", tmp_path / "b", "--run-dir", tmp_path / "rb")
    trained = _release_weights(tmp_path / "a" / "iter_0000002", tmp_path / "wa")
    untouched = _release_weights(tmp_path / "b" / "iter_0000002", tmp_path / "wb")
    changed = {k for k in trained if not torch.equal(trained[k], untouched[k])}
    assert changed and all(k.startswith(("audio_proj.", "audio_models.")) for k in changed), sorted(changed)[:5]


def test_yaml_exponent_floats_are_floats(tmp_path):
    """`lr: 1e-5` (no dot) is a float in our configs, as users write it, not PyYAML's string '1e-5'."""
    from hcustom_mc.model.config import load_yaml
    from hcustom_mc.training.config import build_config

    assert load_yaml("a: 1e-5\nb: -2E+3\nc: 1.5\nd: 7\ne: '1e-5'\nf: 1e5x") == {
        "a": 1e-5, "b": -2000.0, "c": 1.5, "d": 7, "e": "1e-5", "f": "1e5x"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 5e-06\n  min_lr: 1e-7\n")
    cfg = build_config(["--config", str(recipe), "--set", "optim.weight_decay=1e-2"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (5e-06, 1e-7, 1e-2)
