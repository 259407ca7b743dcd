"""Reading a sampler output folder: every `NAME.mp4` with its `NAME.json` sidecar (hcustom_mc.sample writes both;
the sidecar's `job` is the SampleJob that made the video)."""

from __future__ import annotations

import json
from pathlib import Path

from hcustom_mc.errors import ConfigError
from hcustom_mc.eval.common import VideoSample


def find_jobs(folder: str | Path) -> list[Path]:
    """The sidecars of the sampled videos in `folder` (not recursive), sorted by name. A sidecar without its mp4 (a
    job that failed while writing) or an mp4 without its sidecar is named, not skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of sampled videos")
    videos = {p.name[: -len(".mp4")] for p in folder.glob("*.mp4") if not p.name.startswith(".")}
    # other JSON files (a jobs list, our own reports) are not sidecars: only those holding a sampler's `job` count
    sidecars = {p.name[: -len(".json")] for p in folder.glob("*.json") if _is_sidecar(p)}
    lonely = sorted(videos - sidecars)
    missing = sorted(sidecars - videos)
    problems = [f"{name}.mp4 has no {name}.json sidecar" for name in lonely]
    problems += [f"{name}.json has no {name}.mp4 (the job did not finish)" for name in missing]
    if problems:
        raise ConfigError(f"{folder}: " + "; ".join(problems))
    if not videos:
        raise ConfigError(f"{folder} holds no sampled videos (NAME.mp4 with NAME.json, as python -m hcustom_mc.sample "
                          f"writes them)")
    return [folder / f"{name}.json" for name in sorted(videos)]


def _is_sidecar(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("job"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def read_sample(sidecar: Path) -> VideoSample:
    """The video and its job. Paths in the job (identity images, audio, source video) are as the sampler got them:
    a relative one is read from the current folder, so score from where you sampled, or give absolute paths."""
    from hcustom_mc.inference.output import read_mp4

    try:
        settings = json.loads(sidecar.read_text())
        job = settings["job"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{sidecar}: not a sampler sidecar ({exc})") from None
    name = sidecar.name[: -len(".json")]
    frames, fps, _, _ = read_mp4(sidecar.with_name(name + ".mp4"))
    box = job.get("subject_box")
    return VideoSample(name=name, task=str(job.get("task")), prompt=str(job.get("prompt", "")), frames=frames,
                       fps=float(fps), subjects=[(str(n), str(p)) for n, p in job.get("subjects") or []],
                       subject_box=tuple(float(v) for v in box) if box else None,
                       source_video=job.get("source_video"), audio=job.get("audio"))
