"""Dynamic degree: whether a video moves, by optical flow, as VBench decides it, plus the raw flow magnitude.

VBench's code path (github.com/Vchitect/VBench, vbench/dynamic_degree.py, class DynamicDegree, with the RAFT of
vbench/third_party/RAFT/core/raft.py and InputPadder of .../core/utils_core/utils.py), which this module follows:

1. Frames (`get_frames`): every decoded frame of the mp4, RGB, at the video's own size (no resizing), as float
   0..255. Every `interval`-th frame from frame 0 is kept, interval = max(1, round(fps / 8)), so about 8 frames a
   second are compared (Python's round: fps 20 gives round(2.5) = 2).
2. Pairs (`infer`): consecutive kept frames, (f0, f1), (f1, f2), ...: len(frames) - 1 pairs.
3. Flow: each pair is padded to a multiple of 8 by InputPadder (mode "sintel": replicate padding split evenly,
   the odd pixel at the bottom/right), mapped to [-1, 1] as 2 * (x / 255) - 1 inside RAFT.forward, and RAFT-large
   runs with iters=20, test_mode=True; the upsampled flow of the last iteration (`flow_up`) is kept, at the padded
   size (it is never unpadded).
4. Per-pair magnitude (`get_score`): the per-pixel flow norm sqrt(u^2 + v^2) over the padded flow of size h x w;
   the mean of its int(h * w * 0.05) largest values (the top 5%).
5. Threshold (`set_params`): thres = 6.0 * min(H, W) / 256 for the kept frame's own (unpadded) size, so 6 px at
   256 px, 16.875 px at 720 px.
6. Decision (`set_params`, `check_move`): count_num = round(4 * len(frames) / 16), with len(frames) the number of
   kept frames (not pairs); the video is dynamic (1) when at least count_num pairs have a magnitude strictly above
   thres. The check runs inside the loop over pairs, so a video with no pair is static and a video whose
   count_num is 0 (two kept frames) is dynamic whatever its flow; both quirks are kept.

Flow backends, one decision code (`decide_dynamic`, which takes the per-pair flows):

- "raft": torchvision.models.optical_flow.raft_large loaded from models_dir/raft/raft_large_C_T_V1-22a6c225.pth.
  torchvision's Raft_Large_Weights.C_T_V1 are the original paper's raft-things.pth (the checkpoint VBench
  downloads), ported by torchvision to its module names (torchvision's docs: "Weights ported from
  https://github.com/princeton-vl/RAFT ... trained on FlyingChairs + FlyingThings3D"; the port is pytorch/vision
  PR 5060). torchvision's RAFT-large is the same architecture (BasicEncoder feature/context nets, 4-level
  correlation pyramid of radius 4, the ConvGRU update and the convex 8x upsampling), so with C_T_V1 this backend is
  VBench's flow up to float rounding. raft-things.pth itself does not load (other key names: module.fnet.*,
  module.update_block.*); C_T_V2 (torchvision's own Chairs+Things training) loads through `raft_path` and is
  recorded by its file name, but is not VBench's weights. Unlike the original, torchvision's correlation pyramid
  needs 128 px after padding (it raises on smaller frames): smaller frames are replicate-padded up to 128 px the
  way InputPadder pads, and their magnitudes are taken over that padded flow (no real benchmark video is so small). pair_batch pairs run in one call (eval mode, so the
  same flows): at 720x1280 each pair's correlation volume is about 1 GB.
- "farneback": OpenCV's calcOpticalFlowFarneback on the grey frames (a classical method, no weights, so dynamic
  degree runs with no download). Same frames, pairs, magnitude, threshold and decision, but the flow is not
  RAFT's: its numbers are NOT VBench's, and every row records the backend that made it.
- "auto": raft when the weights file is there, else farneback, logged once.

Output per video: dynamic_degree (0 or 1, VBench's decision), motion_magnitude (the mean over pairs of VBench's
per-pair magnitude, in pixels of the frames the flow ran at: motion_flow_size, "HxW", the video's own size),
motion_pairs (pairs compared), motion_flow_backend ("raft:<weights file>" or "farneback").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hcustom_mc.errors import ConfigError
from hcustom_mc.eval.common import MissingModelError, VideoSample

log = logging.getLogger(__name__)

RAFT_WEIGHTS_FILE = "raft_large_C_T_V1-22a6c225.pth"
RAFT_WEIGHTS_URL = f"https://download.pytorch.org/models/{RAFT_WEIGHTS_FILE}"
VBENCH_RAFT_ITERS = 20
VBENCH_FRAMES_PER_SECOND = 8  # interval = round(fps / 8)
VBENCH_TOP_FRACTION = 0.05
BACKENDS = ("auto", "raft", "farneback")

_logged_once: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged_once:
        _logged_once.add(message)
        log.warning(message)


def vbench_frame_indices(num_frames: int, fps: float) -> list[int]:
    """The frames VBench's get_frames keeps: every max(1, round(fps / 8))-th frame from frame 0."""
    interval = max(1, round(fps / VBENCH_FRAMES_PER_SECOND))
    return list(range(0, num_frames, interval))


