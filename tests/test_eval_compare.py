"""Reference comparison: per-frame PSNR/SSIM against torchmetrics called frame by frame, SSIM against
scikit-image's Gaussian SSIM, PSNR against its closed form; the pairing of two folders' rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hcustom_mc.eval.metrics import compare
from hcustom_mc.eval.common import json_safe
from hcustom_mc.eval.metrics.compare import compare_tables, frame_psnr_ssim

pytest.importorskip("torchmetrics")


def video(count: int, seed: int, height: int = 40, width: int = 52) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_per_frame_equals_torchmetrics_frame_by_frame(monkeypatch):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    monkeypatch.setattr(compare, "CHUNK", 3)  # several chunks, one of them short
    a = video(7, seed=0)
    b = np.clip(a.astype(int) + np.random.default_rng(1).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    out = frame_psnr_ssim(a, b)
    assert out["frames"] == 7 and out["psnr_identical_frames"] == 0
    for i in range(7):
        fa = torch.from_numpy(a[i]).permute(2, 0, 1)[None].float()
        fb = torch.from_numpy(b[i]).permute(2, 0, 1)[None].float()
        assert out["psnr_frames"][i] == pytest.approx(float(peak_signal_noise_ratio(fb, fa, data_range=255.0)),
                                                      rel=1e-6)
        assert out["ssim_frames"][i] == pytest.approx(
            float(structural_similarity_index_measure(fb, fa, data_range=255.0, gaussian_kernel=True, sigma=1.5,
                                                      kernel_size=11)), abs=1e-6)
    assert out["psnr"] == pytest.approx(np.mean(out["psnr_frames"]))
    assert out["ssim"] == pytest.approx(np.mean(out["ssim_frames"]))


def test_ssim_is_the_gaussian_ssim_of_scikit_image():
    # A second implementation we did not write: scikit-image's SSIM with Wang et al.'s Gaussian window (sigma
    # 1.5, 11 taps, population statistics). The per-pixel SSIM maps agree wherever the window lies inside the
    # frame; the means differ only in the 5-pixel border: torchmetrics averages it too (reflect-padded),
    # scikit-image crops it away.
    metrics = pytest.importorskip("skimage.metrics")
    from torchmetrics.functional.image import structural_similarity_index_measure

    a = video(2, seed=2, height=64, width=72)
    smooth = np.cumsum(np.cumsum(a.astype(float), axis=1), axis=2)
    a = (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)  # structure, not noise
    b = np.clip(a.astype(int) + np.random.default_rng(3).integers(-25, 26, a.shape), 0, 255).astype(np.uint8)
    out = frame_psnr_ssim(a, b)
    for i in range(2):
        as_batch = [torch.from_numpy(x[i]).permute(2, 0, 1)[None].double() for x in (b, a)]
        _, full = structural_similarity_index_measure(*as_batch, data_range=255.0, return_full_image=True)
        full = full[0].permute(1, 2, 0).numpy()
        _, reference = metrics.structural_similarity(a[i], b[i], data_range=255, channel_axis=-1, full=True,
                                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert np.abs(full[5:-5, 5:-5] - reference[5:-5, 5:-5]).max() < 1e-9
        assert out["ssim_frames"][i] == pytest.approx(full.mean(), abs=1e-5)
        assert out["psnr_frames"][i] == pytest.approx(metrics.peak_signal_noise_ratio(a[i], b[i], data_range=255),
                                                      rel=1e-6)


@pytest.mark.parametrize("offset", [1, 5, 17])
def test_uniform_offset_gives_the_analytic_psnr(offset):
    a = video(3, seed=4).clip(0, 255 - offset)
    out = frame_psnr_ssim(a, a + np.uint8(offset))
    expected = 20 * math.log10(255 / offset)  # MSE = offset^2 on every pixel
    assert out["psnr_frames"] == pytest.approx([expected] * 3, rel=1e-6)  # torchmetrics takes the log of data_range in float32
    assert out["psnr"] == pytest.approx(expected, rel=1e-6)  # torchmetrics takes the log of data_range in float32


def test_identical_videos():
    a = video(4, seed=5)
    out = frame_psnr_ssim(a, a.copy())
    assert out["psnr_frames"] == [math.inf] * 4 and out["psnr"] == math.inf
    assert out["psnr_identical_frames"] == 4
    assert out["ssim_frames"] == pytest.approx([1.0] * 4, abs=1e-6) and out["ssim"] == pytest.approx(1.0, abs=1e-6)
    text = json.dumps(json_safe(out), allow_nan=False)  # standard JSON: no Infinity
    back = json.loads(text)
    assert back["psnr"] == "inf" and float(back["psnr"]) == math.inf


def test_one_identical_frame_is_counted_not_averaged():
    a = video(3, seed=6)
    b = a.copy()
    b[1:] = np.clip(b[1:].astype(int) + 3, 0, 255).astype(np.uint8)
    out = frame_psnr_ssim(a, b)
    assert out["psnr_frames"][0] == math.inf and out["psnr_identical_frames"] == 1
    assert out["psnr"] == pytest.approx(np.mean(out["psnr_frames"][1:]))


def test_mismatched_videos_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        frame_psnr_ssim(video(3, seed=7), video(4, seed=7))
    with pytest.raises(ValueError, match="uint8"):
        frame_psnr_ssim(video(2, seed=7).astype(np.float32), video(2, seed=7).astype(np.float32))


def test_compare_tables_pairs_by_name_and_names_the_unpaired():
    rows_a = [{"name": "j1", "clip_score": 30.0, "dino_sim": 0.5, "face_sim_backend": "dlib", "psnr": math.inf},
              {"name": "j2", "clip_score": 28.0, "dino_sim": None},
              {"name": "only_a", "clip_score": 10.0}]
    rows_b = [{"name": "j2", "clip_score": 27.5, "dino_sim": 0.4, "dino_sim_frames": 32},
              {"name": "j1", "clip_score": 31.5, "dino_sim": 0.25, "face_sim_backend": "dlib", "psnr": math.inf},
              {"name": "only_b", "clip_score": 12.0}]
    rows = {row["name"]: row for row in compare_tables(rows_a, rows_b)}
    assert list(rows) == ["j1", "j2", "only_a", "only_b"]
    assert rows["j1"]["in"] == "both"
    assert rows["j1"]["clip_score_delta"] == pytest.approx(1.5) and rows["j1"]["dino_sim_delta"] == -0.25
    assert rows["j1"]["psnr_delta"] == 0.0  # inf on both sides: unchanged, not nan
    assert "face_sim_backend_delta" not in rows["j1"]  # text is not a metric value
    assert rows["j2"]["clip_score_delta"] == pytest.approx(-0.5)
    assert rows["j2"]["dino_sim_a"] is None and rows["j2"]["dino_sim_delta"] is None
    assert rows["j2"]["dino_sim_frames_b"] == 32 and rows["j2"]["dino_sim_frames_delta"] is None
    assert rows["only_a"]["in"] == "a only" and rows["only_a"]["clip_score_a"] == 10.0
    assert rows["only_a"]["clip_score_b"] is None and rows["only_a"]["clip_score_delta"] is None
    assert rows["only_b"]["in"] == "b only" and rows["only_b"]["clip_score_b"] == 12.0
    with pytest.raises(ValueError, match="twice"):
        compare_tables(rows_a + rows_a[:1], rows_b)
