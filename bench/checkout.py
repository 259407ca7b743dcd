"""The checkout's import roots, for scripts and child processes that may run from a checkout that is not
installed (the bare GPU image runs this repository from PYTHONPATH).

hcustom_mc sits at the repository root; our Triton kernels sit in kernels/ and import as `hcustom_kernels`
(`import kernels` is Hugging Face's package, which transformers and diffusers import)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORT_ROOTS = (REPO, REPO / "kernels")


def pythonpath(environ=os.environ) -> str:
    """PYTHONPATH for a child process: the checkout's roots first, then the caller's own entries (for example
    the folder bench/gpu_check.sh installs wheels into), without repeating an entry."""
    entries = [str(p) for p in IMPORT_ROOTS] + [e for e in environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    return os.pathsep.join(dict.fromkeys(entries))


def use_checkout() -> None:
    """Put the checkout's roots first on this process's sys.path."""
    for root in reversed(IMPORT_ROOTS):
        if str(root) in sys.path:
            sys.path.remove(str(root))
        sys.path.insert(0, str(root))
