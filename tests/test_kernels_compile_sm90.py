"""Every Triton kernel in kernels/ compiles for an H100/H200 (sm_90) at the 13B shapes, within its shared memory:
tests/sm90_compile.py records each launch on meta tensors and compiles it ahead of time with Triton's bundled
ptxas. No GPU is needed; this is the compiled path the CPU interpreter tests cannot see."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.torchrun import REPO, child_pythonpath

NVIDIA = Path(triton.__file__).parent / "backends" / "nvidia"


def jit_kernels() -> set[str]:
    """module.name of every @triton.jit function named *_kernel in kernels/ (what a GPU run launches)."""
    found = set()
    for path in (REPO / "kernels" / "hcustom_kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()):
            found.add(f"{path.stem}.{name}")
    return found


@pytest.mark.skipif(not (NVIDIA / "bin" / "ptxas").exists(), reason="this Triton has no NVIDIA backend / ptxas")
def test_every_kernel_compiles_for_sm90_at_13b_shapes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=child_pythonpath())  # a real compile, not a cache hit
    out = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, "tests/sm90_compile.py", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert {r["kernel"] for r in rows} == jit_kernels()  # a new kernel cannot go unchecked
    ring = {r["kernel"]: r for r in rows if r["kernel"].startswith("block_attention.")}
    assert ring["block_attention._fwd_kernel"]["constexprs"]["BLOCK_D"] == "128"  # the 13B head dim, compiled
    # frame attention's backward re-reads the dK/dV partials other threads stored in the previous row block:
    # its barrier must survive into the compiled kernel (the interpreter runs programs whole and cannot race)
    frame_bwd = [r for r in rows if r["kernel"] == "frame_attention._bwd_kernel"]
    assert frame_bwd and all(r["barriers"] >= 1 for r in frame_bwd), frame_bwd
