"""The raw tracebacks issue 20 (item 7) found, each now one line naming the file, field or flag and what is
wrong: the training config (YAML type, list, syntax error; --kernels triton without a GPU; --min-lr > --lr;
--run-dir naming a file; a seed beyond 64 bits), the sampler's seed, a renamed pickle given as a LoRA file, and
a manifest path that leaves the dataset folder (refused before anything opens it). The manifest, shard index
and NaN-in-shard cases run on real shards in tests/test_data_pipeline.py."""

import pickle

import pytest
import torch

from tests.test_inference_inputs import CFG, job, media  # noqa: F401  (media is a fixture)
from tests.torchrun import run_python


@pytest.fixture
def configs(tmp_path):
    (tmp_path / "tp.yaml").write_text('parallel:\n  tensor_parallel: "2"\n')
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "syntax.yaml").write_text("model: tiny\noptim: {lr: [1, 2}\n")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


CASES = {
    "yaml string for an int": (["--config", "{d}/tp.yaml"], "parallel.tensor_parallel: expected int, got str '2'"),
    "yaml list": (["--config", "{d}/list.yaml"], "{d}/list.yaml must hold a mapping of TrainConfig fields"),
    "yaml syntax": (["--config", "{d}/syntax.yaml"], "{d}/syntax.yaml:2:"),
    "min-lr above lr": (["--config", "examples/tiny_3d.yaml", "--lr", "0.1", "--min-lr", "1"],
                        "optim.min_lr 1 is greater than optim.lr 0.1 (--min-lr must be <= --lr"),
    "run-dir a file": (["--config", "examples/tiny_3d.yaml", "--run-dir", "{d}/a_file"],
                       "logging.run_dir {d}/a_file is a file, not a folder (--run-dir)"),
    "seed 2**70": (["--config", "examples/tiny_3d.yaml", "--init-seed", str(2**70)],
                   f"init_seed: must be >= 0 and <= 4294967295, got {2**70}"),
}


@pytest.mark.parametrize("case", CASES)
def test_training_config_problems_are_one_line(configs, case):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    argv, message = CASES[case]
    with pytest.raises(ConfigError) as err:
        build_config([a.format(d=configs) for a in argv]).validate(1)  # what pretrain_custom.main does first
    assert message.format(d=configs) in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_triton_kernels_without_a_gpu_are_refused(monkeypatch):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for the kernel tests
    with pytest.raises(ConfigError, match=r"^invalid training config: kernels=triton \(--kernels triton\) needs a "
                                          r"CUDA GPU and this host has none"):
        build_config(["--config", "examples/tiny_3d.yaml", "--kernels", "triton"]).validate(1)


def test_the_entry_point_says_it_in_one_line_before_anything_runs(configs):
    # the YAML type error used to be a TypeError from the first use of the field, before validation
    out = run_python("pretrain_custom.py", "--config", configs / "tp.yaml", "--run-dir", configs / "run", expect_ok=False)
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert errors == ["error: invalid training config: parallel.tensor_parallel: expected int, got str '2'"], out[-3000:]
    assert "Traceback" not in out and not (configs / "run").exists()


def test_sampler_seed_beyond_64_bits_is_refused(media):  # noqa: F811
    from hcustom_mc.inference.inputs import InputError, validate_job

    with pytest.raises(InputError, match=r"seed must be between 0 and 2\*\*64 - 1 \(torch's generator seeds\), got "
                                         + str(2**70)):
        validate_job(job(media, "t2v", seed=2**70), CFG["t2v"], world_size=1)
    validate_job(job(media, "t2v", seed=2**64 - 1), CFG["t2v"], world_size=1)


def test_a_pickle_renamed_safetensors_is_refused_as_a_lora_file(tmp_path):
    from hcustom_mc.checkpoint.lora import AdapterError, load_specs

    fake = tmp_path / "adapters.safetensors"
    fake.write_bytes(pickle.dumps({"lora_A": [1.0, 2.0]}))
    with pytest.raises(AdapterError, match=rf"LoRA file {fake} is not a readable \.safetensors adapter file "
                                           r"\(SafetensorError: ") as err:
        load_specs([str(fake)], None)
    assert "\n" not in str(err.value) and "nothing in it was run" in str(err.value)


def test_manifest_path_leaving_the_dataset_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    import builtins

    from hcustom_mc.data.manifest import ManifestError, load_manifest

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text('{"id": "a", "task": "t2v", "video": "../../../../etc/passwd", '
                                         '"caption": "x"}\n')
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: field 'video': '\.\./\.\./\.\./\.\./etc/passwd' "
                                            r"leaves the dataset folder"):
        load_manifest(data / "manifest.jsonl")
    assert opened == [str(data / "manifest.jsonl")]
    # an absolute path is the manifest writer's explicit choice (documented) and stays allowed
    (data / "manifest.jsonl").write_text('{"id": "a", "task": "t2v", "video": "/data/v.mp4", "caption": "x"}\n')
    assert str(load_manifest(data / "manifest.jsonl")[0].video) == "/data/v.mp4"
