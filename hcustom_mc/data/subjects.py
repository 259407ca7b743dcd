"""Subject extraction for training data: identity images cut from a later part of each video than the training clip.

The paper's data section ("Multi-Subject Extraction"): the subjects named in the caption are located in the video and
segmented, and the identity crops come from the 15 s that follow the first 5 s, which alone are used for training, so
the model cannot learn to copy pixels. Here, per sample of an input manifest:

  training segment  [train_start, train_end) s, default [0, 5): re-encoded as the sample's new video (h264, CRF 12, the
                    source's frame rate; an editing sample's source and mask clips are cut alike; an audio file is kept
                    as it is, so train_start must then be 0). The training pipeline picks clips anywhere in its video:
                    only a cut video keeps them out of the crop segment.
  crop segment      [crop_start, crop_end) s, default [5, 20), disjoint from the training segment, cut at the video's
                    end. Frame i is at i / fps. A video that ends before crop_start has none: its subjects are reported.
  a subject with a box   (`box` in video-frame pixels, optional `frame`, the video's frame index): cut from that frame,
                    else from the crop segment's middle frame a + (b - a) // 2 (its frames are [a, b)); a `frame`
                    outside the crop segment or a box leaving the frame is reported.
  a subject without one  the detector looks for its name (the phrase) in `detect_frames` frames spread evenly over the
                    crop segment (frames a + floor((j + 1/2) (b - a) / n), j < n) and takes the highest-scoring box of
                    that phrase over all of them, if it scores above the threshold. The score of a box for a phrase:
                    OWLv2, the sigmoid of that text query's logit; Grounding DINO, the highest sigmoid over the phrase's
                    tokens. Boxes are clipped to the frame; one with nothing left inside it is not considered. Two
                    subjects of a sample with the same phrase cannot be told apart and are reported.
  crop              the box grown by `margin` x its width (height) on the left and right (top and bottom), rounded
                    outward to whole pixels and clipped to the frame: x0' = max(0, floor(x0 - m w)),
                    x1' = min(W, ceil(x1 + m w)), the same for y. The crop is frame[y0':y1', x0':x1'], exactly.
  segmenter         (optional, SAM) prompted with the box on the whole frame; of the 3 masks it proposes, the one with
                    the highest predicted IoU is kept and the crop's pixels outside it become white: the reference-image
                    convention (the release pads identity images with white; its null image is all white).

A subject's phrase must occur in the caption (whole words, any case), as the LLaVA template pairs them. Subjects that
already have an image are kept as they are (unless replace_images). Each subject not found is reported with the sample
id, its name and the reason; a sample with any subject not found is left out of the output manifest, never silently.
Outputs, under `out`:

  images/<id>_<k>.png, masks/<id>_<k>.png (with a segmenter), videos/<id>.mp4 (the training segment),
  results/<id>.json (one per sample, written last: a sample whose result and files exist is done on a rerun),
  manifest.jsonl (the usable samples in input order; each subject's box is in its crop's pixels, as the training
                  manifest defines `box`, and num_frames / fps / height / width describe the cut video),
  report.json (settings, counts, every subject not found), settings.json (a rerun must use the same settings).

Ranks take samples i, i + W, ... Files are written to a temporary name and renamed into place, so a killed run leaves
no half file behind; rerunning the same command finishes the job and rewrites nothing that is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from hcustom_mc.data.errors import DataError
from hcustom_mc.data.manifest import MAX_REPORTED, ManifestEntry, Subject, _LineChecker, entry_to_json
from hcustom_mc.model.config import ConfigError

log = logging.getLogger("hcustom_mc.extract_subjects")

DETECTOR_TYPES = {"owlv2": "OWLv2", "grounding-dino": "Grounding DINO"}
DEFAULT_BOX_THRESHOLD = {"owlv2": 0.2, "grounding-dino": 0.35}
SEGMENTER_TYPES = ("sam",)
EXTRACT_SUBJECT_KEYS = ("name", "image", "box", "mask", "frame")
TRAINING_CRF = "12"  # visually lossless; the crop comes from the source video, never from this re-encode
RESULTS, IMAGES, MASKS, VIDEOS = "results", "images", "masks", "videos"
SETTINGS_FILE, REPORT_FILE, MANIFEST_FILE = "settings.json", "report.json", "manifest.jsonl"


# ---------------------------------------------------------------- settings and input


@dataclass(frozen=True)
class Segments:
    """The training and crop segments, in seconds: [train_start, train_end) and [crop_start, crop_end)."""

    train_start: float = 0.0
    train_end: float = 5.0
    crop_start: float = 5.0
    crop_end: float = 20.0

    def problems(self) -> list[str]:
        out = []
        values = {"--train-start": self.train_start, "--train-end": self.train_end, "--crop-start": self.crop_start,
                  "--crop-end": self.crop_end}
        for flag, v in values.items():
            if not math.isfinite(v) or v < 0:
                out.append(f"{flag} must be a finite number >= 0 (seconds), got {v}")
        if out:
            return out
        if self.train_end <= self.train_start:
            out.append(f"the training segment [{self.train_start}, {self.train_end}) s is empty (--train-end must be "
                       f"above --train-start)")
        if self.crop_end <= self.crop_start:
            out.append(f"the crop segment [{self.crop_start}, {self.crop_end}) s is empty (--crop-end must be above "
                       f"--crop-start)")
        if self.crop_start < self.train_end and self.train_start < self.crop_end:
            out.append(f"the crop segment [{self.crop_start}, {self.crop_end}) s overlaps the training segment "
                       f"[{self.train_start}, {self.train_end}) s: crops from the training clip let the model copy "
                       f"pixels (the paper trains on the first 5 s and crops from the following 15 s)")
        return out


@dataclass(frozen=True)
class ExtractionSettings:
    segments: Segments = Segments()
    margin: float = 0.1
    detect_frames: int = 8
    detector: Path | None = None
    segmenter: Path | None = None
    box_threshold: float | None = None  # None: the detector type's default
    replace_images: bool = False

    def as_json(self, manifest: Path) -> dict:
        """Everything that changes the outputs; a rerun into the same folder must match it."""
        d = {k: getattr(self, k) for k in ("margin", "detect_frames", "replace_images")}
        d.update(manifest=str(Path(manifest).resolve()), segments=asdict(self.segments), crf=TRAINING_CRF,
                 detector=str(self.detector.resolve()) if self.detector else None,
                 segmenter=str(self.segmenter.resolve()) if self.segmenter else None,
                 box_threshold=_json_number(self.threshold()) if self.detector else None)
        return d

    def detector_type(self) -> str | None:
        return model_type(self.detector) if self.detector else None

    def threshold(self) -> float:
        if self.box_threshold is not None:
            return self.box_threshold
        return DEFAULT_BOX_THRESHOLD.get(self.detector_type(), 0.0)


def _json_number(x: float) -> float | str:
    """Strict JSON has no infinities: "-inf" (a threshold that takes every box) is written as a string."""
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class SubjectRequest:
    """One subject of an input line: `extract` when its image is to be made, else it is kept as it is."""

    k: int
    name: str
    extract: bool
    box: tuple[float, float, float, float] | None = None  # video-frame pixels (only when extract)
    frame: int | None = None


@dataclass(frozen=True)
class ExtractionSample:
    entry: ManifestEntry  # subjects to extract carry a placeholder image until they are cut
    requests: tuple[SubjectRequest, ...]
    line: int

    @property
    def needs_extraction(self) -> bool:
        return any(r.extract for r in self.requests)


def model_type(folder: Path) -> str | None:
    """config.json's model_type of a transformers folder, or None when there is none to read."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _folder_problems(folder: Path | None, flag: str, known: dict | tuple) -> list[str]:
    if folder is None:
        return []
    if not Path(folder).is_dir():
        return [f"{flag} {folder}: no such folder (a local transformers model folder; nothing is downloaded)"]
    kind = model_type(folder)
    if kind is None:
        return [f"{flag} {folder}: no readable config.json with a model_type"]
    if kind not in known:
        return [f"{flag} {folder}: model_type {kind!r} is not supported (supported: {', '.join(known)})"]
    return []


