"""Face-Sim: identity consistency between a job's identity image(s) and the faces in its video.

Definition (issue 23: the ArcFace cosine, following OpenS2V-Eval's `eval/get_facesim.py` in
PKU-YuanGroup/OpenS2V-Nexus, the `arc_score` it reports):

1. Frames: `num_frames` (32) frames spread uniformly over the video (OpenS2V `sample_video_frames`:
   np.linspace(0, F-1, 32) rounded down; see `common.uniform_frame_indices`).
2. Faces: the identity image (read as PIL `.convert("RGB")`, as OpenS2V and our sampler read it) and every picked
   frame go through the face detector; the LARGEST face by box area is kept (OpenS2V `get_face_keypoints`). When
   no face is found, the image is padded by 25% of its height/width on each side with gray (128) and searched
   again (OpenS2V `pad_np_bgr_image(scale=1.25)`: detectors miss faces that fill the whole picture); the
   embedding then comes from the padded image, as there.
3. Alignment and embedding: insightface's recogniser aligns the face on its 5 detected landmarks to the ArcFace
   112x112 template (`face_align.norm_crop`, inside `FaceAnalysis.get`) and embeds it with ArcFace
   (buffalo_l: w600k_r50, antelopev2: glintr100). OpenS2V builds `FaceAnalysis(root=..., providers=[CUDA])`
   (no name: insightface's default pack, buffalo_l) with every module of the pack and
   `prepare(ctx_id=0, det_size=(320, 320))`; we load only "detection" and
   "recognition" (the other modules do not touch the embedding) with the same det_size and default det_thresh.
4. Score: per frame, cosine(identity embedding, frame embedding) clamped at 0 (`max(0.0, cos)`, per frame, as
   OpenS2V does); Face-Sim = the mean over the frames in which a face was found.

Where we differ from OpenS2V, and why:
- Frames with no face: OpenS2V skips them silently. We also leave them out of the mean (so our numbers stay
  comparable), but count them: `face_sim_no_face_frames`. When no picked frame has a face, OpenS2V reports 0.0;
  so do we (a video that lost the face did fail to keep the identity; dropping it would flatter the model), with
  `face_sim_note` saying so.
- No face in the identity image: OpenS2V drops the video from its results; we report None with the reason in
  `face_sim_note`. t2v jobs (no identity image): None.
- Short videos: OpenS2V's linspace keeps duplicate indices when the video has fewer than 32 frames (those frames
  count twice); we look at each frame once.
- OpenS2V's headline number is FaceSim-Cur (`cur_score`: a CurricularFace IR-101 model on the same faces,
  which also drops frames whose clamped score is 0); issue 23 asks for the ArcFace number (`arc_score`, zeros
  kept), so that is what we compute.
- Several identity images (multi-subject jobs; OpenS2V only ever scores the one human image of a job): each
  identity image in which a face is found is a face subject. With one face subject the rule above applies
  unchanged (largest face per frame). With two or more, each subject is scored against the face of each frame
  that matches it best (max cosine over the frame's faces), since the largest face can only be one of them;
  the per-subject values are reported as `face_sim/<subject name>`, `face_sim` is their mean and `face_sim_min`
  the lowest (the subject being lost). Subjects whose
  image has no face (objects, animals) are left out and named in `face_sim_note`.

Backends (the one used is recorded with every number, `face_sim_backend` and `face_sim_model`):
- "insightface": `insightface.app.FaceAnalysis` with a buffalo_l or antelopev2 pack from
  `models_dir/insightface/models/<pack>/`. FaceAnalysis downloads a pack it does not find, so the folder is
  checked first and a missing pack raises MissingModelError; nothing is ever downloaded.
- "dlib": no download at all: dlib's (dlib-bin) frontal-face HOG detector, the 5-landmark shape predictor for
  alignment (`dlib.get_face_chip`, 150x150, padding 0.25) and dlib's ResNet face encoder
  (`dlib_face_recognition_resnet_model_v1.dat`, 128-D), whose weights ship inside the face-recognition-models
  package: the pipeline of the `face_recognition` library (HOG, one upsampling, the 5-point model). HOG rather
  than dlib's CNN (mmod) detector: dlib-bin is built without CUDA, and the CNN detector takes about 9 s per 720p
  frame on a CPU core against 0.1-0.5 s for HOG; HOG finds frontal faces only, and frames where it finds none
  are counted in `face_sim_no_face_frames`. One upsampling lets HOG find faces down to about 40 px, near what
  SCRFD finds in a 720p frame shrunk to det_size 320 (its smallest anchors, 16 px, are 64 px there).
  Its numbers are NOT on ArcFace's scale: dlib's descriptors of different people still have cosines around
  0.8-0.9 (dlib's same-person rule is a Euclidean distance below 0.6, about cosine > 0.91 at the descriptors'
  typical norm of 1.4), where ArcFace gives different people about 0-0.3. Compare dlib Face-Sim with dlib
  Face-Sim only.
- "auto" (default): insightface when `models_dir/insightface/models/<pack>` exists, else dlib (logged once at
  INFO). A pack folder that exists but is incomplete is an error, not a quiet fall-back to dlib.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hcustom_mc.console import log_once
from hcustom_mc.eval.common import MissingModelError, VideoSample, uniform_frame_indices

if TYPE_CHECKING:
    import torch

METRIC = "face_sim"
DET_SIZE = (320, 320)  # OpenS2V-Eval get_facesim.py: face_arc_model.prepare(ctx_id=0, det_size=(320, 320))
PAD_SCALE = 1.25  # OpenS2V-Eval pad_np_bgr_image(scale=1.25), gray (128) border
PAD_VALUE = 128
DLIB_PIP = "pip install dlib-bin face-recognition-models"
DLIB_FILES = {
    "shape_predictor": "shape_predictor_5_face_landmarks.dat",
    "encoder": "dlib_face_recognition_resnet_model_v1.dat",
}
HOW_TO_GET = ("hf download public-data/insightface --include 'models/buffalo_l/*' --local-dir models/insightface "
              "(antelopev2: hf download DIAMONIK7777/antelopev2 --local-dir models/insightface/models/antelopev2); "
              f"without a pack Face-Sim uses dlib, no download: {DLIB_PIP}")


@dataclass(frozen=True)
class Face:
    """One detected face: its box area (in the searched image) and its embedding."""

    area: float
    embedding: np.ndarray  # float64


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def pad_gray(rgb: np.ndarray, scale: float = PAD_SCALE) -> np.ndarray:
    """OpenS2V's retry image: int(h * (scale - 1)) gray rows above and below, int(w * (scale - 1)) columns left
    and right."""
    h, w = rgb.shape[:2]
    dy, dx = int(h * (scale - 1.0)), int(w * (scale - 1.0))
    return np.pad(rgb, ((dy, dy), (dx, dx), (0, 0)), mode="constant", constant_values=PAD_VALUE)


def read_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def insightface_pack_dir(models_dir: Path, pack: str) -> Path:
    return Path(models_dir) / "insightface" / "models" / pack


def face_recognition_models_dir() -> Path | None:
    """face_recognition_models' models/ folder, found without importing the package (its __init__ imports
    pkg_resources, which recent setuptools releases no longer ship)."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "models"
        if folder.is_dir():
            return folder
    return None


