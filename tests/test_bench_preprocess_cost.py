"""bench/preprocess_cost.py: shard bytes per clip from the real shard writer, encoder FLOPs counted on meta tensors."""

import re
import subprocess
import sys

from tests.torchrun import REPO, child_pythonpath


def test_cost_table_per_task_of_a_recipe():
    proc = subprocess.run([sys.executable, "bench/preprocess_cost.py", "--config", "examples/tiny_data.yaml",
                           "--set", "data.task_weights={t2v: 1, audio: 1, editing: 1}", "--clips", "1000"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m[0]: [float(x) for x in m[1:]] for m in
            re.findall(r"^(\w+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", proc.stdout, re.M)}
    assert set(rows) == {"t2v", "audio", "editing"}, proc.stdout
    size, _, vae, llava, _ = rows["t2v"]
    # tiny_data: 64x32 (the 16:9 bucket of short side 32) x 9 frames -> latents [4, 3, 4, 8]; 64 text states of
    # width 32, 64 mask entries (int64), a pooled vector of 16; bf16: bytes on disk = those plus the shard header
    payload = (4 * 3 * 4 * 8 + 64 * 32 + 16) * 2 + 64 * 8
    assert payload <= size < payload + 4096
    assert rows["audio"][0] > size and rows["editing"][0] > size  # Whisper features / the 32-channel condition added
    # editing encodes the target, the masked source and the mask; audio the target (and both the identity image)
    assert abs(rows["editing"][2] - rows["audio"][2] - 2 * vae) <= 0.02 * vae
    assert vae > 0 and llava > 0
    assert "1000 clips:" in proc.stdout