def load_extraction_manifest(path: Path, replace_images: bool = False) -> tuple[list[ExtractionSample], list[str]]:
    """The input manifest: the training manifest's format, except that a subject may have no image yet (it is then
    extracted), and such a subject's `box` is in video-frame pixels, with an optional `frame` (the video's frame
    index). Returns the samples and every problem found (file:line: field: reason)."""
    path = Path(path)
    root = Path(os.path.abspath(path.parent))
    problems: list[str] = []
    samples: list[ExtractionSample] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        return [], [f"{path}: cannot read the manifest: {e.strerror or e}"]
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
        before = len(problems)
        standard, requests = _split_subjects(obj, checker, replace_images)
        entry = checker.entry(standard, number)
        sample_id = obj.get("id")
        if isinstance(sample_id, str) and sample_id.strip():
            if sample_id in seen:
                checker.bad("id", f"duplicate id {sample_id!r} (first used on line {seen[sample_id]})")
            else:
                seen[sample_id] = number
        if entry is not None and len(problems) == before:
            samples.append(ExtractionSample(entry=entry, requests=requests, line=number))
    if not problems and not samples:
        problems.append(f"{path}: no samples (only blank or comment lines)")
    return samples, problems


def _split_subjects(obj: dict, checker: _LineChecker, replace_images: bool) -> tuple[dict, tuple[SubjectRequest, ...]]:
    """The line as a training-manifest object (a placeholder image for each subject to extract, its video box and
    frame taken out) plus what to do with each subject. Problems of the extraction-only keys go to `checker`."""
    raw = obj.get("subjects")
    if not isinstance(raw, list):
        return obj, ()  # absent or malformed: the training manifest's own checks say so
    subjects, requests = [], []
    for k, item in enumerate(raw):
        if not isinstance(item, dict):
            subjects.append(item)
            continue
        label = f"subjects[{k}]"
        checker.unknown_keys(item, EXTRACT_SUBJECT_KEYS, prefix=label + ".")
        item = {key: v for key, v in item.items() if key in EXTRACT_SUBJECT_KEYS}
        extract = item.get("image") is None or replace_images
        name = item.get("name")
        if not extract:
            if item.get("frame") is not None:
                checker.bad(label + ".frame", "only for a subject to extract (one without an image): a given image's "
                                              "box is in the image's pixels")
            item.pop("frame", None)
            subjects.append(item)
            requests.append(SubjectRequest(k=k, name=name if isinstance(name, str) else "", extract=False))
            continue
        if item.get("image") is not None:  # replace_images: a given image's box is in its pixels, not the video's
            item = {key: v for key, v in item.items() if key not in ("box", "frame")}
        box = checker.box(item.get("box"), label + ".box")
        frame = item.get("frame")
        if frame is not None:
            if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
                checker.bad(label + ".frame", f"must be a frame index (an integer >= 0), got {json.dumps(frame)}")
                frame = None
            elif item.get("box") is None:
                checker.bad(label + ".frame", "names the frame of a `box`, but this subject has none")
        # the placeholder satisfies the training manifest's "image required" until the crop exists
        subjects.append({"name": name, "image": f"_extract_/{k}.png"})
        requests.append(SubjectRequest(k=k, name=name if isinstance(name, str) else "", extract=True, box=box,
                                       frame=frame))
    return {**obj, "subjects": subjects}, tuple(requests)


