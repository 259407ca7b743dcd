"""Measure what the default checkpoint verification (`--verify-checkpoint full`) costs per GB on this host.

    python tools/measure_verify.py [--gb 1] [--dir /tmp]

Writes a sealed folder of GB gigabytes (four files, like four ranks' shards, random bytes), then times
`integrity.verify_folder(folder, "full")` in one process (one rank hashes everything: the cost per GB per rank)
with the files in the page cache, the state a resume right after a save, or a second read, sees. The result
is the figure in hcustom_mc/checkpoint/verify_modes.py (VERIFY_COST) and the README.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default: 1)")
    p.add_argument("--dir", default=None, help="where to write it (default: the system temp folder)")
    p.add_argument("--repeat", type=int, default=3, help="timed verifications; the best is reported (default: 3)")
    args = p.parse_args()
    from hcustom_mc.checkpoint.integrity import seal_folder, verify_folder

    folder = Path(tempfile.mkdtemp(prefix="measure_verify_", dir=args.dir))
    try:
        per_file = int(args.gb * 1e9 / 4)
        for r in range(4):
            with open(folder / f"__{r}_0.distcp", "wb") as f:
                for _ in range(0, per_file, 1 << 26):
                    f.write(os.urandom(min(1 << 26, per_file - f.tell())))
        seal_folder(folder)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            assert verify_folder(folder, "full") == []
            times.append(time.perf_counter() - t0)
        gb = 4 * per_file / 1e9
        print(f"verify full: {gb:.2f} GB in {min(times):.2f}s (best of {args.repeat}) = {min(times) / gb:.2f} s per GB "
              f"per rank ({os.cpu_count()} cores)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
