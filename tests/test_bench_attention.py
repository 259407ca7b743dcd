"""bench/attention.py documents itself and runs its small CPU case end to end (numbers on CPU mean nothing)."""

import subprocess
import sys

from tests.torchrun import REPO, child_pythonpath


def test_attention_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "table.md"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1"}
    help_ = subprocess.run([sys.executable, "bench/attention.py", "--help"], cwd=REPO, capture_output=True, text=True,
                           env=env)
    assert help_.returncode == 0 and "720p" in help_.stdout and "TFLOP/s" in help_.stdout
    proc = subprocess.run([sys.executable, "bench/attention.py", "--seq", "129,200", "--iters", "1", "--warmup", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for row in ("| sdpa | 129 |", "| blockwise | 200 |", "| 129 | 32 | 5 |", "| 200 | 50 | 5 |"):
        assert row in table, table
    assert "failed" not in table
    assert "command: `python bench/attention.py --seq 129,200" in table
