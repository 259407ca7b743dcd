"""The planner (python -m hcustom_mc.plan) against measured peaks of real training steps, its layout
ranking and its input errors.

Measured = tests/dist_scripts/train_step_peak.py: loop.train (megatron DDP, optimizer, schedule) in
one process at TP=PP=CP=DP=1, two steps (the second runs with the Adam state allocated, the steady
state the planner predicts). CPU peak: live bytes of the CPU allocator from the torch profiler;
CUDA peak: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.torchrun import REPO, child_pythonpath
TOLERANCE = 0.15
# mid-size: hidden 512 (8 heads of 64), 2 double + 2 single blocks, 384x384 x 9 frames = 4 x 576 image
# + 32 text tokens (2,336); activations are about half of its peak, so the recompute modes differ
MID = {"in_channels": 16, "out_channels": 16, "hidden_size": 512, "num_heads": 8, "rope_dims": [16, 24, 24],
       "num_double_blocks": 2, "num_single_blocks": 2, "num_refiner_blocks": 1, "text_dim": 256,
       "pooled_text_dim": 64}
SHAPES = {"tiny": ("64x48", 5, 8), "mid": ("384x384", 9, 32)}


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcustom_mc.plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": child_pythonpath()})


def model_arg(name: str, tmp_path: Path) -> str:
    if name == "tiny":
        return "tiny"
    path = tmp_path / "mid.json"
    path.write_text(json.dumps(MID))
    return str(path)


def measured_peak(model: str, size: str, frames: int, text_len: int, recompute: str, bf16: bool) -> int:
    cmd = [sys.executable, str(REPO / "tests/dist_scripts/train_step_peak.py"), "--model", model, "--size", size,
           "--frames", str(frames), "--text-len", str(text_len), "--recompute", recompute,
           "--double-blocks", "2", "--single-blocks", "2"] + (["--bf16"] if bf16 else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1"})
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(found.group(1))["peak_bytes"]


def predicted_peak(model: str, size: str, frames: int, text_len: int, recompute: str, bf16: bool, target: str) -> float:
    proc = plan("--model", model, "--size", size, "--frames", str(frames), "--text-len", str(text_len),
                "--recompute", recompute, "--tp", "1", "--pp", "1", "--cp", "1", "--dp", "1",
                "--micro-batch-size", "1", "--target", target, "--json", *(["--bf16"] if bf16 else []))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["peak_gib"] * 2**30


def check_prediction(name, recompute, bf16, tmp_path, target="cpu"):
    model = model_arg(name, tmp_path)
    size, frames, text_len = SHAPES[name]
    measured = measured_peak(model, size, frames, text_len, recompute, bf16)
    predicted = predicted_peak(model, size, frames, text_len, recompute, bf16, target)
    error = predicted / measured - 1
    print(f"{name} recompute {recompute} {'bf16' if bf16 else 'fp32'}: measured {measured / 2**20:.1f} MiB, "
          f"predicted {predicted / 2**20:.1f} MiB ({error:+.1%})")
    assert abs(error) <= TOLERANCE, f"predicted {predicted:.0f} B vs measured {measured} B ({error:+.1%})"
    return measured, predicted


def test_tiny_peak_matches_measurement(tmp_path):
    check_prediction("tiny", "none", False, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("recompute,bf16", [("none", False), ("full", False), ("none", True), ("full", True),
                                            ("selective", False), ("selective", True)])
def test_mid_size_peak_matches_measurement(recompute, bf16, tmp_path):
    check_prediction("mid", recompute, bf16, tmp_path)


@pytest.mark.slow
def test_tiny_full_recompute_bf16_matches_measurement(tmp_path):
    check_prediction("tiny", "full", True, tmp_path)


@pytest.mark.slow
def test_recompute_modes_order_as_measured(tmp_path):
    """Full recompute keeps less than none, measured and predicted alike (the mid-size config)."""
    none = check_prediction("mid", "none", False, tmp_path)
    full = check_prediction("mid", "full", False, tmp_path)
    assert full[0] < none[0] and full[1] < none[1]


def measured_ranks(tmp_path, *layout: str) -> tuple[dict, float]:
    """(peak per rank under torchrun on 2 ranks, the planner's peak) for the mid-size config, fp32, no recompute."""
    from tests.torchrun import torchrun

    model = model_arg("mid", tmp_path)
    size, frames, text_len = SHAPES["mid"]
    common = ["--model", model, "--size", size, "--frames", str(frames), "--text-len", str(text_len), "--recompute", "none"]
    out = torchrun(2, REPO / "tests/dist_scripts/train_step_peak.py", *common, *layout, env={"OMP_NUM_THREADS": "1"})
    peaks = {r["rank"]: r["peak_bytes"] for r in map(json.loads, re.findall(r"^RESULT (.*)$", out, re.M))}
    proc = plan(*common, *layout, "--target", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    return peaks, json.loads(proc.stdout)["peak_gib"] * 2**30


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--pp", "2", "--global-batch-size", "4"), ("--cp", "2", "--cp-comm-type", "ring"),
                                    ("--cp", "2", "--cp-comm-type", "ulysses"), ("--tp", "2"),
                                    ("--tp", "2", "--sequence-parallel")],
                         ids=["pp2-1f1b", "cp2-ring", "cp2-ulysses", "tp2", "tp2-sp"])
