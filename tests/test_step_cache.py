"""Identity-aware step caching (hcustom_mc/inference/cache.py): threshold 0 is full sampling bit for bit; a positive
threshold evaluates fewer blocks and stays close to full; the identity tokens pass through the probe block on every
step, batched branches included; per-branch state; TP2, CP2 and CFG-parallel 2 take the single process's decisions
and give its latents; the sampler's sidecar counts the steps and `eval compare` reports what caching costs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.torchrun import REPO, run_python, torchrun

STEPS, SHIFT = 30, 13.0


def tiny_model(seed: int = 0):
    """The tiny DiT with every weight random (no zero-initialised gates: the blocks' residuals are not zero)."""
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights

    model = HunyuanCustomDiT(get_model_config("tiny", "base"))
    initialize_weights(model, seed=seed, zero_init=False)
    return model.eval().requires_grad_(False)


def conditions(cfg, ip: bool = False, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Noise and the branches of an identity job: different text for uncond / cond, and with `ip` the release's
    ip-cfg inputs (cond and ip differ only in the identity latent: white image vs the reference)."""
    g = torch.Generator().manual_seed(seed)

    def branch(identity):
        return {"text_states": torch.randn(1, 8, cfg.text_dim, generator=g),
                "text_mask": torch.ones(1, 8, dtype=torch.long), "text_pooled": torch.randn(1, cfg.pooled_text_dim, generator=g), "identity_latents": identity}

    ref = torch.randn(1, cfg.in_channels, 1, 6, 8, generator=g)
    white = torch.full_like(ref, 0.7)
    noise = torch.randn(1, cfg.in_channels, 3, 6, 8, generator=g)
    if not ip:
        return noise, {"uncond": branch(ref), "cond": branch(ref)}
    cond = branch(white)
    return noise, {"uncond": branch(white), "cond": cond, "ip": {**cond, "identity_latents": ref}}


@pytest.fixture(scope="module")
def setup(single_process):
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout

    model = tiny_model()
    noise, branches = conditions(model.cfg)
    sampler = ParallelSampler(model, SamplerLayout())
    full = sampler.sample(noise, branches, STEPS, SHIFT, 7.5)
    return model, sampler, noise, branches, full


def cached(sampler, noise, branches, threshold, cfg_scale=7.5, ip_cfg_scale=0.0, steps=STEPS, **settings):
    from hcustom_mc.inference.cache import CacheSettings, StepCache

    cache = StepCache(CacheSettings(threshold=threshold, **settings))
    out = sampler.sample(noise, branches, steps, SHIFT, cfg_scale, ip_cfg_scale, cache=cache)
    return out, cache


class BlockSpy:
    """Counts every block's calls and keeps the rows of the first block's input, per call."""

    def __init__(self, model):
        self.calls: dict[str, int] = {}
        self.first_inputs: list[torch.Tensor] = []
        self.handles = []
        for kind in ("double_blocks", "single_blocks"):
            for name, block in getattr(model, kind).items():
                key = f"{kind}.{name}"
                self.handles.append(block.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key):
        def hook(module, args):
            self.calls[key] = self.calls.get(key, 0) + 1
            if key == "double_blocks.0":
                self.first_inputs.append(args[0].clone())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_threshold_zero_is_full_sampling_bit_for_bit(setup):
    _, sampler, noise, branches, full = setup
    out, cache = cached(sampler, noise, branches, 0.0)
    assert torch.equal(out, full)  # the cached path ran (probe, then the rest) and skipped nothing
    report = cache.report()
    assert report["skipped_steps"] == [] and report["branches"]["cond"]["computed"] == STEPS
    assert report["block_evaluations"] == report["block_evaluations_full"] == STEPS * 4 * 2
    # measured from the third step on (the first has no reference; after the second, no calibration pair yet)
    assert report["estimates"][:2] == [None, None] and all(e is not None for e in report["estimates"][2:])


def test_a_positive_threshold_evaluates_fewer_blocks_and_stays_close(setup):
    model, sampler, noise, branches, full = setup
    spy = BlockSpy(model)
    try:
        out, cache = cached(sampler, noise, branches, 0.1)
    finally:
        spy.close()
    report = cache.report()
    skipped = report["skipped_steps"]
    # measured on this model: 18 of 30 steps cached (3 in a row at most), relative L2 error of the latents 7.2e-5
    assert len(skipped) >= 10, report
    warmup = math.ceil(0.2 * STEPS)
    assert report["warmup"] == warmup and min(skipped) >= warmup and STEPS - 1 not in skipped
    runs = [s for s in skipped if s - 1 in skipped and s - 2 in skipped and s - 3 in skipped]
    assert not runs, f"more than 3 cached steps in a row: {skipped}"
    # the policy's bookkeeping equals what really ran: the probe block every step, the rest only when computed
    computed = STEPS - len(skipped)
    assert spy.calls["double_blocks.0"] == STEPS
    assert spy.calls["double_blocks.1"] == spy.calls["single_blocks.0"] == spy.calls["single_blocks.1"] == computed
    for name in ("uncond", "cond"):
        b = report["branches"][name]
        assert (b["computed"], b["skipped"]) == (computed, len(skipped))
        assert b["block_evaluations"] == computed * 4 + len(skipped) * 1
    assert report["block_evaluations"] < 0.6 * report["block_evaluations_full"]
    err = float((out - full).norm() / full.norm())
    assert 0 < err < 1e-3, err  # measured 7.2e-5


def test_two_probe_blocks_run_every_step(setup):
    model, sampler, noise, branches, full = setup
    spy = BlockSpy(model)
    try:
        out, cache = cached(sampler, noise, branches, 0.1, probe_blocks=2)
    finally:
        spy.close()
    report = cache.report()
    computed = STEPS - len(report["skipped_steps"])
    assert report["skipped_steps"] and report["probe_blocks"] == 2
    assert spy.calls["double_blocks.0"] == spy.calls["double_blocks.1"] == STEPS
    assert spy.calls["single_blocks.0"] == spy.calls["single_blocks.1"] == computed
    assert report["branches"]["cond"]["block_evaluations"] == computed * 4 + len(report["skipped_steps"]) * 2
    assert float((out - full).norm() / full.norm()) < 1e-3


def test_computed_steps_keep_the_full_arithmetic(setup):
    """Up to the first cached step the latents equal full sampling bit for bit; after it they differ."""
    _, sampler, noise, branches, _ = setup
    latents_full, latents_cached = [], []

    def record(into):
        original = sampler.velocities

        def velocities(latents, *args):
            into.append(latents.clone())
            return original(latents, *args)
        return velocities

    sampler.velocities = record(latents_full)
    try:
        sampler.sample(noise, branches, STEPS, SHIFT, 7.5)
        sampler.velocities = record(latents_cached)
        _, cache = cached(sampler, noise, branches, 0.1)
    finally:
        del sampler.velocities
    first = min(cache.report()["skipped_steps"])
    for i in range(first + 1):  # the input of step i is the output of step i - 1
        assert torch.equal(latents_cached[i], latents_full[i]), i
    assert not torch.equal(latents_cached[first + 1], latents_full[first + 1])


@pytest.mark.parametrize("ip", [False, True], ids=["cfg", "ip-cfg"])
def test_identity_tokens_enter_the_probe_block_on_every_step_batched(setup, ip):
    """Branches batched in one forward: the first block's input holds, on every step and for every branch, that
    branch's identity tokens (its own reference or white latent, patch-embedded) at the head of the sequence."""
    model, sampler, *_ = setup
    noise, branches = conditions(model.cfg, ip=ip, seed=1)
    spy = BlockSpy(model)
    try:
        _, cache = cached(sampler, noise, branches, 0.1, ip_cfg_scale=2.0 if ip else 0.0)
    finally:
        spy.close()
    names = ["uncond", "cond", "ip"] if ip else ["uncond", "cond"]
    assert cache.report()["skipped_steps"], "nothing was cached: the test would not show the identity path"
    assert len(spy.first_inputs) == STEPS
    hw = (6 // 2) * (8 // 2)
    for x in spy.first_inputs:
        assert x.shape[1] == len(names)  # one forward, the branches batched
        for j, name in enumerate(names):
            tokens = model.img_in(branches[name]["identity_latents"])  # [B, K*hw, C]
            torch.testing.assert_close(x[:hw, j], tokens[0], rtol=0, atol=0)


def test_state_is_per_branch(setup):
    """Each branch keeps its own residual and calibration: the batched run's cond state equals what the cond
    branch alone computes from the same latents and timestep."""
    from hcustom_mc.inference.cache import CacheSettings, StepCache
    from hcustom_mc.inference.scheduler import FlowMatchEulerScheduler

    model, sampler, noise, branches, _ = setup
    seen = []
    original = sampler.velocities

    def keep(latents, *args):
        seen.append(latents.clone())
        return original(latents, *args)

    sampler.velocities = keep
    try:
        _, cache = cached(sampler, noise, branches, 0.1, steps=3, warmup=3)  # all computed (warm-up)
    finally:
        del sampler.velocities
    uncond, cond = cache.branches["uncond"], cache.branches["cond"]
    assert uncond.residual.shape[1] == cond.residual.shape[1] == 1
    assert not torch.equal(uncond.residual, cond.residual)
    assert len(uncond.pairs) == len(cond.pairs) == 2 and uncond.pairs != cond.pairs
    alone = StepCache(CacheSettings(threshold=0.1))
    alone.start(3, ["cond"], ["cond"], [])
    alone.begin_step(0)  # its first step: computed, so it keeps the residual
    t = float(FlowMatchEulerScheduler(3, SHIFT).timesteps[2])
    b = branches["cond"]
    alone.forward(model, seen[2], torch.full((1,), t), b["text_states"], b["text_mask"], b["text_pooled"],
                  identity_latents=b["identity_latents"])
    torch.testing.assert_close(alone.branches["cond"].residual, cond.residual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone.branches["cond"].probe, cond.probe, rtol=1e-5, atol=1e-6)


def test_one_stale_branch_never_meets_a_fresh_one(setup):
    """The decision is joint: on every step every branch is computed, or every branch reuses its residual."""
    _, sampler, noise, branches, _ = setup
    _, cache = cached(sampler, noise, branches, 0.1)
    r = cache.report()["branches"]
    assert r["uncond"]["computed"] == r["cond"]["computed"] and r["uncond"]["skipped"] == r["cond"]["skipped"] > 0


def test_the_identity_tokens_change_counts_on_its_own():
    """d is the larger of the image tokens' and the identity tokens' relative L1 change: a change confined to the
    few identity rows is not averaged away by the many video rows."""
    from hcustom_mc.inference.cache import CacheSettings, StepCache

    cache = StepCache(CacheSettings(threshold=0.1))
    cache.start(10, ["uncond", "cond"], ["uncond", "cond"], [])
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(104, 2, 8, generator=g)  # 4 identity rows, then 100 video rows; branches along dim 1
    for j, name in enumerate(["uncond", "cond"]):
        cache.branches[name].probe = ref[:, j : j + 1]
    now = ref.clone()
    now[:4, 1] *= 1.5  # cond: only its identity rows move, by 50%
    now[4:, 0] *= 1.01  # uncond: its video rows move by 1%
    d = cache._probe_changes(now, n_id=4)
    assert d["cond"] == pytest.approx(0.5, rel=1e-6)
    whole = float((now[:, 0] - ref[:, 0]).abs().sum() / ref[:, 0].abs().sum())
    assert d["uncond"] == pytest.approx(whole, rel=1e-6) and whole < 0.011


def test_the_gain_is_the_least_squares_fit_through_the_origin():
    from hcustom_mc.inference.cache import BranchCache

    pairs = [(0.03, 0.028), (0.05, 0.061), (0.02, 0.018), (0.08, 0.07)]
    d, r = (torch.tensor(column, dtype=torch.float64) for column in zip(*pairs))
    k = torch.linalg.lstsq(d[:, None], r[:, None]).solution.item()
    assert BranchCache(pairs=pairs).gain() == pytest.approx(k, rel=1e-12)
    assert BranchCache(pairs=[(0.0, 0.0)]).gain() == 0.0  # nothing moves: reuse is exact
    assert BranchCache(pairs=[(0.0, 0.1)]).gain() == math.inf  # the probe is blind to a moving residual: never skip
    assert BranchCache().gain() == math.inf


@pytest.mark.gpu
def test_bf16_on_cuda_threshold_zero_is_bit_for_bit_and_a_threshold_skips(single_process):
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout

    model = tiny_model().to("cuda", torch.bfloat16)
    noise, branches = conditions(model.cfg)
    branches = {n: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
                for n, b in branches.items()}
    sampler = ParallelSampler(model, SamplerLayout())
    full = sampler.sample(noise, branches, STEPS, SHIFT, 7.5)
    out, _ = cached(sampler, noise, branches, 0.0)
    assert torch.equal(out, full)
    out, cache = cached(sampler, noise, branches, 0.1)
    assert cache.report()["skipped_steps"] and float((out - full).norm() / full.norm()) < 1e-2


def test_bad_settings_are_one_message():
    from hcustom_mc.inference.cache import CacheSettings
    from hcustom_mc.model.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        CacheSettings(threshold=-1, warmup=1, probe_blocks=4, max_skips=0).check(num_blocks=4)
    text = str(exc.value)
    for part in ("--cache-threshold must be", "--cache-warmup must be >= 2", "leaves no block to cache: the model has "
                 "4 blocks", "--cache-max-skips must be >= 1"):
        assert part in text, text
    with pytest.raises(ConfigError, match="finite"):
        CacheSettings(threshold=float("nan")).check()
    assert not CacheSettings().enabled and CacheSettings(threshold=0.05).enabled


def test_sampler_flags_make_the_settings_and_bad_ones_are_refused():
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.sample import cache_settings, parse_args

    base = ["--checkpoint", "ck", "--task", "t2v", "--prompt", "a"]
    assert not cache_settings(parse_args(base)).enabled  # default: off
    s = cache_settings(parse_args(base + ["--cache-threshold", "0.05", "--cache-warmup", "4", "--cache-probe-blocks",
                                          "2", "--cache-max-skips", "2"]))
    assert (s.threshold, s.warmup, s.probe_blocks, s.max_skips) == (0.05, 4, 2, 2) and s.warmup_steps(30) == 4
    assert cache_settings(parse_args(base)).warmup_steps(50) == 10  # 20% of the steps
    with pytest.raises(ConfigError, match="--cache-probe-blocks 60 leaves no block to cache: the model has 60"):
        cache_settings(parse_args(base + ["--cache-probe-blocks", "60"])).check(num_blocks=60)


# ----------------------------------------------------------------------------- across ranks
@pytest.fixture(scope="module")
def reference(tmp_path_factory, setup):
    """Weights, inputs and the single-process cached run, for the torchrun script."""
    model, sampler, noise, branches, _ = setup
    root = tmp_path_factory.mktemp("step_cache")
    torch.save(model.weight_state_dict(), root / "weights.pt")
    torch.save({"noise": noise, "branches": branches}, root / "inputs.pt")
    out, cache = cached(sampler, noise, branches, 0.1)
    return root, out, cache.report()


@pytest.mark.parametrize("layout", [
    ["--tp", 2],
    ["--cp", 2],
    pytest.param(["--cfg-parallel", 2], marks=pytest.mark.slow),
    pytest.param(["--tp", 2, "--sequence-parallel"], marks=pytest.mark.slow),
], ids=["tp2", "cp2", "cfg2", "tp2-sp"])
def test_two_ranks_take_the_single_process_decisions(reference, tmp_path, layout):
    root, want, report = reference
    torchrun(2, REPO / "tests" / "dist_scripts" / "step_cache_check.py", root / "weights.pt", root / "inputs.pt",
             tmp_path / "out.pt", 0.1, STEPS, SHIFT, *layout, timeout=300)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for rank_report in got["reports"]:  # every rank: the same steps skipped as one process
        assert rank_report["skipped_steps"] == report["skipped_steps"]
        for b, counts in report["branches"].items():
            assert all(rank_report["branches"][b][k] == counts[k] for k in ("computed", "skipped", "block_evaluations"))
            assert rank_report["branches"][b]["gain"] == pytest.approx(counts["gain"], rel=1e-4)
        # the signal is the whole sequence's (summed over the ranks' rows), not this rank's part of it
        for got_e, want_e in zip(rank_report["estimates"], report["estimates"], strict=True):
            assert (got_e is None) == (want_e is None) and (want_e is None or got_e == pytest.approx(want_e, rel=1e-4))
    torch.testing.assert_close(got["latents"], want, rtol=1e-4, atol=2e-5)  # fp32, the sampler tests' tolerance


# ----------------------------------------------------------------------------- the sampler command
@pytest.fixture(scope="module")
def sampled(tmp_path_factory, setup):
    """`python -m hcustom_mc.sample` on a tiny release checkpoint of the random model, in full and cached."""
    import numpy as np
    from PIL import Image

    from hcustom_mc.checkpoint.release import save_release_state_dict
    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.eval.tiny import save_tiny_eval_models

    model = setup[0]
    root = tmp_path_factory.mktemp("step_cache_cli")
    save_release_state_dict(model.weight_state_dict(), root / "ckpt")
    save_tiny_encoders(root / "enc", model.cfg)
    save_tiny_eval_models(root / "models")
    image = root / "subject.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    outs = {}
    for name, threshold in (("full", 0), ("cached", 0.1)):
        outs[name] = run_python(
            "-m", "hcustom_mc.sample", "--checkpoint", root / "ckpt", "--model-config", "tiny", "--encoders-dir",
            root / "enc", "--task", "identity", "--image", f"it={image}", "--prompt", "it moves.", "--height", 48,
            "--width", 64, "--frames", 9, "--steps", 12, "--seed", 3, "--no-progress", "--out", root / name,
            "--cache-threshold", threshold, "--cache-warmup", 3, env={"HCUSTOM_DIST_BACKEND": "gloo"})
    return root, outs


def test_the_sidecar_counts_the_steps_and_the_log_says_so(sampled):
    root, outs = sampled
    full = json.loads((root / "full" / "000_identity.json").read_text())
    assert full["cache"] == {"enabled": False, "threshold": 0.0}
    side = json.loads((root / "cached" / "000_identity.json").read_text())["cache"]
    assert side["enabled"] and side["threshold"] == 0.1 and side["warmup"] == 3 and side["steps"] == 12
    assert side["skipped_steps"] and set(side["branches"]) == {"uncond", "cond"}
    for b in side["branches"].values():
        assert b["computed"] + b["skipped"] == 12 and b["skipped"] == len(side["skipped_steps"])
    assert "job 0: step cache (threshold 0.1): computed uncond" in outs["cached"]
    assert "step cache" not in outs["full"]


def test_eval_compare_reports_what_caching_costs(sampled):
    root, _ = sampled
    run_python("-m", "hcustom_mc.eval", "compare", root / "full", root / "cached", "--metrics", "temporal_consistency",
               "clip_score", "--models", root / "models", "--out", root / "cmp")
    report = json.loads((root / "cmp" / "scores.json").read_text())
    (row,) = report["jobs"]
    assert row["in"] == "both" and row["name"] == "000_identity"
    assert isinstance(row["psnr"], float) and 0 < row["ssim"] <= 1  # the cached video is not the full one
    for metric in ("temporal_consistency", "clip_score"):
        assert row[f"{metric}_delta"] == pytest.approx(row[f"{metric}_b"] - row[f"{metric}_a"])
