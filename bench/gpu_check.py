"""The prepared GPU check: one command that turns the project's unverified GPU paths into measured facts.

    bench/gpu_check.sh --wheels .whl --out-dir $OUT                 # on the GPU machine: the smoke tier (240 s)
    bench/gpu_check.sh --wheels .whl --out-dir $OUT --tier bench    # a second call: the bench tier (375 s)
    bench/gpu_check.sh --dry-run [--tier all]                       # on CPU: the same logic at tiny shapes
    bench/gpu_check.sh --fetch-wheels .whl                          # here: the cp312 wheels the bare GPU image lacks

Two tiers, so that one short call proves the paths production takes before a second one measures them. Each
part runs in its own process group with a time box: SIGINT GRACE_S seconds before the box ends (pytest then
still writes its junit XML), SIGKILL at the end of the box, both inside the tier's budget. A failing or
timed-out part is reported and the check goes on.

  smoke (240 s): env, then
    gpu_numerics  pytest -m gpu tests/test_gpu_paths.py: NCCL world of one, every attention backend this image
                  has (cuDNN, FA3, FA2, TE, SDPA) forward + backward against fp32 on the padded B=2 batch, the DiT
    train_step    bench/train_step.py: one bf16 step at 13B width (2 double + 4 single blocks), 848x480 x 33
    sampler       bench/sampler.py: one guided sampler step at that shape, one GPU
  bench (375 s): env, then
    pytest_gpu    pytest -m gpu on the rest of tests/ (compiled Triton kernels, placement, memory model)
    gloo_on_cuda  tests/test_device.py: the multi-process path a one-GPU host takes (gloo, CUDA untouched)
    kernels       bench/fused_kernels.py at 720p, bf16: ours vs eager vs torch.compile, GB/s, % of HBM
    attention     bench/attention.py --seq 16384,65536 --dtype bf16: TFLOP/s per backend
    train_step    one bf16 step at 13B width, 1280x720 x 129 frames (720p length), full recompute
    sampler       one guided sampler step at the same shape
    sampler_modes bench/sampler.py --modes at 848x480 x 33: resident, block offload, fp8, step cache side by side
    data          bench/data.py: DALI GPU decode frames/s against PyAV (when nvidia.dali and av import)

Every result is written the moment its part ends, into --out-dir, as gpu_check_<gpu>_<tier>.*:
  .log          every part's output, streamed as it is printed
  .<part>.xml   junit XML of each pytest part (per-test outcomes, also of a part cut off by its box)
  .jsonl        one JSON line per measurement (kernel row, attention row, training step, sampler layout)
  .md, .json    the summary, rewritten before and after every part: a SIGKILL of the whole check leaves
                the finished parts' results and a summary that names the part it was running
Exit status 1 when a part failed or timed out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.checkout import IMPORT_ROOTS, pythonpath, use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed

from bench.wheels import fetch_wheels  # noqa: E402

TIERS = ("smoke", "bench")
TIER_BUDGET_S = {"smoke": 240, "bench": 375}  # command time of one device call each (the limit is 600 s a call)
GRACE_S = 10  # SIGINT this long before a part's box ends (a fifth of a short box), SIGKILL at its end: both inside it
TEST_TIMEOUT_S = {"smoke": 60, "bench": 30}  # per test (pytest-timeout), well inside the part's box
OPTIONAL_IMPORTS = ("flash_attn", "flash_attn_interface", "transformer_engine", "nvidia.dali", "megatron.core",
                    "av", "mlflow", "triton", "pytest_timeout")
STATUSES = ("ok", "partial", "skipped", "failed", "timeout", "running", "pending")
MIN_BOX_S = 10  # a part with less time left than this is skipped
DRY_RUN_BOX_SCALE = 8  # a dry run proves the logic on a (shared, slow) CPU, not the GPU timings: wider boxes
# What a lease of one GPU cannot show, whatever it runs: said in every report, so no figure is read as covering it.
NOT_COVERED = (
    "multi-rank NCCL: ring attention's point-to-point K/V exchange, Ulysses all-to-all with uneven splits, "
    "megatron's pipeline point-to-point, the distributed optimizer's reduce-scatter / all-gather, sequence "
    "parallelism with transformer-engine linears (their multi-process tests run here on gloo, CPU tensors)",
    "DALI GPU video decoding: its wheel (199 MB) cannot travel with the 64 MiB working tree",
)


@dataclass
class Part:
    name: str
    title: str
    box_s: int
    cmd: list[str] | None = None  # None: skipped for `reason`
    reason: str = ""
    report: Path | None = None  # the part's own markdown, inlined in the check's report
    data: Path | None = None  # the part's own JSON, kept in the check's JSON
    tier: str = "smoke"  # smoke | bench; the env part belongs to every tier
    junit: Path | None = None  # pytest parts: their junit XML, in the output folder
    result: dict = field(default_factory=dict)


# ------------------------------------------------------------------ environment
def probe_environment() -> dict:
    """What this machine has (run in a child process: a crashing import cannot take the check down)."""
    import importlib
    import platform

    env: dict = {"python": platform.python_version(), "imports": {}}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_runtime"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), sms=props.multi_processor_count,
                       gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    except Exception as exc:  # torch itself missing is worth a report, not a crash
        env["torch"] = f"import failed: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        env["driver"] = out.stdout.split(",")[1].strip() if out.returncode == 0 and "," in out.stdout else None
    for name in OPTIONAL_IMPORTS:
        try:
            mod = importlib.import_module(name)
            env["imports"][name] = {"ok": True, "version": str(getattr(mod, "__version__", "?"))}
        except Exception as exc:
            env["imports"][name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    # what bench/gpu_check.sh --wheels put on PYTHONPATH for this run (dist-info names outside the repo)
    roots = {p.resolve() for p in IMPORT_ROOTS}
    extra = [Path(e) for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e and Path(e).resolve() not in roots]
    env["installed_from_wheels"] = sorted(d.name[: -len(".dist-info")] for e in extra if e.is_dir()
                                          for d in e.glob("*.dist-info"))
    try:
        import hcustom_mc.device as dev

        env["hcustom_backend"] = dev.dist_backend()
    except Exception as exc:
        env["hcustom_backend"] = f"failed: {exc}"
    return env


def gpu_slug(env: dict, dry_run: bool) -> str:
    if dry_run:
        return "dryrun_cpu"
    name = env.get("gpu") or "nogpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def imports_ok(env: dict, name: str) -> bool:
    return env.get("imports", {}).get(name, {}).get("ok", False)


# ------------------------------------------------------------------ the plan
SMOKE_SHAPE = ["--model", "13b", "--double-blocks", "2", "--single-blocks", "4", "--size", "848x480", "--frames", "33",
               "--text-len", "256"]  # 13B width at 15,900 image tokens: one step proves the path in seconds
BENCH_SHAPE = ["--model", "13b", "--double-blocks", "2", "--single-blocks", "4", "--size", "1280x720", "--frames", "129",
               "--text-len", "256"]  # 720p length: 122,400 image tokens
DRY_SHAPE = ["--model", "tiny", "--double-blocks", "1", "--single-blocks", "1", "--size", "64x48", "--frames", "5",
             "--text-len", "8"]


def pytest_cmd(env: dict, junit: Path, tier: str, dry_run: bool) -> list[str]:
    """pytest with a line per test (a part cut off still shows which tests ran and how), its junit XML, and a
    per-test time-out where pytest-timeout is installed (a hung test fails alone, the part goes on)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    timeout = TEST_TIMEOUT_S[tier] * (DRY_RUN_BOX_SCALE if dry_run else 1)
    return cmd + ([f"--timeout={timeout}"] if imports_ok(env, "pytest_timeout") else [])


