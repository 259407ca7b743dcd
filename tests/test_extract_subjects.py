"""Subject extraction (tools/extract_subjects.py, hcustom_mc/data/subjects.py): given boxes cut exactly from the crop
segment, the detector and segmenter paths on tiny random models, subjects not found reported by name and reason,
resumed runs that rewrite nothing, 2 ranks equal to 1, bad input reported at once."""

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.torchrun import REPO, backend_env, child_pythonpath, launch_command

FPS, H, W = 10, 64, 96
# training segment [0, 1) s = frames 0..9; crop segment [1.5, 3.5) s = frames 15..34, middle frame 15 + 20 // 2 = 25
SEGMENTS = ["--train-end", "1", "--crop-start", "1.5", "--crop-end", "3.5"]
TRAIN, CROP, MIDDLE = range(0, 10), range(15, 35), 25
DETECTED = [15 + math.floor((j + 0.5) * 20 / 3) for j in range(3)]  # 3 detection frames: the centres of 3 equal parts
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath()}


def background(i: int) -> int:
    """Each frame's flat background grey encodes its index: robust to h264, so a crop tells which frame it came from."""
    return 20 + 4 * i


def frame_of(pixels: np.ndarray) -> int:
    return round((float(pixels.mean()) - 20) / 4)


def write_coded_video(path: Path, frames: int, boxes: list[tuple[int, int, int, int]], seed: int = 0) -> None:
    """Frames on a grey that encodes their index, each box filled with a fixed random texture."""
    from hcustom_mc.data.tiny_dataset import write_video

    rng = np.random.default_rng(seed)
    textures = [rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8) for x0, y0, x1, y1 in boxes]
    video = np.empty((frames, H, W, 3), np.uint8)
    for i in range(frames):
        video[i] = background(i)
        for (x0, y0, x1, y1), tex in zip(boxes, textures):
            video[i, y0:y1, x0:x1] = tex
    write_video(path, video, fps=FPS)


def write_manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_tool(*args, nproc: int = 1, expect: int = 0) -> str:
    proc = subprocess.run(launch_command(nproc, "tools/extract_subjects.py", *args, "--no-progress"), cwd=REPO,
                          env={**ENV, **backend_env(nproc)}, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect})\n{out[-6000:]}"
    return out


def expected_window(box, margin, height=H, width=W):
    """The README's rule, written out here: the box grown by margin x its size per side, rounded outward, clipped."""
    x0, y0, x1, y1 = box
    mw, mh = margin * (x1 - x0), margin * (y1 - y0)
    return (max(0, math.floor(x0 - mw)), max(0, math.floor(y0 - mh)), min(width, math.ceil(x1 + mw)),
            min(height, math.ceil(y1 + mh)))


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def not_found(report: dict) -> set[tuple[str, str, str]]:
    return {(r["id"], r["subject"], r["kind"]) for r in report["not_found"]}


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """A dataset with boxes given: one usable two-subject sample, one kept as given, and one of each way to fail."""
    from PIL import Image

    root = tmp_path_factory.mktemp("given")
    (root / "videos").mkdir()
    cat, dog = (20, 14, 44, 38), (58, 30, 86, 56)
    write_coded_video(root / "videos" / "long.mp4", 40, [cat, dog])
    write_coded_video(root / "videos" / "short.mp4", 12, [cat])
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "given.png")
    cat_box = [20.4, 14.5, 43.7, 37.9]  # fractional: the outward rounding is part of what is checked
    lines = [
        {"id": "two", "task": "multi_identity", "video": "videos/long.mp4", "caption": "A cat and a dog play.",
         "subjects": [{"name": "cat", "box": cat_box}, {"name": "dog", "box": list(dog), "frame": 31}]},
        {"id": "kept", "task": "identity", "video": "videos/long.mp4", "caption": "A cat sits.",
         "subjects": [{"name": "cat", "image": "given.png", "box": [0, 0, 16, 16]}]},
        {"id": "early", "task": "identity", "video": "videos/long.mp4", "caption": "A cat sits.",
         "subjects": [{"name": "cat", "box": cat_box, "frame": 5}]},  # in the training segment
        {"id": "wrong_name", "task": "identity", "video": "videos/long.mp4", "caption": "A dog sits.",
         "subjects": [{"name": "cat", "box": cat_box}]},
        {"id": "short", "task": "identity", "video": "videos/short.mp4", "caption": "A cat sits.",
         "subjects": [{"name": "cat", "box": cat_box}]},
        {"id": "outside", "task": "identity", "video": "videos/long.mp4", "caption": "A cat sits.",
         "subjects": [{"name": "cat", "box": [50, 10, 120, 40]}]},
        {"id": "gone", "task": "identity", "video": "videos/gone.mp4", "caption": "A cat sits.",
         "subjects": [{"name": "cat", "box": cat_box}]},
    ]
    manifest = write_manifest(root / "raw.jsonl", lines)
    out = root / "out"
    log = run_tool("--manifest", manifest, "--out", out, "--margin", "0.25", *SEGMENTS)
    return {"root": root, "manifest": manifest, "out": out, "log": log, "cat": cat_box, "dog": list(dog)}


