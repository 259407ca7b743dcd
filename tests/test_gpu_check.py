"""bench/gpu_check.sh: the dry run (every part at a tiny shape, on CPU) passes in CI; the plan at GPU
shapes fits the budget; failures and time-outs are reported while the check goes on; wheels install
into a temporary folder only; the wheel folder's checks."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.torchrun import REPO, child_pythonpath

sys.path.insert(0, str(REPO))
from bench import gpu_check as gc  # noqa: E402
from bench import wheels as wh  # noqa: E402

PARTS = ["env", "pytest_gpu", "gloo_on_cuda", "kernels", "attention", "train_step", "sampler", "data"]


def test_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    failed_logs = ""
    if proc.returncode and (tmp_path / "gpu_check_dryrun_cpu.json").is_file():
        parts = json.loads((tmp_path / "gpu_check_dryrun_cpu.json").read_text())["parts"]
        failed_logs = "".join(f"\n--- {n} ---\n{p.get('log_tail', '')}" for n, p in parts.items()
                              if p["status"] not in ("ok", "skipped"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:] + failed_logs
    assert "GPU check plan" in proc.stdout and "bench/train_step.py" in proc.stdout
    result = json.loads((tmp_path / "gpu_check_dryrun_cpu.json").read_text())
    parts = result["parts"]
    assert list(parts) == PARTS
    assert {n: p["status"] for n, p in parts.items() if p["status"] not in ("ok", "skipped")} == {}
    has_attention = (REPO / "bench" / "attention.py").is_file()
    assert parts["attention"]["status"] == ("ok" if has_attention else "skipped")
    if not has_attention:
        assert "not present" in parts["attention"]["reason"]
    env = result["env"]
    assert env["torch"] and set(gc.OPTIONAL_IMPORTS) <= set(env["imports"]) and env["hcustom_backend"] == "gloo"
    assert parts["pytest_gpu"]["counts"].get("skipped", 0) > 0 and not parts["pytest_gpu"]["counts"].get("failed")
    train = parts["train_step"]["data"]
    assert train["step_time_s"] > 0 and train["tflops_per_device"] > 0 and train["bf16"] and train["recompute"] == "full"
    assert "| layernorm_modulate |" in parts["kernels"]["report"]
    assert "s / step" in parts["sampler"]["report"]
    md = (tmp_path / "gpu_check_dryrun_cpu.md").read_text()
    for name in PARTS:
        assert f"| {name} |" in md
    assert "needs CUDA" in md  # the gpu tests said why they skipped
    assert (tmp_path / "gpu_check_dryrun_cpu.log").stat().st_size > 0


def _gpu_env(dali=True, av=True):
    return {"gpu": "NVIDIA H200", "imports": {"nvidia.dali": {"ok": dali}, "av": {"ok": av}}}


def test_plan_at_gpu_shapes_fits_the_budget(tmp_path):
    parts = gc.plan(_gpu_env(), tmp_path, dry_run=False)
    assert [p.name for p in parts] == PARTS
    assert sum(p.box_s for p in parts) <= gc.BUDGET_S <= 540  # under 9 minutes with the wheel install
    cmd = {p.name: " ".join(p.cmd) if p.cmd else "" for p in parts}
    assert "-m gpu" in cmd["pytest_gpu"] and "--shape 720p --dtype bf16" in cmd["kernels"]
    for name in ("train_step", "sampler"):
        assert "--model 13b --double-blocks 2 --single-blocks 4 --size 1280x720 --frames 129" in cmd[name], name
    assert "--bf16 --recompute full" in cmd["train_step"] and "--dtype bfloat16" in cmd["sampler"]
    assert "--size 1280x720" in cmd["data"]
    assert gc.gpu_slug(_gpu_env(), dry_run=False) == "nvidia_h200"


def test_optional_parts_skip_saying_why(tmp_path, monkeypatch):
    parts = {p.name: p for p in gc.plan(_gpu_env(dali=False), tmp_path, dry_run=False)}
    assert parts["data"].cmd is None and "nvidia.dali does not import" in parts["data"].reason
    fake = tmp_path / "repo"
    (fake / "bench").mkdir(parents=True)
    monkeypatch.setattr(gc, "REPO", fake)
    assert "not present" in {p.name: p for p in gc.plan(_gpu_env(), tmp_path, False)}["attention"].reason
    (fake / "bench" / "attention.py").write_text("")
    attention = {p.name: p for p in gc.plan(_gpu_env(), tmp_path, False)}["attention"]
    assert attention.cmd[1:] == ["bench/attention.py", "--seq", "16384,65536", "--dtype", "bf16", "--out",
                                 str(tmp_path / "attention.md")]


def test_failures_and_timeouts_are_reported_and_the_check_goes_on(tmp_path, monkeypatch):
    py = sys.executable
    env_json = tmp_path / "env.json"

    def fake_plan(env, work, dry_run):
        return [
            gc.Part("env", "environment", 20, [py, "-c", f"open({str(env_json)!r}, 'w').write('{{\"gpu\": \"Test GPU\"}}')"],
                    data=env_json),
            gc.Part("boom", "a failing part", 20, [py, "-c", "print('about to fail'); raise SystemExit(3)"]),
            gc.Part("slow", "a part past its box", 2, [py, "-c", "import time; print('started', flush=True); time.sleep(60)"]),
            gc.Part("later", "a part after them", 20, [py, "-c", "print('still ran')"]),
            gc.Part("absent", "an optional part", 20, reason="not present here"),
        ]

    monkeypatch.setattr(gc, "plan", fake_plan)
    monkeypatch.setattr(gc, "MIN_BOX_S", 1)
    assert gc.main(["--out-dir", str(tmp_path / "out")]) == 1
    result = json.loads((tmp_path / "out" / "gpu_check_test_gpu.json").read_text())
    status = {n: p["status"] for n, p in result["parts"].items()}
    assert status == {"env": "ok", "boom": "failed", "slow": "timeout", "later": "ok", "absent": "skipped"}
    assert result["parts"]["boom"]["rc"] == 3 and "about to fail" in result["parts"]["boom"]["log_tail"]
    assert result["parts"]["slow"]["seconds"] < 30 and "started" in result["parts"]["slow"]["log_tail"]
    md = (tmp_path / "out" / "gpu_check_test_gpu.md").read_text()
    assert "## boom: failed" in md and "## slow: timeout" in md and "still ran" in md and "not present here" in md


COLLECT = ("==================================== ERRORS ====================================\n"
           "________________ ERROR collecting {m} _________________\n{e}\n"
           "=========================== short test summary info ============================\nERROR {m}\n")


@pytest.mark.parametrize("text, rc, counts, status", [
    ("...\n3 passed, 2 skipped in 4.20s\n", 0, {"passed": 3, "skipped": 2}, "ok"),
    (COLLECT.format(m="tests/test_vae.py", e="E   ModuleNotFoundError: No module named 'diffusers'") +
     "5 passed, 1 error in 3.0s\n", 1, {"passed": 5, "error": 1}, "partial"),  # a module this image lacks; the rest ran
    (COLLECT.format(m="tests/b.py", e="E   SyntaxError: invalid syntax") + "5 passed, 1 error in 3.0s\n", 1,
     {"passed": 5, "error": 1}, "failed"),
    ("FAILED tests/a.py::t\n" + COLLECT.format(m="tests/b.py", e="E   ImportError: x") +
     "1 failed, 4 passed, 1 error in 2s\n", 1, {"failed": 1, "passed": 4, "error": 1}, "failed"),
])
def test_pytest_outcomes(tmp_path, text, rc, counts, status):
    assert gc.pytest_counts(text) == counts
    part = gc.Part("pytest_gpu", "t", 20, [sys.executable, "-c", f"import sys; print({text!r}); sys.exit({rc})"])
    with open(tmp_path / "log", "w") as log:
        result = gc.run_part(part, deadline=1e12, env_vars=dict(os.environ), log=log)
    assert result["status"] == status and result["counts"] == counts


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel: package `name` with VALUE = version."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VALUE = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def test_wheels_install_into_a_temporary_folder_only(tmp_path):
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "gpucheck_probe_pkg", "1.2")
    probe = tmp_path / "env.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--wheels", str(folder), "--probe-env", str(probe)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(probe.read_text())["installed_from_wheels"] == ["gpucheck_probe_pkg-1.2"]
    check = subprocess.run([sys.executable, "-c", "import gpucheck_probe_pkg"], capture_output=True)
    assert check.returncode != 0, "the wheel leaked into the system's packages"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("hcustom_gpu_check_site.*/gpucheck_probe_pkg"))
    empty = subprocess.run(["bash", "bench/gpu_check.sh", "--wheels", str(tmp_path / "none")], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no wheels" in empty.stderr


def test_wheel_folder_checks(tmp_path):
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "megatron_core", "0.16.1")
    assert wh.project_name(next(folder.glob("*.whl"))) == "megatron-core"
    assert wh.check_folder(folder) == []
    _wheel(folder, "megatron_core", "0.17.0")
    assert any("two versions of megatron-core" in p for p in wh.check_folder(folder))
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "huge-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(wh.LIMIT_BYTES)  # sparse: counts its size, costs no disk
    assert any("exceed the 64 MiB" in p for p in wh.check_folder(big))
    cmd = wh.download_command(folder, list(wh.WHEELS))
    assert cmd[-1] == "megatron-core==0.16.1" and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux_2_28_x86_64" in cmd


def test_train_step_reports_a_skipped_nonfinite_step(tmp_path):
    """A NaN loss at step 2 of 3 is skipped by the loop and reported by the benchmark (once it crashed: the
    recorder had no log_metrics); every step is a JSON line the moment it is measured."""
    out, jsonl = tmp_path / "train.json", tmp_path / "m.jsonl"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--double-blocks", "1", "--single-blocks", "1",
                           "--warmup", "1", "--steps", "2", "--json", str(out), "--jsonl", str(jsonl),
                           "--out", str(tmp_path / "train.md")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1",
                               "HCUSTOM_FAULT_NONFINITE": "loss:2"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped_steps"] == [2] and [s["step"] for s in result["steps"]] == [1, 3]
    assert result["step_time_s"] > 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["step"], r.get("skipped", False)) for r in lines] == [(1, False), (2, True), (3, False)]
    assert lines[1]["skipped_nonfinite_steps"] == 1 and all(r["bench"] == "train_step" for r in lines)
    assert "1 of 3 steps skipped" in (tmp_path / "train.md").read_text()


@pytest.mark.parametrize("name, bf16, tf32", [
    ("NVIDIA H100 80GB HBM3", 989.0, 494.7), ("NVIDIA H100 PCIe", 756.0, 378.0), ("NVIDIA H100 NVL", 835.0, 417.5),
    ("NVIDIA H200", 989.0, 494.7), ("NVIDIA H200 NVL", 835.0, 417.5), ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
    ("NVIDIA H100 something new", None, None),  # an unknown card: no MFU rather than another card's peak
])
def test_peak_tflops_is_the_cards_own(monkeypatch, name, bf16, tf32):
    from hcustom_mc.training import tracking

    monkeypatch.setattr(tracking, "uses_cuda", lambda: True)
    monkeypatch.setattr(tracking.torch.cuda, "get_device_name", lambda *a: name)
    assert (tracking.peak_tflops(True, None), tracking.peak_tflops(False, None)) == (bf16, tf32)
    assert tracking.peak_tflops(True, 500.0) == 500.0