class InsightFaceBackend:
    """insightface's FaceAnalysis (detection + ArcFace recognition) on a local pack; never downloads."""

    name = "insightface"

    def __init__(self, models_dir: Path, pack: str, device: torch.device | str = "cpu"):
        pack_dir = insightface_pack_dir(models_dir, pack)
        how = HOW_TO_GET
        if not pack_dir.is_dir():
            raise MissingModelError(METRIC, pack_dir, how)
        if not any(pack_dir.glob("*.onnx")):
            nested = pack_dir / pack
            if any(nested.glob("*.onnx")):
                # insightface's antelopev2.zip unpacks into antelopev2/antelopev2/
                how = f"the .onnx files are in {nested}: move them up one level"
            raise MissingModelError(METRIC, pack_dir / "*.onnx", how)
        try:
            import insightface.app
            import onnxruntime
        except ImportError as e:
            raise MissingModelError(METRIC, pack_dir, f"the insightface backend needs the insightface and "
                                    f"onnxruntime packages ({e}); pip install 'hcustom-mc[eval]'") from None
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers: list = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
            ctx_id = dev.index or 0
        else:
            if dev.type == "cuda":
                log_once("face_sim: onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed); "
                         "insightface runs on the CPU", __name__)
            providers, ctx_id = ["CPUExecutionProvider"], -1
        # The pack folder is passed as an absolute path: insightface >= 1 takes a name that is an existing folder
        # as is (a relative name would be looked up in the working directory first), and 0.7's
        # ensure_available joins root/models/<absolute path> into that same path. insightface 0.7 print()s every
        # model it loads: kept off stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.app = insightface.app.FaceAnalysis(
                    name=str(pack_dir.resolve()), root=str(Path(models_dir) / "insightface"),
                    allowed_modules=["detection", "recognition"], providers=providers)
            except AssertionError:  # FaceAnalysis asserts that the pack has a detector
                raise MissingModelError(METRIC, pack_dir, f"no face detector among its .onnx files; {how}") from None
            if "recognition" not in self.app.models:
                raise MissingModelError(METRIC, pack_dir, f"no ArcFace recogniser among its .onnx files; {how}")
            self.app.prepare(ctx_id=ctx_id, det_size=DET_SIZE)
        self.model = f"{pack}/{Path(self.app.models['recognition'].model_file).name}"

    def faces(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface takes OpenCV's BGR, as OpenS2V passes it
        return [Face(float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])), np.asarray(f.embedding, np.float64))
                for f in self.app.get(bgr)]