def check_inputs(manifest: Path, settings: ExtractionSettings, out: Path | None = None) -> list[ExtractionSample]:
    """Every problem with the manifest, the settings and the output folder, in one ConfigError, before anything
    expensive runs."""
    samples, problems = load_extraction_manifest(Path(manifest), settings.replace_images)
    if out is not None and Path(os.path.abspath(Path(out) / MANIFEST_FILE)) == Path(os.path.abspath(manifest)):
        problems.append(f"--out {out} would overwrite the input manifest {manifest} with the output one: use another "
                        f"folder")
    problems += settings.segments.problems()
    if not (math.isfinite(settings.margin) and settings.margin >= 0):
        problems.append(f"--margin must be a finite number >= 0 (a fraction of the box's size), got {settings.margin}")
    if settings.detect_frames < 1:
        problems.append(f"--detect-frames must be >= 1, got {settings.detect_frames}")
    if settings.box_threshold is not None and math.isnan(settings.box_threshold):
        problems.append("--box-threshold must be a number, got nan")
    problems += _folder_problems(settings.detector, "--detector", DETECTOR_TYPES)
    problems += _folder_problems(settings.segmenter, "--segmenter", SEGMENTER_TYPES)
    unboxed = [f"{s.entry.id} ({r.name})" for s in samples for r in s.requests if r.extract and r.box is None]
    if unboxed and settings.detector is None:
        shown = ", ".join(unboxed[:MAX_REPORTED]) + (f" and {len(unboxed) - MAX_REPORTED} more" if len(unboxed) >
                                                     MAX_REPORTED else "")
        problems.append(f"{len(unboxed)} subject(s) have neither an image nor a box, so --detector (a local OWLv2 or "
                        f"Grounding DINO folder) is needed to find them: {shown}")
    moved = [s.entry.id for s in samples if s.needs_extraction and s.entry.audio is not None]
    if moved and settings.segments.train_start > 0:
        problems.append(f"--train-start {settings.segments.train_start} would shift the training video against its "
                        f"audio file, which is not cut (samples {', '.join(moved[:MAX_REPORTED])}): use "
                        f"--train-start 0")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise ConfigError(f"cannot extract subjects from {manifest} ({len(problems)} problem(s)):\n  "
                          + "\n  ".join(problems[:MAX_REPORTED]) + more)
    return samples


