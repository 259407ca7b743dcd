"""Our import names never collide with another package's: Hugging Face's `kernels` (which transformers 5.25+ and
diffusers import) stays theirs from any working directory, with or without the checkout on PYTHONPATH; our Triton
kernels import as `hcustom_kernels` and stand alone (nothing of hcustom_mc); a wheel installs no top-level
`kernels`."""

import ast
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.torchrun import REPO, child_pythonpath

KERNEL_DIR = REPO / "kernels" / "hcustom_kernels"
try:
    importlib.metadata.distribution("kernels")  # Hugging Face's, installed (wherever `import kernels` leads)
    HF_KERNELS_INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    HF_KERNELS_INSTALLED = False
IMPORTS = """
import json, sys
import kernels
from transformers import CLIPTextModel, LlavaForConditionalGeneration, WhisperModel
import diffusers.loaders.peft
import hcustom_kernels.adaln, hcustom_kernels.block_attention, hcustom_kernels.frame_attention, hcustom_kernels.rope
print(json.dumps({"kernels": kernels.__file__, "hcustom_kernels": hcustom_kernels.__file__,
                  "hf_kernels_api": hasattr(kernels, "CUDAProperties")}))
import runpy  # then `python -m hcustom_mc.sample --help`, in the same process (it exits 0 after the usage)
sys.argv = ["hcustom_mc.sample", "--help"]
runpy.run_module("hcustom_mc.sample", run_name="__main__", alter_sys=True)
"""


def _run(args, cwd, with_checkout_path):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    if with_checkout_path:  # as the examples and the test launchers run children
        env["PYTHONPATH"] = child_pythonpath()
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not HF_KERNELS_INSTALLED, reason="Hugging Face's `kernels` package is not installed (the dev extra installs it)")
@pytest.mark.parametrize("where", ["repo_root", "other_dir"])
@pytest.mark.parametrize("with_checkout_path", [True, False], ids=["checkout_on_pythonpath", "plain"])
def test_hugging_face_kernels_stays_theirs_and_ours_import_beside_it(where, with_checkout_path, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    proc = _run(["-c", IMPORTS], cwd, with_checkout_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, usage = proc.stdout.split("\n", 1)
    found = json.loads(first)
    assert found["hf_kernels_api"] and not Path(found["kernels"]).resolve().is_relative_to(REPO), found
    assert Path(found["hcustom_kernels"]).resolve().parent == KERNEL_DIR.resolve(), found
    assert usage.startswith("usage:") and "--jobs" in usage, usage[:500]


def test_nothing_at_the_repository_root_is_a_kernels_package():
    # a regular package there (an __init__.py) would win over site-packages' `kernels` from the repository root
    assert not (REPO / "kernels" / "__init__.py").exists() and not (REPO / "kernels.py").exists()
    assert (KERNEL_DIR / "__init__.py").exists()


def test_the_kernel_package_imports_nothing_of_hcustom_mc():
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # lazy imports inside functions count too
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "hcustom_mc"], f"{path.name}:{node.lineno} imports {names}"
    code = ("import sys, hcustom_kernels.adaln, hcustom_kernels.block_attention, hcustom_kernels.frame_attention, "
            "hcustom_kernels.rope; print(sorted(m for m in sys.modules if m.split('.')[0] == 'hcustom_mc'))")
    proc = _run(["-c", code], REPO, True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-3000:]


def test_a_wheel_installs_no_top_level_kernels(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:  # the tracked tree only: no build folders or egg-info of the developer's checkout
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hcustom_mc-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert "kernels" not in tops, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hcustom_kernels/rope.py", "hcustom_kernels/block_attention.py", "hcustom_mc/__init__.py"} <= set(names)


def test_no_script_folder_holds_a_module_named_like_an_installed_package():
    """`python bench/x.py` puts bench/ first on sys.path: a bench/kernels.py there shadowed Hugging Face's kernels
    for every bench script that imports transformers or diffusers. Likewise for tools/, examples/ and tests/."""
    installed = importlib.metadata.packages_distributions()
    clashes = [str(p.relative_to(REPO)) for folder in ("bench", "tools", "examples", "tests")
               for p in (REPO / folder).iterdir() if not p.name.startswith("__")  # __pycache__, __init__.py
               if (p.stem if p.suffix == ".py" else p.name if p.is_dir() else None) in installed]
    assert clashes == [], clashes