def plan(env: dict, work: Path, dry_run: bool, stem: Path | None = None) -> list[Part]:
    """Every part of both tiers, in running order (env first). `stem`: where results go (the output folder's
    gpu_check_<gpu>_<tier>); the parts' own reports are written to `work` and inlined in the summary."""
    py = sys.executable
    stem = stem or work / "gpu_check"
    w = lambda name: work / name  # noqa: E731
    xml = lambda part: stem.with_name(f"{stem.name}.{part}.xml")  # noqa: E731
    jsonl = ["--jsonl", str(stem.with_name(stem.name + ".jsonl"))]
    parts = [Part("env", "environment", 25, [py, str(Path(__file__)), "--probe-env", str(w("env.json"))],
                  data=w("env.json"), tier="env")]

    # ---- smoke: the paths production takes, each once
    parts.append(Part("gpu_numerics", "pytest -m gpu tests/test_gpu_paths.py: attention backends (bf16 vs fp32, "
                      "forward + backward), NCCL world of one, the DiT in bf16", 70,
                      [*pytest_cmd(env, xml("gpu_numerics"), "smoke", dry_run), "-m", "gpu", "tests/test_gpu_paths.py"],
                      junit=xml("gpu_numerics")))
    smoke_shape = DRY_SHAPE if dry_run else SMOKE_SHAPE
    steps = ["--warmup", "0", "--steps", "1"]
    parts.append(Part("train_step", "one bf16 training step, 13B width, 2 double + 4 single blocks, 848x480 x 33, "
                      "full recompute", 90,
                      [py, "bench/train_step.py", *smoke_shape, "--bf16", "--recompute", "full", *steps,
                       "--out", str(w("train_step.md")), "--json", str(w("train_step.json")), *jsonl],
                      report=w("train_step.md"), data=w("train_step.json")))
    dtype = ["--dtype", "float32" if dry_run else "bfloat16"]
    parts.append(Part("sampler", "one guided sampler step at 848x480 x 33 (1 GPU, CFG 2 branches)", 55,
                      [py, "bench/sampler.py", "--layouts", "1", *smoke_shape, *dtype, "--steps", "1", "--warmup", "1",
                       "--out", str(w("sampler.md")), *jsonl], report=w("sampler.md")))

    # ---- bench: everything else, and the figures at 720p length
    parts.append(Part("pytest_gpu", "pytest -m gpu, the rest of tests/ (compiled Triton kernels, placement, memory "
                      "model)", 45, [*pytest_cmd(env, xml("pytest_gpu"), "bench", dry_run), "-m", "gpu",
                                     "--continue-on-collection-errors", "--ignore=tests/test_gpu_paths.py", "tests"],
                      tier="bench", junit=xml("pytest_gpu")))
    # 27 tests, several of them a child that imports megatron-core, one a 2-rank torchrun training run
    parts.append(Part("gloo_on_cuda", "multi-process tests on this host (gloo; CUDA left untouched)", 35,
                      [*pytest_cmd(env, xml("gloo_on_cuda"), "bench", dry_run), "tests/test_device.py",
                       *(["-k", "not two_ranks"] if dry_run else [])], tier="bench", junit=xml("gloo_on_cuda")))

    kernels = [py, "bench/fused_kernels.py", "--out", str(w("kernels.md")), *jsonl]
    kernels += (["--shape", "tiny", "--dtype", "fp32", "--warmup", "1", "--iters", "1", "--no-compile",
                 "--kernels", "layernorm_modulate,frame_cross_attention"] if dry_run
                else ["--shape", "720p", "--dtype", "bf16", "--warmup", "2", "--iters", "5"])
    parts.append(Part("kernels", "kernel benchmark (720p, bf16): ours vs eager vs torch.compile", 40, kernels,
                      report=w("kernels.md"), tier="bench"))

    title = "attention TFLOP/s per backend, 13B heads (24 x 128)"
    if (REPO / "bench" / "attention.py").is_file():
        seq = "256" if dry_run else "16384,65536"
        parts.append(Part("attention", title, 25, [py, "bench/attention.py", "--seq", seq, "--dtype", "bf16", "--warmup",
                                                   "1", "--iters", "3", "--out", str(w("attention.md")), *jsonl],
                          report=w("attention.md"), tier="bench"))
    else:
        parts.append(Part("attention", title, 25, reason="not present: bench/attention.py is not in this tree "
                          "(issue 11 adds it; expected flags: --seq 16384,65536 --dtype bf16 --out FILE)", tier="bench"))

    bench_shape = DRY_SHAPE if dry_run else BENCH_SHAPE
    parts.append(Part("train_step_720p", "one bf16 training step, 13B width, 2 double + 4 single blocks, 1280x720 x 129 "
                      "frames, full recompute", 75,
                      [py, "bench/train_step.py", *bench_shape, "--bf16", "--recompute", "full", "--warmup", "1",
                       "--steps", "1", "--out", str(w("train_step_720p.md")), "--json", str(w("train_step_720p.json")),
                       *jsonl], report=w("train_step_720p.md"), data=w("train_step_720p.json"), tier="bench"))
    parts.append(Part("sampler_720p", "one guided sampler step at 1280x720 x 129 (1 GPU, CFG 2 branches)", 35,
                      [py, "bench/sampler.py", "--layouts", "1", *bench_shape, *dtype, "--steps", "1", "--warmup", "1",
                       "--out", str(w("sampler_720p.md")), *jsonl], report=w("sampler_720p.md"), tier="bench"))

    # the one-GPU modes through the real sampler command, each against resident (bench/sampler.py --modes)
    modes = ["resident", "blocks", "fp8", "cache=0.1"]
    parts.append(Part("sampler_modes", "sampling modes side by side at 848x480 x 33, 8 steps (resident, block offload, "
                      "fp8 weights, step cache; 1 double + 2 single blocks): s/step, peak memory, PSNR/SSIM against resident", 75,
                      [py, "bench/sampler.py", "--modes", *modes, *smoke_shape, "--double-blocks", "1",
                       "--single-blocks", "2", "--text-len", "256", *dtype, "--steps", "8",
                       "--work", str(w("sampler_modes")), "--out", str(w("sampler_modes.md")), *jsonl],
                      report=w("sampler_modes.md"), tier="bench"))

    title = "video decoding: DALI GPU frames/s vs PyAV"
    if env and not (imports_ok(env, "nvidia.dali") and imports_ok(env, "av")):
        missing = [n for n in ("nvidia.dali", "av") if not imports_ok(env, n)]
        parts.append(Part("data", title, 20, reason=f"{' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not import here (DALI's 199 MB wheel "
                          "cannot travel within the 64 MiB working tree; see the env part)", tier="bench"))
    else:
        size = ["--size", "64x48", "--frames", "5", "--iters", "1"] if dry_run else ["--size", "1280x720", "--frames", "33", "--iters", "3"]
        parts.append(Part("data", title, 20, [py, "bench/data.py", *size, "--out", str(w("data.md"))], report=w("data.md"),
                          tier="bench"))
    if dry_run:
        for part in parts:
            part.box_s *= DRY_RUN_BOX_SCALE
    return parts


