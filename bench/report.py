"""What every benchmark writes with --out: a markdown file with the exact command that produced it."""

from __future__ import annotations

import sys
from pathlib import Path


def write_report(out: Path | None, title: str, text: str, argv=None) -> None:
    """Print `text`; with `out`, also write it under `# title` with the command line (argv None = sys.argv)."""
    print("\n" + text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out.write_text(f"# {title}\n\ncommand: `{cmd}`\n\n{text}\n")
