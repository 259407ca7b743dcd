"""CLIP-B (ClipScore), DINO-Sim and temporal consistency on tiny random models of the real architectures, saved
to tmp_path and loaded through the metrics' own loading code. CLIP-B is checked against torchmetrics' CLIPScore
loading the same folder; DINO-Sim against the transformers model called by hand."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hcustom_mc.eval.common import MissingModelError, VideoSample, uniform_frame_indices
from hcustom_mc.eval.metrics.clip_score import CLIP_DIR, ClipScore, clip_image_features, load_clip
from hcustom_mc.eval.metrics.dino import DINO_DIR, DinoSim, TemporalConsistency, box_pixels
from hcustom_mc.eval.tiny import save_tiny_clip_model, save_tiny_dinov2

pytest.importorskip("torchmetrics")
transformers = pytest.importorskip("transformers")

CLAMP_CASES = ("a dog runs", "x")  # a positive mean, a negative one (clamped to 0)
WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    # torchmetrics loads a string path only when it contains "openai" (_get_clip_model_and_processor)
    root = tmp_path_factory.mktemp("models") / "openai-style-models"
    save_tiny_clip_model(root / CLIP_DIR, seed=1)  # seed 1: the prompts below fall on both sides of 0
    save_tiny_dinov2(root / DINO_DIR)
    return root


def random_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def sample(frames: np.ndarray, prompt: str = "a man", subjects=(), box=None) -> VideoSample:
    return VideoSample(name="job", task="identity" if subjects else "t2v", prompt=prompt, frames=frames, fps=25.0,
                       subjects=list(subjects), subject_box=box)


def torchmetrics_clip_score(folder: Path, frames: np.ndarray, prompt: str, monkeypatch) -> float:
    """torchmetrics' CLIPScore loading `folder` itself, with every network connection refused."""
    from torchmetrics.multimodal import CLIPScore

    def refuse(*args, **kwargs):
        raise AssertionError("torchmetrics tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    metric = CLIPScore(model_name_or_path=str(folder))
    for method in ("get_image_features", "get_text_features"):
        # torchmetrics 1.9 reads get_*_features as tensors; transformers 5 returns BaseModelOutputWithPooling.
        # Unwrapped to its pooler_output, as the upstream fix does (Lightning-AI/torchmetrics#3407, PR #3408).
        original = getattr(metric.model, method)

        def unwrapped(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        setattr(metric.model, method, unwrapped)
    images = list(torch.from_numpy(frames).permute(0, 3, 1, 2))
    metric.update(images, [prompt] * len(images))
    monkeypatch.undo()
    return float(metric.compute())


def ours_unclamped(models_dir: Path, frames: np.ndarray, prompt: str) -> float:
    """The mean per-frame 100 * cos before the clamp, to know which side of 0 a case is on."""
    model, processor = load_clip(models_dir, "test")
    images = clip_image_features(model, processor, frames)
    with torch.no_grad():
        text = model.get_text_features(**processor.tokenizer([prompt], return_tensors="pt")).pooler_output
    return float(100 * torch.nn.functional.cosine_similarity(images, text, dim=-1).mean())


@pytest.mark.parametrize("prompt", CLAMP_CASES)
def test_clip_score_equals_torchmetrics(models_dir, monkeypatch, prompt):
    frames = random_frames(7, 40, 56, seed=1)
    metric = ClipScore(models_dir, frames=3)
    ours = metric.score(sample(frames, prompt))
    picked = frames[uniform_frame_indices(7, 3)]
    reference = torchmetrics_clip_score(models_dir / CLIP_DIR, picked, prompt, monkeypatch)
    assert ours["clip_score"] == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert ours["clip_score_frames"] == 3 and ours["clip_score_prompt_truncated"] == 0
    assert ours["clip_score_prompt_tokens"] == len(prompt.replace(" ", "")) + 2


def test_clip_score_cases_cover_both_sides_of_the_clamp(models_dir):
    # the two prompts above: one positive mean, one clamped at 0 (torchmetrics clamps the mean, not each frame)
    picked = random_frames(7, 40, 56, seed=1)[uniform_frame_indices(7, 3)]
    means = [ours_unclamped(models_dir, picked, prompt) for prompt in CLAMP_CASES]
    assert means[0] > 0 > means[1]
    assert ClipScore(models_dir, frames=3).score(sample(random_frames(7, 40, 56, seed=1), CLAMP_CASES[1]))[
        "clip_score"] == 0.0


def test_clip_score_long_prompt(models_dir, monkeypatch):
    long_prompt = " ".join(WORDS * 4)  # 104 one-character words: 106 tokens with start and end
    frames = random_frames(4, 32, 32, seed=2)
    ours = ClipScore(models_dir).score(sample(frames, long_prompt))
    with pytest.warns(UserWarning, match="longer than"):
        reference = torchmetrics_clip_score(models_dir / CLIP_DIR, frames, long_prompt, monkeypatch)
    assert ours["clip_score"] == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert ours["clip_score_prompt_tokens"] == 106 and ours["clip_score_prompt_truncated"] == 1
    # keep_end: the tokenizer's truncation keeps 75 words and the end-of-text token, which is the score of
    # the prompt cut to 75 words; torchmetrics' cut (no end-of-text token) pools elsewhere and differs
    kept = ClipScore(models_dir, long_prompt="keep_end").score(sample(frames, long_prompt))
    short = ClipScore(models_dir).score(sample(frames, " ".join((WORDS * 4)[:75])))
    assert short["clip_score_prompt_truncated"] == 0
    assert kept["clip_score"] == pytest.approx(short["clip_score"], rel=1e-5, abs=1e-5)
    assert kept["clip_score"] > 0 and abs(kept["clip_score"] - ours["clip_score"]) > 1e-3


def test_missing_models_name_metric_path_and_download(tmp_path):
    for metric_class, folder in ((ClipScore, CLIP_DIR), (DinoSim, DINO_DIR), (TemporalConsistency, CLIP_DIR)):
        with pytest.raises(MissingModelError) as error:
            metric_class(tmp_path)
        message = str(error.value)
        assert "\n" not in message and metric_class.name in message
        assert str(tmp_path / folder) in message and "hf download" in message
        assert metric_class.expected_path(tmp_path) == tmp_path / folder


def write_png(path: Path, image: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)


def hand_dino(models_dir: Path, images: list[np.ndarray]) -> torch.Tensor:
    """pooler_output (CLS after the final layernorm) of the transformers model, PIL images into its processor."""
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(models_dir / DINO_DIR).eval()
    processor = AutoImageProcessor.from_pretrained(models_dir / DINO_DIR)
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels).last_hidden_state[:, 0]


def test_dino_sim_equals_hand_computation(models_dir, tmp_path):
    frames = random_frames(5, 48, 64, seed=3)
    subjects = [("man", write_png(tmp_path / "man.png", random_frames(1, 50, 30, seed=4)[0])),
                ("dog", write_png(tmp_path / "dog.png", random_frames(1, 20, 40, seed=5)[0]))]
    box = (0.25, 0.125, 0.75, 0.875)  # x 16:48, y 6:42 on 64 x 48
    ours = DinoSim(models_dir, frames=None).score(sample(frames, subjects=subjects, box=box))
    regions = [frame[6:42, 16:48] for frame in frames]
    identity = hand_dino(models_dir, [random_frames(1, 50, 30, seed=4)[0], random_frames(1, 20, 40, seed=5)[0]])
    features = hand_dino(models_dir, regions)
    expected = np.mean([[float(torch.nn.functional.cosine_similarity(s, f, dim=0)) for f in features]
                        for s in identity])
    assert ours["dino_sim"] == pytest.approx(expected, abs=1e-5)
    assert ours["dino_sim_region"] == "box" and ours["dino_sim_frames"] == 5 and ours["dino_sim_subjects"] == 2


def test_dino_sim_box_takes_the_right_pixels(models_dir, tmp_path):
    identity = random_frames(1, 24, 32, seed=6)[0]
    frames = random_frames(3, 64, 96, seed=7)
    frames[:, 12:36, 40:72] = identity
    subjects = [("man", write_png(tmp_path / "id.png", identity))]
    metric = DinoSim(models_dir)
    boxed = metric.score(sample(frames, subjects=subjects, box=(40 / 96, 12 / 64, 72 / 96, 36 / 64)))
    whole = metric.score(sample(frames, subjects=subjects))
    shifted = metric.score(sample(frames, subjects=subjects, box=(44 / 96, 12 / 64, 76 / 96, 36 / 64)))
    assert boxed["dino_sim"] == pytest.approx(1.0, abs=1e-5) and boxed["dino_sim_region"] == "box"
    assert whole["dino_sim"] < 1 - 1e-3 and whole["dino_sim_region"] == "frame"
    assert shifted["dino_sim"] < 1 - 1e-3
    assert box_pixels((1 / 3, 0.0, 2 / 3, 1.0), 96, 64) == (32, 0, 64, 64)
    assert box_pixels((0.5, 0.5, 0.5001, 0.5001), 10, 10) == (5, 5, 6, 6)  # at least one pixel
    with pytest.raises(ValueError):
        box_pixels((0.6, 0.0, 0.4, 1.0), 10, 10)


def test_dino_sim_per_subject_finds_each_subject_and_reports_the_lost_one(models_dir, tmp_path):
    """Two subjects, no box: each is compared with its best window of each frame. The man fills the top-left
    quarter window exactly, the dog the bottom-right one: both score 1. When the dog is gone from the frames,
    dino_sim_min is the dog's (lower) value and dino_sim the mean of the two."""
    man, dog = random_frames(1, 24, 32, seed=11)[0], random_frames(1, 24, 32, seed=12)[0]
    subjects = [("man", write_png(tmp_path / "man.png", man)), ("dog", write_png(tmp_path / "dog.png", dog))]
    frames = np.full((3, 48, 64, 3), 128, dtype=np.uint8)  # grey: nothing like either subject
    frames[:, :24, :32] = man  # the window (0, 0, 1/2, 1/2)
    frames[:, 24:, 32:] = dog  # the window (1/2, 1/2, 1, 1)
    metric = DinoSim(models_dir, frames=None)
    both = metric.score(sample(frames, subjects=subjects))
    assert both["dino_sim_region"] == "best window"
    assert both["dino_sim/man"] == pytest.approx(1.0, abs=1e-5) and both["dino_sim/dog"] == pytest.approx(1.0, abs=1e-5)
    lost = frames.copy()
    lost[:, 24:, 32:] = 128  # grey where the dog was
    one = metric.score(sample(lost, subjects=subjects))
    assert one["dino_sim/man"] == pytest.approx(1.0, abs=1e-5) and one["dino_sim/dog"] < 1 - 1e-3
    assert one["dino_sim_min"] == one["dino_sim/dog"]
    assert one["dino_sim"] == pytest.approx((one["dino_sim/man"] + one["dino_sim/dog"]) / 2)
    # the dog's value is its best window per frame, computed by hand over every candidate window
    from hcustom_mc.eval.metrics.dino import CANDIDATE_WINDOWS

    best = []
    for frame in lost:
        crops = [frame[y0:y1, x0:x1] for x0, y0, x1, y1 in (box_pixels(b, 64, 48) for b in CANDIDATE_WINDOWS)]
        feats = hand_dino(models_dir, crops)
        ref = hand_dino(models_dir, [dog])[0]
        best.append(max(float(torch.nn.functional.cosine_similarity(ref, f, dim=0)) for f in feats))
    assert one["dino_sim/dog"] == pytest.approx(float(np.mean(best)), abs=1e-5)


def test_dino_sim_without_identity_is_none(models_dir):
    out = DinoSim(models_dir).score(sample(random_frames(2, 32, 32, seed=8)))
    assert out["dino_sim"] is None and out["dino_sim_frames"] == 0


def vbench_loop(features: torch.Tensor) -> float:
    """VBench's background_consistency loop as written there (per frame, clamped previous and first)."""
    features = torch.nn.functional.normalize(features, dim=-1, p=2)
    total = 0.0
    for i in range(1, len(features)):
        previous = max(0.0, torch.nn.functional.cosine_similarity(features[i - 1:i], features[i:i + 1]).item())
        first = max(0.0, torch.nn.functional.cosine_similarity(features[:1], features[i:i + 1]).item())
        total += (previous + first) / 2
    return total / (len(features) - 1)


@pytest.mark.parametrize("features", ["clip", "dino"])
def test_temporal_consistency(models_dir, features):
    metric = TemporalConsistency(models_dir, features=features)
    still = np.repeat(random_frames(1, 40, 48, seed=9), 6, axis=0)
    same = metric.score(sample(still))
    assert same["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert same["temporal_consistency_vbench"] == pytest.approx(1.0, abs=1e-5)
    assert same["temporal_consistency_frames"] == 6
    unrelated = random_frames(6, 40, 48, seed=10)
    unrelated[::2] //= 4  # dark and bright frames alternate: unrelated neighbours
    out = metric.score(sample(unrelated))
    assert out["temporal_consistency"] < 1 - 1e-3
    if features == "clip":
        model, processor = load_clip(models_dir, "test")
        reference = clip_image_features(model, processor, unrelated)
    else:
        reference = hand_dino(models_dir, list(unrelated))
    unit = torch.nn.functional.normalize(reference, dim=-1)
    consecutive = float(torch.mean(torch.stack([unit[i] @ unit[i + 1] for i in range(5)])))
    assert out["temporal_consistency"] == pytest.approx(consecutive, abs=1e-5)
    assert out["temporal_consistency_vbench"] == pytest.approx(vbench_loop(reference), abs=1e-5)
    single = metric.score(sample(unrelated[:1]))
    assert single["temporal_consistency"] is None and single["temporal_consistency_vbench"] is None


def test_metric_modules_import_without_their_packages():
    # transformers and torchmetrics load inside the metrics, so importing the modules stays cheap
    code = ("import sys, hcustom_mc.eval.metrics.clip_score, hcustom_mc.eval.metrics.dino, "
            "hcustom_mc.eval.metrics.compare; "
            "print(sorted(m for m in ('transformers', 'torchmetrics', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"