# ---------------------------------------------------------------- geometry and frames


def crop_window(box: tuple[float, float, float, float], margin: float, height: int,
                width: int) -> tuple[int, int, int, int]:
    """The crop [x0', y0', x1', y1') of a box grown by margin x its size per side, rounded outward, clipped."""
    x0, y0, x1, y1 = box
    mw, mh = margin * (x1 - x0), margin * (y1 - y0)
    return (max(0, math.floor(x0 - mw)), max(0, math.floor(y0 - mh)),
            min(width, math.ceil(x1 + mw)), min(height, math.ceil(y1 + mh)))


def segment_frames(start_s: float, end_s: float, fps: float, num_frames: int) -> range:
    """Frames i whose time i / fps lies in [start_s, end_s), cut at the video's end."""
    eps = 1e-6  # 5 s x 25 fps is frame 125 exactly, whatever the float rounding of 5 * 25
    first = max(0, math.ceil(start_s * fps - eps))
    stop = min(num_frames, math.ceil(end_s * fps - eps))
    return range(first, max(first, stop))


def detection_frames(segment: range, n: int) -> list[int]:
    """n frames spread evenly over the segment (the centres of n equal parts), fewer if it is shorter."""
    span = len(segment)
    return sorted({segment.start + math.floor((j + 0.5) * span / n) for j in range(n)})


