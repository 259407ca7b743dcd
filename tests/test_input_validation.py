"""Validation up front (issue 13): every TrainConfig field's type and range in one message (items 6, 9),
shard files checked at indexing (item 6), the sampler's settings, sizes, memory and outputs (items 7, 8)."""

import json
import math

import pytest
import torch

from tests.test_inference_inputs import CFG, job, media  # noqa: F401  (media is a fixture)
from tests.test_training_runs import run

# ----------------------------------------------------------------------------- training config
BAD_FIELDS = {
    "--keep-last 0": (["--keep-last", "0"], "checkpoint.keep_last: must be >= 1, got 0"),
    "--keep-last -3": (["--keep-last", "-3"], "checkpoint.keep_last: must be >= 1, got -3"),
    "--log-interval 0": (["--log-interval", "0"], "logging.log_interval: must be >= 1, got 0"),
    "negative warmup": (["--lr-warmup-iters", "-1"], "optim.warmup_steps: must be >= 0, got -1"),
    "negative clip-grad": (["--clip-grad", "-1"], "optim.clip_grad: must be >= 0, got -1.0"),
    "text_drop 2.5": (["--set", "data.text_drop=2.5"], "data.text_drop: must be >= 0 and <= 1, got 2.5"),
    "nan lr": (["--set", "optim.lr=.nan"], "optim.lr: must be a finite number, got nan"),
    "string steps": (["--set", "train_steps=ten"], "train_steps: expected int, got str 'ten'"),
    "bool for int": (["--set", "micro_batch_size=true"], "micro_batch_size: expected int, got bool True"),
    "list for a section": (["--set", "optim=[1, 2]"], "optim: expected a section of fields"),
    "negative task weight": (["--set", "data.task_weights={t2v: -1}"], "data.task_weights.t2v: must be >= 0, got -1"),
    "verify mode": (["--verify-checkpoint", "most"], "checkpoint.verify: must be one of full, size, off, got 'most'"),
    "parallel size": (["--set", "parallel.context_parallel=0"], "parallel.context_parallel: must be >= 1, got 0"),
}


def test_every_bad_field_in_one_message():
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    combined = [n for n in BAD_FIELDS if n not in ("--keep-last -3", "list for a section")]  # one value per field
    argv = ["--config", "examples/tiny_3d.yaml"] + [a for n in combined for a in BAD_FIELDS[n][0]]
    cfg = build_config(argv)
    with pytest.raises(ConfigError) as err:
        cfg.validate(1)
    text = str(err.value)
    for name in combined:
        assert BAD_FIELDS[name][1] in text, (name, text)


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_each_bad_field_is_named(case):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    args, message = BAD_FIELDS[case]
    with pytest.raises(ConfigError, match="invalid training config") as err:
        build_config(["--config", "examples/tiny_3d.yaml", *args]).validate(1)
    assert message in str(err.value)


def test_wrong_yaml_types_are_listed_not_raised(tmp_path):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    (tmp_path / "bad.yaml").write_text("train_steps: '10'\noptim: {lr: fast, warmup_steps: 2.5}\ndata: {frames: [5]}\n")
    with pytest.raises(ConfigError) as err:
        build_config(["--config", str(tmp_path / "bad.yaml")]).validate(1)
    for message in ("train_steps: expected int, got str '10'", "optim.lr: expected float, got str 'fast'",
                    "optim.warmup_steps: expected int, got float 2.5", "data.frames: expected int, got list [5]"):
        assert message in str(err.value)


def test_new_fields_are_checked_without_registration():
    """The checker reads the annotations: a field added later is type-checked automatically."""
    from dataclasses import dataclass, field

    from hcustom_mc.training.config_check import field_errors

    @dataclass
    class Section:
        rate: float = 0.5
        names: list[str] = field(default_factory=list)

    @dataclass
    class Config:
        new_flag: bool = False
        section: Section = field(default_factory=Section)

    cfg = Config(new_flag="yes", section=Section(rate=math.inf, names=["a", 3]))
    assert field_errors(cfg) == ["new_flag: expected bool, got str 'yes'", "section.rate: must be a finite number, got inf",
                                 "section.names: expected list[str], got list ['a', 3]"]


def test_keep_last_zero_refused_before_anything_is_deleted(tmp_path):
    ck = tmp_path / "ck"
    run(1, "--train-iters", 2, "--save", ck, "--run-dir", tmp_path / "a")
    out = run(1, "--train-iters", 4, "--load", ck, "--save", ck, "--keep-last", 0, "--run-dir", tmp_path / "b",
              expect_ok=False)
    assert "checkpoint.keep_last: must be >= 1, got 0" in out and "step 3/" not in out
    assert (ck / "latest").read_text().strip() == "iter_0000002" and (ck / "iter_0000002" / "train_state.json").is_file()


