"""The training manifest: one JSON object per line (JSONL) describing one training sample.

Example line (shown wrapped; in the file it is one line):

    {"id": "s0000", "task": "identity", "video": "videos/s0000.mp4",
     "caption": "A red square moves to the right.",
     "subjects": [{"name": "square", "image": "images/s0000_0.png", "box": [4, 4, 20, 20]}],
     "audio": null, "source_video": null, "mask_video": null,
     "height": 48, "width": 64, "num_frames": 17, "fps": 25.0}

Fields (unknown keys are rejected, so a typo such as "subject" cannot silently drop a condition):

  id            required  non-empty string, unique in the file
  task          required  one of t2v, identity, multi_identity, audio, editing
  video         required  path of the target clip
  caption       required  non-empty string
  subjects      list of {"name": str, "image": path, "box": [x0, y0, x1, y1] (optional, pixels of the
                image, x0 < x1 and y0 < y1), "mask": path (optional)}.
                t2v: none; identity: exactly 1; multi_identity: at least 2; audio: at least 1;
                editing: any number
  audio         path of the driving audio; required for task "audio", not allowed otherwise
  source_video  path of the clip to edit; required for task "editing", not allowed otherwise
  mask_video    path of the edit-region mask clip; required for task "editing", not allowed otherwise
  height, width, num_frames   optional positive integers, fps optional positive number: clip metadata.
                When absent (or null) it is probed from the video and cached by the data pipeline.

Paths are relative to the folder holding the manifest (absolute paths are kept as they are); a relative
path that leaves that folder (`../../etc/passwd`) is refused before anything opens it.
Blank lines and lines whose first non-blank character is '#' are skipped. Whether the files exist is
not checked here: a missing or broken file becomes a `DataError` when training reads it, and the
sample is replaced, so one bad clip never stops a run.

`load_manifest` checks every line and raises one `ManifestError` listing every problem found
(file, line number, field), not just the first.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hcustom_mc.data.config import TASKS
from hcustom_mc.model.config import ConfigError

ENTRY_KEYS = (
    "id", "task", "video", "caption", "subjects", "audio", "source_video", "mask_video",
    "height", "width", "num_frames", "fps",
)
SUBJECT_KEYS = ("name", "image", "box", "mask")
# task -> (min, max or None, wording) subjects; editing takes any number (the edit may or may not add one)
SUBJECT_COUNT = {
    "t2v": (0, 0, "no subjects"),
    "identity": (1, 1, "exactly 1 subject"),
    "multi_identity": (2, None, "at least 2 subjects"),
    "audio": (1, None, "at least 1 subject"),
}
MAX_REPORTED = 20


class ManifestError(ConfigError):
    """Everything wrong with a manifest; `problems` holds one "file:line: field 'x': reason" per problem. A
    ConfigError (a ValueError): entry points report it as the user's to fix, without a traceback."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path, self.problems = str(path), problems
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"invalid manifest {self.path} ({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + more)


@dataclass(frozen=True)
class Subject:
    name: str
    image: Path  # absolute
    box: tuple[float, float, float, float] | None = None
    mask: Path | None = None  # absolute


@dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest line; every path is absolute (resolved against the manifest's folder)."""

    id: str
    task: str
    video: Path
    caption: str
    subjects: tuple[Subject, ...] = ()
    audio: Path | None = None
    source_video: Path | None = None
    mask_video: Path | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    line: int = field(default=0, compare=False)  # where it came from, for messages; 0 if built in code


class _LineChecker:
    """Validates one parsed line, appending "file:line: field 'x': reason" messages to `problems`."""

    def __init__(self, where: str, root: Path, problems: list[str]):
        self.where, self.root, self.problems = where, root, problems

    def bad(self, name: str, reason: str) -> None:
        self.problems.append(f"{self.where}: field '{name}': {reason}")

    def unknown_keys(self, obj: dict, allowed: tuple[str, ...], prefix: str = "") -> None:
        for key in obj:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(allowed)})"
                self.bad(prefix + str(key), "unknown key" + hint)

    def text(self, obj: dict, name: str, label: str) -> str | None:
        """A required non-empty string."""
        value = obj.get(name)
        if name not in obj or value is None:
            self.bad(label, "missing (required)")
        elif not isinstance(value, str) or not value.strip():
            self.bad(label, f"must be a non-empty string, got {json.dumps(value)}")
        else:
            return value
        return None

    def path(self, obj: dict, name: str, label: str, required: bool) -> Path | None:
        if obj.get(name) is None:
            if required:
                self.bad(label, "missing (required)")
            return None
        value = self.text(obj, name, label)
        if value is None:
            return None
        full = Path(os.path.abspath(self.root / value))
        if not Path(value).is_absolute() and not full.is_relative_to(self.root):
            # refused here, before anything opens it: a relative path stays inside the dataset folder
            self.bad(label, f"{value!r} leaves the dataset folder {self.root} (a relative path must stay inside it; "
                            f"give an absolute path for a file elsewhere)")
            return None
        return full

    def positive(self, obj: dict, name: str, integer: bool) -> int | float | None:
        value = obj.get(name)
        if value is None:
            return None
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            self.bad(name, f"must be {kind} (or absent), got {json.dumps(value)}")
            return None
        return int(value) if integer else float(value)

    def box(self, value, label: str) -> tuple[float, float, float, float] | None:
        if value is None:
            return None
        numbers = isinstance(value, list) and len(value) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        if not numbers:
            self.bad(label, f"must be [x0, y0, x1, y1] (4 numbers), got {json.dumps(value)}")
            return None
        x0, y0, x1, y1 = (float(v) for v in value)
        if min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
            self.bad(label, f"must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, got {json.dumps(value)}")
            return None
        return x0, y0, x1, y1

    def subjects(self, obj: dict) -> tuple[Subject, ...]:
        raw = obj.get("subjects")
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.bad("subjects", f"must be a list of objects, got {json.dumps(raw)}")
            return ()
        out = []
        for k, item in enumerate(raw):
            label = f"subjects[{k}]"
            if not isinstance(item, dict):
                self.bad(label, f"must be an object with name and image, got {json.dumps(item)}")
                continue
            self.unknown_keys(item, SUBJECT_KEYS, prefix=label + ".")
            name = self.text(item, "name", label + ".name")
            image = self.path(item, "image", label + ".image", required=True)
            box = self.box(item.get("box"), label + ".box")
            mask = self.path(item, "mask", label + ".mask", required=False)
            if name is not None and image is not None:
                out.append(Subject(name=name, image=image, box=box, mask=mask))
        return tuple(out)

    def entry(self, obj: dict, line: int) -> ManifestEntry | None:
        before = len(self.problems)
        self.unknown_keys(obj, ENTRY_KEYS)
        sample_id = self.text(obj, "id", "id")
        task = self.text(obj, "task", "task")
        if task is not None and task not in TASKS:
            close = difflib.get_close_matches(task, TASKS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.bad("task", f"unknown task {task!r}{hint}; known: {', '.join(TASKS)}")
            task = None
        video = self.path(obj, "video", "video", required=True)
        caption = self.text(obj, "caption", "caption")
        subjects = self.subjects(obj)
        audio = self.path(obj, "audio", "audio", required=task == "audio")
        source = self.path(obj, "source_video", "source_video", required=task == "editing")
        mask = self.path(obj, "mask_video", "mask_video", required=task == "editing")
        metadata = {n: self.positive(obj, n, integer=n != "fps") for n in ("height", "width", "num_frames", "fps")}

        if task is not None:
            self.task_rules(obj, task)
        if len(self.problems) > before:
            return None
        return ManifestEntry(
            id=sample_id, task=task, video=video, caption=caption, subjects=subjects, audio=audio,
            source_video=source, mask_video=mask, line=line, **metadata,
        )

    def task_rules(self, obj: dict, task: str) -> None:
        # Counted on the raw list so a malformed subject is reported once (above), not again as a count;
        # a "subjects" that is not a list at all was reported already.
        raw = obj.get("subjects")
        n = 0 if raw is None else len(raw) if isinstance(raw, list) else None
        rule = SUBJECT_COUNT.get(task)
        if rule is not None and n is not None:
            low, high, need = rule
            if n < low or (high is not None and n > high):
                self.bad("subjects", f"task {task!r} needs {need}, got {n}")
        # A condition on the wrong task would be silently ignored by training: the task is probably wrong.
        for name, owner in (("audio", "audio"), ("source_video", "editing"), ("mask_video", "editing")):
            if obj.get(name) is not None and task != owner:
                self.bad(name, f"only used by task {owner!r}, but this line's task is {task!r}")


def load_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Parse and validate a JSONL manifest; raises ManifestError naming file, line and field of every problem."""
    path = Path(path)
    root = Path(os.path.abspath(path.parent))
    problems: list[str] = []
    entries: list[ManifestEntry] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            problems.append(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: each line must be a JSON object {{...}}, got {text[:40]}")
            continue
        checker = _LineChecker(where, root, problems)
        entry = checker.entry(obj, number)
        sample_id = obj.get("id")
        if isinstance(sample_id, str) and sample_id.strip():
            if sample_id in first_line:
                checker.bad("id", f"duplicate id {sample_id!r} (first used on line {first_line[sample_id]})")
                entry = None
            else:
                first_line[sample_id] = number
        if entry is not None:
            entries.append(entry)
    if not problems and not entries:
        problems.append(f"{path}: no samples (only blank or comment lines)")
    if problems:
        raise ManifestError(path, problems)
    return entries


def _relative(p: Path | None, root: Path) -> str | None:
    # Relative paths keep a dataset folder relocatable; as_posix so a manifest written anywhere reads anywhere.
    # A file outside the folder stays absolute: a relative path may not leave it (load_manifest refuses that).
    if p is None:
        return None
    full, root = Path(os.path.abspath(p)), Path(os.path.abspath(root))
    return Path(os.path.relpath(full, root)).as_posix() if full.is_relative_to(root) else full.as_posix()


def entry_to_json(entry: ManifestEntry, root: str | os.PathLike) -> dict:
    """The manifest object of one entry, with paths relative to `root` (the manifest's folder)."""
    root = Path(os.path.abspath(root))
    subjects = []
    for s in entry.subjects:
        item = {"name": s.name, "image": _relative(s.image, root)}
        if s.box is not None:
            item["box"] = list(s.box)
        if s.mask is not None:
            item["mask"] = _relative(s.mask, root)
        subjects.append(item)
    obj = {
        "id": entry.id, "task": entry.task, "video": _relative(entry.video, root), "caption": entry.caption,
        "subjects": subjects, "audio": _relative(entry.audio, root),
        "source_video": _relative(entry.source_video, root), "mask_video": _relative(entry.mask_video, root),
    }
    for name in ("height", "width", "num_frames", "fps"):  # unknown metadata stays absent, not null
        if getattr(entry, name) is not None:
            obj[name] = getattr(entry, name)
    return obj


def write_manifest(entries: list[ManifestEntry], path: str | os.PathLike) -> None:
    """Write entries as JSONL (paths relative to the file's folder); `load_manifest` reads back equal entries."""
    path = Path(path)
    root = path.parent
    lines = [json.dumps(entry_to_json(e, root), ensure_ascii=False) for e in entries]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)  # never leave a half-written manifest behind