def _stem(sample_id: str) -> str:
    """A file-name-safe stem of a sample id; a hash keeps two ids that clean to the same name apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:80]
    if safe != sample_id or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"
    return safe


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then rename into place: a killed run never leaves a half-written file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    _atomic(path, lambda tmp: Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG"))


def _write_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"))


def write_segment(src: Path, dst: Path, frames: range) -> None:
    """Frames [start, stop) of `src` re-encoded as h264 (yuv420p, CRF 12, the source's frame rate) into `dst`.

    The decoder's own pictures are re-encoded (no RGB round trip); only a non-yuv420p source is converted."""
    import av

    def write(tmp: Path) -> None:
        with av.open(str(src)) as source, av.open(str(tmp), "w", format="mp4") as target:
            stream = source.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            out = target.add_stream("libx264", rate=rate, options={"crf": TRAINING_CRF, "preset": "medium",
                                                                   "threads": "2"})
            out.width, out.height, out.pix_fmt = stream.width, stream.height, "yuv420p"
            pos = 0
            try:
                for frame in source.decode(stream):
                    if pos >= frames.stop:
                        break
                    if pos >= frames.start:
                        if frame.format.name != "yuv420p":
                            frame = frame.reformat(format="yuv420p")
                        # renumbered from 0 at the frame rate: the segment starts the new video
                        frame.pts, frame.time_base = pos - frames.start, 1 / Fraction(rate)
                        for packet in out.encode(frame):
                            target.mux(packet)
                    pos += 1
            except av.error.FFmpegError as e:
                raise DataError("corrupt", str(src), f"decode failed at frame {pos}: {e}") from None
            for packet in out.encode():
                target.mux(packet)
        if pos < frames.stop:
            raise DataError("corrupt", str(src), f"decoded {pos} frames, the training segment needs {frames.stop}")

    _atomic(dst, write)


# ---------------------------------------------------------------- models


@dataclass
class Detection:
    score: float
    frame: int  # the video's frame index
    box: tuple[float, float, float, float]  # frame pixels


class Detector:
    """An open-vocabulary detector from a local transformers folder: OWLv2 or Grounding DINO (by its config)."""

    def __init__(self, folder: Path, device):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.kind, self.device = model_type(folder), device
        # AutoModelForZeroShotObjectDetection maps owlv2 -> Owlv2ForObjectDetection and grounding-dino ->
        # GroundingDinoForObjectDetection; AutoProcessor -> Owlv2Processor / GroundingDinoProcessor
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
        self.model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.torch = torch

    def best(self, frames: np.ndarray, indices: list[int], phrases: list[str]) -> list[Detection | None]:
        """Per phrase, the highest-scoring box over all frames (uint8 [F, H, W, 3]); None if there is no box."""
        scores, boxes = self.scores(frames, phrases)  # [F, boxes, P], [F, boxes, 4] in pixels
        out = []
        for p in range(len(phrases)):
            s = scores[..., p]
            if s.numel() == 0 or not bool(self.torch.isfinite(s).any()):  # a phrase without tokens has no score
                out.append(None)
                continue
            flat = int(s.flatten().argmax())
            f, b = divmod(flat, s.shape[1])
            out.append(Detection(score=float(s[f, b]), frame=indices[f], box=tuple(float(v) for v in boxes[f, b])))
        return out

    def scores(self, frames: np.ndarray, phrases: list[str]):
        torch = self.torch
        images = list(frames)
        h, w = frames.shape[1:3]
        with torch.inference_mode():
            if self.kind == "owlv2":
                inputs = self.processor(text=[phrases] * len(images), images=images, return_tensors="pt")
                inputs = inputs.to(self.device)
                outputs = self.model(**inputs)
                # one independent sigmoid classifier per text query: the phrase's own score for every box
                scores = outputs.logits.float().sigmoid()  # [F, boxes, P]
                # OWLv2 pads the frame to a square (bottom and right) before resizing: boxes are in units of its side
                side = max(h, w)
                boxes = _corners(outputs.pred_boxes.float()) * side
            else:
                text, spans = _grounding_text(phrases)
                inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt").to(self.device)
                outputs = self.model(**inputs)
                token_probs = outputs.logits.float().sigmoid()  # [F, queries, max_text_len]
                offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
                scores = torch.full((*token_probs.shape[:2], len(phrases)), -math.inf)
                for p, (a, b) in enumerate(spans):
                    tokens = [t for t, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b
                              and t < token_probs.shape[-1]]
                    if tokens:
                        scores[..., p] = token_probs[..., tokens].amax(-1).cpu()
                # Grounding DINO's boxes are relative to the frame itself (same-size frames: no batch padding)
                boxes = _corners(outputs.pred_boxes.float()) * torch.tensor([w, h, w, h], dtype=torch.float32,
                                                                             device=outputs.pred_boxes.device)
            boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)  # a box may reach past the frame (OWLv2: into its pad)
            boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
            outside = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])  # nothing left in the frame
            scores = scores.masked_fill(outside[..., None].to(scores.device), -math.inf)
        return scores.cpu().clone(), boxes.cpu().clone()  # clones: ordinary tensors outside inference mode