def test_two_rank_layout_peak_matches_measurement(layout, tmp_path):
    """Two ranks under torchrun. PP=2 with 4 micro batches of 1F1B: stage 0 holds two micro batches'
    activations (the planner's largest stage), stage 1 one. CP=2: each rank holds half the image frames and
    all text tokens. TP=2 (+SP: the norm / modulation / residual activations split over TP). The planner's
    peak is that of the largest rank."""
    peaks, predicted = measured_ranks(tmp_path, *layout)
    assert sorted(peaks) == [0, 1]
    if "--pp" in layout:
        assert peaks[0] > peaks[1]
    measured = max(peaks.values())
    error = predicted / measured - 1
    print(f"mid {' '.join(layout)}, recompute none fp32: measured {measured / 2**20:.1f} MiB (largest rank), "
          f"predicted {predicted / 2**20:.1f} MiB ({error:+.1%})")
    assert abs(error) <= TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_mid_size_peak_matches_cuda_allocator(recompute, tmp_path):
    """On a GPU: torch.cuda.max_memory_allocated of the same steps (bf16, Triton glue kernels)."""
    check_prediction("mid", recompute, True, tmp_path, target="gpu")


def test_parameter_count_is_the_models(single_process, device):
    """The planner's parameter arithmetic equals the built model (meta device: nothing allocated), also with the
    device's default device set (CUDA: a `gpu` variant, under the NCCL world a GPU host initialises)."""
    from hcustom_mc.model.config import get_model_config
    from hcustom_mc.plan.memory import stage_parameters
    from hcustom_mc.training.loop import whole_model

    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    with torch.device(device):
        for name, variant in (("tiny", "base"), ("tiny", "audio"), ("tiny", "editing"), ("13b", "audio")):
            cfg = get_model_config(name, variant)
            layers = range(cfg.num_double_blocks + cfg.num_single_blocks)
            planned = sum(n for n, _ in stage_parameters(cfg, 1, layers).values())
            assert planned == sum(p.numel() for p in whole_model(cfg).parameters()), (name, variant)
    if device.type == "cuda":
        assert single_process.device.type == "cuda" and torch.cuda.memory_allocated() - before < 1 << 20


def test_help_is_fast_and_imports_no_torch():
    start = time.time()
    proc = plan("--help")
    assert proc.returncode == 0 and "--gpu-memory" in proc.stdout
    assert time.time() - start < 3.0
    check = subprocess.run([sys.executable, "-c", "import sys, hcustom_mc.plan.__main__; print('torch' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": child_pythonpath()})
    assert check.stdout.strip() == "False", check.stderr


def test_issue_example_prints_every_part():
    proc = plan("--model", "13b", "--variant", "audio", "--size", "1280x720", "--frames", "129", "--tp", "4", "--pp", "2",
                "--cp", "2", "--dp", "8", "--micro-batch-size", "1", "--recompute", "full", "--bf16")
    assert proc.returncode == 0, proc.stderr
    for part in ("ESTIMATE", "weights", "gradients", "Adam moments", "fp32 main weights", "activations",
                 "communication buffers", "predicted peak (allocated by torch):", "step FLOPs", "not counted"):
        assert part in proc.stdout, part


