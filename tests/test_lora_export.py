"""LoRA export / merge / sampler --lora (hcustom_mc/checkpoint/lora.py), checked against diffusers' own
HunyuanVideo LoRA loading (HunyuanVideoPipeline.load_lora_weights -> peft) on diffusers' transformer.

The adapters come from a real LoRA training run at TP2 on a tiny base release file; the base goes to diffusers
through our weight converter (itself checked against diffusers in test_diffusers_equivalence.py)."""

import subprocess
import sys

import pytest
import torch

from hcustom_mc.checkpoint.compare import random_inputs, reference_output
from tests.test_training_parity import train
from tests.torchrun import REPO, child_pythonpath

BASE_ONLY = ["--variant", "base", "--set", "data.task_weights={t2v: 1.0, identity: 1.0}"]
ENV = {"PYTHONPATH": child_pythonpath(), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def _cli(*args, expect=0):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base release and a LoRA run on it (TP2, lr high enough that the adapters matter)."""
    root = tmp_path_factory.mktemp("lora_export")
    _cli("examples/make_tiny_release.py", root / "base", "--variant", "base", "--seed", 5)
    release = root / "base" / "mp_rank_00_model_states.pt"
    train(2, root / "run", "--lora-rank", 4, "--lora-alpha", 8, "--tensor-model-parallel-size", 2, *BASE_ONLY,
          "--pretrained", release, "--set", "optim.lr=0.05", "--save", root / "ck")
    return root, release


def _ours(release):
    from hcustom_mc.checkpoint.release import load_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.parallel.sharding import load_full_state_dict

    sd = load_release_state_dict(release)
    model = HunyuanCustomDiT(get_model_config("tiny", "base")).eval()
    load_full_state_dict(model, sd)
    return model, sd


def _pipeline(release_sd, cfg, copy=True):
    """diffusers' HunyuanVideo pipeline (only the transformer: LoRA loading needs nothing else) on our base."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from hcustom_mc.checkpoint.diffusers_format import diffusers_config_from_model_config, release_to_diffusers

    transformer = HunyuanVideoTransformer3DModel(**diffusers_config_from_model_config(cfg)).eval()
    transformer.load_state_dict(release_to_diffusers(release_sd, copy=copy), strict=True)
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)


def _with_live_adapters(model, adapters, scale=1.0, skip=()):
    """Our model with the training checkpoint's adapters live (hcustom_mc.model.lora), scale folded into B."""
    from hcustom_mc.model.lora import apply_lora

    names = [n for n in adapters.tensors if not n.endswith(skip)]
    apply_lora(model, targets=names, rank=adapters.info["rank"])  # alpha = rank: scale 1
    with torch.no_grad():
        for n in names:
            A, B = adapters.tensors[n]
            model.get_submodule(n).lora_A.copy_(A)
            model.get_submodule(n).lora_B.copy_(B * scale)
    return model


def _compare(ours, pipe, base_out, inputs):
    with torch.no_grad():
        got, expected = ours(**inputs), reference_output(pipe.transformer, inputs)
    assert (expected - base_out).abs().max() > 1e-2  # the adapters change the output: the check can fail
    assert (got - expected).abs().max().item() < 2e-5