def test_given_boxes_cut_exactly_from_the_crop_segment(given):
    from hcustom_mc.data.manifest import load_manifest
    from hcustom_mc.data.video import decode_frames, probe_video

    out, source = given["out"], given["root"] / "videos" / "long.mp4"
    entries = {e.id: e for e in load_manifest(out / "manifest.jsonl")}  # the preprocessing's own reader takes it
    assert list(entries) == ["two", "kept"]
    two = entries["two"]
    for k, (box, frame) in enumerate([(given["cat"], MIDDLE), (given["dog"], 31)]):
        subject = two.subjects[k]
        x0, y0, x1, y1 = expected_window(box, 0.25)
        crop = read_png(subject.image)
        assert np.array_equal(crop, decode_frames(source, [frame])[0][y0:y1, x0:x1])  # exactly the slice
        corner = crop[:2, :2]  # the margin: background, whose grey names the frame it was cut from
        assert frame_of(corner) == frame and frame in CROP
        assert subject.box == pytest.approx((box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0))  # in crop pixels
    # the training video is the training segment, frames 0..9 in order, and the manifest says so
    info = probe_video(two.video)
    assert (two.num_frames, info.num_frames, info.fps, info.height, info.width) == (len(TRAIN), len(TRAIN), FPS, H, W)
    assert [frame_of(f[:4, :4]) for f in decode_frames(two.video, list(range(info.num_frames)))] == list(TRAIN)
    assert entries["kept"].subjects[0].image == given["root"] / "given.png"
    assert entries["kept"].video == source  # nothing to extract: the line as it was


def test_every_subject_not_found_is_reported_by_name_and_reason(given):
    report = json.loads((given["out"] / "report.json").read_text())
    assert not_found(report) == {("early", "cat", "frame_outside_segment"), ("wrong_name", "cat", "not_in_caption"),
                                 ("short", "cat", "no_crop_segment"), ("outside", "cat", "box_outside_frame"),
                                 ("gone", "cat", "video")}
    assert sorted(report["left_out"]) == ["early", "gone", "outside", "short", "wrong_name"]
    assert (report["samples"], report["written"], report["kept_as_given"]) == (7, 2, 1)
    for sample_id, reason in [("early", "frame 5 (0.50 s) is outside the crop segment [1.5, 3.5) s"),
                              ("short", "the video ends at 1.20 s"), ("wrong_name", "'cat' is not in the caption"),
                              ("gone", "missing: no such file"), ("outside", "leaves the 96x64 frame")]:
        line = next(x for x in given["log"].splitlines() if f"{sample_id}: subjects[0] 'cat' not found" in x)
        assert reason in line, line


