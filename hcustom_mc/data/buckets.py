"""Aspect-ratio buckets and the resize geometry every reader shares.

A clip is resized (aspect preserved) until it *covers* its bucket, then centre-cropped to it, so
no backend ever stretches a frame. The rounding rules below are DALI's (`fn.resize(mode=
"not_smaller")` rounds the scaled size half-up; `fn.crop` rounds a centred anchor half-up): the
torch fallback uses the same numbers so every backend crops the same window.
"""

from __future__ import annotations

import math

# (height, width) proportions, portrait first. Sizes are (H, W) everywhere in this package, so
# "9:16" is a tall phone video and "16:9" ordinary landscape 720p (720 x 1280).
BUCKET_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (3, 4), (4, 3), (9, 16), (16, 9))
SHORT_SIDES = (512, 720)  # the release's two resolutions; any multiple of 16 is accepted
ALIGN = 16  # the VAE downsamples 8x and the DiT patches 2x: bucket sides must divide by 16


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def bucket_size(ratio: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(H, W) of one ratio's bucket: the short side exact, the long side rounded to a multiple of 16."""
    if short_side <= 0 or short_side % ALIGN:
        raise ValueError(f"short_side must be a positive multiple of {ALIGN}, got {short_side}")
    rh, rw = ratio
    if rh <= rw:
        return short_side, _round_to(short_side * rw / rh, ALIGN)
    return _round_to(short_side * rh / rw, ALIGN), short_side


def buckets(short_side: int) -> list[tuple[int, int]]:
    """All bucket sizes for one short side, in BUCKET_RATIOS order."""
    return [bucket_size(r, short_side) for r in BUCKET_RATIOS]


def bucket_for(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is nearest to height:width.

    Distance is |log(h/w) - log(rh/rw)| so 2:1 and 1:2 are equally far from square. An exact tie
    (within float noise) goes to the ratio listed first in BUCKET_RATIOS, so the choice never
    depends on dict order or float summation order.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    target = math.log(height / width)
    best, best_dist = None, math.inf
    for ratio in BUCKET_RATIOS:
        dist = abs(target - math.log(ratio[0] / ratio[1]))
        if dist < best_dist - 1e-9:
            best, best_dist = ratio, dist
    return bucket_size(best, short_side)


def cover_size(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Size after an aspect-preserving resize that covers (out_h, out_w) (DALI's `not_smaller`)."""
    scale = max(out_h / height, out_w / width)
    return max(out_h, int(height * scale + 0.5)), max(out_w, int(width * scale + 0.5))


def fit_size(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Size after an aspect-preserving resize that fits inside (out_h, out_w) (for padding)."""
    scale = min(out_h / height, out_w / width)
    return min(out_h, max(1, int(height * scale + 0.5))), min(out_w, max(1, int(width * scale + 0.5)))


def center_anchor(size: int, crop: int) -> int:
    """Top/left offset of a centred crop; the half pixel rounds up, as DALI's crop_pos=0.5 does."""
    return (size - crop + 1) // 2
