"""What every metric shares: the sample it scores, the error for a model that is not there, frame picking."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hcustom_mc.errors import ConfigError


class MissingModelError(ConfigError):
    """A metric's model is not in the models folder: one line naming the metric, the path and how to get it."""

    def __init__(self, metric: str, path: Path | str, how: str):
        self.metric, self.path, self.how = metric, str(path), how
        super().__init__(f"{metric}: no model at {path} ({how})")


@dataclass
class VideoSample:
    """One sampled video and what its job asked for (from the sampler's NAME.json sidecar)."""

    name: str  # the job's output stem, unique in a folder
    task: str  # t2v, identity, audio, editing
    prompt: str
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float
    subjects: list[tuple[str, str]] = field(default_factory=list)  # (name, identity image path)
    subject_box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1), fractions of the frame
    source_video: str | None = None  # editing: the condition video
    audio: str | None = None


def uniform_frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread uniformly over [0, num_frames) (every frame when there are fewer), as
    OpenS2V-Eval samples 32 frames per video: np.linspace over the whole clip, rounded down, duplicates dropped."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if count >= num_frames:
        return list(range(num_frames))
    return sorted(set(np.linspace(0, num_frames - 1, count).astype(int).tolist()))


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float written as the string "inf", "-inf" or "nan" (JSON has none of them;
    Python's json would write the non-standard Infinity)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