def test_a_resumed_run_does_nothing_and_rewrites_no_file(given):
    out = given["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    log = run_tool("--manifest", given["manifest"], "--out", out, "--margin", "0.25", *SEGMENTS)
    assert "this rank: 0 to do" in log
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # a run killed after a sample's crops landed but before its result: that sample alone is done again, the same
    image = out / "images" / "two_0.png"
    pixels = image.read_bytes()
    (out / "results" / "two.json").unlink()
    (out / ".manifest.jsonl.tmp123").write_text("half")  # a killed run's temporary file: removed
    log = run_tool("--manifest", given["manifest"], "--out", out, "--margin", "0.25", *SEGMENTS)
    assert "this rank: 1 to do" in log and image.read_bytes() == pixels
    assert not (out / ".manifest.jsonl.tmp123").exists()
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert sorted(after) == sorted(before)
    changed = sorted(p.relative_to(out).as_posix() for p in after if after[p] != before[p])
    assert changed == ["images/two_0.png", "images/two_1.png", "results/two.json", "videos/two.mp4"]
    # other settings into the same folder: refused, naming what differs
    log = run_tool("--manifest", given["manifest"], "--out", out, "--margin", "0.3", *SEGMENTS, expect=2)
    assert "other settings (differ in: margin)" in log


def test_two_ranks_write_what_one_writes(given):
    out2 = given["root"] / "out2"
    run_tool("--manifest", given["manifest"], "--out", out2, "--margin", "0.25", *SEGMENTS, nproc=2)
    one = {p.relative_to(given["out"]): p.read_bytes() for p in given["out"].rglob("*") if p.is_file()}
    two = {p.relative_to(out2): p.read_bytes() for p in out2.rglob("*") if p.is_file()}
    report = Path("report.json")
    assert sorted(one) == sorted(two)
    assert {k: v for k, v in one.items() if k != report} == {k: v for k, v in two.items() if k != report}
    r1, r2 = (json.loads(d[report]) for d in (one, two))
    assert {**r1, "output_manifest": None} == {**r2, "output_manifest": None}


# ---------------------------------------------------------------- detector and segmenter paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from hcustom_mc.data.tiny_detectors import save_tiny_grounding_dino, save_tiny_owlv2, save_tiny_sam

    root = tmp_path_factory.mktemp("models")
    return {"owlv2": save_tiny_owlv2(root / "owlv2"), "grounding-dino": save_tiny_grounding_dino(root / "gdino"),
            "sam": save_tiny_sam(root / "sam")}


@pytest.fixture(scope="module")
def unboxed(tmp_path_factory):
    root = tmp_path_factory.mktemp("unboxed")
    (root / "videos").mkdir()
    write_coded_video(root / "videos" / "a.mp4", 40, [(20, 14, 44, 38), (58, 30, 86, 56)])
    lines = [{"id": "pair", "task": "multi_identity", "video": "videos/a.mp4", "caption": "A red square and a dog.",
              "subjects": [{"name": "red square"}, {"name": "dog"}]},
             {"id": "one", "task": "identity", "video": "videos/a.mp4", "caption": "The cat waits.",
              "subjects": [{"name": "cat"}]},
             {"id": "twins", "task": "multi_identity", "video": "videos/a.mp4", "caption": "A dog chases a Dog.",
              "subjects": [{"name": "dog"}, {"name": "Dog"}]}]
    return write_manifest(root / "raw.jsonl", lines)


def _extract(manifest, out, **kw):
    from hcustom_mc.data.subjects import ExtractionSettings, Segments, extract_subjects

    settings = ExtractionSettings(segments=Segments(0, 1, 1.5, 3.5), detect_frames=3, **kw)
    return extract_subjects(manifest, out, settings, progress=False)


@pytest.mark.parametrize("kind", ["owlv2", "grounding-dino"])
def test_detector_path_runs_and_reports_every_unfound_subject_by_name(kind, models, unboxed, tmp_path, caplog):
    twins = {("twins", "dog", "ambiguous_phrase"), ("twins", "Dog", "ambiguous_phrase")}
    report = _extract(unboxed, tmp_path / "high", detector=models[kind], box_threshold=1e9)
    assert not_found(report) == {("pair", "red square", "not_detected"), ("pair", "dog", "not_detected"),
                                 ("one", "cat", "not_detected"), *twins}
    assert report["written"] == 0 and sorted(report["left_out"]) == ["one", "pair", "twins"]
    assert all("not detected above the threshold 1e+09 in 3 frames" in r["reason"] for r in report["not_found"]
               if r["kind"] == "not_detected")
    assert "pair: subjects[0] 'red square' not found" in caplog.text
    assert (tmp_path / "high" / "manifest.jsonl").read_text() == ""

    from hcustom_mc.data.manifest import load_manifest
    from hcustom_mc.data.video import decode_frames

    report = _extract(unboxed, tmp_path / "all", detector=models[kind], box_threshold=-math.inf)
    assert not_found(report) == twins and report["written"] == 2
    video = unboxed.parent / "videos" / "a.mp4"
    for entry in load_manifest(tmp_path / "all" / "manifest.jsonl"):
        result = json.loads((tmp_path / "all" / "results" / f"{entry.id}.json").read_text())
        for subject, found in zip(entry.subjects, result["subjects"]):
            assert found["frame"] in DETECTED
            x0, y0, x1, y1 = expected_window(found["box"], 0.1)
            assert found["crop"] == [x0, y0, x1, y1]
            assert np.array_equal(read_png(subject.image), decode_frames(video, [found["frame"]])[0][y0:y1, x0:x1])


def test_owlv2_picks_the_box_the_library_scores_highest(models, unboxed, tmp_path):
    """One phrase: our per-phrase score is OWLv2's own post-processed score (max over queries of one query)."""
    import torch
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    from hcustom_mc.data.video import decode_frames

    report = _extract(unboxed, tmp_path / "o", detector=models["owlv2"], box_threshold=-math.inf)
    assert report["written"] == 2 and json.loads((tmp_path / "o" / "settings.json").read_text())["box_threshold"] == "-inf"
    found = json.loads((tmp_path / "o" / "results" / "one.json").read_text())["subjects"][0]
    model = Owlv2ForObjectDetection.from_pretrained(models["owlv2"]).eval()
    processor = Owlv2Processor.from_pretrained(models["owlv2"])
    frames = decode_frames(unboxed.parent / "videos" / "a.mp4", DETECTED)
    with torch.no_grad():
        outputs = model(**processor(text=[["cat"]] * 3, images=list(frames), return_tensors="pt"))
    results = processor.post_process_grounded_object_detection(outputs, threshold=-1.0, target_sizes=[(H, W)] * 3)
    scores = torch.stack([r["scores"] for r in results])
    boxes = torch.stack([r["boxes"] for r in results])
    boxes = torch.stack([boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H), boxes[..., 2].clamp(0, W),
                         boxes[..., 3].clamp(0, H)], dim=-1)  # in the frame; a box with nothing left there is skipped
    scores[(boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])] = -1
    f, b = divmod(int(scores.argmax()), scores.shape[1])
    box = boxes[f, b].tolist()
    assert found["frame"] == DETECTED[f]
    assert found["score"] == pytest.approx(float(scores.max()), rel=1e-5)
    assert found["box"] == pytest.approx(box, abs=1e-3)


