"""Bounding boxes of edited regions, and candidate boxes found from the pixel difference of one edit turn.

The box type itself, :class:`mcie.geometry.Box` (normalized image coordinates), is shared by every stage.

:func:`diff_boxes` proposes up to k candidate boxes for the region changed between the image before and the
image after a turn (paper 3.1, "Spatial Information Generation"; the MLLM proposes others): colour
difference in Lab, blur, hysteresis threshold, morphological clean-up, connected components (OpenCV),
merging of nearby components, then the largest regions, their union and a padded variant, deduplicated by IoU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

from mcie.geometry import Box

CandidateSource = Literal["diff", "mllm", "human"]
ImageLike = np.ndarray | Image.Image

__all__ = [
    "Candidate",
    "CandidateSource",
    "ImageLike",
    "change_mask",
    "dedupe",
    "diff_boxes",
    "to_rgb_array",
    "union_mask",
]


def union_mask(boxes: Iterable[Box], h: int, w: int) -> np.ndarray:
    """A boolean h x w array, True inside any of ``boxes`` (M_union of the paper's Eq. 10)."""
    out = np.zeros((h, w), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = box.to_pixels(w, h)
        out[y0:y1, x0:x1] = True
    return out


@dataclass(frozen=True, slots=True)
class Candidate:
    """A proposed box for one turn's edit, where it came from, and an optional prior score in [0, 1]."""

    box: Box
    source: CandidateSource
    prior: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("diff", "mllm", "human"):
            raise ValueError(f"Candidate.source: expected 'diff', 'mllm' or 'human', got {self.source!r}")
        if self.prior is not None and not (math.isfinite(self.prior) and 0.0 <= self.prior <= 1.0):
            raise ValueError(f"Candidate.prior: expected None or a number in [0, 1], got {self.prior!r}")


def dedupe(boxes: Iterable[Box], max_iou: float) -> list[Box]:
    """``boxes`` in order, without any box whose IoU with an earlier kept one is >= ``max_iou``."""
    kept: list[Box] = []
    for box in boxes:
        if all(box.iou(k) < max_iou for k in kept):
            kept.append(box)
    return kept


# --- images -----------------------------------------------------------------------------------------------


def to_rgb_array(image: ImageLike, *, name: str = "image") -> np.ndarray:
    """``image`` as an H x W x 3 uint8 RGB array (PIL images are converted; grey and RGBA arrays accepted)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: expected an HxWx3 array, got shape {image.shape}")
    return image


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    if image.shape[1] == w and image.shape[0] == h:
        return image
    shrinking = w * h < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _work_size(w: int, h: int, longest: int) -> tuple[int, int]:
    scale = min(1.0, longest / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


# --- candidates from the pixel difference -------------------------------------------------------------------


def change_mask(
    before: ImageLike,
    after: ImageLike,
    *,
    work_size: int = 256,
    min_delta: float = 12.0,
    noise_factor: float = 3.0,
    seed_factor: float = 2.0,
    blur_sigma: float = 1.5,
    close_frac: float = 0.02,
) -> np.ndarray:
    """Boolean mask (at working resolution, longest side ``work_size``) of the pixels the edit changed.

    ``after`` is resized to ``before``'s size when they differ. Both images are downscaled (area averaging,
    which also evens out JPEG noise), the per-pixel Euclidean distance is taken in OpenCV's 8-bit Lab space
    and blurred (Gaussian, ``blur_sigma`` working pixels). Thresholding has two regimes:

    - local edit (median distance <= ``min_delta``, i.e. most of the image unchanged): the median is the
      noise level (JPEG / VAE re-encoding); hysteresis thresholding keeps connected pixels above
      ``low = max(min_delta, noise_factor * median)`` that reach a seed above
      ``high = max(Otsu, seed_factor * low)``. Noise rarely reaches the seed level, while the weak parts of
      a real edit (flat areas of a blurred-out object) are kept through their strong parts;
    - global edit (median > ``min_delta``): every pixel above ``min_delta`` (Otsu would split it in two).

    Finally a morphological close (elliptic kernel ``close_frac`` of the longest side) joins fragments and a
    3x3 open removes specks.
    """
    src = to_rgb_array(before, name="before")
    tar = to_rgb_array(after, name="after")
    h, w = src.shape[:2]
    tar = _resize(tar, w, h)
    ww, wh = _work_size(w, h, work_size)
    src_lab = cv2.cvtColor(_resize(src, ww, wh), cv2.COLOR_RGB2LAB).astype(np.float32)
    tar_lab = cv2.cvtColor(_resize(tar, ww, wh), cv2.COLOR_RGB2LAB).astype(np.float32)
    diff = np.sqrt(((src_lab - tar_lab) ** 2).sum(axis=2))
    if blur_sigma > 0:
        diff = cv2.GaussianBlur(diff, (0, 0), blur_sigma)
    median, peak = float(np.median(diff)), float(diff.max())
    if median > min_delta:  # most of the image changed: a global edit, no noise floor to estimate
        mask = (diff > min_delta).astype(np.uint8)
    else:
        low = max(min_delta, noise_factor * median)
        high = max(float(threshold_otsu(diff)), seed_factor * low) if peak > low else np.inf
        if peak <= high:
            return np.zeros((wh, ww), dtype=bool)
        mask = apply_hysteresis_threshold(diff, low, high).astype(np.uint8)
    size = max(3, 2 * round(close_frac * max(ww, wh) / 2) + 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    return mask.astype(bool)


@dataclass(slots=True)
class _Region:
    x0: int
    y0: int
    x1: int
    y1: int
    pixels: int

    def near(self, other: _Region, gap: float) -> bool:
        gx = max(self.x0, other.x0) - min(self.x1, other.x1)
        gy = max(self.y0, other.y0) - min(self.y1, other.y1)
        return gx <= gap and gy <= gap

    def merged(self, other: _Region) -> _Region:
        return _Region(
            min(self.x0, other.x0),
            min(self.y0, other.y0),
            max(self.x1, other.x1),
            max(self.y1, other.y1),
            self.pixels + other.pixels,
        )


def _regions(mask: np.ndarray, min_pixels: int, gap: float) -> list[_Region]:
    """Connected components of ``mask`` (8-connected, at least ``min_pixels``), nearby ones merged."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    regions = [
        _Region(int(x), int(y), int(x + bw), int(y + bh), int(area))
        for x, y, bw, bh, area in stats[1:count]
        if area >= min_pixels
    ]
    merged = True
    while merged and len(regions) > 1:
        merged = False
        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                if regions[i].near(regions[j], gap):
                    regions[i] = regions[i].merged(regions.pop(j))
                    merged = True
                    break
            if merged:
                break
    return sorted(regions, key=lambda r: (-r.pixels, r.y0, r.x0))