class DlibBackend:
    """dlib's HOG face detector, 5-landmark alignment and ResNet face encoder; the weights ship in
    face-recognition-models, so nothing is downloaded."""

    name = "dlib"

    def __init__(self, upsample: int = 1):
        folder = face_recognition_models_dir()
        try:
            import dlib
        except ImportError:
            raise MissingModelError(METRIC, "the dlib package", f"{DLIB_PIP}, or give an insightface pack "
                                    "(backend='insightface')") from None
        if folder is None:
            raise MissingModelError(METRIC, "the face_recognition_models package", DLIB_PIP)
        paths = {key: folder / fname for key, fname in DLIB_FILES.items()}
        for path in paths.values():
            if not path.is_file():
                raise MissingModelError(METRIC, path, DLIB_PIP)
        self.dlib = dlib
        self.upsample = int(upsample)
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(paths["shape_predictor"]))
        self.encoder = dlib.face_recognition_model_v1(str(paths["encoder"]))
        self.model = DLIB_FILES["encoder"]

    def faces(self, rgb: np.ndarray) -> list[Face]:
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        out = []
        for rect in self.detector(rgb, self.upsample):
            landmarks = self.shape_predictor(rgb, rect)
            chip = self.dlib.get_face_chip(rgb, landmarks, size=150, padding=0.25)
            descriptor = np.asarray(self.encoder.compute_face_descriptor(chip), np.float64)
            out.append(Face(float(rect.width() * rect.height()), descriptor))
        return out


def _subject_key(name: str, taken: set[str]) -> str:
    base = f"{METRIC}/" + (re.sub(r"[^A-Za-z0-9_.\- ]", "_", name) or "subject")
    key, n = base, 2
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