def select(parts: list[Part], tier: str, names: set[str] | None = None) -> list[Part]:
    """The env part, then the parts of `tier` (smoke, bench or all), or the parts named in `names` (any tier)."""
    tiers = set(TIERS) if tier == "all" else {tier}
    return [p for p in parts if p.tier == "env" or (p.name in names if names else p.tier in tiers)]


def tier_box_s(parts: list[Part], tier: str) -> int:
    """Seconds the parts of `tier` (with the env part) may take: the sum of the boxes of those that run."""
    return sum(p.box_s for p in select(parts, tier) if p.cmd is not None)


def print_plan(parts: list[Part], budget: int) -> None:
    print(f"GPU check plan ({len(parts)} parts, {budget} s in all; each part boxed: SIGINT to its processes up to "
          f"{GRACE_S} s before its box ends, SIGKILL at the end):", flush=True)
    for p in parts:
        what = " ".join(a if " " not in a else repr(a) for a in p.cmd) if p.cmd else f"skipped: {p.reason}"
        print(f"  {p.name:<15} {p.tier:<5} {p.box_s:>4} s  {p.title}\n                        {what}", flush=True)


# ------------------------------------------------------------------ running
def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 passed, 2 skipped, 1 error in 4.2s')."""
    lines = [l for l in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors|deselected)\b", l)
             and re.search(r"\bin [0-9.]+s", l)]
    if not lines:
        return {}
    return {("error" if k.startswith("error") else k): int(n)
            for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1])}


