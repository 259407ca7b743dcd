"""Writing scores: a per-job table (Markdown, readable in a terminal and rendered by MLflow and GitHub), the
summary, and everything as JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from hcustom_mc.eval.common import json_safe


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def table_lines(rows: list[dict], columns: list[str]) -> list[str]:
    """A Markdown table of `rows` with `columns` (a column no row has is left out)."""
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def summary_lines(summary: dict) -> list[str]:
    rows = []
    for scope, block in [("all", summary["overall"]), *summary["by_task"].items()]:
        for name, s in block.items():
            rows.append({"jobs": scope, "metric": name, "mean": s["mean"], "std": s["std"], "min": s["min"],
                         "max": s["max"], "n": s["n"]})
    return table_lines(rows, ["jobs", "metric", "mean", "std", "min", "max", "n"]) if rows else ["(no metric scored)"]


def write_report(out: str | Path, rows: list[dict], summary: dict, columns: list[str], info: dict) -> dict[str, Path]:
    """out/scores.json (rows, summary, `info`: what was scored with which models) and out/scores.md (both tables).
    Written atomically: a reader never sees half a report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "scores.json", "table": out / "scores.md"}
    text = {"json": json.dumps(json_safe({"info": info, "summary": summary, "jobs": rows}), indent=2, sort_keys=True),
            "table": "\n".join(["# per job", "", *table_lines(rows, columns), "", "# summary", "",
                                *summary_lines(summary)])}
    for key, path in files.items():
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text[key] + "\n")
        os.replace(tmp, path)
    return files
