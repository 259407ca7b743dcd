"""bench/fused_kernels.py documents itself and runs its tiny CPU case end to end (numbers on CPU mean nothing)."""

import subprocess
import sys

from tests.torchrun import REPO, child_pythonpath


def test_kernel_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "table.md"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1"}
    help_ = subprocess.run([sys.executable, "bench/fused_kernels.py", "--help"], cwd=REPO, capture_output=True, text=True,
                           env=env)
    assert help_.returncode == 0 and "720p" in help_.stdout
    proc = subprocess.run([sys.executable, "bench/fused_kernels.py", "--iters", "1", "--warmup", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for name in ("qk_norm_rope", "frame_cross_attention", "frame_cross_attention_vs_sdpa", "layernorm_modulate",
                 "gated_residual"):
        assert f"| {name} |" in table
    assert "command: `python bench/fused_kernels.py --iters 1" in table
