"""LoRA adapters (hcustom_mc/model/lora.py): frozen base, zero-start, merge == live, and LoRA training under
TP2, PP2, CP2 and TP2 x PP2 equal to the single-process run."""

import pytest
import torch

from tests.conftest import tiny_inputs
from tests.torchrun import REPO, child_pythonpath
from tests.test_training_parity import train

LORA = ["--lora-rank", 4, "--lora-alpha", 8]


def _model(rank=4):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.model.lora import apply_lora

    cfg = get_model_config("tiny", "audio")
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=3, zero_init=False)
    inputs = tiny_inputs(cfg, seed=1)
    base_out = model(**inputs).detach()
    names = apply_lora(model, rank=rank, alpha=2.0 * rank)
    return model, inputs, base_out, names


def test_adapters_start_as_identity_and_only_they_get_grads(single_process):
    from hcustom_mc.model.lora import is_lora_name

    model, inputs, base_out, names = _model()
    assert len(names) == 2 * 8 + 2 * 2  # tiny: 2 double blocks x 8 linears, 2 single blocks x 2
    torch.testing.assert_close(model(**inputs), base_out, rtol=0, atol=0)  # B = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_name(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    out = model(**inputs)
    assert (out - base_out).abs().max() > 1e-4
    (out.float() ** 2).mean().backward()
    for name, p in model.named_parameters():
        if is_lora_name(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert "double_blocks.0.img_attn_qkv.lora_A" in dict(model.named_parameters())


def test_merge_equals_live_adapters(single_process):
    from hcustom_mc.model.lora import merge_lora

    model, inputs, base_out, _ = _model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        live = model(**inputs)
        assert merge_lora(model) == 20
        merged = model(**inputs)
    assert (live - base_out).abs().max() > 1e-4
    torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-5)


def test_lora_targets_pattern(single_process):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.lora import apply_lora

    model = HunyuanCustomDiT(get_model_config("tiny", "base"))
    assert apply_lora(model, targets=["single_blocks.*.linear1"], rank=2) == ["single_blocks.0.linear1", "single_blocks.1.linear1"]


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    return train(1, tmp_path_factory.mktemp("lora_single"), *LORA)


def test_single_process_lora_trains_only_adapters(single_process, lora_reference):
    from hcustom_mc.model import get_model_config
    from hcustom_mc.model.lora import DEFAULT_TARGETS, match_targets
    from hcustom_mc.training.loop import whole_model

    whole = whole_model(get_model_config("tiny", "audio"))
    adapter = 0
    for name in match_targets(whole, DEFAULT_TARGETS):
        out_f, in_f = whole.get_submodule(name).weight.shape
        adapter += 4 * (in_f + out_f)
    assert lora_reference["trainable_numel"] == adapter
    assert lora_reference["optimizer_state_numel"] == 2 * adapter
    assert lora_reference["losses"][0] != lora_reference["losses"][-1]


LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", 2]),
    "pp2": (2, ["--pipeline-model-parallel-size", 2]),
    "cp2": (2, ["--context-parallel-size", 2, "--cp-comm-type", "ulysses"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", 2, "--virtual-pipeline-model-parallel-size", 2]),
    "cp2_ring": (2, ["--context-parallel-size", 2, "--cp-comm-type", "ring"]),
}


SLOW_LAYOUTS = {"pp2", "pp2_vpp2", "cp2_ring"}  # -m slow only (tp2_pp2 covers pp2 in the default run)


@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_LAYOUTS else k for k in LAYOUTS])
def test_lora_layout_equals_single_process(lora_reference, tmp_path, layout):
    nproc, args = LAYOUTS[layout]
    got = train(nproc, tmp_path, *LORA, *args)
    ref = lora_reference
    assert len(got["losses"]) == len(ref["losses"]) == 3
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"]), 1):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6, f"step {step} loss {a} != {b}"
    for step, (a, b) in enumerate(zip(got["grad_norms"], ref["grad_norms"]), 1):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6, f"step {step} grad norm {a} != {b}"


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def release_audio(tmp_path_factory):
    import subprocess
    import sys


    out = tmp_path_factory.mktemp("release")
    subprocess.run([sys.executable, "examples/make_tiny_release.py", str(out), "--variant", "audio", "--seed", "5"],
                   cwd=REPO, check=True, capture_output=True, env={"PYTHONPATH": child_pythonpath(), "PATH": "/usr/bin:/bin",
                                                                   "OMP_NUM_THREADS": "1"})
    return out / "mp_rank_00_model_states.pt"


def test_adapter_checkpoint_resumes_exactly_from_pretrained_and_is_small(release_audio, tmp_path):
    import json

    common = [*LORA, "--pretrained", release_audio, "--train-iters", 6]
    whole = train(1, tmp_path / "whole", *common)
    first = train(1, tmp_path / "a", *common, "--exit-after-iters", 3, "--save", tmp_path / "ck")
    second = train(1, tmp_path / "b", *common, "--load", tmp_path / "ck", "--save", tmp_path / "ck")
    assert first["losses"] + second["losses"] == whole["losses"]
    assert first["grad_norms"] + second["grad_norms"] == whole["grad_norms"]
    step3 = tmp_path / "ck" / "iter_0000003"
    meta = json.loads((step3 / "train_state.json").read_text())
    assert meta["adapter_only"] and meta["adapter_base"]["pretrained"] == str(release_audio.resolve())
    full = train(1, tmp_path / "full", "--train-iters", 1, "--save", tmp_path / "full_ck")
    assert _size(step3) < 0.25 * _size(tmp_path / "full_ck" / "iter_0000001"), (_size(step3), _size(tmp_path / "full_ck"))
    assert full["losses"]