def _corners(cxcywh):
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    import torch

    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _grounding_text(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's prompt "a. b." (lower case, as its processor merges labels) and each phrase's characters."""
    text, spans = "", []
    for phrase in phrases:
        if text:
            text += " "
        start = len(text)
        text += phrase.strip().lower()
        spans.append((start, len(text)))
        text += "."
    return text, spans


class Segmenter:
    """SAM (SamModel + SamProcessor) from a local folder, prompted with one box on the whole frame."""

    def __init__(self, folder: Path, device):
        import torch
        from transformers import SamModel, SamProcessor

        self.model = SamModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = SamProcessor.from_pretrained(folder, local_files_only=True)
        self.device, self.torch = device, torch

    def mask(self, frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """bool [H, W]: the mask of the three SAM proposes for the box with the highest predicted IoU."""
        with self.torch.inference_mode():
            inputs = self.processor(images=frame, input_boxes=[[list(box)]], return_tensors="pt").to(self.device)
            outputs = self.model(**inputs, multimask_output=True)
            masks = self.processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                      inputs["reshaped_input_sizes"].cpu())[0]  # [1, 3, H, W] bool
            best = int(outputs.iou_scores[0, 0].float().argmax())
        return masks[0, best].numpy().astype(bool)


# ---------------------------------------------------------------- one sample


@dataclass
class SubjectResult:
    k: int
    name: str
    found: bool
    kind: str = ""  # why not found: not_in_caption, video, no_crop_segment, no_training_segment,
    reason: str = ""  # frame_outside_segment, box_outside_frame, ambiguous_phrase, not_detected, empty_mask
    frame: int | None = None
    time_s: float | None = None
    score: float | None = None
    box: list[float] | None = None  # in the frame's pixels
    crop: list[int] | None = None  # [x0, y0, x1, y1) in the frame's pixels


@dataclass
class SampleResult:
    id: str
    subjects: list[SubjectResult] = field(default_factory=list)
    entry: dict | None = None  # the output manifest object (paths relative to out), when usable
    files: list[str] = field(default_factory=list)  # relative to out

    def as_json(self) -> dict:
        return {"id": self.id, "entry": self.entry, "files": self.files,
                "subjects": [vars(s) for s in self.subjects]}


_WORD = r"(?<![\w]){}(?![\w])"


def phrase_in_caption(name: str, caption: str) -> bool:
    """The phrase as whole words of the caption, any case ("cat" is not found in "concatenate")."""
    return re.search(_WORD.format(re.escape(name.strip())), caption, flags=re.IGNORECASE) is not None


class SampleExtractor:
    def __init__(self, out: Path, settings: ExtractionSettings, detector: Detector | None,
                 segmenter: Segmenter | None):
        self.out, self.settings, self.detector, self.segmenter = out, settings, detector, segmenter

    def run(self, sample: ExtractionSample) -> SampleResult:
        from hcustom_mc.data.video import decode_frames, probe_video

        entry, seg = sample.entry, self.settings.segments
        result = SampleResult(id=entry.id)
        todo = [r for r in sample.requests if r.extract]
        if not todo:  # nothing to cut: the line is kept as it is
            result.entry = entry_to_json(entry, self.out)
            return result
        found: dict[int, SubjectResult] = {}  # k -> its outcome, once known

        def fail_rest(kind: str, reason: str) -> SampleResult:
            """The subjects without an outcome yet all fail for one reason that concerns the whole sample."""
            result.subjects = [found.get(r.k) or SubjectResult(r.k, r.name, False, kind, reason) for r in todo]
            return result

        for r in todo:
            if not phrase_in_caption(r.name, entry.caption):
                found[r.k] = SubjectResult(r.k, r.name, False, "not_in_caption",
                                           f"the phrase {r.name!r} is not in the caption {entry.caption!r}")
        try:
            info = probe_video(entry.video)
        except DataError as e:
            return fail_rest("video", f"{e.kind}: {e.reason}")
        if not info.fps > 0:  # seconds cannot be turned into frames
            return fail_rest("video", f"the video {entry.video} declares no frame rate")
        crop_seg = segment_frames(seg.crop_start, seg.crop_end, info.fps, info.num_frames)
        train_seg = segment_frames(seg.train_start, seg.train_end, info.fps, info.num_frames)
        if not crop_seg:
            return fail_rest("no_crop_segment",
                             f"the video ends at {info.num_frames / info.fps:.2f} s ({info.num_frames} frames at "
                             f"{info.fps:g} fps), before the crop segment [{seg.crop_start:g}, {seg.crop_end:g}) s")
        if not train_seg:
            return fail_rest("no_training_segment", f"no frame of the video lies in the training segment "
                                                    f"[{seg.train_start:g}, {seg.train_end:g}) s at {info.fps:g} fps")
        where = (f"the crop segment [{seg.crop_start:g}, {seg.crop_end:g}) s "
                 f"(frames {crop_seg.start}..{crop_seg.stop - 1})")

        # given boxes: on their frame, or on the segment's middle one
        chosen: dict[int, tuple[SubjectRequest, int, tuple]] = {}  # k -> (request, frame, box)
        for r in todo:
            if r.k in found or r.box is None:
                continue
            frame = crop_seg.start + len(crop_seg) // 2 if r.frame is None else r.frame
            if frame not in crop_seg:
                found[r.k] = SubjectResult(r.k, r.name, False, "frame_outside_segment",
                                           f"its box's frame {frame} ({frame / info.fps:.2f} s) is outside {where}")
            elif r.box[2] > info.width or r.box[3] > info.height:
                found[r.k] = SubjectResult(r.k, r.name, False, "box_outside_frame",
                                           f"its box {list(r.box)} leaves the {info.width}x{info.height} frame")
            else:
                chosen[r.k] = (r, frame, r.box)
        # the others: the detector, over frames spread evenly over the segment
        phrases = [r for r in todo if r.k not in found and r.box is None]
        names = [r.name.strip().lower() for r in phrases]
        for r in phrases:
            if names.count(r.name.strip().lower()) > 1:  # the detector would give both the same box
                found[r.k] = SubjectResult(r.k, r.name, False, "ambiguous_phrase",
                                           f"another subject of this sample without a box has the phrase {r.name!r}: "
                                           f"the detector cannot tell them apart (give boxes, or phrases of the "
                                           f"caption that differ, such as 'red square' and 'blue square')")
        phrases = [r for r in phrases if r.k not in found]
        indices = detection_frames(crop_seg, self.settings.detect_frames) if phrases else []
        wanted = sorted(set(indices) | {frame for _, frame, _ in chosen.values()})
        try:
            pixels = dict(zip(wanted, decode_frames(entry.video, wanted))) if wanted else {}
        except DataError as e:
            return fail_rest("video", f"{e.kind}: {e.reason}")
        scores: dict[int, float] = {}
        if phrases:
            threshold = self.settings.threshold()
            best = self.detector.best(np.stack([pixels[i] for i in indices]), indices, [r.name for r in phrases])
            for r, d in zip(phrases, best):
                if d is not None and d.score > threshold:
                    chosen[r.k], scores[r.k] = (r, d.frame, d.box), d.score
                else:
                    seen = (" (no box inside the frame)" if d is None else
                            f" (best score {d.score:.3g}, at {d.frame / info.fps:.2f} s)")
                    found[r.k] = SubjectResult(r.k, r.name, False, "not_detected",
                                               f"not detected above the threshold {threshold:g} in {len(indices)} "
                                               f"frames of {where}{seen}")

        crops: dict[int, tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int]]] = {}
        for k, (r, frame, box) in sorted(chosen.items()):
            x0, y0, x1, y1 = crop_window(box, self.settings.margin, info.height, info.width)
            crop = pixels[frame][y0:y1, x0:x1].copy()
            mask = None
            if self.segmenter is not None:
                mask = self.segmenter.mask(pixels[frame], box)[y0:y1, x0:x1]
                if not mask.any():
                    found[k] = SubjectResult(k, r.name, False, "empty_mask",
                                             f"the segmenter found none of its pixels in its box {_round(box)} at "
                                             f"frame {frame} ({frame / info.fps:.2f} s)")
                    continue
                crop[~mask] = 255  # white background: the reference-image convention
            crops[k] = (crop, mask, (x0, y0, x1, y1))
            found[k] = SubjectResult(k, r.name, True, frame=frame, time_s=round(frame / info.fps, 6),
                                     score=scores.get(k), box=[float(v) for v in box], crop=[x0, y0, x1, y1])
        result.subjects = [found[r.k] for r in todo]
        if not all(s.found for s in result.subjects):
            return result  # left out of the manifest; each subject not found is reported by name and reason

        stem, out = _stem(entry.id), self.out
        subjects = list(entry.subjects)
        for k, (crop, mask, (x0, y0, _, _)) in crops.items():
            image = out / IMAGES / f"{stem}_{k}.png"
            _write_png(image, crop)
            mask_path = None
            if mask is not None:
                mask_path = out / MASKS / f"{stem}_{k}.png"
                _write_png(mask_path, mask.astype(np.uint8) * 255)
            x0b, y0b, x1b, y1b = chosen[k][2]
            # the manifest's box is in the identity image's pixels: the subject's box moved into its crop
            subjects[k] = Subject(name=subjects[k].name, image=image, box=(x0b - x0, y0b - y0, x1b - x0, y1b - y0),
                                  mask=mask_path)
        # the training segment becomes the sample's video(s); an edit's source and mask clips are cut alike
        videos = {}
        for name, suffix in (("video", ""), ("source_video", "_source"), ("mask_video", "_mask")):
            src = getattr(entry, name)
            if src is not None:
                videos[name] = out / VIDEOS / f"{stem}{suffix}.mp4"
                try:
                    write_segment(src, videos[name], train_seg)
                except DataError as e:
                    found.clear()
                    return fail_rest("video", f"{e.kind}: {e.reason}")
        written = [*(subjects[k].image for k in crops), *(subjects[k].mask for k in crops if subjects[k].mask),
                   *videos.values()]
        result.files = [Path(os.path.relpath(p, out)).as_posix() for p in written]
        fixed = replace(entry, subjects=tuple(subjects), num_frames=len(train_seg), fps=info.fps, height=info.height,
                        width=info.width, **videos)
        result.entry = entry_to_json(fixed, out)
        return result


def _round(box) -> list[float]:
    return [round(float(v), 3) for v in box]


# ---------------------------------------------------------------- the run


def _claim_settings(out: Path, settings: dict, rank: int) -> None:
    import torch.distributed as dist

    path = out / SETTINGS_FILE
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.rglob(".*.tmp*"):  # a killed run's half-written file
            stale.unlink()
        if not path.exists():
            _write_json(path, settings)
    if dist.is_initialized():
        dist.barrier()
    found = json.loads(path.read_text())
    if found != json.loads(json.dumps(settings)):
        diff = sorted(k for k in set(found) | set(settings) if found.get(k) != json.loads(json.dumps(settings)).get(k))
        raise ConfigError(f"{out} holds an extraction made with other settings (differ in: {', '.join(diff)}); use a "
                          f"new --out folder or the original settings")


def _done(out: Path, stem: str) -> bool:
    path = out / RESULTS / f"{stem}.json"
    if not path.exists():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((out / f).exists() for f in files)


def extract_subjects(manifest: str | Path, out: str | Path, settings: ExtractionSettings,
                     progress: bool = True) -> dict | None:
    """Run on every rank (or alone). Returns the report on rank 0, None elsewhere."""
    import torch.distributed as dist
    from tqdm import tqdm

    from hcustom_mc.device import compute_device

    manifest, out = Path(manifest), Path(out)
    samples = check_inputs(manifest, settings, out)  # every rank checks: each must stop on a bad input
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    _claim_settings(out, settings.as_json(manifest), rank)
    mine = [s for s in samples[rank::world] if not _done(out, _stem(s.entry.id))]
    if rank == 0:
        log.info("extract subjects %s -> %s: %d samples (%d with subjects to extract), %d ranks; this rank: %d to do",
                 manifest, out, len(samples), sum(s.needs_extraction for s in samples), world, len(mine))
    device = compute_device()
    need_detector = any(r.extract and r.box is None for s in mine for r in s.requests)
    detector = Detector(settings.detector, device) if need_detector else None
    need_segmenter = settings.segmenter is not None and any(s.needs_extraction for s in mine)
    segmenter = Segmenter(settings.segmenter, device) if need_segmenter else None
    extractor = SampleExtractor(out, settings, detector, segmenter)
    bar = tqdm(total=len(mine), desc="extract subjects", unit="sample", disable=not progress or rank != 0,
               file=sys.stderr)
    for sample in mine:
        result = extractor.run(sample)
        _write_json(out / RESULTS / f"{_stem(sample.entry.id)}.json", result.as_json())  # last: marks it done
        bar.update(1)
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    return _merge(out, samples, settings, manifest) if rank == 0 else None


def _write_if_changed(path: Path, text: str) -> None:
    """A resumed run that changes nothing rewrites nothing."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _merge(out: Path, samples: list[ExtractionSample], settings: ExtractionSettings, manifest: Path) -> dict:
    """Rank 0: the output manifest (in input order) and the report, from the per-sample results."""
    lines, not_found, left_out = [], [], []
    kept_as_given = 0
    for sample in samples:
        result = json.loads((out / RESULTS / f"{_stem(sample.entry.id)}.json").read_text())
        missing = [s for s in result["subjects"] if not s["found"]]
        for s in missing:
            not_found.append({"id": result["id"], "subject": s["name"], "index": s["k"], "kind": s["kind"],
                              "reason": s["reason"]})
            log.warning("%s: subjects[%d] %r not found: %s", result["id"], s["k"], s["name"], s["reason"])
        if result["entry"] is None:
            left_out.append(result["id"])
        else:
            kept_as_given += not sample.needs_extraction
            lines.append(json.dumps(result["entry"], ensure_ascii=False))
    report = {"manifest": str(manifest.resolve()), "output_manifest": str((out / MANIFEST_FILE).resolve()),
              "settings": settings.as_json(manifest), "samples": len(samples), "written": len(lines),
              "kept_as_given": kept_as_given, "left_out": left_out, "not_found": not_found}
    _write_if_changed(out / MANIFEST_FILE, "".join(line + "\n" for line in lines))
    _write_if_changed(out / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    log.info("extract subjects done: %d of %d samples in %s (%d kept as given), %d left out with %d subject(s) not "
             "found (listed in %s)", len(lines), len(samples), out / MANIFEST_FILE, kept_as_given, len(left_out),
             len(not_found), out / REPORT_FILE)
    return report