def test_segmenter_whitens_the_background_with_sams_own_mask(models, given, tmp_path):
    import torch
    from transformers import SamModel, SamProcessor

    from hcustom_mc.data.manifest import load_manifest
    from hcustom_mc.data.video import decode_frames

    report = _extract(given["manifest"], tmp_path / "s", segmenter=models["sam"], margin=0.25)
    model, processor = SamModel.from_pretrained(models["sam"]).eval(), SamProcessor.from_pretrained(models["sam"])
    entry = next(e for e in load_manifest(tmp_path / "s" / "manifest.jsonl") if e.id == "two")
    frame = decode_frames(given["root"] / "videos" / "long.mp4", [MIDDLE])[0]
    box = given["cat"]
    with torch.no_grad():
        inputs = processor(images=frame, input_boxes=[[box]], return_tensors="pt")
        outputs = model(**inputs, multimask_output=True)
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    mask = masks[0][0, int(outputs.iou_scores[0, 0].argmax())].numpy()
    x0, y0, x1, y1 = expected_window(box, 0.25)
    mask = mask[y0:y1, x0:x1]
    assert mask.any() and not mask.all()  # this tiny SAM's mask splits the crop: both branches are checked
    expected = np.where(mask[..., None], frame[y0:y1, x0:x1], 255)
    assert np.array_equal(read_png(entry.subjects[0].image), expected)
    assert np.array_equal(read_png(entry.subjects[0].mask)[..., 0] > 0, mask)
    assert report["written"] == 2


def test_an_empty_mask_is_reported(models, given, tmp_path, monkeypatch):
    from hcustom_mc.data import subjects

    monkeypatch.setattr(subjects.Segmenter, "mask", lambda self, frame, box: np.zeros(frame.shape[:2], bool))
    report = _extract(given["manifest"], tmp_path / "e", segmenter=models["sam"])
    assert {("two", "cat", "empty_mask"), ("two", "dog", "empty_mask")} <= not_found(report)
    assert "two" in report["left_out"] and report["written"] == 1  # only the line kept as given


