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

SMOKE = ["env", "gpu_numerics", "train_step", "sampler"]
BENCH = ["pytest_gpu", "gloo_on_cuda", "kernels", "attention", "train_step_720p", "sampler_720p", "sampler_modes", "data"]
PARTS = SMOKE + BENCH


@pytest.mark.parametrize("tier", ["smoke", pytest.param("all", marks=pytest.mark.slow)])
def test_dry_run_runs_every_part(tmp_path, tier):
    """The tier at tiny shapes on CPU (the smoke tier is the default; both tiers: -m slow): every part runs or says
    why not."""
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--tier", tier, "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    stem = tmp_path / f"gpu_check_dryrun_cpu_{tier}"
    summary = stem.with_suffix(".json")
    failed_logs = ""
    if proc.returncode and summary.is_file():
        parts = json.loads(summary.read_text())["parts"]
        failed_logs = "".join(f"\n--- {n} ---\n{p.get('log_tail', '')}" for n, p in parts.items()
                              if p["status"] not in ("ok", "skipped"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:] + failed_logs
    assert "GPU check plan" in proc.stdout and "bench/train_step.py" in proc.stdout
    result = json.loads(summary.read_text())
    parts = result["parts"]
    expected = PARTS if tier == "all" else SMOKE
    assert list(parts) == expected
    assert {n: p["status"] for n, p in parts.items() if p["status"] not in ("ok", "skipped")} == {}
    env = result["env"]
    assert env["torch"] and set(gc.OPTIONAL_IMPORTS) <= set(env["imports"]) and env["hcustom_backend"] == "gloo"
    assert parts["gpu_numerics"]["counts"].get("skipped", 0) > 0 and not parts["gpu_numerics"]["counts"].get("failed")
    train = parts["train_step"]["data"]
    assert train["step_time_s"] > 0 and train["tflops_per_device"] > 0 and train["bf16"] and train["recompute"] == "full"
    assert "s / step" in parts["sampler"]["report"]
    md = stem.with_suffix(".md").read_text()
    for name in expected:
        assert f"| {name} |" in md
    assert "needs CUDA" in md  # the gpu tests said why they skipped
    assert "what one GPU cannot cover" in md and "reduce-scatter" in md and "DALI" in md
    assert md.count("device: CPU (dry run") >= len(expected) - 1  # the device of every figure, beside its command
    assert stem.with_suffix(".log").stat().st_size > 0
    # the results each part wrote when it ended: junit XML per pytest part, a JSON line per measurement
    pytest_parts = ("gpu_numerics", "pytest_gpu", "gloo_on_cuda") if tier == "all" else ("gpu_numerics",)
    for name in pytest_parts:
        assert gc.junit_outcomes(tmp_path / f"{stem.name}.{name}.xml")["counts"] == parts[name]["counts"]
    lines = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert {r["bench"] for r in lines} >= {"train_step", "sampler"}
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back from $OUT: 8 files at most
    if tier == "all":
        has_attention = (REPO / "bench" / "attention.py").is_file()
        assert parts["attention"]["status"] == ("ok" if has_attention else "skipped")
        if not has_attention:
            assert "not present" in parts["attention"]["reason"]
        assert parts["pytest_gpu"]["counts"].get("skipped", 0) > 0 and not parts["pytest_gpu"]["counts"].get("failed")
        assert parts["gloo_on_cuda"]["counts"].get("passed", 0) > 0
        train = parts["train_step_720p"]["data"]
        assert train["step_time_s"] > 0 and train["tflops_per_device"] > 0 and train["bf16"]
        assert "| layernorm_modulate |" in parts["kernels"]["report"]
        assert "s / step" in parts["sampler_720p"]["report"]
        assert {r["bench"] for r in lines} >= {"kernels", "attention"}


def _gpu_env(dali=True, av=True, timeout=True):
    return {"gpu": "NVIDIA H200", "imports": {"nvidia.dali": {"ok": dali}, "av": {"ok": av},
                                              "pytest_timeout": {"ok": timeout}}}


@pytest.mark.parametrize("dali", [True, False])
def test_tiers_at_gpu_shapes_fit_their_budgets(tmp_path, dali):
    parts = gc.plan(_gpu_env(dali=dali), tmp_path, dry_run=False, stem=tmp_path / "gpu_check_x")
    assert [p.name for p in parts] == PARTS
    assert [p.name for p in gc.select(parts, "smoke")] == SMOKE
    assert [p.name for p in gc.select(parts, "bench")] == ["env"] + BENCH
    assert [p.name for p in gc.select(parts, "all")] == PARTS
    assert [p.name for p in gc.select(parts, "smoke", {"kernels"})] == ["env", "kernels"]
    # one device call each: the smoke tier within 240 s of command time, the bench tier within 375 s; every
    # SIGINT and SIGKILL falls inside its part's box, so the boxes are the whole story
    assert gc.tier_box_s(parts, "smoke") <= gc.TIER_BUDGET_S["smoke"] <= 240
    assert gc.tier_box_s(parts, "bench") <= gc.TIER_BUDGET_S["bench"] <= 375
    assert all(0 < gc.grace_s(p.box_s) < p.box_s for p in parts)
    cmd = {p.name: " ".join(p.cmd) if p.cmd else "" for p in parts}
    assert "-m gpu tests/test_gpu_paths.py" in cmd["gpu_numerics"]
    assert "-m gpu" in cmd["pytest_gpu"] and "--ignore=tests/test_gpu_paths.py" in cmd["pytest_gpu"]
    for name, tier in (("gpu_numerics", "smoke"), ("pytest_gpu", "bench"), ("gloo_on_cuda", "bench")):
        assert f"--junitxml={tmp_path / f'gpu_check_x.{name}.xml'}" in cmd[name] and " -v " in cmd[name]
        assert f"--timeout={gc.TEST_TIMEOUT_S[tier]}" in cmd[name]  # pytest-timeout is on the image
    assert "--shape 720p --dtype bf16" in cmd["kernels"]
    assert "--model 13b --double-blocks 2 --single-blocks 4 --size 848x480 --frames 33" in cmd["train_step"]
    assert "--warmup 0 --steps 1" in cmd["train_step"]
    for name in ("train_step_720p", "sampler_720p"):
        assert "--model 13b --double-blocks 2 --single-blocks 4 --size 1280x720 --frames 129" in cmd[name], name
    assert "--bf16 --recompute full" in cmd["train_step_720p"] and "--dtype bfloat16" in cmd["sampler_720p"]
    for name in ("train_step", "sampler", "kernels", "attention", "train_step_720p", "sampler_720p"):
        assert f"--jsonl {tmp_path / 'gpu_check_x.jsonl'}" in cmd[name], name
    assert ("--size 1280x720" in cmd["data"]) == dali
    assert gc.gpu_slug(_gpu_env(), dry_run=False) == "nvidia_h200"
    dry = {p.name: " ".join(p.cmd) for p in gc.plan(_gpu_env(), tmp_path, True) if p.cmd}  # a slow CPU: wider limits
    assert f"--timeout={gc.TEST_TIMEOUT_S['bench'] * gc.DRY_RUN_BOX_SCALE}" in dry["gloo_on_cuda"]
    # without pytest-timeout the pytest parts run without the flag rather than fail on it
    assert not any("--timeout" in a for p in gc.plan(_gpu_env(timeout=False), tmp_path, False) for a in p.cmd or [])


def test_optional_parts_skip_saying_why(tmp_path, monkeypatch):
    parts = {p.name: p for p in gc.plan(_gpu_env(dali=False), tmp_path, dry_run=False)}
    assert parts["data"].cmd is None and "nvidia.dali does not import" in parts["data"].reason
    fake = tmp_path / "repo"
    (fake / "bench").mkdir(parents=True)
    monkeypatch.setattr(gc, "REPO", fake)
    assert "not present" in {p.name: p for p in gc.plan(_gpu_env(), tmp_path, False)}["attention"].reason
    (fake / "bench" / "attention.py").write_text("")
    attention = {p.name: p for p in gc.plan(_gpu_env(), tmp_path, False)}["attention"]
    assert attention.cmd[1:] == ["bench/attention.py", "--seq", "16384,65536", "--dtype", "bf16", "--warmup", "1",
                                 "--iters", "3", "--out", str(tmp_path / "attention.md"), "--jsonl",
                                 str(tmp_path / "gpu_check.jsonl")]


def test_failures_and_timeouts_are_reported_and_the_check_goes_on(tmp_path, monkeypatch):
    py = sys.executable
    env_json = tmp_path / "env.json"

    def fake_plan(env, work, dry_run, stem=None):
        return [
            gc.Part("env", "environment", 20, [py, "-c", f"open({str(env_json)!r}, 'w').write('{{\"gpu\": \"Test GPU\"}}')"],
                    data=env_json, tier="env"),
            gc.Part("boom", "a failing part", 20, [py, "-c", "print('about to fail'); raise SystemExit(3)"]),
            gc.Part("slow", "a part past its box", 2, [py, "-c", "import time; print('started', flush=True); time.sleep(60)"]),
            gc.Part("stubborn", "a part that ignores SIGINT", 3,
                    [py, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('deaf', flush=True); "
                               "time.sleep(60)"]),
            gc.Part("later", "a part after them", 20, [py, "-c", "print('still ran')"]),
            gc.Part("absent", "an optional part", 20, reason="not present here"),
            gc.Part("other_tier", "a bench part", 20, [py, "-c", "print('never')"], tier="bench"),
        ]

    monkeypatch.setattr(gc, "plan", fake_plan)
    monkeypatch.setattr(gc, "MIN_BOX_S", 1)
    assert gc.main(["--out-dir", str(tmp_path / "out")]) == 1
    result = json.loads((tmp_path / "out" / "gpu_check_test_gpu_smoke.json").read_text())
    status = {n: p["status"] for n, p in result["parts"].items()}
    assert status == {"env": "ok", "boom": "failed", "slow": "timeout", "stubborn": "timeout", "later": "ok",
                      "absent": "skipped"}
    assert result["parts"]["boom"]["rc"] == 3 and "about to fail" in result["parts"]["boom"]["log_tail"]
    assert result["parts"]["slow"]["seconds"] < 30 and "started" in result["parts"]["slow"]["log_tail"]
    # SIGINT a second before its 3 s box ends, ignored; SIGKILL at the end of the box
    stubborn = result["parts"]["stubborn"]
    assert 2 <= stubborn["seconds"] < 10 and stubborn["rc"] == -9 and "killed after the grace" in stubborn["reason"]
    md = (tmp_path / "out" / "gpu_check_test_gpu_smoke.md").read_text()
    assert "## boom: failed" in md and "## slow: timeout" in md and "still ran" in md and "not present here" in md
    assert "never" not in (tmp_path / "out" / "gpu_check_test_gpu_smoke.log").read_text()


def test_the_budget_counts_from_the_commands_start(tmp_path, monkeypatch):
    """A tier's budget is command time: what bench/gpu_check.sh spent before the check (installing the wheels)
    comes off it, so the parts still end inside it."""
    import time

    py = sys.executable
    env_json = tmp_path / "env.json"

    def fake_plan(env, work, dry_run, stem=None):
        return [gc.Part("env", "environment", 20, [py, "-c", f"open({str(env_json)!r}, 'w').write('{{}}')"], data=env_json,
                        tier="env"),
                gc.Part("short", "fits in what is left", 15, [py, "-c", "print('ran')"]),
                gc.Part("long", "does not", 30, [py, "-c", "print('never')"])]

    monkeypatch.setattr(gc, "plan", fake_plan)
    monkeypatch.setenv("HCUSTOM_GPU_CHECK_START", str(time.time() - 30))  # the .sh began 30 s ago
    assert gc.main(["--out-dir", str(tmp_path / "out"), "--budget", "60"]) == 0
    parts = json.loads((tmp_path / "out" / "gpu_check_nogpu_smoke.json").read_text())["parts"]
    assert parts["short"]["status"] == "ok" and parts["short"]["box_s"] <= 30
    assert parts["long"]["status"] == "skipped" or parts["long"]["box_s"] < 30
    monkeypatch.setenv("HCUSTOM_GPU_CHECK_START", "not a time")
    assert abs(gc.command_start() - time.time()) < 5


CUT_OFF = """
import json, sys
from pathlib import Path
from bench import gpu_check as gc

py, tests, out = sys.executable, sys.argv[1], sys.argv[2]
MEASURE = "import json, sys; open(sys.argv[1], 'a').write(json.dumps({'bench': 'probe', 'value': 42}) + chr(10))"
HANG = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); print('hanging', flush=True); time.sleep(600)"


def plan(env, work, dry_run, stem=None):
    stem = stem or work / "gpu_check"
    xml, jsonl = stem.with_name(stem.name + ".tests.xml"), stem.with_name(stem.name + ".jsonl")
    probe = "import json, sys; open(sys.argv[1], 'w').write(json.dumps({'gpu': 'Test GPU'}))"
    return [gc.Part("env", "environment", 60, [py, "-c", probe, str(work / "env.json")], data=work / "env.json", tier="env"),
            gc.Part("tests", "a pytest part", 120, [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--rootdir={tests}",
                                                     f"--junitxml={xml}", tests], junit=xml),
            gc.Part("measure", "one measurement", 60, [py, "-c", MEASURE, str(jsonl)]),
            gc.Part("hang", "the part the check is cut off in", 600, [py, "-c", HANG, str(Path(out) / "hang.pid")]),
            gc.Part("after", "a part never reached", 60, [py, "-c", "print('never')"])]


gc.plan = plan
sys.exit(gc.main(["--out-dir", out]))
"""


def _alive(pid: int) -> bool:
    """Running, not a zombie left for an init that does not reap."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_check_killed_halfway_leaves_the_finished_parts_and_a_summary(tmp_path):
    """SIGKILL of the check's whole process group while a part runs (a device call cut off at its limit): every
    part that finished has its results in the output folder, the summary names the part it was cut off in and
    the parts never reached, and no part outlives the check."""
    import signal
    import time

    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_probe.py").write_text("import pytest\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\n"
                                          "def test_c():\n    pytest.skip('not here')\n")
    out = tmp_path / "out"
    check = subprocess.Popen([sys.executable, "-c", CUT_OFF, str(tests), str(out)], cwd=REPO, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": child_pythonpath()}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    summary = out / "gpu_check_test_gpu_smoke.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and check.poll() is None:
            if (out / "hang.pid").is_file() and summary.is_file() and \
                    json.loads(summary.read_text())["parts"]["hang"]["status"] == "running":
                break
            time.sleep(0.5)
        assert check.poll() is None, check.stdout.read()
        os.killpg(check.pid, signal.SIGKILL)
        check.wait(timeout=30)
    finally:
        if check.poll() is None:
            os.killpg(check.pid, signal.SIGKILL)
    hang_pid = int((out / "hang.pid").read_text())
    time.sleep(0.5)
    assert not _alive(hang_pid), "the part outlived the check"  # nothing left holding the GPU
    result = json.loads(summary.read_text())
    assert {n: p["status"] for n, p in result["parts"].items()} == {
        "env": "ok", "tests": "ok", "measure": "ok", "hang": "running", "after": "pending"}
    assert result["parts"]["tests"]["counts"] == {"passed": 2, "skipped": 1} and result["unfinished"]
    assert gc.junit_outcomes(out / "gpu_check_test_gpu_smoke.tests.xml")["counts"] == {"passed": 2, "skipped": 1}
    assert json.loads((out / "gpu_check_test_gpu_smoke.jsonl").read_text()) == {"bench": "probe", "value": 42}
    assert "hanging" in (out / "gpu_check_test_gpu_smoke.log").read_text()
    md = (out / "gpu_check_test_gpu_smoke.md").read_text()
    assert "cut off or still running" in md and "## hang: running" in md and "## after: pending" in md
    assert "## tests: ok" in md and "pytest: 2 passed, 1 skipped" in md and "not reached" in md
    assert not list(out.glob("*.tmp"))  # the summaries are replaced whole, never half written


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


def _interpreter_without(tmp_path: Path, hidden: tuple[str, ...]) -> Path:
    """A virtual environment whose packages are this interpreter's, less those whose names start with `hidden`
    (linked one by one, not copied): the GPU image, which has torch and triton but neither megatron-core nor
    this checkout installed."""
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = next((venv / "lib").glob("python3*/site-packages"))
    for folder in map(Path, site.getsitepackages()):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if not entry.name.lower().startswith(hidden) and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return venv / "bin" / "python"


DEVICE_CHILDREN = ["tests/test_device.py::test_cpu_layer_is_installed_for_gloo_on_a_cuda_host"]  # the gloo-on-CUDA test
ORIGIN = """
import json
from tests.torchrun import run_python
out = run_python("-c", "import megatron.core, hcustom_mc; print('FROM', megatron.core.__file__, hcustom_mc.__file__)")
print(json.dumps(next(line for line in out.splitlines() if line.startswith("FROM ")).split()[1:]))
"""


def test_children_find_megatron_only_through_the_callers_pythonpath(tmp_path):
    """On the GPU image megatron-core exists only in the folder bench/gpu_check.sh installs the carried wheel into,
    on PYTHONPATH, and so does the checkout: a test that starts a child with PYTHONPATH set to the repository alone
    fails there with ModuleNotFoundError: megatron (three did). Here the same: an interpreter whose own packages lack
    megatron-core and hcustom_mc, megatron-core unpacked in a temporary folder on PYTHONPATH; the test helpers'
    children (and tests that start megatron-importing children) must find it there."""
    import importlib.util

    megatron = Path(importlib.util.find_spec("megatron.core").origin).parents[1]
    site = tmp_path / "site"  # what `pip install --target` of the wheel leaves, as bench/gpu_check.sh --wheels does
    site.mkdir()
    (site / "megatron").symlink_to(megatron, target_is_directory=True)
    python = _interpreter_without(tmp_path, ("megatron", "hcustom", "__editable__"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), str(REPO / "kernels")])}  # what gpu_check.sh exports
    bare = subprocess.run([str(python), "-c", "import megatron.core"], env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "No module named 'megatron'" in bare.stderr  # the interpreter has none of its own
    origin = subprocess.run([str(python), "-c", ORIGIN], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert origin.returncode == 0, origin.stdout[-2000:] + origin.stderr[-3000:]
    found_megatron, found_checkout = json.loads(origin.stdout.splitlines()[-1])
    assert found_megatron.startswith(str(site)) and found_checkout.startswith(str(REPO))
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEVICE_CHILDREN], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f"{len(DEVICE_CHILDREN)} passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


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
    # besides what the caller's own PYTHONPATH already holds (a wheel folder of an enclosing check, say)
    roots = {str(REPO), str(REPO / "kernels")}
    callers = {d.name[: -len(".dist-info")] for e in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if e and e not in roots and Path(e).is_dir() for d in Path(e).glob("*.dist-info")}
    assert json.loads(probe.read_text())["installed_from_wheels"] == sorted(callers | {"gpucheck_probe_pkg-1.2"})
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
