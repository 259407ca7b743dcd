"""Flow-matching Euler scheduler, guidance combination and task defaults (facts file section 3.1)."""

import numpy as np
import pytest
import torch

from hcustom_mc.inference.scheduler import (
    GUIDANCE_DISTILLED_T2V,
    NEGATIVE_PROMPT,
    TASK_DEFAULTS,
    FlowMatchEulerScheduler,
    branches_needed,
    guide,
    ip_cfg_weight,
    task_defaults,
)


@pytest.mark.parametrize("steps,shift", [(30, 13.0), (50, 5.0), (50, 7.0), (1, 13.0), (7, 0.5)])
def test_sigmas_and_timesteps_match_the_formulas(steps, shift):
    sched = FlowMatchEulerScheduler(steps, shift)
    # independent float64 derivation: close at fp32 tolerance
    s64 = np.linspace(1.0, 0.0, steps + 1)
    s64 = shift * s64 / (1 + (shift - 1) * s64)
    assert sched.sigmas.dtype == torch.float32 and sched.timesteps.dtype == torch.float32
    np.testing.assert_allclose(sched.sigmas.numpy(), s64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sched.timesteps.numpy(), s64[:-1] * 1000, rtol=1e-6, atol=1e-4)
    # a straightforward torch fp32 re-derivation (how the release computes it): bit-exact
    s32 = torch.linspace(1, 0, steps + 1)
    s32 = (shift * s32) / (1 + (shift - 1) * s32)
    assert torch.equal(sched.sigmas, s32)
    assert torch.equal(sched.timesteps, s32[:-1] * 1000)
    assert len(sched) == steps and sched.timesteps.shape == (steps,)
    assert sched.timesteps[0].item() == 1000.0 and sched.sigmas[-1].item() == 0.0
    assert bool((sched.sigmas[1:] < sched.sigmas[:-1]).all())


def test_shift_one_is_linear():
    sched = FlowMatchEulerScheduler(10, 1.0)
    assert torch.equal(sched.sigmas, torch.linspace(1, 0, 11))
    np.testing.assert_allclose(sched.timesteps.numpy(), np.arange(1000, 0, -100), atol=1e-3)


def test_shift_pushes_sigmas_towards_noise():
    assert bool((FlowMatchEulerScheduler(30, 13.0).sigmas[1:-1] > FlowMatchEulerScheduler(30, 1.0).sigmas[1:-1]).all())


@pytest.mark.parametrize("steps,shift", [(0, 1.0), (-3, 1.0), (2.5, 1.0), (True, 1.0), (10, 0.0), (10, -1.0), (10, float("nan"))])
def test_invalid_arguments_are_refused(steps, shift):
    with pytest.raises(ValueError):
        FlowMatchEulerScheduler(steps, shift)


def test_step_is_the_fp32_euler_update():
    sched = FlowMatchEulerScheduler(30, 13.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 5, generator=g)
    v = torch.randn(1, 4, 2, 3, 5, generator=g).to(torch.bfloat16)
    for i in (0, 14, 29):
        out = sched.step(v, i, x)
        assert out.dtype == torch.float32
        assert torch.equal(out, x + v.float() * (sched.sigmas[i + 1] - sched.sigmas[i]))
    assert sched.step(v, 0, x.to(torch.bfloat16)).dtype == torch.float32  # running latents go fp32
    with pytest.raises(IndexError):
        sched.step(v, 30, x)


@pytest.mark.parametrize("steps,shift", [(30, 13.0), (50, 5.0), (4, 1.0)])
def test_exact_velocity_field_lands_on_x0(steps, shift):
    # x_t = σ·noise + (1−σ)·x0 has dx/dσ = noise − x0, a constant: Euler is exact for any grid.
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    sched = FlowMatchEulerScheduler(steps, shift)
    x = noise.clone()
    for i in range(steps):
        sigma = sched.sigmas[i]
        # the state really is on the path at every step (up to fp32 rounding)
        torch.testing.assert_close(x, sigma * noise + (1 - sigma) * x0, rtol=0, atol=2e-5)
        x = sched.step(noise - x0, i, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


def test_branches_needed():
    assert branches_needed(7.5) == ["uncond", "cond"]
    assert branches_needed(1.0) == ["cond"]
    assert branches_needed(7.5, 3.0) == ["uncond", "cond", "ip"]
    assert branches_needed(1.0, 3.0) == ["cond", "ip"]
    for bad in ((0.5, 0.0), (7.5, -1.0)):
        with pytest.raises(ValueError):
            branches_needed(*bad)


def _branches(seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 5, generator=g) for k in ("uncond", "cond", "ip")}


