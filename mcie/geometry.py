"""Boxes of edited regions in normalized image coordinates: the one box type every stage shares.

A :class:`Box` is normalized to the image: ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``, with (x0, y0)
the top-left and (x1, y1) the bottom-right *edge* (continuous coordinates, so a box covering pixel columns
3..5 of a 10-pixel-wide image is x0=0.3, x1=0.6). Boxes are resolution-free; :meth:`Box.to_pixels` turns one
into integer pixel bounds with exclusive ends, ready for ``array[y0:y1, x0:x1]``.

The pipeline finds and scores boxes (:mod:`pipeline.boxes`, :mod:`pipeline.scoring`), the MLLM layer parses them
(:mod:`mcie.mllm.decompose`), the model turns them into masks; so the type lives here, beside the settings, where
every stage may import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in normalized image coordinates (see the module docstring)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "x1", "y1"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"Box.{name}: expected a finite number in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Box.{name}: expected a number in [0, 1], got {value!r}")
        if not self.x0 < self.x1:
            raise ValueError(f"Box: expected x0 < x1, got x0={self.x0!r}, x1={self.x1!r}")
        if not self.y0 < self.y1:
            raise ValueError(f"Box: expected y0 < y1, got y0={self.y0!r}, y1={self.y1!r}")

    # constructors
    @classmethod
    def clip(cls, x0: float, y0: float, x1: float, y1: float) -> Box:
        """A box from coordinates that may fall outside [0, 1], clamped into the image.

        Raises ``ValueError`` when nothing of the box is left inside the image.
        """
        cx0, cy0, cx1, cy1 = (min(1.0, max(0.0, float(v))) for v in (x0, y0, x1, y1))
        if not (cx0 < cx1 and cy0 < cy1):
            raise ValueError(f"Box.clip: ({x0}, {y0}, {x1}, {y1}) has no area inside the image")
        return cls(cx0, cy0, cx1, cy1)

    @classmethod
    def from_pixels(
        cls, x0: float, y0: float, x1: float, y1: float, w: int, h: int, *, clip: bool = False
    ) -> Box:
        """A box from pixel bounds on a w x h image; (x1, y1) are exclusive ends (edges), as in slicing.

        With ``clip=True`` bounds outside the image are clamped (useful for MLLM grounding output).
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"Box.from_pixels: expected a positive image size, got w={w}, h={h}")
        coords = (x0 / w, y0 / h, x1 / w, y1 / h)
        return cls.clip(*coords) if clip else cls(*coords)

    @staticmethod
    def hull(boxes: Iterable[Box]) -> Box:
        """The smallest box enclosing all ``boxes``."""
        items = list(boxes)
        if not items:
            raise ValueError("Box.hull: expected at least one box")
        return Box(
            min(b.x0 for b in items),
            min(b.y0 for b in items),
            max(b.x1 for b in items),
            max(b.y1 for b in items),
        )

    # measures
    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """Fraction of the image the box covers."""
        return self.width * self.height

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other`` (0 when disjoint, 1 when equal)."""
        iw = min(self.x1, other.x1) - max(self.x0, other.x0)
        ih = min(self.y1, other.y1) - max(self.y0, other.y0)
        if iw <= 0 or ih <= 0:
            return 0.0
        inter = iw * ih
        return inter / (self.area + other.area - inter)

    def pad(self, fraction: float) -> Box:
        """The box grown by ``fraction`` of its own width/height on every side, clipped to the image."""
        dx, dy = self.width * fraction, self.height * fraction
        return Box.clip(self.x0 - dx, self.y0 - dy, self.x1 + dx, self.y1 + dy)

    # pixels
    def to_pixels(self, w: int, h: int) -> tuple[int, int, int, int]:
        """Integer pixel bounds (x0, y0, x1, y1) on a w x h image, ends exclusive.

        The bounds are the smallest pixel rectangle covering the box (start rounded down, end up), always at
        least one pixel wide and high, so ``array[y0:y1, x0:x1]`` is the box's region.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"Box.to_pixels: expected a positive image size, got w={w}, h={h}")
        px0 = min(w - 1, max(0, math.floor(self.x0 * w + _EPS)))
        py0 = min(h - 1, max(0, math.floor(self.y0 * h + _EPS)))
        px1 = max(px0 + 1, min(w, math.ceil(self.x1 * w - _EPS)))
        py1 = max(py0 + 1, min(h, math.ceil(self.y1 * h - _EPS)))
        return px0, py0, px1, py1

    def mask(self, h: int, w: int) -> np.ndarray:
        """A boolean h x w array, True inside the box (pixels of :meth:`to_pixels`)."""
        out = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = self.to_pixels(w, h)
        out[y0:y1, x0:x1] = True
        return out
