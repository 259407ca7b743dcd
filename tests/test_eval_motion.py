"""Dynamic degree (hcustom_mc/eval/metrics/motion.py) against VBench's definition (vbench/dynamic_degree.py):
the decision on flows whose answer is worked out by hand, Farneback on videos with known motion, and the RAFT
path equal to torchvision's RAFT called directly with VBench's pre-processing."""

import logging

import numpy as np
import pytest
import torch

from hcustom_mc.errors import ConfigError
from hcustom_mc.eval.common import MissingModelError, VideoSample
from hcustom_mc.eval.metrics import motion
from hcustom_mc.eval.metrics.motion import DynamicDegree, decide_dynamic, pair_magnitude, vbench_frame_indices


def uniform_flow(u: float, v: float, height: int = 64, width: int = 64) -> np.ndarray:
    flow = np.empty((2, height, width), dtype=np.float32)
    flow[0], flow[1] = u, v
    return flow


def sample(frames: np.ndarray, fps: float) -> VideoSample:
    return VideoSample(name="clip", task="t2v", prompt="", frames=frames, fps=fps)


def textured_pan(size: int, shift: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture seen through a size x size window that moves `shift` px right per frame: the
    content moves left by `shift` px, and the new content enters at the right edge (no wrap-around)."""
    import cv2

    margin = 4
    rng = np.random.default_rng(seed)
    noise = rng.random((size + 2 * margin, size + shift * num_frames + 2 * margin)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 2.0)  # features a few px wide, which flow methods lock onto
    texture = ((texture - texture.min()) / (texture.max() - texture.min()) * 255).astype(np.uint8)
    windows = [texture[margin:margin + size, margin + shift * i:margin + shift * i + size] for i in range(num_frames)]
    return np.repeat(np.stack(windows)[..., None], 3, axis=-1)


# --- a. the decision on exact flows --------------------------------------------------------------------------


def test_still_flows_are_static():
    decision = decide_dynamic([uniform_flow(0, 0)] * 8, (64, 64))
    assert decision.pair_magnitudes == [0.0] * 8
    assert decision.magnitude == 0.0
    assert not decision.dynamic


def test_uniform_shift_magnitude_is_the_shift():
    # a (3, 4) px shift everywhere: every norm is 5, so is the top-5% mean
    decision = decide_dynamic([uniform_flow(3, 4)] * 8, (64, 64))
    assert decision.pair_magnitudes == [5.0] * 8
    assert decision.magnitude == 5.0
    assert decision.dynamic  # 8 pairs above 6 * 64 / 256 = 1.5 px, 2 needed


def test_top_five_percent_mean():
    # 64 x 64 = 4096 px: the top 5% is int(4096 * 0.05) = int(204.8) = 204 px
    flow = uniform_flow(0, 0)
    flat_v = flow[1].reshape(-1)
    flat_v[:204] = 10.0
    assert pair_magnitude(flow) == 10.0  # exactly the moving 5%
    flat_v[:] = 0.0
    flat_v[:102] = 10.0
    assert pair_magnitude(flow) == pytest.approx(10.0 * 102 / 204)  # half the top 5% moves
    flat_v[:] = 0.0
    flat_v[:1000] = 10.0
    assert pair_magnitude(flow) == 10.0  # more than 5% moving: still the mean of the top 204
    # norms 1..4096 in a shuffled order: the top 204 are 3893..4096, mean (3893 + 4096) / 2
    flow = uniform_flow(0, 0)
    flow[0] = np.random.default_rng(0).permutation(np.arange(1, 4097, dtype=np.float32)).reshape(64, 64)
    assert pair_magnitude(flow) == (3893 + 4096) / 2
    # u and v both count: the norm is sqrt(u^2 + v^2), sign-free
    assert pair_magnitude(uniform_flow(-6, 8)) == 10.0
    with pytest.raises(ValueError, match="top 5%"):
        pair_magnitude(uniform_flow(1, 1, 4, 4))  # int(16 * 0.05) = 0 pixels


def test_threshold_follows_the_short_side():
    assert decide_dynamic([], (64, 64)).threshold == 1.5
    assert decide_dynamic([], (64, 128)).threshold == 1.5
    assert decide_dynamic([], (720, 1280)).threshold == 6.0 * 720 / 256
    assert decide_dynamic([], (512, 256)).threshold == 6.0
    # strictly above: a pair at exactly the threshold does not move, one a little above does
    at = decide_dynamic([uniform_flow(1.5, 0)] * 8, (64, 64))
    assert at.pairs_above == 0 and not at.dynamic
    above = decide_dynamic([uniform_flow(1.51, 0)] * 8, (64, 64))
    assert above.pairs_above == 8 and above.dynamic


@pytest.mark.parametrize(("num_frames", "count_needed"), [
    (16, 4),  # round(4 * 16 / 16)
    (10, 2),  # round(2.5) = 2: Python rounds half to even
    (11, 3),  # round(2.75)
    (14, 4),  # round(3.5) = 4
    (43, 11),  # 129 frames at 25 fps keep every 3rd: 43 frames, round(10.75)
])
def test_count_rule(num_frames: int, count_needed: int):
    moving, still = uniform_flow(2, 0), uniform_flow(0, 0)
    pairs = num_frames - 1
    short = decide_dynamic([moving] * (count_needed - 1) + [still] * (pairs - count_needed + 1), (64, 64))
    assert short.count_needed == count_needed and short.pairs_above == count_needed - 1 and not short.dynamic
    # where the moving pairs are does not matter, only how many
    enough = decide_dynamic([still] * (pairs - count_needed) + [moving] * count_needed, (64, 64))
    assert enough.pairs_above == count_needed and enough.dynamic


def test_vbench_edge_cases():
    # two kept frames: count_num = round(0.5) = 0, and VBench's check runs after the first pair: dynamic whatever
    # the flow
    assert decide_dynamic([uniform_flow(0, 0)], (64, 64)).dynamic
    # one kept frame: no pair, the loop never runs: static, with no magnitude
    no_pair = decide_dynamic([], (64, 64))
    assert not no_pair.dynamic and no_pair.magnitude is None and no_pair.count_needed == 0


@pytest.mark.parametrize(("fps", "step"), [(25, 3), (24, 3), (16, 2), (20, 2), (12, 2), (8, 1), (4, 1), (30, 4)])
def test_frame_interval_from_fps(fps: float, step: int):
    # interval = max(1, round(fps / 8)): 20 fps is round(2.5) = 2, 12 fps round(1.5) = 2
    assert vbench_frame_indices(129, fps) == list(range(0, 129, step))


# --- b. Farneback on videos with known motion ----------------------------------------------------------------


def farneback_metric(tmp_path) -> DynamicDegree:
    return DynamicDegree(tmp_path, backend="farneback")


def test_farneback_still_video(tmp_path):
    out = farneback_metric(tmp_path).score(sample(textured_pan(128, 0, 9), fps=8))
    assert out["motion_magnitude"] < 0.1  # Farneback leaves a few hundredths of a px on identical frames
    assert out["dynamic_degree"] == 0
    assert out["motion_pairs"] == 8 and out["motion_flow_backend"] == "farneback"
    assert out["motion_flow_size"] == "128x128"


@pytest.mark.parametrize(("shift", "dynamic"), [(2, 0), (5, 1)])
def test_farneback_translation(tmp_path, shift: int, dynamic: int):
    # 128 px: threshold 3 px. The top-5% mean picks the largest flow errors too, so it sits a little above the
    # shift: within 10% + 0.1 px
    out = farneback_metric(tmp_path).score(sample(textured_pan(128, shift, 9), fps=8))
    assert out["motion_magnitude"] == pytest.approx(shift, rel=0.1, abs=0.1)
    assert out["dynamic_degree"] == dynamic


def test_farneback_pairs_follow_fps(tmp_path):
    # 1 px a frame at 24 fps: VBench keeps every 3rd frame, so each pair moves 3 px, above 64 px's 1.5 px
    out = farneback_metric(tmp_path).score(sample(textured_pan(64, 1, 13), fps=24))
    assert out["motion_pairs"] == 4  # frames 0, 3, 6, 9, 12
    assert out["motion_magnitude"] == pytest.approx(3, rel=0.1, abs=0.1)
    assert out["dynamic_degree"] == 1


def test_single_frame_video(tmp_path):
    out = farneback_metric(tmp_path).score(sample(textured_pan(64, 0, 1), fps=25))
    assert out == {"dynamic_degree": 0, "motion_magnitude": None, "motion_pairs": 0, "motion_flow_size": "64x64",
                   "motion_flow_backend": "farneback"}


# --- c. RAFT through the real loading code -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_raft(tmp_path_factory):
    """A random torchvision RAFT-large (the real file's architecture) saved where the real weights go."""
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    model = raft_large(weights=None, progress=False).eval()
    models_dir = tmp_path_factory.mktemp("models")
    path = DynamicDegree.expected_path(models_dir)
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return model, models_dir


def test_raft_equals_torchvision_with_vbench_preprocessing(tiny_raft):
    model, models_dir = tiny_raft
    iters = 3
    metric = DynamicDegree(models_dir, backend="raft", raft_iters=iters, pair_batch=2)
    # 123 x 130 (torchvision's RAFT needs 128 px after padding): VBench pads 5 rows (2 top, 3 bottom) and 6 columns
    # (3 each side); 7 frames at 16 fps: VBench keeps 0, 2, 4, 6
    frames = np.random.default_rng(1).integers(0, 256, (7, 123, 130, 3), dtype=np.uint8)
    out = metric.score(sample(frames, fps=16))

    kept = torch.from_numpy(frames[[0, 2, 4, 6]]).permute(0, 3, 1, 2).float()
    padded = torch.nn.functional.pad(kept, (3, 3, 2, 3), mode="replicate")
    scaled = 2 * (padded / 255.0) - 1.0
    with torch.no_grad():
        reference_flows = [model(scaled[i:i + 1], scaled[i + 1:i + 2], num_flow_updates=iters)[-1][0]
                           for i in range(3)]
    top = int(128 * 136 * 0.05)  # over the padded flow, as VBench's get_score
    reference = [flow.norm(dim=0).flatten().sort(descending=True).values[:top].mean().item()
                 for flow in reference_flows]

    flows = metric.flow(frames[[0, 2, 4, 6]])
    for flow, reference_flow in zip(flows, reference_flows):
        torch.testing.assert_close(flow, reference_flow, rtol=1e-4, atol=1e-4)
    assert out["motion_pairs"] == 3
    assert out["motion_magnitude"] == pytest.approx(float(np.mean(reference)), rel=1e-4)
    threshold, count_needed = 6.0 * 123 / 256, round(4 * 4 / 16)
    assert out["dynamic_degree"] == int(sum(m > threshold for m in reference) >= count_needed)
    assert out["motion_flow_backend"] == f"raft:{motion.RAFT_WEIGHTS_FILE}"
    assert out["motion_flow_size"] == "123x130"


def test_auto_picks_raft_when_present(tiny_raft):
    _, models_dir = tiny_raft
    assert isinstance(DynamicDegree(models_dir).flow, motion.RaftFlow)


def test_auto_falls_back_to_farneback_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(motion, "_logged_once", set())
    with caplog.at_level(logging.WARNING, logger=motion.__name__):
        first = DynamicDegree(tmp_path)
        DynamicDegree(tmp_path)
    assert isinstance(first.flow, motion.FarnebackFlow)
    notes = [record for record in caplog.records if "Farneback" in record.getMessage()]
    assert len(notes) == 1 and str(DynamicDegree.expected_path(tmp_path)) in notes[0].getMessage()


def test_missing_raft_weights(tmp_path):
    with pytest.raises(MissingModelError) as error:
        DynamicDegree(tmp_path, backend="raft")
    expected = DynamicDegree.expected_path(tmp_path)
    assert error.value.path == str(expected) and str(expected) in str(error.value)
    assert motion.RAFT_WEIGHTS_URL in str(error.value)


def test_original_raft_checkpoint_is_refused(tmp_path):
    # VBench's raft-things.pth is saved from nn.DataParallel with the original module names
    path = DynamicDegree.expected_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"module.fnet.conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ConfigError, match="raft_large_C_T_V1"):
        DynamicDegree(tmp_path, backend="raft")


def test_unknown_backend(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        DynamicDegree(tmp_path, backend="flownet")
