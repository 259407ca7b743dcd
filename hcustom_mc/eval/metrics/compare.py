"""Reference comparison (`compare A B`): two folders of the same jobs, for example full sampling against a faster
mode. Per job, how far B's frames are from A's (PSNR and SSIM per frame), and per metric, what B costs (B - A).

PSNR and SSIM are torchmetrics' functional implementations (torchmetrics.functional.image
`peak_signal_noise_ratio`, `structural_similarity_index_measure`), called per frame on uint8 RGB with data range
255; SSIM with its defaults, the standard Gaussian window (Wang et al. 2004: 11 x 11, sigma 1.5, K1 0.01,
K2 0.03), averaged over the three channels and every pixel. They are used as they are rather than rewritten:
they are the reference the issue names, and one standard implementation is worth more than a second copy.
The tests check the per-frame batching against single-frame calls, PSNR against its closed form and scikit-image,
and the SSIM map against scikit-image's Gaussian SSIM (equal wherever the window lies inside the frame; the mean
differs in the 5-pixel border, which torchmetrics averages with reflect padding and scikit-image crops away).

An identical frame has PSNR +inf (MSE 0). The mean `psnr` is over the frames that differ (`psnr_identical_frames`
counts the others), +inf only when every frame is identical. JSON has no infinity: `common.json_safe` writes it as the
string "inf" (float("inf") reads it back).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DATA_RANGE = 255.0
CHUNK = 8  # frames per torchmetrics call: SSIM holds several float copies of each frame


def _as_batch(frames: np.ndarray, dtype: Any) -> Any:
    import torch

    return torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2).to(dtype)


def frame_psnr_ssim(frames_a: np.ndarray, frames_b: np.ndarray, device: Any = "cpu"
                    ) -> dict[str, float | int | list[float]]:
    """Per-frame PSNR (dB) and SSIM of two uint8 [F, H, W, 3] videos of the same shape, and their means."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if frames_a.shape != frames_b.shape or frames_a.ndim != 4 or frames_a.shape[-1] != 3:
        raise ValueError(f"compare needs two uint8 [F, H, W, 3] videos of one shape, got {frames_a.shape} and "
                         f"{frames_b.shape}")
    if frames_a.dtype != np.uint8 or frames_b.dtype != np.uint8:
        raise ValueError(f"compare needs uint8 frames, got {frames_a.dtype} and {frames_b.dtype}")
    psnr: list[float] = []
    ssim: list[float] = []
    for start in range(0, len(frames_a), CHUNK):
        a, b = frames_a[start:start + CHUNK], frames_b[start:start + CHUNK]
        # float64 for PSNR: the squared error of a 720p frame sums ~2.8M terms
        a64, b64 = _as_batch(a, torch.float64).to(device), _as_batch(b, torch.float64).to(device)
        psnr += peak_signal_noise_ratio(b64, a64, data_range=DATA_RANGE, reduction="none",
                                        dim=(1, 2, 3)).tolist()
        ssim += structural_similarity_index_measure(b64.float(), a64.float(), data_range=DATA_RANGE,
                                                    reduction="none").tolist()
    finite = [value for value in psnr if math.isfinite(value)]
    return {
        "psnr": float(np.mean(finite)) if finite else math.inf,
        "ssim": float(np.mean(ssim)),
        "psnr_identical_frames": len(psnr) - len(finite),
        "frames": len(psnr),
        "psnr_frames": psnr,
        "ssim_frames": ssim,
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def compare_tables(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], key: str = "name"
                   ) -> list[dict[str, Any]]:
    """Pair two folders' per-job rows by `key`. Each row out: the name, `in` ("both", "a only", "b only"), and
    for every numeric metric either side has, `<metric>_a`, `<metric>_b` and `<metric>_delta` (B - A; None where
    a side lacks it or has None). Jobs in one folder only are kept and named, with their values on their side."""
    table_a, table_b = _by_name(rows_a, key, "A"), _by_name(rows_b, key, "B")
    out = []
    for name in sorted(table_a.keys() | table_b.keys()):
        row_a, row_b = table_a.get(name, {}), table_b.get(name, {})
        side = "both" if row_a and row_b else ("a only" if row_a else "b only")
        row: dict[str, Any] = {key: name, "in": side}
        metrics = [m for m in dict.fromkeys([*row_a, *row_b])
                   if m != key and (_is_number(row_a.get(m)) or _is_number(row_b.get(m)))]
        for metric in metrics:
            a, b = row_a.get(metric), row_b.get(metric)
            row[f"{metric}_a"], row[f"{metric}_b"] = a, b
            row[f"{metric}_delta"] = _delta(a, b)
        out.append(row)
    return out


def _by_name(rows: list[dict[str, Any]], key: str, label: str) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row[key] in table:
            raise ValueError(f"folder {label} has job {row[key]!r} twice")
        table[row[key]] = row
    return table


def _delta(a: Any, b: Any) -> float | None:
    if not (_is_number(a) and _is_number(b)):
        return None
    if a == b:  # inf == inf too: no change, where inf - inf would be nan
        return 0.0
    return float(b) - float(a)
