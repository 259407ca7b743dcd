"""The wheels the GPU check needs on a bare GPU image, fetched here and carried with the working tree.

The GPU image (Python 3.12, torch, triton, numpy, einops, pyyaml, safetensors, psutil, tqdm, packaging,
transformers, pytest, pytest-timeout) lacks megatron-core, which importing hcustom_mc's model, training loop and sampler needs;
nothing else the check runs imports a missing package (mlflow is only used by the training loop's
Tracker, which bench/train_step.py replaces with a recorder). PyAV (35 MB) is optional: only the data
part uses it, and that part also needs DALI, whose 199 MB wheel cannot travel. The wheels, plus the
working tree, must stay under the 64 MiB that may travel to the GPU machine.

    python bench/gpu_check.py --fetch-wheels .whl [--with-pyav]      (bench/gpu_check.sh --fetch-wheels .whl)

The folder must be git-ignored (`.whl/` is, in .gitignore) and named in the device tool's `carry`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20  # what may travel: the working tree and the carried folders together
# Pinned to what the CPU machine tests (megatron-core 0.17+ needs Python 3.12, so it is never tested here).
WHEELS = ("megatron-core==0.16.1",)
PYAV = "av==19.0.2"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def download_command(folder: Path, requirements: list[str]) -> list[str]:
    """pip download of binary cp312 manylinux x86-64 wheels, no dependencies (each need is named)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for tag in PLATFORMS:
        cmd += ["--platform", tag]
    return [*cmd, "--platform", "any", "-d", str(folder), *requirements]


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree that travels: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                         check=True).stdout
    return sum((repo / name).stat().st_size for name in out.decode().split("\0") if name and (repo / name).is_file())


def project_name(wheel: Path) -> str:
    """'megatron_core-0.16.1-cp312-...whl' -> 'megatron-core' (normalised as pip does)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def check_folder(folder: Path, repo: Path = REPO) -> list[str]:
    """Problems that would stop the carry or the install: over the size limit, two versions of one project."""
    wheels = sorted(folder.glob("*.whl"))
    problems = []
    seen: dict[str, list[str]] = {}
    for w in wheels:
        seen.setdefault(project_name(w), []).append(w.name)
    problems += [f"two versions of {n} in {folder} (pip installs neither): {v}" for n, v in seen.items() if len(v) > 1]
    total = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes(repo)
    if total + tree > LIMIT_BYTES:
        problems.append(f"wheels {total / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB exceed the "
                        f"{LIMIT_BYTES // 2**20} MiB that may travel")
    return problems


def is_ignored(folder: Path, repo: Path = REPO) -> bool:
    try:
        rel = folder.resolve().relative_to(repo)
    except ValueError:
        return False
    return subprocess.run(["git", "check-ignore", "-q", str(rel) + "/"], cwd=repo).returncode == 0


def fetch_wheels(folder: Path, with_pyav: bool = False) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    requirements = [*WHEELS, *([PYAV] if with_pyav else [])]
    cmd = download_command(folder, requirements)
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: pip download failed (see above)", file=sys.stderr)
        return 1
    for w in sorted(folder.glob("*.whl")):
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    problems = check_folder(folder)
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    if problems:
        return 1
    total = sum(w.stat().st_size for w in folder.glob("*.whl"))
    carry = folder.resolve().relative_to(REPO) if folder.resolve().is_relative_to(REPO) else folder
    note = (f"name '{carry}' in the device tool's carry" if is_ignored(folder)
            else f"{folder} is not git-ignored inside this repo: put it in an ignored folder (e.g. .whl/) and carry it")
    print(f"{total / 2**20:.1f} MiB of wheels in {folder} (working tree {tree_bytes() / 2**20:.1f} MiB); {note}; "
          f"on the GPU machine: bench/gpu_check.sh --wheels {carry}")
    return 0