@pytest.mark.parametrize("fmt", ["diffusers", "original"])
def test_export_loads_in_diffusers_and_matches_ours(single_process, run, fmt):
    from safetensors.torch import load_file

    from hcustom_mc.checkpoint.lora import read_training_adapters

    root, release = run
    out = root / f"{fmt}.safetensors"
    _cli("-m", "hcustom_mc.checkpoint.lora", "export", "--ckpt", root / "ck", "--format", fmt, "--out", out,
         "--overwrite")
    adapters = read_training_adapters(root / "ck")
    assert adapters.info["rank"] == 4 and adapters.info["alpha"] == 8.0 and len(adapters.tensors) == 20
    ours, sd = _ours(release)
    inputs = random_inputs(ours.cfg, batch=2, frames=2, height=4, width=4, text_len=6, seed=4, device="cpu")
    with torch.no_grad():
        base_out = ours(**inputs)
    pipe = _pipeline(sd, ours.cfg)
    lora = load_file(str(out))
    skip = ()
    if fmt == "original":
        assert all(k.startswith("diffusion_model.") and ".lora_" in k for k in lora)
        # diffusers' converter splits single_blocks.*.linear1 at a hard-coded hidden size 3072 (the 13B model):
        # covered at that size by the slow test below; here the tiny model's linear1 adapters are left out
        skip = (".linear1",)
        lora = {k: v for k, v in lora.items() if ".linear1." not in k}
    else:
        assert all(k.startswith("transformer.") for k in lora) and len(lora) == 2 * (2 * 12 + 2 * 5)  # q,k,v split: 34 modules
    pipe.load_lora_weights(lora)  # diffusers' HunyuanVideoLoraLoaderMixin: lora_state_dict + peft injection
    n_lora = sum(1 for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A"))
    # every exported adapter landed on diffusers modules (the original layout's fused qkv becomes q, k, v)
    assert n_lora == (len(lora) // 2 + 2 * sum(".lora_A." in k and "_attn_qkv." in k for k in lora))
    _compare(_with_live_adapters(ours, adapters, skip=skip), pipe, base_out, inputs)


def test_diffusers_export_skips_modules_diffusers_lacks(single_process):
    from hcustom_mc.checkpoint.lora import Adapters, to_diffusers, to_original
    from hcustom_mc.model import get_model_config

    cfg = get_model_config("tiny", "audio")
    a = Adapters({"double_blocks.0.img_attn_qkv": (torch.ones(2, 64), torch.ones(192, 2)),
                  "audio_models.0.to_q": (torch.ones(2, 64), torch.ones(32, 2))}, "mem")
    sd, skipped = to_diffusers(a, cfg)
    assert skipped == ["audio_models.0.to_q"] and len(sd) == 6
    assert "diffusion_model.audio_models.0.to_q.lora_A.weight" in to_original(a)  # the original layout keeps it


def test_merge_lora_converter_equals_live_adapters(single_process, run, tmp_path):
    """--merge-lora (the export file at scale 0.5, then the checkpoint folder itself at 0.25) == live adapters."""
    from hcustom_mc.checkpoint.lora import read_training_adapters
    from hcustom_mc.checkpoint.release import load_release_state_dict
    from hcustom_mc.parallel.sharding import load_full_state_dict

    root, release = run
    file = root / "orig_for_merge.safetensors"
    _cli("-m", "hcustom_mc.checkpoint.lora", "export", "--ckpt", root / "ck", "--format", "original", "--out", file,
         "--overwrite")
    _cli("-m", "hcustom_mc.checkpoint.convert", "--src", release, "--src-format", "release", "--dst", tmp_path / "m",
         "--dst-format", "release", "--model-config", "tiny", "--merge-lora", f"{file}:0.5",
         "--merge-lora", f"{root / 'ck'}:0.25")
    merged, _ = _ours(release)
    load_full_state_dict(merged, load_release_state_dict(tmp_path / "m"))
    live, _ = _ours(release)
    _with_live_adapters(live, read_training_adapters(root / "ck"), scale=0.75)
    inputs = random_inputs(live.cfg, batch=2, frames=2, height=4, width=4, text_len=6, seed=2, device="cpu")
    base, _ = _ours(release)
    with torch.no_grad():
        want, got, before = live(**inputs), merged(**inputs), base(**inputs)
    assert (want - before).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_lora_refuses_another_base_and_bad_specs(run, tmp_path):
    root, _ = run
    other = tmp_path / "other"
    _cli("examples/make_tiny_release.py", other, "--variant", "base", "--seed", 6)
    common = ["-m", "hcustom_mc.checkpoint.convert", "--src", other / "mp_rank_00_model_states.pt", "--src-format",
              "release", "--dst", tmp_path / "m", "--dst-format", "release", "--model-config", "tiny"]
    out = _cli(*common, "--merge-lora", root / "ck", expect=2)
    assert "holds LoRA adapters trained on the base" in out and "fingerprints differ" in out
    out = _cli(*common, "--merge-lora", f"{root / 'ck'}:half", expect=2)
    assert "bad LoRA spec" in out and "FILE:SCALE" in out
    out = _cli(*common, "--merge-lora", tmp_path / "missing.safetensors", expect=2)
    assert "does not exist" in out


def test_sampler_lora_flag_merges_and_checks(single_process, run):
    from hcustom_mc.checkpoint.lora import load_specs, merge_into_model, read_training_adapters
    from hcustom_mc.sample import parse_args

    root, release = run
    args = parse_args(["--checkpoint", str(release), "--lora", f"{root / 'ck'}:0.5", "--lora", str(root / "ck")])
    assert args.lora == [f"{root / 'ck'}:0.5", str(root / "ck")]
    loaded = load_specs(args.lora, args.checkpoint)
    assert [s for _, s in loaded] == [0.5, 1.0]
    merged, _ = _ours(release)
    for adapters, scale in loaded:
        merge_into_model(merged, adapters, scale)
    live, _ = _ours(release)
    _with_live_adapters(live, read_training_adapters(root / "ck"), scale=1.5)
    inputs = random_inputs(live.cfg, batch=1, frames=2, height=4, width=4, text_len=6, seed=3, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs), live(**inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_original_export_at_hidden_3072_through_diffusers(single_process, tmp_path):
    """At the 13B width (diffusers' converter hard-codes 3072 for linear1) the original layout, fused qkv and
    linear1 adapters included, loads in diffusers and equals ours: 1 double + 1 single + 1 refiner block."""
    from safetensors.torch import save_file

    from hcustom_mc.checkpoint.lora import Adapters, to_original
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights

    cfg = get_model_config("13b", "base", num_double_blocks=1, num_single_blocks=1, num_refiner_blocks=1,
                           in_channels=4, out_channels=4, text_dim=32, pooled_text_dim=16)
    ours = HunyuanCustomDiT(cfg).eval()
    initialize_weights(ours, seed=1, zero_init=False)
    sd = {k: v.detach() for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    g = torch.Generator().manual_seed(0)
    names = ["double_blocks.0.img_attn_qkv", "double_blocks.0.txt_attn_qkv", "single_blocks.0.linear1",
             "single_blocks.0.linear2", "double_blocks.0.img_mlp.fc2"]
    tensors = {}
    for n in names:
        out_f, in_f = sd[f"{n}.weight"].shape
        tensors[n] = (torch.randn(4, in_f, generator=g) / in_f ** 0.5, torch.randn(out_f, 4, generator=g) * 0.02)
    adapters = Adapters(tensors, "mem", info={"rank": 4})
    file = tmp_path / "orig.safetensors"
    save_file(to_original(adapters), str(file))
    inputs = random_inputs(cfg, batch=1, frames=1, height=4, width=4, text_len=4, seed=1, device="cpu")
    with torch.no_grad():
        base_out = ours(**inputs)
    pipe = _pipeline(sd, cfg, copy=False)  # (load_state_dict copies: no third copy of the weights)
    del sd
    pipe.load_lora_weights(str(file))
    assert sum(1 for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A")) == 3 + 3 + 4 + 1 + 1
    _with_live_adapters(ours, adapters)
    with torch.no_grad():
        got, expected = ours(**inputs), reference_output(pipe.transformer, inputs)
    assert (expected - base_out).abs().max() > 1e-2
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.slow
def test_sampler_with_lora_equals_sampling_the_merged_checkpoint(run, tmp_path):
    """End to end: `sample --lora FILE:0.8` on the base == `sample` of `convert --merge-lora FILE:0.8`, and differs
    from the base alone (t2v, tiny random encoders)."""
    import numpy as np

    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.inference.output import read_mp4
    from hcustom_mc.model import get_model_config

    root, release = run
    file = root / "orig_for_sampler.safetensors"
    _cli("-m", "hcustom_mc.checkpoint.lora", "export", "--ckpt", root / "ck", "--format", "original", "--out", file,
         "--overwrite")
    _cli("-m", "hcustom_mc.checkpoint.convert", "--src", release, "--src-format", "release", "--dst", tmp_path / "m",
         "--dst-format", "release", "--model-config", "tiny", "--merge-lora", f"{file}:0.8")
    save_tiny_encoders(tmp_path / "enc", get_model_config("tiny", "base"))
    job = ["--model-config", "tiny", "--encoders-dir", tmp_path / "enc", "--task", "t2v", "--prompt", "A red ball.",
           "--height", 32, "--width", 48, "--frames", 9, "--steps", 2, "--text-len", 256, "--seed", 3, "--no-progress"]
    _cli("-m", "hcustom_mc.sample", "--checkpoint", release, "--lora", f"{file}:0.8", *job, "--out", tmp_path / "live")
    _cli("-m", "hcustom_mc.sample", "--checkpoint", tmp_path / "m", *job, "--out", tmp_path / "merged")
    _cli("-m", "hcustom_mc.sample", "--checkpoint", release, *job, "--out", tmp_path / "base")
    frames = {k: read_mp4(tmp_path / k / "000_t2v.mp4")[0].astype(np.int32) for k in ("live", "merged", "base")}
    assert np.array_equal(frames["live"], frames["merged"])
    assert np.abs(frames["live"] - frames["base"]).max() > 0