def test_ranking_13b_on_8_gpus(tmp_path):
    """Every listed layout fits by the planner's own single-layout estimate, and they come best first."""
    args = ["--model", "13b", "--variant", "audio", "--size", "896x512", "--frames", "129", "--bf16", "--recompute",
            "full"]
    proc = plan(*args, "--gpus", "8", "--gpu-memory", "80GB", "--json", "--top", "100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    assert rows and all(r["fits"] for r in rows)
    keys = [(round(r["seconds_per_sample"], 6), r["model_parallel"], r["peak_gib"]) for r in rows]
    assert keys == sorted(keys)
    for row in rows[:3]:  # the ranking's numbers are those of the single-layout estimate
        m = re.match(r"TP (\d+)(?: \+SP)? x PP (\d+) x CP (\d+)(?: \((\w+)\))? x DP (\d+)", row["layout"])
        tp, pp, cp, comm, dp = m.groups()
        single = plan(*args, "--tp", tp, "--pp", pp, "--cp", cp, "--dp", dp, "--gpu-memory", "80GB", "--json",
                      *(["--cp-comm-type", comm] if comm else []))
        one = json.loads(single.stdout)
        assert one["fits"] and abs(one["peak_gib"] - row["peak_gib"]) < 1e-9
        assert one["device_total_gib"] <= 80e9 / 2**30


def test_ranking_says_when_nothing_fits():
    proc = plan("--model", "13b", "--size", "1280x720", "--frames", "129", "--bf16", "--gpus", "1", "--gpu-memory", "80GB")
    assert proc.returncode == 1
    assert "NONE FITS" in proc.stdout and "--recompute full" in proc.stdout


def test_sequence_parallel_and_context_parallel_shrink_activations():
    def peak(*extra):
        proc = plan("--model", "13b", "--size", "1280x720", "--frames", "129", "--bf16", "--recompute", "full",
                    "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["parts_gib"]["activations (kept for backward)"]

    base = peak("--tp", "4")
    # the block inputs shrink by TP; the final layer and the token refiner (not sequence-split) stay
    assert base / 4 < peak("--tp", "4", "--sequence-parallel") < 1.1 * base / 4
    assert peak("--tp", "4", "--cp", "2", "--cp-comm-type", "ring") < 0.6 * base


@pytest.mark.parametrize("args,message", [
    (["--size", "1280x721"], "multiples of 16"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--frames", "128"], "4k+1"),
    (["--tp", "5"], "num_heads 24 is not divisible by tensor_parallel 5"),
    (["--cp", "4", "--cp-comm-type", "ulysses", "--tp", "8"], "Ulysses"),
    (["--pp", "2", "--vpp", "40"], "exceed"),
    (["--model", "no-such-model"], "neither a preset"),
    (["--gpu-memory", "lots"], "expected a size"),
    (["--recompute", "most"], "invalid choice"),
    (["--trainable", "lora"], "--lora-rank"),
])
def test_bad_input_is_one_message_exit_2(args, message):
    base = {"--model": "13b", "--size": "1280x720", "--frames": "129"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    proc = plan(*[x for kv in base.items() for x in kv])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


def test_step_time_reads_as_a_total_and_the_run_length_is_given():
    args = ["--model", "13b", "--size", "1280x720", "--frames", "129", "--bf16", "--recompute", "full", "--tp", "4",
            "--pp", "2", "--dp", "4", "--global-batch-size", "32"]
    out = plan(*args, "--train-iters", "5000")
    assert out.returncode == 0, out.stderr
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("step time:")]
    total, plain, bubble = (float(x) for x in re.search(
        r"~([\d.]+) s .*all included: ([\d.]+) s of model FLOPs, x 4/3 for full recompute .*, x ([\d.]+) for the "
        r"pipeline bubble", line).groups())
    assert abs(plain * 4 / 3 * bubble - total) <= 0.01 * total  # the factors multiply to the figure given first
    (run,) = [l for l in out.stdout.splitlines() if l.startswith("run:")]
    days = float(re.search(r"= ([\d.]+) days", run).group(1))
    assert abs(days - 5000 * total / 86400) <= 0.06, run
    assert "+ 1/3" not in out.stdout