def test_guide_two_branches():
    b = _branches()
    two = {"uncond": b["uncond"], "cond": b["cond"]}
    torch.testing.assert_close(guide(two, 7.5), b["uncond"] + 7.5 * (b["cond"] - b["uncond"]))
    # cfg 1: cond only, uncond not required
    assert torch.equal(guide({"cond": b["cond"]}, 1.0), b["cond"])
    with pytest.raises(KeyError):
        guide({"cond": b["cond"]}, 7.5)
    assert guide({k: v.to(torch.bfloat16) for k, v in two.items()}, 7.5).dtype == torch.float32


def test_guide_three_branches_and_decay_endpoints():
    b = _branches()
    u, c, ip = b["uncond"], b["cond"], b["ip"]
    n, s0 = 30, 3.0
    torch.testing.assert_close(guide(b, 7.5, s0, step=0, num_steps=n), u + 7.5 * (c - u) + 3.0 * (ip - c))
    # linear decay from ip_cfg_scale to ~1 (the release's +1e-3 in the denominator leaves 1 + O(1e-4))
    weights = [ip_cfg_weight(s0, i, n) for i in range(n)]
    assert weights[0] == s0
    assert abs(weights[-1] - 1.0) < 1e-3 * (s0 - 1) / (n - 1) + 1e-12
    np.testing.assert_allclose(np.diff(weights), -(s0 - 1) / (n - 1 + 1e-3), rtol=1e-9)
    last = guide(b, 7.5, s0, step=n - 1, num_steps=n)
    torch.testing.assert_close(last, u + 7.5 * (c - u) + weights[-1] * (ip - c))
    torch.testing.assert_close(last, u + 7.5 * (c - u) + (ip - c), rtol=0, atol=1e-3)
    assert ip_cfg_weight(s0, 0, 1) == s0  # a single step uses the start value
    # cfg 1 with ip: c + s·(ip − c), no uncond pass needed
    torch.testing.assert_close(guide({"cond": c, "ip": ip}, 1.0, 2.0), c + 2.0 * (ip - c))
    with pytest.raises(KeyError):
        guide({"uncond": u, "cond": c}, 7.5, 3.0)
    with pytest.raises(IndexError):
        ip_cfg_weight(s0, n, n)


def test_task_defaults_follow_the_release_scripts():
    for task in ("t2v", "identity", "multi_identity", "audio"):
        d = TASK_DEFAULTS[task]
        assert (d.steps, d.flow_shift, d.cfg_scale, d.embedded_guidance, d.fps, d.ip_cfg_scale) == (30, 13.0, 7.5, None, 25, 0.0)
    e = TASK_DEFAULTS["editing"]
    assert (e.steps, e.flow_shift, e.cfg_scale, e.embedded_guidance, e.fps) == (50, 5.0, 7.5, None, 25)
    d = GUIDANCE_DISTILLED_T2V
    assert (d.steps, d.flow_shift, d.cfg_scale, d.embedded_guidance, d.fps) == (50, 7.0, 1.0, 6.0, 24)
    assert branches_needed(d.cfg_scale) == ["cond"]
    assert task_defaults("t2v", guidance_distilled=True) is GUIDANCE_DISTILLED_T2V
    assert task_defaults("audio") is TASK_DEFAULTS["audio"]
    with pytest.raises(ValueError):
        task_defaults("identity", guidance_distilled=True)
    with pytest.raises(KeyError):
        task_defaults("i2v")
    assert NEGATIVE_PROMPT == (
        "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, "
        "bad eyes, bad limbs, distortion, blurring, text, subtitles, static, picture, black border."
    )