def pytest_summary(text: str, limit: int = 40) -> list[str]:
    """pytest's short summary (SKIPPED/FAILED/ERROR lines) and its final line."""
    keep = [l for l in text.splitlines() if l.startswith(("SKIPPED", "FAILED", "ERROR", "XFAIL"))]
    final = [l for l in text.splitlines() if re.search(r"\bin [0-9.]+s\b", l)][-1:]
    return keep[:limit] + (["..."] if len(keep) > limit else []) + final


def collection_errors(text: str) -> dict[str, str]:
    """Test module -> its section of pytest's ERRORS block, for each module that failed to collect."""
    errors, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^_+ ERROR collecting (\S+) _+$", line)
        if m:
            current = m.group(1)
            errors[current] = ""
        elif current and re.match(r"^(_{3,}|={3,}) ", line):
            current = None
        elif current:
            errors[current] += line + "\n"
    return errors


def junit_outcomes(path: Path) -> dict:
    """Counts and the failing tests' ids from pytest's junit XML ({} when pytest wrote none, or half of one)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        kind = "failed" if "failure" in kinds else "error" if "error" in kinds else "skipped" if "skipped" in kinds \
            else "passed"
        counts[kind] += 1
        if kind in ("failed", "error"):
            failing.append(name)
    return {"counts": {k: n for k, n in counts.items() if n}, "failing": failing}


def _signal_tree(proc: subprocess.Popen, sig: int, sent: list, seen: set) -> None:
    """Send `sig` to the part's process and every descendant (torchrun's workers, a test's subprocesses), as
    Ctrl-C reaches a foreground job. `seen` keeps every descendant found, so the SIGKILL also reaches one
    orphaned since the SIGINT (its parent exited)."""
    if proc.poll() is not None:
        return
    sent.append(sig)
    try:
        import psutil

        seen.update(psutil.Process(proc.pid).children(recursive=True))
        targets = [q for q in seen if q.is_running()]
    except ImportError:  # psutil is on the GPU image and in install_requires; without it, the part's process only
        targets = []
    except Exception:  # the process ended while we looked
        targets = [q for q in seen if q.is_running()]
    for pid in [proc.pid] + [q.pid for q in targets]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def grace_s(box: int) -> int:
    """Seconds between SIGINT and SIGKILL for a part of `box` seconds: GRACE_S, a fifth of a short box."""
    return max(1, min(GRACE_S, box // 5))


def run_part(part: Part, deadline: float, env_vars: dict, log) -> dict:
    """Run one part, its output streamed into `log` line by line; SIGINT to its process tree grace_s seconds
    before its box ends (KeyboardInterrupt: pytest still writes its junit XML), SIGKILL to the tree (torchrun's
    workers too) at the end. The box is cut to what is left before `deadline`. Parts stay in the check's own
    process group: whoever kills that group (a device call's time limit) ends the parts with it, so none is
    left holding the GPU for the next call."""
    import threading

    start = time.time()
    if part.cmd is None:
        return {"status": "skipped", "reason": part.reason, "seconds": 0.0}
    box = int(min(part.box_s, deadline - start))
    if box < MIN_BOX_S:
        return {"status": "skipped", "reason": "no time left in the check's budget", "seconds": 0.0}
    log.write(f"\n===== {part.name}: {' '.join(part.cmd)} (box {box} s)\n")
    log.flush()
    proc = subprocess.Popen(part.cmd, cwd=REPO, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    sent: list[int] = []
    seen: set = set()
    grace = grace_s(box)
    timers = [threading.Timer(box - grace, _signal_tree, (proc, signal.SIGINT, sent, seen)),
              threading.Timer(box, _signal_tree, (proc, signal.SIGKILL, sent, seen))]
    for t in timers:
        t.daemon = True
        t.start()
    tail: list[str] = []

    def stream():
        for line in proc.stdout:  # to the log as printed: a check killed mid-part keeps what the part said
            log.write(line)
            log.flush()
            tail.append(line)
            if len(tail) > 400:
                del tail[:200]

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    rc = proc.wait()  # the SIGKILL at the end of the box bounds this
    for t in timers:
        t.cancel()
    reader.join(timeout=5)  # a descendant that escaped the kill may hold the pipe open: do not wait for it
    out = "".join(tail)
    result = {"cmd": " ".join(part.cmd), "rc": rc, "seconds": round(time.time() - start, 1), "box_s": box,
              "log_tail": out[-3000:]}
    if sent:
        result["status"] = "timeout"
        result["reason"] = f"cut off at {box - grace if sent[0] == signal.SIGINT else box} s of its {box} s box" + (
            "; killed after the grace" if signal.SIGKILL in sent else "")
    if part.junit is not None or part.name.startswith("pytest"):
        result["junit"] = str(part.junit) if part.junit else None
        outcomes = junit_outcomes(part.junit) if part.junit else {}
        counts = outcomes.get("counts") or pytest_counts(out)
        result["counts"] = counts
        result["failing"] = outcomes.get("failing", [])
        result["summary"] = pytest_summary(out)
        errors = collection_errors(out)
        uncollected = sorted(m for m, text in errors.items() if re.search(r"\b(ModuleNotFoundError|ImportError)\b", text))
        if sent:
            pass
        elif rc == 0:
            result["status"] = "ok"
        elif errors and len(uncollected) == len(errors) == counts.get("error", 0) and not counts.get("failed"):
            # every error is a test module that cannot be imported here (a package this image lacks)
            result["status"], result["uncollected"] = "partial", uncollected
        else:
            result["status"] = "failed"
    elif not sent:
        result["status"] = "ok" if rc == 0 else "failed"
    if part.report and part.report.is_file():
        result["report"] = part.report.read_text()
    if part.data and part.data.is_file():
        try:
            result["data"] = json.loads(part.data.read_text())
        except json.JSONDecodeError as exc:
            result["data_error"] = str(exc)
    return result


# ------------------------------------------------------------------ the report
def device_line(env: dict, dry_run: bool) -> str:
    if env.get("gpu"):
        return f"{env['gpu']} ({env.get('gpus', 1)} visible; driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
    return "CPU (dry run: tiny shapes, no GPU)" if dry_run else "no GPU found"


def render(parts: list[Part], env: dict, header: dict) -> str:
    device = device_line(env, header["dry_run"])
    lines = [f"# GPU check, {header.get('tier', 'all')} tier: {env.get('gpu') or 'no GPU'}"
             f"{' (dry run)' if header['dry_run'] else ''}", "",
             f"command: `{header['command']}`  ", f"device: {device}  ",
             f"date: {header['date']}; {header['seconds']:.0f} s so far (budget {header['budget_s']} s)"
             + ("; **cut off or still running**" if header.get("unfinished") else ""),
             "", "| part | tier | status | seconds | box s | what |", "|---|---|---|---|---|---|"]
    for p in parts:
        r = p.result
        lines.append(f"| {p.name} | {p.tier} | {r.get('status', 'pending')} | {r.get('seconds', 0):.0f} | {p.box_s} | "
                     f"{p.title} |")
    lines += ["", "## what one GPU cannot cover", "",
              "Nothing in this report measures these; they need several GPUs (or, for DALI, its wheel on the machine):",
              ""] + [f"- {item}" for item in NOT_COVERED]
    lines += ["", "## environment", ""]
    for key in ("gpu", "nvidia_smi", "driver", "cuda_runtime", "torch", "python", "sms", "gpu_memory_gib", "capability",
                "hcustom_backend", "installed_from_wheels"):
        if key in env:
            lines.append(f"- {key}: {env[key]}")
    for name, r in env.get("imports", {}).items():
        lines.append(f"- import {name}: " + (f"yes ({r['version']})" if r["ok"] else f"no ({r['error']})"))
    for p in parts[1:]:
        r = p.result
        lines += ["", f"## {p.name}: {r.get('status', 'pending')}", "", p.title, ""]
        if r.get("status") in (None, "pending"):
            lines.append("not reached: the check was cut off before this part (run it with --tier "
                         f"{p.tier} or --parts {p.name})")
            continue
        lines += [f"command: `{r.get('cmd') or ' '.join(p.cmd or [])}`  ", f"device: {device}" + (
            f"  \nbox {r.get('box_s', p.box_s)} s" + (f", exit {r['rc']}" if "rc" in r else "") if p.cmd else ""), ""]
        if r.get("status") == "running":
            lines.append("**running when this summary was written**: if nothing follows, the check was cut off here "
                         "(its output so far is in the .log" + (", a line per finished test" if p.junit else "") + ")")
            continue
        if r.get("reason"):
            lines.append(f"{'skipped' if r.get('status') == 'skipped' else 'note'}: {r['reason']}")
        if r.get("counts"):
            lines.append("pytest: " + ", ".join(f"{n} {k}" for k, n in r["counts"].items())
                         + (f" (junit: `{Path(r['junit']).name}`)" if r.get("junit") else ""))
        if r.get("failing"):
            lines.append("failing: " + ", ".join(f"`{t}`" for t in r["failing"][:30]))
        if r.get("uncollected"):
            lines.append("not collected here (imports this image lacks): " + ", ".join(r["uncollected"]))
        if r.get("report"):  # the part's own report, without its title and command lines
            body = [l for l in r["report"].splitlines()[1:] if not l.startswith("command: `")]
            lines += ["", "\n".join(body).strip()]
        if r.get("counts") is not None:  # pytest: what was skipped or failed, and why
            lines += ["", "```", *r.get("summary", []), "```"]
        elif r.get("status") in ("failed", "timeout") or (r.get("cmd") and not r.get("report")):
            lines += ["", "```", r.get("log_tail", "")[-2500:].strip(), "```"]
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    """A summary killed while being written is never half a file: the old one stays until the new one is whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(stem: Path, parts: list[Part], env: dict, header: dict) -> None:
    """The .md and .json summary of every part so far (finished, running, pending)."""
    header = {**header, "seconds": time.time() - header["t0"],
              "unfinished": any(p.result.get("status") in (None, "running", "pending") for p in parts)}
    _write_atomically(stem.with_suffix(".md"), render(parts, env, header))
    summary = {**{k: v for k, v in header.items() if k != "t0"}, "gpu": env.get("gpu"), "env": env,
               "not_covered": list(NOT_COVERED), "parts": {q.name: {"title": q.title, "tier": q.tier, "box_s": q.box_s,
                                                                   "status": "pending", **q.result} for q in parts}}
    _write_atomically(stem.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")


def command_start() -> float:
    """When the command began: bench/gpu_check.sh's start (before it installs the wheels), else now. A tier's
    budget is command time, so the budget counts from there."""
    now = time.time()
    try:
        start = float(os.environ.get("HCUSTOM_GPU_CHECK_START", now))
    except ValueError:
        return now
    return start if now - 3600 < start <= now else now  # a stale or future value (an inherited env) is ignored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU: the same parts at tiny shapes (CI runs the smoke tier)")
    p.add_argument("--tier", choices=(*TIERS, "all"), default="smoke",
                   help="smoke (default; 240 s): env, GPU numerics tests, one 13B-width training step, one sampler "
                        "step; bench (375 s): the rest of pytest -m gpu, kernels, attention, 720p step and sampler, the sampling "
                        "modes; all")
    p.add_argument("--out-dir", type=Path, help="where the results go (default bench/results; dry run: a temp folder)")
    p.add_argument("--budget", type=int, help="seconds for all parts together (default: the tier's boxes)")
    p.add_argument("--parts", help="comma list of parts to run, from any tier (instead of --tier)")
    p.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="download the cp312 wheels the GPU image lacks, then stop")
    p.add_argument("--with-pyav", action="store_true", help="with --fetch-wheels: add PyAV (35 MB; the data part needs it)")
    p.add_argument("--probe-env", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_env:
        env = probe_environment()
        args.probe_env.write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env, indent=2))
        return 0
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels, with_pyav=args.with_pyav)

    t0 = command_start()
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    # (a check started by a part, e.g. a test of this file, counts from its own start)
    env_vars = {**{k: v for k, v in os.environ.items() if k != "HCUSTOM_GPU_CHECK_START"}, "PYTHONPATH": pythonpath(),
                "PYTHONUNBUFFERED": "1"}
    wanted = set(args.parts.split(",")) if args.parts else None
    tier = "parts" if wanted else args.tier
    header = {"command": " ".join(["bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run, "tier": tier,
              "t0": t0}
    # the env part first (its own log until the GPU, and so the results' names, is known): the plan depends on it
    env_part = plan({}, work, args.dry_run)[0]
    with open(work / "env.log", "w") as log:
        env_part.result = run_part(env_part, time.time() + env_part.box_s, env_vars, log)
    env = env_part.result.get("data", {})
    stem = out_dir / f"gpu_check_{gpu_slug(env, args.dry_run)}_{tier}"
    for old in out_dir.glob(stem.name + ".*"):  # a rerun into the same folder starts clean (its jsonl appends)
        old.unlink()
    parts = [env_part] + select(plan(env, work, args.dry_run, stem), args.tier, wanted)[1:]
    boxes = sum(q.box_s for q in parts if q.cmd is not None)
    tier_budget = sum(TIER_BUDGET_S[t] for t in (TIERS if args.tier == "all" else (args.tier,))) * (
        DRY_RUN_BOX_SCALE if args.dry_run else 1)
    header["budget_s"] = args.budget or (boxes if wanted else min(boxes, tier_budget))
    deadline = t0 + header["budget_s"]
    print_plan(parts, header["budget_s"])
    with open(stem.with_suffix(".log"), "w") as log:
        log.write((work / "env.log").read_text())
        for part in parts[1:]:
            part.result = {"status": "running"}
            write_summary(stem, parts, env, header)
            print(f"[{time.time() - t0:5.0f} s] {part.name} ...", flush=True)
            part.result = run_part(part, deadline, env_vars, log)
            write_summary(stem, parts, env, header)  # this part's results are in the output folder from now on
            print(f"[{time.time() - t0:5.0f} s] {part.name}: {part.result['status']} ({part.result['seconds']:.0f} s)"
                  + (f" - {part.result['reason']}" if part.result.get("reason") else ""), flush=True)
    write_summary(stem, parts, env, header)
    shutil.rmtree(work, ignore_errors=True)
    bad = [q.name for q in parts if q.result.get("status") in ("failed", "timeout")]
    written = sorted(f.name for f in out_dir.glob(stem.name + ".*"))
    print(f"wrote {', '.join(written)} to {out_dir} in {time.time() - t0:.0f} s" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
