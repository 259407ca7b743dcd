"""DINO-Sim (subject similarity) and temporal consistency.

DINO-Sim follows the HunyuanCustom paper (section 4.1, "Subject similarity": the DINOv2 feature similarity
between the reference and the subject in each generated frame, which the paper finds with a YOLOv11 human
segmentation) and the DINO image-similarity metric it descends from (DreamBooth's DINO-I: cosine of the
self-supervised ViT's CLS embeddings; VBench vbench/subject_consistency.py uses the same DINO CLS output).
Here the subject region is the job's `subject_box` (no detector is run), or the whole frame when the job has
none; `dino_sim_region` says which. With several subjects and no box, each subject is compared with its
best-matching region of each frame (the highest cosine over CANDIDATE_WINDOWS: the frame and windows of 1/2 and
1/3 of its sides), `dino_sim/<name>` per subject, their mean `dino_sim` and the lowest `dino_sim_min` (the number
that shows one subject being lost). Per frame:

    crop     the box in pixels: x0 = round(x0_frac * W), x1 = round(x1_frac * W) (likewise y), at least 1 px
    features DINOv2-base CLS token of the last layer after the final layernorm (Dinov2Model.pooler_output),
             on the checkpoint's own image processor (facebook/dinov2-base: shortest side 256 bicubic, centre
             crop 224, ImageNet mean/std), the identity image through the same processor
    score    cosine(identity, frame region); dino_sim = mean over the sampled frames (32, uniformly, as
             OpenS2V-Eval), and over the job's subjects when it has several (each at its best window)

Temporal consistency (the issue's definition): mean cosine similarity of consecutive frames' image features.
The paper (section 4.1, "Temporal consistency") computes it "following VBench" with CLIP-B, from "each frame
and its adjacent frames, as well as the first frame": that is VBench's background_consistency formula
(vbench/background_consistency.py: for i >= 1, (max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))) / 2,
averaged over i, CLIP ViT-B/32 features); VBench's subject_consistency is the same formula on DINO features.
So CLIP-B is the default feature model here (features="clip"; "dino" uses DINOv2-base), the issue's value is
`temporal_consistency` and the paper/VBench value `temporal_consistency_vbench` (the one to set beside the
paper's Table 1 Temp-Consis). Both use every frame by default, since "consecutive" means adjacent frames.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hcustom_mc.eval.common import MissingModelError, VideoSample, uniform_frame_indices
from hcustom_mc.eval.metrics.clip_score import (CLIP_DIR, CLIP_HOW_TO_GET, clip_image_features, frames_to_tensors,
                                               load_clip)

log = logging.getLogger(__name__)

DINO_DIR = "dinov2-base"
DINO_HOW_TO_GET = "hf download facebook/dinov2-base --local-dir models/dinov2-base"
DEFAULT_FRAMES = 32  # OpenS2V-Eval scores 32 uniformly sampled frames per video
BATCH = 32
FEATURES = ("clip", "dino")


def dino_path(models_dir: Path | str) -> Path:
    return Path(models_dir) / DINO_DIR


def load_dinov2(models_dir: Path | str, metric: str, device: Any = "cpu") -> tuple[Any, Any]:
    """(Dinov2Model in eval mode on `device`, its image processor) from models_dir/dinov2-base."""
    path = dino_path(models_dir)
    if not (path / "config.json").is_file():
        raise MissingModelError(metric, path, DINO_HOW_TO_GET)
    return _load_dinov2(str(path.resolve()), str(device))


@functools.lru_cache(maxsize=2)
def _load_dinov2(path: str, device: str) -> tuple[Any, Any]:
    # cached: DinoSim and TemporalConsistency(features="dino") share one copy of the weights
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(path).to(device).eval()
    return model, AutoImageProcessor.from_pretrained(path)


def dino_features(model: Any, processor: Any, images: list[np.ndarray], batch: int = BATCH) -> Any:
    """DINOv2 CLS features after the final layernorm (pooler_output) [N, D] of uint8 [H, W, 3] images
    (any sizes: each goes through the processor's resize and centre crop)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            chunk = [frames_to_tensors(image[None])[0] for image in images[start:start + batch]]
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
            out.append(model(pixel_values=pixels).pooler_output.float())
    return torch.cat(out)


def _windows() -> tuple[tuple[float, float, float, float], ...]:
    """Where a subject may be when a frame holds several and the job gives no box: the whole frame, then windows of
    1/2 and 1/3 of each side at half-window strides (1 + 9 + 25 candidates), as a detector-free region search."""
    out = []
    for parts in (1, 2, 3):
        side, stride = 1.0 / parts, 0.5 / parts
        starts = [i * stride for i in range(2 * parts - 1)]
        out += [(x, y, min(1.0, x + side), min(1.0, y + side)) for y in starts for x in starts]
    return tuple(out)


CANDIDATE_WINDOWS = _windows()


def box_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) fractions of the frame -> pixel bounds for frame[y0:y1, x0:x1], each edge rounded to
    the nearest pixel boundary, at least one pixel wide and high."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"subject_box {box} is not (x0, y0, x1, y1) fractions with x0 < x1, y0 < y1")
    px0, py0 = min(round(x0 * width), width - 1), min(round(y0 * height), height - 1)
    return px0, py0, max(round(x1 * width), px0 + 1), max(round(y1 * height), py0 + 1)