class FaceSim:
    """Face-Sim (identity consistency), see the module docstring for the definition and its sources.

    Options: backend "auto" | "insightface" | "dlib"; num_frames (32, as OpenS2V); pack ("buffalo_l" or
    "antelopev2", the folder under models_dir/insightface/models/); dlib_upsample (HOG detector upsamplings, 1).
    """

    name = METRIC
    how_to_get = HOW_TO_GET

    @staticmethod
    def expected_path(models_dir: Path) -> Path:
        return insightface_pack_dir(models_dir, "buffalo_l")

    def __init__(self, models_dir: Path, device: torch.device | str = "cpu", backend: str = "auto",
                 num_frames: int = 32, pack: str = "buffalo_l", dlib_upsample: int = 1):
        if backend not in ("auto", "insightface", "dlib"):
            raise ValueError(f"face_sim backend must be auto, insightface or dlib, not {backend!r}")
        if num_frames < 1:
            raise ValueError("face_sim num_frames must be at least 1")
        self.num_frames = int(num_frames)
        pack_dir = insightface_pack_dir(models_dir, pack)
        if backend == "auto":
            backend = "insightface" if pack_dir.exists() else "dlib"
            log_once(f"face_sim: backend {backend} (" + (
                f"pack {pack_dir})" if backend == "insightface"
                else f"no insightface pack at {pack_dir}: dlib's face encoder from face-recognition-models)"), __name__)
        self.backend: InsightFaceBackend | DlibBackend = (
            InsightFaceBackend(models_dir, pack, device) if backend == "insightface" else DlibBackend(dlib_upsample))

    def find_faces(self, rgb: np.ndarray) -> list[Face]:
        """The faces in one image, searched again in the gray-padded image when there are none (OpenS2V)."""
        faces = self.backend.faces(rgb)
        return faces if faces else self.backend.faces(pad_gray(rgb))

    def score(self, sample: VideoSample) -> dict[str, float | int | str | None]:
        out: dict[str, float | int | str | None] = {
            METRIC: None, f"{METRIC}_min": None, f"{METRIC}_frames": None, f"{METRIC}_no_face_frames": None,
            f"{METRIC}_backend": self.backend.name, f"{METRIC}_model": self.backend.model, f"{METRIC}_note": None}
        if not sample.subjects:
            out[f"{METRIC}_note"] = f"no identity image ({sample.task} job)"
            return out
        multi = len(sample.subjects) > 1
        keys: set[str] = set()
        subjects: list[tuple[str, str, np.ndarray | None]] = []  # (name, output key, identity embedding)
        for name, path in sample.subjects:
            faces = self.find_faces(read_rgb(path))
            embedding = max(faces, key=lambda f: f.area).embedding if faces else None
            subjects.append((name, _subject_key(name, keys) if multi else METRIC, embedding))
            if multi:
                out[subjects[-1][1]] = None
        faceless = [name for name, _, e in subjects if e is None]
        scored = [(key, e) for _, key, e in subjects if e is not None]
        notes = []
        if faceless:
            notes.append("no face in the identity image of " + ", ".join(repr(n) for n in faceless))
        if not scored:
            out[f"{METRIC}_note"] = "; ".join(notes)
            return out

        indices = uniform_frame_indices(len(sample.frames), self.num_frames)
        frame_faces = [self.find_faces(sample.frames[i]) for i in indices]
        with_face = [faces for faces in frame_faces if faces]
        out[f"{METRIC}_frames"] = len(indices)
        out[f"{METRIC}_no_face_frames"] = len(indices) - len(with_face)
        if not with_face:
            notes.append(f"no face in any of the {len(indices)} frames (scored 0.0, as OpenS2V-Eval)")
        values = []
        for key, reference in scored:
            if len(scored) == 1:  # OpenS2V: the largest face of each frame
                sims = [cosine(reference, max(faces, key=lambda f: f.area).embedding) for faces in with_face]
            else:  # several faces to find: each subject against its best-matching face of the frame
                sims = [max(cosine(reference, f.embedding) for f in faces) for faces in with_face]
            value = float(np.mean([max(0.0, s) for s in sims])) if sims else 0.0
            values.append(value)
            if multi:
                out[key] = value
        out[METRIC] = float(np.mean(values))
        # the subject scored worst: a mean of 0.8 may be two subjects at 0.8 or one lost at 0.6 beside one at 1.0
        out[f"{METRIC}_min"] = float(min(values))
        out[f"{METRIC}_note"] = "; ".join(notes) or None
        return out