def _dice(box: Box, integral: np.ndarray, total: int) -> float:
    """Dice overlap between ``box`` and the change mask whose integral image is ``integral``."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x0, y0, x1, y1 = box.to_pixels(w, h)
    inside = int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])
    return 2.0 * inside / ((x1 - x0) * (y1 - y0) + total)


def diff_boxes(
    before: ImageLike,
    after: ImageLike,
    k: int = 3,
    *,
    work_size: int = 256,
    min_delta: float = 12.0,
    noise_factor: float = 3.0,
    seed_factor: float = 2.0,
    blur_sigma: float = 1.5,
    close_frac: float = 0.02,
    min_area_frac: float = 5e-4,
    merge_gap_frac: float = 0.04,
    pad_frac: float = 0.1,
    dedupe_iou: float = 0.85,
) -> list[Candidate]:
    """Up to ``k`` distinct candidate boxes for what changed from ``before`` to ``after`` (source "diff").

    The change mask comes from :func:`change_mask` (which documents the thresholding arguments); its
    connected components smaller than ``min_area_frac`` of the image are dropped and those closer than
    ``merge_gap_frac`` of the longest side are merged into regions. Candidates, in this order, then
    deduplicated (IoU >= ``dedupe_iou``) and cut to ``k``: the largest region, the union (hull) of all
    regions, the largest region padded by ``pad_frac`` of its size, then the other regions by size. Each
    candidate's ``prior`` is the Dice overlap of its box with the change mask. No change gives an empty
    list; a change everywhere gives the whole-image box.
    """
    if k < 1:
        raise ValueError(f"diff_boxes: expected k >= 1, got {k}")
    mask = change_mask(
        before,
        after,
        work_size=work_size,
        min_delta=min_delta,
        noise_factor=noise_factor,
        seed_factor=seed_factor,
        blur_sigma=blur_sigma,
        close_frac=close_frac,
    )
    h, w = mask.shape
    regions = _regions(mask, max(1, round(min_area_frac * w * h)), merge_gap_frac * max(w, h))
    if not regions:
        return []
    region_boxes = [Box.from_pixels(r.x0, r.y0, r.x1, r.y1, w, h) for r in regions]
    ordered = [region_boxes[0], Box.hull(region_boxes), region_boxes[0].pad(pad_frac), *region_boxes[1:]]
    integral = cv2.integral(mask.astype(np.uint8))
    total = int(mask.sum())
    return [
        Candidate(box, "diff", round(min(1.0, _dice(box, integral, total)), 6))
        for box in dedupe(ordered, dedupe_iou)[:k]
    ]