def load_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


class DinoSim:
    """DINO-Sim: DINOv2-base CLS cosine of each identity image vs the subject box (or whole frame) per frame.

    Options: frames (how many frames, uniformly spread; None = every frame; default 32)."""

    name = "dino_sim"
    how_to_get = DINO_HOW_TO_GET

    @staticmethod
    def expected_path(models_dir: Path) -> Path:
        return dino_path(models_dir)

    def __init__(self, models_dir: Path, device: Any = "cpu", frames: int | None = DEFAULT_FRAMES):
        self.model, self.processor = load_dinov2(models_dir, self.name, device)
        self.frames = frames

    def score(self, sample: VideoSample) -> dict[str, float | int | str | None]:
        import torch

        if not sample.subjects:  # t2v: no identity image to compare with
            return {self.name: None, f"{self.name}_region": None, f"{self.name}_frames": 0,
                    f"{self.name}_subjects": 0, f"{self.name}_model": DINO_DIR}
        picked = (list(range(len(sample.frames))) if self.frames is None
                  else uniform_frame_indices(len(sample.frames), self.frames))
        frames = sample.frames[picked]
        height, width = frames.shape[1:3]
        if sample.subject_box is not None:
            boxes, region = [sample.subject_box], "box"
        elif len(sample.subjects) > 1:  # several subjects, one frame: each finds its own region
            boxes, region = list(CANDIDATE_WINDOWS), "best window"
        else:
            boxes, region = [(0.0, 0.0, 1.0, 1.0)], "frame"
        pixels = [box_pixels(box, width, height) for box in boxes]
        regions = [frame[y0:y1, x0:x1] for frame in frames for x0, y0, x1, y1 in pixels]
        frame_features = dino_features(self.model, self.processor, regions).view(len(frames), len(boxes), -1)
        identity = dino_features(self.model, self.processor, [load_rgb(path) for _, path in sample.subjects])
        # [subjects, frames, windows] cosines -> each subject's best window per frame -> mean over frames
        cosines = torch.nn.functional.cosine_similarity(identity[:, None, None], frame_features[None], dim=-1)
        per_subject = cosines.amax(dim=2).mean(dim=1)
        out = {
            self.name: float(per_subject.mean()),
            f"{self.name}_min": float(per_subject.min()),
            f"{self.name}_region": region,
            f"{self.name}_frames": len(frames),
            f"{self.name}_subjects": len(sample.subjects),
            f"{self.name}_model": DINO_DIR,
        }
        if len(sample.subjects) > 1:
            out.update({f"{self.name}/{name}": float(v) for (name, _), v in zip(sample.subjects, per_subject)})
        return out


def consecutive_and_vbench(features: Any) -> tuple[float | None, float | None]:
    """(mean cosine of consecutive rows, VBench's mean over i >= 1 of (max(0, cos(f_i, f_{i-1})) +
    max(0, cos(f_i, f_0))) / 2); None for both with fewer than two rows."""
    import torch

    if len(features) < 2:
        return None, None
    unit = torch.nn.functional.normalize(features, dim=-1)
    previous = (unit[1:] * unit[:-1]).sum(-1)
    first = (unit[1:] * unit[:1]).sum(-1)
    vbench = (previous.clamp(min=0) + first.clamp(min=0)) / 2
    return float(previous.mean()), float(vbench.mean())


class TemporalConsistency:
    """Temporal consistency: mean cosine of consecutive frames' image features (`temporal_consistency`),
    and the paper's / VBench's first-and-previous-frame form (`temporal_consistency_vbench`).

    Options: features ("clip": CLIP ViT-B/32 image embeddings, as the paper and VBench background_consistency;
    "dino": DINOv2-base CLS, as VBench subject_consistency uses DINO), frames (None = every frame, the default;
    an int spreads that many uniformly, which makes "consecutive" frames further apart)."""

    name = "temporal_consistency"
    how_to_get = f"{CLIP_HOW_TO_GET} (features='dino': {DINO_HOW_TO_GET})"

    @staticmethod
    def expected_path(models_dir: Path) -> Path:
        """The default feature model's folder (features='dino' reads dino_path(models_dir))."""
        return Path(models_dir) / CLIP_DIR

    def __init__(self, models_dir: Path, device: Any = "cpu", features: str = "clip", frames: int | None = None):
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, not {features!r}")
        load = load_clip if features == "clip" else load_dinov2
        self.model, self.processor = load(models_dir, self.name, device)
        self.features, self.frames = features, frames

    def score(self, sample: VideoSample) -> dict[str, float | int | str | None]:
        picked = (list(range(len(sample.frames))) if self.frames is None
                  else uniform_frame_indices(len(sample.frames), self.frames))
        frames = sample.frames[picked]
        if self.features == "clip":
            features = clip_image_features(self.model, self.processor, frames)
        else:
            features = dino_features(self.model, self.processor, list(frames))
        consecutive, vbench = consecutive_and_vbench(features)
        return {
            self.name: consecutive,
            f"{self.name}_vbench": vbench,
            f"{self.name}_frames": len(frames),
            f"{self.name}_model": CLIP_DIR if self.features == "clip" else DINO_DIR,
        }