def vbench_threshold(height: int, width: int) -> float:
    """VBench's per-pair threshold for a frame of this size (set_params): 6 px per 256 px of the short side."""
    return 6.0 * (min(height, width) / 256.0)


def vbench_count_needed(num_frames: int) -> int:
    """How many pairs must move, for `num_frames` kept frames (set_params: round(4 * count / 16), Python's round)."""
    return round(4 * (num_frames / 16.0))


def pair_magnitude(flow: np.ndarray | torch.Tensor) -> float:
    """VBench's get_score for one flow field [2, h, w] (u, v): the mean of the largest 5% of the per-pixel norms,
    int(h * w * 0.05) of them, over the whole field it is given (for RAFT, the padded one)."""
    if isinstance(flow, torch.Tensor):
        flow = flow.detach().float().cpu().numpy()
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"a flow field is [2, H, W], got shape {flow.shape}")
    _, h, w = flow.shape
    top_count = int(h * w * VBENCH_TOP_FRACTION)
    if top_count < 1:
        raise ValueError(f"a {h}x{w} flow has no top 5% (VBench would average nothing)")
    norms = np.sqrt(np.square(flow[0]) + np.square(flow[1])).ravel()  # float32, as VBench
    top = np.partition(norms, norms.size - top_count)[norms.size - top_count:]
    return float(top.astype(np.float64).mean())


@dataclass(frozen=True)
class DynamicDecision:
    dynamic: bool
    pair_magnitudes: list[float]
    threshold: float  # px, for the frame size
    count_needed: int  # pairs above the threshold that make the video dynamic
    pairs_above: int

    @property
    def magnitude(self) -> float | None:
        """The raw motion: the mean of the per-pair magnitudes (None with no pair)."""
        return float(np.mean(self.pair_magnitudes)) if self.pair_magnitudes else None


def decide_dynamic(flows: Sequence[np.ndarray | torch.Tensor], frame_size: tuple[int, int]) -> DynamicDecision:
    """VBench's decision from the flows of consecutive kept frames ([2, h, w] each, len(frames) - 1 of them) and
    the kept frames' own (unpadded) size (H, W): per-pair top-5% magnitudes, the size's threshold, and dynamic when
    at least round(4 * len(frames) / 16) pairs are strictly above it (with no pair: static, as VBench's loop)."""
    magnitudes = [pair_magnitude(flow) for flow in flows]
    threshold = vbench_threshold(*frame_size)
    count_needed = vbench_count_needed(len(flows) + 1)
    above = sum(magnitude > threshold for magnitude in magnitudes)
    dynamic = bool(magnitudes) and above >= count_needed
    return DynamicDecision(dynamic, magnitudes, threshold, count_needed, above)


def vbench_pad(frames: torch.Tensor, minimum: int = 0) -> torch.Tensor:
    """InputPadder(mode="sintel").pad: replicate-pad [N, C, H, W] to multiples of 8, split evenly, the odd pixel at
    the bottom/right. `minimum`: pad each side to at least that many pixels the same way (torchvision's RAFT needs
    128; VBench's videos are never that small, the tiny demo's are)."""
    height, width = frames.shape[-2:]
    pad_h, pad_w = max(-height % 8, minimum - height), max(-width % 8, minimum - width)
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if not any(pads):
        return frames
    return torch.nn.functional.pad(frames, pads, mode="replicate")


RAFT_MIN_SIZE = 128  # torchvision's correlation pyramid: feature maps (1/8 size) of at least 16