# ----------------------------------------------------------------------------- shards
@pytest.fixture
def shard_dir(tmp_path):
    from hcustom_mc.data.shards import write_index, write_shard

    def rec(i):
        return {"id": f"s{i}", "task": "t2v", "group": "g", "tensors": {
            "latents": torch.randn(16, 2, 4, 4), "text_states": torch.randn(8, 32), "text_mask": torch.ones(8, dtype=torch.long),
            "text_pooled": torch.randn(16)}}

    for shard in range(3):
        write_shard(tmp_path, shard, [rec(2 * shard), rec(2 * shard + 1)])
    write_index(tmp_path, 3)
    return tmp_path


def test_corrupt_shard_is_named_and_its_samples_are_bad_data(shard_dir):
    from hcustom_mc.data.shards import ShardLatentDataset, shard_path

    path = shard_path(shard_dir, 1)
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    ds = ShardLatentDataset(shard_dir)
    assert sorted(s.id for s in ds.samples) == ["s0", "s1", "s4", "s5"]
    assert [(e.kind, e.path.split("#")[0]) for e in ds.unusable] == [("corrupt", str(path))] * 2
    assert "unreadable shard" in ds.unusable[0].reason


def test_shard_header_dtypes_and_shapes_checked(shard_dir):
    from hcustom_mc.data.shards import ShardLatentDataset, write_shard

    bad = {"id": "s2", "task": "t2v", "group": "g", "tensors": {
        "latents": torch.randn(16, 2, 4), "text_states": torch.randn(8, 32), "text_mask": torch.ones(8),
        "text_pooled": torch.randn(16)}}
    good = {"id": "s3", "task": "t2v", "group": "g", "tensors": {
        "latents": torch.randn(16, 2, 4, 4), "text_states": torch.randn(8, 32), "text_mask": torch.ones(7, dtype=torch.long),
        "text_pooled": torch.randn(16)}}
    write_shard(shard_dir, 1, [bad, good])
    ds = ShardLatentDataset(shard_dir)
    reasons = {e.path.split(" ")[-1]: e.reason for e in ds.unusable}
    assert "latents has shape (16, 2, 4), expected 4 dimensions" in reasons["(s2)"]
    assert "text_mask (7,) does not match text_states (8, 32)" in reasons["(s3)"]


def test_check_shards_finds_nonfinite_values(shard_dir):
    from hcustom_mc.data.shards import ShardLatentDataset, write_shard

    rec = {"id": "s4", "task": "t2v", "group": "g", "tensors": {
        "latents": torch.full((16, 2, 4, 4), float("nan")), "text_states": torch.randn(8, 32),
        "text_mask": torch.ones(8, dtype=torch.long), "text_pooled": torch.randn(16)}}
    ok = {"id": "s5", "task": "t2v", "group": "g", "tensors": {
        "latents": torch.randn(16, 2, 4, 4), "text_states": torch.randn(8, 32),
        "text_mask": torch.ones(8, dtype=torch.long), "text_pooled": torch.randn(16)}}
    write_shard(shard_dir, 2, [rec, ok])
    assert len(ShardLatentDataset(shard_dir).samples) == 6  # values are read only on request
    ds = ShardLatentDataset(shard_dir, check_finite=True)
    (err,) = ds.unusable
    assert "(s4)" in err.path and "latents holds NaN/inf values" in err.reason


def test_shard_broken_after_indexing_raises_data_error(shard_dir):
    from hcustom_mc.data.errors import DataError
    from hcustom_mc.data.shards import ShardLatentDataset, shard_path

    ds = ShardLatentDataset(shard_dir)
    shard_path(shard_dir, 0).write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        ds[0]
    assert err.value.kind == "corrupt" and str(shard_path(shard_dir, 0)) in err.value.path


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("key,value,message", [
    ("frames", 0, "frames must be 4k+1"), ("frames", -3, "frames must be 4k+1"),
    ("width", 0, "width must be a positive multiple of 16, got 0"), ("height", -16, "height must be a positive multiple"),
    ("fps", 0.0, "fps must be positive, got 0.0"),
    ("audio_strength", float("nan"), "audio_strength must be a finite number, got nan"),
    ("cfg_scale", float("inf"), "cfg_scale must be a finite number, got inf"),
    ("shift", float("nan"), "shift must be a finite number"), ("steps", 2.5, "steps must be an integer, got 2.5"),
])
def test_sampler_sizes_and_settings_never_defaulted(media, key, value, message):  # noqa: F811
    from hcustom_mc.inference.inputs import InputError, resolve_job, validate_job

    j = job(media, "audio", **{key: value})
    assert getattr(resolve_job(j), key) == value or math.isnan(value)  # not replaced by a default
    with pytest.raises(InputError, match="invalid job") as err:
        validate_job(j, CFG["audio"], world_size=1)
    assert message in str(err.value)


