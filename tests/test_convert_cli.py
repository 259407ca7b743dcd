"""The convert and compare command lines, end to end on tiny checkpoints."""

import subprocess
import sys

import pytest
import torch

from tests.torchrun import REPO, child_pythonpath, torchrun

MODEL_FILE = "mp_rank_00_model_states.pt"


def run(*args, expect=0):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": child_pythonpath()})
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def convert(src, src_fmt, dst, dst_fmt, *extra, nproc=1, expect=0):
    args = ["--src", src, "--src-format", src_fmt, "--dst", dst, "--dst-format", dst_fmt, "--model-config", "tiny", *extra]
    if nproc == 1:
        return run("-m", "hcustom_mc.checkpoint.convert", *args, expect=expect)
    return torchrun(nproc, "-m", "hcustom_mc.checkpoint.convert", *args)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "diffusers"
    run("examples/make_tiny_diffusers.py", out, "--seed", "3")
    return out


@pytest.fixture(scope="module")
def release_dir(diffusers_dir):
    out = diffusers_dir.parent / "release"
    convert(diffusers_dir, "diffusers", out, "release")
    return out


def _load(path):
    return torch.load(path / MODEL_FILE, weights_only=True)["module"]


def _assert_bit_exact(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tp, pp", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_release_mcore_release_is_bit_exact(release_dir, tmp_path, tp, pp):
    mcore = tmp_path / "mcore"
    convert(release_dir, "release", mcore, "mcore", "--tp", tp, "--pp", pp, nproc=tp * pp)
    convert(mcore, "mcore", tmp_path / "back", "release")  # read back at TP=1, PP=1
    _assert_bit_exact(_load(release_dir), _load(tmp_path / "back"))
    if pp == 1:  # and written again from the mcore checkpoint by a 2-stage pipeline
        convert(mcore, "mcore", tmp_path / "back_pp", "release", "--pp", 2, nproc=2)
        _assert_bit_exact(_load(release_dir), _load(tmp_path / "back_pp"))


def test_diffusers_release_diffusers_is_bit_exact(diffusers_dir, release_dir, tmp_path):
    from safetensors.torch import load_file

    convert(release_dir, "release", tmp_path / "diffusers", "diffusers")
    a = load_file(diffusers_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    _assert_bit_exact(a, b)


def test_compare_passes_on_conversion_and_fails_on_tampering(diffusers_dir, release_dir, tmp_path):
    out = run("-m", "hcustom_mc.checkpoint.compare", "--reference-diffusers", diffusers_dir,
              "--ckpt", release_dir, "--ckpt-format", "release")
    assert "OK" in out
    sd = _load(release_dir)
    sd["single_blocks.1.linear2.weight"][0, 0] += 0.05
    (tmp_path / "tampered").mkdir()
    torch.save({"module": sd}, tmp_path / "tampered" / MODEL_FILE)
    out = run("-m", "hcustom_mc.checkpoint.compare", "--reference-diffusers", diffusers_dir,
              "--ckpt", tmp_path / "tampered", "--ckpt-format", "release", expect=1)
    assert "MISMATCH" in out


@pytest.mark.slow
def test_compare_mcore_at_tp2(diffusers_dir, release_dir, tmp_path):
    convert(release_dir, "release", tmp_path / "mcore", "mcore")
    out = torchrun(2, "-m", "hcustom_mc.checkpoint.compare", "--reference-diffusers", diffusers_dir,
                   "--ckpt", tmp_path / "mcore", "--ckpt-format", "mcore", "--tp", 2)
    assert "OK" in out
    assert f"{tmp_path / 'mcore'} (mcore) at TP 2 vs diffusers: max abs difference" in out  # which run said OK


def test_checkpoint_with_wrong_keys_lists_them(release_dir, tmp_path):
    sd = _load(release_dir)
    del sd["double_blocks.0.img_attn_qkv.bias"]
    sd["double_blocks.0.extra.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    torch.save({"module": sd}, tmp_path / "bad" / MODEL_FILE)
    out = convert(tmp_path / "bad", "release", tmp_path / "out", "mcore", expect=2)
    assert "missing keys (1): ['double_blocks.0.img_attn_qkv.bias']" in out
    assert "unexpected keys (1): ['double_blocks.0.extra.weight']" in out
    assert not (tmp_path / "out").exists()


def test_wrong_variant_and_missing_checkpoint(release_dir, tmp_path):
    out = convert(release_dir, "release", tmp_path / "out", "release", "--variant", "audio", expect=2)
    assert "missing keys" in out and "audio_proj.proj1.weight" in out
    out = convert(tmp_path / "nowhere", "release", tmp_path / "out2", "release", expect=2)  # a usage error: exit 2
    assert "does not exist" in out and len(out.splitlines()) < 10


def test_tp_without_processes_is_refused(release_dir, tmp_path):
    out = convert(release_dir, "release", tmp_path / "out", "mcore", "--tp", 2, expect=2)
    assert "needs that many processes" in out


def _wider_config(tmp_path):
    from hcustom_mc.model.config import get_model_config

    cfg = get_model_config("tiny").to_dict()
    cfg.update(hidden_size=2 * cfg["hidden_size"], num_heads=2 * cfg["num_heads"])  # same head dim: a valid config
    path = tmp_path / "wider.json"
    path.write_text(__import__("json").dumps(cfg))
    return path


def test_a_config_that_does_not_fit_is_named_not_called_damage(release_dir, tmp_path):
    wider = _wider_config(tmp_path)
    mcore = tmp_path / "mcore"
    convert(release_dir, "release", mcore, "mcore")
    for src, fmt in ((release_dir, "release"), (mcore, "mcore")):
        args = ["--src", src, "--src-format", fmt, "--dst", tmp_path / f"out_{fmt}", "--dst-format", "release",
                "--model-config", wider]
        out = run("-m", "hcustom_mc.checkpoint.convert", *args, expect=2)
        error = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"does not fit --model-config {wider}" in error[0], out[-3000:]
        assert "damaged" not in out and "Traceback" not in out, out[-3000:]
        assert "img_attn_proj" in out  # the shapes that differ, a few of them


def test_a_new_mcore_folder_gets_no_overwrite_warning(release_dir, tmp_path):
    out = convert(release_dir, "release", tmp_path / "mcore", "mcore")
    assert "Overwriting old incomplete" not in out