class RaftFlow:
    """torchvision RAFT-large from a local state dict, run as VBench runs its RAFT (padding, [-1, 1], iters)."""

    def __init__(self, weights_path: Path, device: torch.device | str = "cpu", iters: int = VBENCH_RAFT_ITERS,
                 pair_batch: int = 4):
        from torchvision.models.optical_flow import raft_large

        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if any(key.startswith("module.") for key in state):
            raise ConfigError(f"dynamic_degree: {weights_path} holds the original RAFT's module names (VBench's "
                              f"raft-things.pth?); torchvision's port of that checkpoint is {RAFT_WEIGHTS_URL}")
        model = raft_large(weights=None, progress=False)
        model.load_state_dict(state)
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.iters, self.pair_batch = iters, pair_batch
        self.name = f"raft:{Path(weights_path).name}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> list[torch.Tensor]:
        """Flows [2, h, w] (padded size) between consecutive frames of uint8 RGB [F, H, W, 3]."""
        flows: list[torch.Tensor] = []
        for start in range(0, len(frames) - 1, self.pair_batch):
            stop = min(start + self.pair_batch, len(frames) - 1)
            clip = torch.from_numpy(np.ascontiguousarray(frames[start:stop + 1])).to(self.device)
            clip = vbench_pad(clip.permute(0, 3, 1, 2).float(), RAFT_MIN_SIZE)  # 0..255, as VBench pads it
            clip = 2 * (clip / 255.0) - 1.0  # RAFT.forward's input scaling
            # eval mode: batch norm uses its running statistics, so a batch of pairs equals one pair at a time
            flow = self.model(clip[:-1], clip[1:], num_flow_updates=self.iters)[-1]
            flows.extend(flow.float().cpu())
        return flows


class FarnebackFlow:
    """OpenCV's Farneback dense flow on grey frames, with the parameters of OpenCV's optical-flow tutorial except
    more pyramid levels (5), so shifts of tens of pixels at 720p are still found from the coarse levels."""

    name = "farneback"

    def __init__(self, pyr_scale: float = 0.5, levels: int = 5, winsize: int = 15, iterations: int = 3,
                 poly_n: int = 5, poly_sigma: float = 1.2):
        self.params = (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, 0)

    def __call__(self, frames: np.ndarray) -> list[np.ndarray]:
        import cv2

        grey = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in frames]
        return [cv2.calcOpticalFlowFarneback(a, b, None, *self.params).transpose(2, 0, 1)
                for a, b in zip(grey[:-1], grey[1:])]


class DynamicDegree:
    """VBench's dynamic degree (0/1 per video) and the raw flow magnitude; see the module docstring for the path."""

    name = "dynamic_degree"
    how_to_get = (f"curl -L --create-dirs -o models/raft/{RAFT_WEIGHTS_FILE} {RAFT_WEIGHTS_URL}  "
                  f"(torchvision's port of RAFT's raft-things.pth, VBench's flow model)")

    @staticmethod
    def expected_path(models_dir: Path) -> Path:
        return Path(models_dir) / "raft" / RAFT_WEIGHTS_FILE

    def __init__(self, models_dir: Path, device: torch.device | str = "cpu", backend: str = "auto",
                 raft_path: Path | None = None, raft_iters: int = VBENCH_RAFT_ITERS, pair_batch: int = 4):
        """backend: "auto" (raft when its weights are there, else farneback), "raft" or "farneback".
        raft_path: another torchvision RAFT-large state dict than models_dir/raft/raft_large_C_T_V1-22a6c225.pth.
        raft_iters: RAFT's refinement iterations (VBench: 20). pair_batch: frame pairs per RAFT call."""
        if backend not in BACKENDS:
            raise ConfigError(f"dynamic_degree: backend {backend!r} is not one of {', '.join(BACKENDS)}")
        weights = Path(raft_path) if raft_path is not None else self.expected_path(models_dir)
        if backend == "auto":
            backend = "raft" if weights.is_file() else "farneback"
            if backend == "farneback":
                _log_once(f"dynamic_degree: no RAFT weights at {weights}, using OpenCV Farneback flow (not "
                          f"VBench's numbers; {self.how_to_get})")
        if backend == "raft":
            if not weights.is_file():
                raise MissingModelError(self.name, weights, self.how_to_get)
            self.flow: RaftFlow | FarnebackFlow = RaftFlow(weights, device, raft_iters, pair_batch)
        else:
            self.flow = FarnebackFlow()

    def score(self, sample: VideoSample) -> dict[str, float | int | str | None]:
        frames = sample.frames[vbench_frame_indices(len(sample.frames), sample.fps)]
        height, width = frames.shape[1:3]
        decision = decide_dynamic(self.flow(frames), (height, width))
        return {
            self.name: int(decision.dynamic),
            "motion_magnitude": decision.magnitude,
            "motion_pairs": len(decision.pair_magnitudes),
            "motion_flow_size": f"{height}x{width}",
            "motion_flow_backend": self.flow.name,
        }