@pytest.mark.parametrize("size,frames", [((100000, 100000), 9), ((512, 896), 400001)])
def test_memory_estimate_refuses_impossible_jobs(media, single_process, size, frames):  # noqa: F811
    from hcustom_mc.inference.inputs import InputError, resolve_job
    from hcustom_mc.inference.memory import check_jobs_fit

    ok = resolve_job(job(media, "t2v"))
    huge = resolve_job(job(media, "t2v", height=size[0], width=size[1], frames=frames))
    check_jobs_fit([ok], CFG["t2v"], torch.float32, torch.device("cpu"), 1, 1, 1)
    with pytest.raises(InputError, match=r"job 1 .* needs about [\d.]+ (GB|TB) \(DiT weights") as err:
        check_jobs_fit([ok, huge], CFG["t2v"], torch.float32, torch.device("cpu"), 1, 1, 1)
    assert "job 0" not in str(err.value) and "usable of the" in str(err.value)


def test_outputs_resolving_to_one_file_refused(tmp_path, monkeypatch):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.sample import build_jobs, parse_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    jobs = tmp_path / "jobs.yaml"
    for a, b in (("out/a", "./out/a"), ("out/a", str(tmp_path / "link" / "a")), ("out/x", "out/x/../x")):
        jobs.write_text(json.dumps([{"task": "t2v", "prompt": "p", "output": a}, {"task": "t2v", "prompt": "p", "output": b}]))
        with pytest.raises(ConfigError, match="job 1: output .* which job 0 also writes"):
            build_jobs(parse_args(["--checkpoint", "x", "--jobs", str(jobs), "--out", "."]))
    jobs.write_text(json.dumps([{"task": "t2v", "prompt": "p", "output": "out/a"}, {"task": "t2v", "prompt": "p", "output": "out/b"}]))
    assert len(build_jobs(parse_args(["--checkpoint", "x", "--jobs", str(jobs)]))) == 2


def test_a_jobs_output_is_a_stem_under_out(tmp_path, monkeypatch):
    """`output` in a job file names the files' stem: relative ones go under --out, absolute ones stay, a trailing .mp4
    is not doubled (clip.mp4 -> clip.mp4, not clip.mp4.mp4); without one, --out/NNN_task."""
    from hcustom_mc.sample import build_jobs, parse_args

    monkeypatch.chdir(tmp_path)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(json.dumps([{"task": "t2v", "prompt": "p", "output": "clip.mp4"},
                                {"task": "t2v", "prompt": "p", "output": str(tmp_path / "abs" / "b")},
                                {"task": "t2v", "prompt": "p", "output": "sub/c.v2"}, {"task": "t2v", "prompt": "p"}]))
    got = [j.output for j in build_jobs(parse_args(["--checkpoint", "x", "--jobs", str(jobs), "--out", "res"]))]
    assert got == ["res/clip", str(tmp_path / "abs" / "b"), "res/sub/c.v2", "res/003_t2v"]


def test_nonfinite_latents_stop_naming_the_step(single_process, monkeypatch):
    from hcustom_mc.inference.pipeline import NonFiniteError, ParallelSampler, SamplerLayout

    sampler = ParallelSampler(torch.nn.Linear(1, 1), SamplerLayout())
    calls = []

    def velocities(latents, t, branches, names, guidance):
        calls.append(t)
        v = torch.zeros_like(latents)
        if len(calls) == 3:
            v[0, 0, 0, 0, 0] = float("inf")
        return {n: v for n in names}

    monkeypatch.setattr(sampler, "velocities", velocities)
    with pytest.raises(NonFiniteError, match=r"non-finite \(NaN/inf\) at denoising step 3/5"):
        sampler.sample(torch.randn(1, 4, 1, 2, 2), {"cond": {}}, steps=5, shift=1.0, cfg_scale=1.0)
    assert len(calls) == 3  # stopped there