def test_bad_input_gives_one_message_listing_every_problem(tmp_path):
    lines = [
        {"id": "a", "task": "identity", "video": "v.mp4", "caption": "A cat.", "subjects": [{"name": "cat"}]},
        {"id": "a", "task": "identity", "video": "v.mp4", "caption": "A cat.",
         "subjects": [{"name": "cat", "box": [5, 5, 1, 1], "frame": -2, "colour": "red"}]},
        {"id": "c", "task": "multi_identity", "video": "v.mp4", "caption": "A cat.",
         "subjects": [{"name": "cat", "frame": 3}]},
    ]
    manifest = write_manifest(tmp_path / "raw.jsonl", lines)
    log = run_tool("--manifest", manifest, "--out", tmp_path / "out", "--train-end", "6", "--margin", "-1",
                   "--segmenter", tmp_path / "nowhere", "--detect-frames", "0", expect=2)
    for problem in ["raw.jsonl:2: field 'id': duplicate id 'a'", "subjects[0].box': must satisfy 0 <= x0 < x1",
                    "subjects[0].frame': must be a frame index", "subjects[0].colour': unknown key",
                    "raw.jsonl:3: field 'subjects[0].frame': names the frame of a `box`",
                    "raw.jsonl:3: field 'subjects': task 'multi_identity' needs at least 2 subjects",
                    "overlaps the training segment", "--margin must be", "--detect-frames must be >= 1",
                    "--segmenter", "no such folder",
                    "1 subject(s) have neither an image nor a box, so --detector (a local OWLv2 or Grounding DINO "
                    "folder) is needed to find them: a (cat)"]:
        assert problem in log, problem
    assert log.count("error:") == 1 and "Traceback" not in log
    assert not (tmp_path / "out").exists()  # refused before anything was written

    from hcustom_mc.data.subjects import ExtractionSettings, check_inputs
    from hcustom_mc.model.config import ConfigError

    (tmp_path / "manifest.jsonl").write_text(manifest.read_text())
    with pytest.raises(ConfigError, match="would overwrite the input manifest"):
        check_inputs(tmp_path / "manifest.jsonl", ExtractionSettings(), out=tmp_path)


def test_replace_images_extracts_given_subjects_without_their_image_boxes(tmp_path):
    from hcustom_mc.data.subjects import load_extraction_manifest

    lines = [{"id": "a", "task": "identity", "video": "v.mp4", "caption": "A cat.",
              "subjects": [{"name": "cat", "image": "cat.png", "box": [1, 2, 3, 4]}]},
             {"id": "b", "task": "identity", "video": "v.mp4", "caption": "A cat.",
              "subjects": [{"name": "cat", "box": [1, 2, 3, 4], "frame": 7}]}]
    manifest = write_manifest(tmp_path / "raw.jsonl", lines)
    kept, problems = load_extraction_manifest(manifest)
    assert problems == [] and [s.requests[0].extract for s in kept] == [False, True]
    assert (kept[1].requests[0].box, kept[1].requests[0].frame) == ((1, 2, 3, 4), 7)
    replaced, problems = load_extraction_manifest(manifest, replace_images=True)
    assert problems == [] and [s.requests[0].extract for s in replaced] == [True, True]
    assert replaced[0].requests[0].box is None  # the image's box is not a box in the video
    assert replaced[1].requests[0].box == (1, 2, 3, 4)


def test_the_tiny_datasets_boxes_cut_each_named_shape(tmp_path):
    """examples/multi_subject_tiny.sh's input: make_tiny_dataset(boxes_from_frame=9) names each shape by colour and
    gives its box in a frame of the crop segment (frames 9..16 of 17 at 25 fps); extracted, each crop is mostly its
    own subject's colour and the training video is the clip's first 9 frames."""
    from hcustom_mc.data.subjects import ExtractionSettings, Segments, extract_subjects
    from hcustom_mc.data.tiny_dataset import COLORS, make_tiny_dataset

    make_tiny_dataset(tmp_path / "raw", num_samples=6, frames=17, tasks=("multi_identity",), multi_subjects=(2, 3),
                      boxes_from_frame=9)
    raw = [json.loads(line) for line in (tmp_path / "raw" / "manifest.jsonl").read_text().splitlines()]
    assert all("image" not in s and 9 <= s["frame"] <= 16 and s["name"] in r["caption"]
               for r in raw for s in r["subjects"])
    extract_subjects(tmp_path / "raw" / "manifest.jsonl", tmp_path / "out",
                     ExtractionSettings(segments=Segments(0, 0.36, 0.36, 0.68)), progress=False)
    out = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [len(r["subjects"]) for r in out] == [2, 3] * 3 and {r["num_frames"] for r in out} == {9}
    for record in out:
        for subject in record["subjects"]:
            crop = read_png(tmp_path / "out" / subject["image"]).astype(int)
            own = np.abs(crop - COLORS[subject["name"].split()[0]]).max(-1) < 30
            # a 16-pixel shape in its 20-pixel crop: square 64 %, circle 50 %, triangle 32 % (less its h264-blurred
            # edges and what covers it); a shape behind another all clip long would give ~0
            least = 0.15 if subject["name"].endswith("triangle") else 0.3
            assert own.mean() > least, (record["id"], subject, own.mean())