@pytest.mark.slow
def test_adapter_checkpoint_refuses_another_base(release_audio, tmp_path):
    import subprocess
    import sys


    train(1, tmp_path / "a", *LORA, "--train-iters", 2, "--save", tmp_path / "ck")  # base: the seeded init
    proc = subprocess.run([sys.executable, "pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--train-iters", "3",
                           "--run-dir", str(tmp_path / "b"), *map(str, LORA), "--load", str(tmp_path / "ck"), "--pretrained", str(release_audio)],
                          cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": child_pythonpath(), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "holds LoRA adapters trained on the base" in proc.stderr + proc.stdout


def test_trainable_new_with_lora_trains_audionet_and_adapters(single_process, tmp_path):
    from hcustom_mc.model import get_model_config
    from hcustom_mc.model.lora import DEFAULT_TARGETS, match_targets
    from hcustom_mc.training.loop import NEW_MODULES, whole_model

    got = train(1, tmp_path, *LORA, "--trainable", "new")
    whole = whole_model(get_model_config("tiny", "audio"))
    new = sum(p.numel() for n, p in whole.named_parameters() if n.startswith(NEW_MODULES))
    adapter = sum(4 * sum(whole.get_submodule(n).weight.shape) for n in match_targets(whole, DEFAULT_TARGETS))
    assert new > 0 and got["trainable_numel"] == new + adapter
    assert got["optimizer_state_numel"] == 2 * (new + adapter)


def test_lora_flags():
    from hcustom_mc.model.lora import DEFAULT_TARGETS
    from hcustom_mc.training.config import build_config

    cfg = build_config(["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lora-targets",
                        "single_blocks.*.linear1", "double_blocks.*.img_attn_qkv"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (4, 8.0, 0.1)
    assert cfg.lora_targets == ["single_blocks.*.linear1", "double_blocks.*.img_attn_qkv"]
    assert build_config([]).lora_rank == 0 and build_config([]).lora_targets == list(DEFAULT_TARGETS)


def test_merge_at_tp2_equals_live_adapters_and_single_process(single_process, tmp_path):
    """TP2: merge_lora (per shard) == merge_into_model (full adapters, sharded) == live adapters == the same
    adapters live in one process (B seeded by name on its full shape, A seeded TP-invariantly)."""
    import importlib.util

    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.model.lora import apply_lora, lora_modules
    from hcustom_mc.parallel.sharding import full_state_dict
    from tests.torchrun import REPO, torchrun

    cfg = get_model_config("tiny", "base")
    model = HunyuanCustomDiT(cfg).eval()
    initialize_weights(model, seed=4, zero_init=False)
    torch.save(full_state_dict(model), tmp_path / "w.pt")
    inputs = tiny_inputs(cfg, seed=5)
    torch.save(inputs, tmp_path / "in.pt")
    script = REPO / "tests" / "dist_scripts" / "lora_merge_check.py"
    torchrun(2, script, tmp_path / "w.pt", tmp_path / "in.pt", tmp_path / "out.pt", 2)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        base = model(**inputs)
    spec = importlib.util.spec_from_file_location("lora_merge_check", script)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    apply_lora(model, rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_B.copy_(helper.seeded_b(name, m.lora_B.shape))
            torch.testing.assert_close(got["adapters"][name][0], m.lora_A, rtol=0, atol=0)
        ref = model(**inputs)
    assert (ref - base).abs().max() > 1e-3  # the adapters matter
    for key in ("live", "merged", "merged_full"):
        torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_bf16_lora_with_ema_resumes_exactly_and_ema_holds_only_adapters(tmp_path):
    """bf16 + --ema-decay: 2 + 2 resumed steps == 4 steps; the EMA (saved, exported) covers only the adapters."""
    import subprocess
    import sys

    from hcustom_mc.checkpoint.safe_load import dist_load_tensors_metadata

    common = [*LORA, "--bf16", "--ema-decay", "0.5", "--train-iters", 4]
    whole = train(1, tmp_path / "whole", *common)
    first = train(1, tmp_path / "a", *common, "--exit-after-iters", 2, "--save", tmp_path / "ck")
    second = train(1, tmp_path / "b", *common, "--load", tmp_path / "ck", "--save", tmp_path / "ck")
    assert first["losses"] + second["losses"] == whole["losses"]
    keys = dist_load_tensors_metadata(tmp_path / "ck" / "iter_0000004")
    ema = sorted(k for k in keys if k.startswith("ema."))
    model = sorted(k for k in keys if k.startswith("model."))
    assert ema and [k[4:] for k in ema] == [k[6:] for k in model]  # the same tensors: the adapters, nothing else
    assert all(k.split("#")[0].endswith(("lora_A", "lora_B")) for k in ema)
    assert keys[model[0]].dtype == torch.bfloat16 and keys[ema[0]].dtype == torch.float32
    outs = {}
    for flag in ([], ["--ema"]):
        out = tmp_path / f"x{len(flag)}.safetensors"
        subprocess.run([sys.executable, "-m", "hcustom_mc.checkpoint.lora", "export", "--ckpt", str(tmp_path / "ck"),
                        "--format", "original", "--out", str(out), *flag], cwd=REPO, check=True, capture_output=True,
                       env={"PYTHONPATH": child_pythonpath(), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        from safetensors.torch import load_file

        outs[len(flag)] = load_file(str(out))
    assert outs[0].keys() == outs[1].keys()
    assert any((outs[0][k].float() - outs[1][k]).abs().max() > 0 for k in outs[0] if "lora_B" in k)
