"""The prepared GPU check: one command that turns the project's unverified GPU paths into measured facts.

    bench/gpu_check.sh --wheels .whl [--out-dir DIR]      # on the GPU machine (what the .sh runs is this file)
    bench/gpu_check.sh --dry-run                          # on CPU: every part at a tiny shape, plan printed
    bench/gpu_check.sh --fetch-wheels .whl                # here: the cp312 wheels the bare GPU image lacks

Parts, in order, each in its own process under `timeout` (a failing or timed-out part is reported and
the check goes on; all boxes together fit the 9-minute budget on one H100/H200):
  env          GPU, driver, CUDA, torch, triton; which of flash_attn, flash_attn_interface (FA3),
               transformer_engine, nvidia.dali, megatron.core, av, mlflow import
  pytest_gpu   pytest -m gpu (compiled Triton kernels, bf16 tolerances, NCCL, attention backends)
  gloo_on_cuda tests/test_device.py: the multi-process path a one-GPU host takes (gloo, CUDA untouched)
  kernels      bench/fused_kernels.py at 720p, bf16: ours vs eager vs torch.compile, GB/s, % of HBM
  attention    bench/attention.py --seq 16384,65536 --dtype bf16 (when present: issue 11 adds it)
  train_step   bench/train_step.py: 13B width, 2 double + 4 single blocks, 1280x720 x 129 frames, bf16,
               full recompute: step time, model TFLOP/s, MFU, peak memory, the planner beside it
  sampler      bench/sampler.py: one guided sampler step at the same shape, one GPU
  data         bench/data.py: DALI GPU decode frames/s against PyAV (when nvidia.dali and av import)
Writes gpu_check_<gpu>.md, gpu_check_<gpu>.json and gpu_check_<gpu>.log (every part's full output).
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

BUDGET_S = 530  # all parts together; the .sh's wheel install and start-up fit in the rest of 9 minutes
OPTIONAL_IMPORTS = ("flash_attn", "flash_attn_interface", "transformer_engine", "nvidia.dali", "megatron.core",
                    "av", "mlflow", "triton")
STATUSES = ("ok", "partial", "skipped", "failed", "timeout")
MIN_BOX_S = 10  # a part with less time left than this is skipped


@dataclass
class Part:
    name: str
    title: str
    box_s: int
    cmd: list[str] | None = None  # None: skipped for `reason`
    reason: str = ""
    report: Path | None = None  # the part's own markdown, inlined in the check's report
    data: Path | None = None  # the part's own JSON, kept in the check's JSON
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
def plan(env: dict, work: Path, dry_run: bool) -> list[Part]:
    py = sys.executable
    w = lambda name: work / name  # noqa: E731
    parts = [Part("env", "environment", 30, [py, str(Path(__file__)), "--probe-env", str(w("env.json"))],
                  data=w("env.json"))]

    pytest = [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    parts.append(Part("pytest_gpu", "pytest -m gpu", 100, [*pytest, "-m", "gpu", "--continue-on-collection-errors", "tests"]))
    parts.append(Part("gloo_on_cuda", "multi-process tests on this host (gloo; CUDA left untouched)", 40,
                      [*pytest, "tests/test_device.py", *(["-k", "not two_ranks"] if dry_run else [])]))

    kernels = [py, "bench/fused_kernels.py", "--out", str(w("kernels.md"))]
    kernels += (["--shape", "tiny", "--dtype", "fp32", "--warmup", "1", "--iters", "1", "--no-compile",
                 "--kernels", "layernorm_modulate,frame_cross_attention"] if dry_run
                else ["--shape", "720p", "--dtype", "bf16", "--warmup", "3", "--iters", "10"])
    parts.append(Part("kernels", "kernel benchmark (720p, bf16): ours vs eager vs torch.compile", 100, kernels,
                      report=w("kernels.md")))

    title = "attention TFLOP/s per backend, 13B heads (24 x 128)"
    if (REPO / "bench" / "attention.py").is_file():
        seq = "256" if dry_run else "16384,65536"
        parts.append(Part("attention", title, 60, [py, "bench/attention.py", "--seq", seq, "--dtype", "bf16", "--out",
                                                   str(w("attention.md"))], report=w("attention.md")))
    else:
        parts.append(Part("attention", title, 60, reason="not present: bench/attention.py is not in this tree "
                          "(issue 11 adds it; expected flags: --seq 16384,65536 --dtype bf16 --out FILE)"))

    shape = (["--model", "tiny", "--double-blocks", "1", "--single-blocks", "1", "--size", "64x48", "--frames", "5",
              "--text-len", "8"] if dry_run else
             ["--model", "13b", "--double-blocks", "2", "--single-blocks", "4", "--size", "1280x720", "--frames", "129",
              "--text-len", "256"])
    parts.append(Part("train_step", "one bf16 training step, 13B width, 2 double + 4 single blocks, full recompute", 110,
                      [py, "bench/train_step.py", *shape, "--bf16", "--recompute", "full", "--warmup", "1", "--steps", "1",
                       "--out", str(w("train_step.md")), "--json", str(w("train_step.json"))],
                      report=w("train_step.md"), data=w("train_step.json")))
    parts.append(Part("sampler", "one guided sampler step at the same shape (1 GPU, CFG 2 branches)", 60,
                      [py, "bench/sampler.py", "--layouts", "1", *shape, "--dtype", "float32" if dry_run else "bfloat16",
                       "--steps", "1", "--warmup", "1", "--out", str(w("sampler.md"))], report=w("sampler.md")))

    title = "video decoding: DALI GPU frames/s vs PyAV"
    if env and not (imports_ok(env, "nvidia.dali") and imports_ok(env, "av")):
        missing = [n for n in ("nvidia.dali", "av") if not imports_ok(env, n)]
        parts.append(Part("data", title, 30, reason=f"{' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not import here (DALI's 199 MB wheel "
                          "cannot travel within the 64 MiB working tree; see the env part)"))
    else:
        size = ["--size", "64x48", "--frames", "5", "--iters", "1"] if dry_run else ["--size", "1280x720", "--frames", "33", "--iters", "3"]
        parts.append(Part("data", title, 30, [py, "bench/data.py", *size, "--out", str(w("data.md"))], report=w("data.md")))
    return parts


def print_plan(parts: list[Part], budget: int) -> None:
    print(f"GPU check plan ({len(parts)} parts, {budget} s in all; each part in its own process under `timeout`):", flush=True)
    for p in parts:
        what = " ".join(a if " " not in a else repr(a) for a in p.cmd) if p.cmd else f"skipped: {p.reason}"
        print(f"  {p.name:<13} {p.box_s:>4} s  {p.title}\n                        {what}", flush=True)


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


def run_part(part: Part, deadline: float, env_vars: dict, log) -> dict:
    start = time.time()
    if part.cmd is None:
        return {"status": "skipped", "reason": part.reason, "seconds": 0.0}
    box = int(min(part.box_s, deadline - start - 2))
    if box < MIN_BOX_S:
        return {"status": "skipped", "reason": "no time left in the check's budget", "seconds": 0.0}
    cmd = (["timeout", "-k", "10", str(box)] if shutil.which("timeout") else []) + part.cmd
    log.write(f"\n===== {part.name}: {' '.join(part.cmd)} (box {box} s)\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a time-out ends torchrun's workers too
    try:
        out, _ = proc.communicate(timeout=box + 30)  # `timeout` ends it at `box`; this is the backstop
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, rc = proc.communicate()[0], 124
    log.write(out)
    log.flush()
    result = {"cmd": " ".join(part.cmd), "rc": rc, "seconds": round(time.time() - start, 1), "box_s": box,
              "log_tail": out[-3000:]}
    if rc in (124, 137):
        result["status"] = "timeout"
    elif part.name.startswith("pytest") or part.name == "gloo_on_cuda":
        counts = pytest_counts(out)
        result["counts"] = counts
        result["summary"] = pytest_summary(out)
        errors = collection_errors(out)
        uncollected = sorted(m for m, text in errors.items() if re.search(r"\b(ModuleNotFoundError|ImportError)\b", text))
        if rc == 0:
            result["status"] = "ok"
        elif errors and len(uncollected) == len(errors) == counts.get("error", 0) and not counts.get("failed"):
            # every error is a test module that cannot be imported here (a package this image lacks)
            result["status"], result["uncollected"] = "partial", uncollected
        else:
            result["status"] = "failed"
    else:
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
def render(parts: list[Part], env: dict, header: dict) -> str:
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'}{' (dry run)' if header['dry_run'] else ''}", "",
             f"command: `{header['command']}`  ", f"date: {header['date']}; total {header['seconds']:.0f} s "
             f"(budget {header['budget_s']} s)", "", "| part | status | seconds | what |", "|---|---|---|---|"]
    for p in parts:
        r = p.result
        lines.append(f"| {p.name} | {r.get('status')} | {r.get('seconds', 0):.0f} | {p.title} |")
    lines += ["", "## environment", ""]
    for key in ("gpu", "nvidia_smi", "driver", "cuda_runtime", "torch", "python", "sms", "gpu_memory_gib", "capability",
                "hcustom_backend", "installed_from_wheels"):
        if key in env:
            lines.append(f"- {key}: {env[key]}")
    for name, r in env.get("imports", {}).items():
        lines.append(f"- import {name}: " + (f"yes ({r['version']})" if r["ok"] else f"no ({r['error']})"))
    for p in parts[1:]:
        r = p.result
        lines += ["", f"## {p.name}: {r.get('status')}", "", p.title, ""]
        if r.get("cmd"):
            lines += [f"command: `{r['cmd']}` (box {r.get('box_s')} s, exit {r.get('rc')})", ""]
        if r.get("reason"):
            lines.append(f"skipped: {r['reason']}")
        if r.get("counts"):
            lines.append("pytest: " + ", ".join(f"{n} {k}" for k, n in r["counts"].items()))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU: every part at a tiny shape (CI runs this)")
    p.add_argument("--out-dir", type=Path, help="where the report goes (default bench/results; dry run: a temp folder)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for all parts together")
    p.add_argument("--parts", help="comma list of parts to run (default all)")
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

    t0 = time.time()
    deadline = t0 + args.budget
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    env_vars = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONUNBUFFERED": "1"}
    wanted = set(args.parts.split(",")) if args.parts else None
    log_path = out_dir / "gpu_check.log"  # renamed once the GPU is known
    header = {"command": " ".join(["bench/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "budget_s": args.budget}
    with open(log_path, "w") as log:
        parts = plan({}, work, args.dry_run)  # the env part first: the rest of the plan depends on it
        env_part = parts[0]
        env_part.result = run_part(env_part, deadline, env_vars, log)
        env = env_part.result.get("data", {})
        parts = [env_part] + [q for q in plan(env, work, args.dry_run)[1:] if wanted is None or q.name in wanted]
        print_plan(parts, args.budget)
        for part in parts[1:]:
            print(f"[{time.time() - t0:5.0f} s] {part.name} ...", flush=True)
            part.result = run_part(part, deadline, env_vars, log)
            print(f"[{time.time() - t0:5.0f} s] {part.name}: {part.result['status']} ({part.result['seconds']:.0f} s)"
                  + (f" - {part.result['reason']}" if part.result.get("reason") else ""), flush=True)
    header["seconds"] = time.time() - t0
    slug = gpu_slug(env, args.dry_run)
    stem = out_dir / f"gpu_check_{slug}"
    log_path.replace(stem.with_suffix(".log"))
    stem.with_suffix(".md").write_text(render(parts, env, header))
    summary = {**header, "gpu": env.get("gpu"), "env": env,
               "parts": {q.name: {"title": q.title, **q.result} for q in parts}}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    bad = [q.name for q in parts if q.result.get("status") in ("failed", "timeout")]
    print(f"wrote {stem}.md, .json and .log in {header['seconds']:.0f} s" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
