"""The one exception every reader raises for a sample that cannot be used.

Training catches it, replaces the sample deterministically and counts it by `kind`, so readers must
raise `DataError` (never a bare decoder exception) for anything wrong with the *data*; bugs stay bugs.
"""

from __future__ import annotations

KINDS = ("missing", "corrupt", "codec", "sample_rate", "too_short", "image", "caption", "mismatch")


class DataError(Exception):
    def __init__(self, kind: str, path: str, reason: str):
        if kind not in KINDS:
            raise ValueError(f"unknown DataError kind {kind!r} (known: {KINDS})")
        self.kind, self.path, self.reason = kind, str(path), reason
        super().__init__(f"{kind}: {path}: {reason}")
