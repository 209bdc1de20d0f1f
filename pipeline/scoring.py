"""Pick the candidate box of an edit turn whose masking-out leaves source and target most alike (paper Eq. 1).

    i* = argmax_i  sim(I_src * (1 - M_i), I_tar * (1 - M_i))

where M_i is the mask of the i-th candidate box. A :class:`BoxScorer` scores every candidate of many
(before, after) pairs at once; :func:`select` takes the argmax. Two scorers:

- :class:`ClipScorer`: sim is the cosine similarity of open_clip image embeddings, as in the paper;
- :class:`PixelScorer`: the same criterion with a pixel difference, for runs without a CLIP checkpoint.

Both similarities favour larger boxes: masking more leaves less to differ, and masking everything makes the
two images identical (the CLIP score of two blank images is 1). The pixel scorer therefore charges a price per
covered pixel (see :class:`PixelScorer`) and :class:`ClipScorer` takes an optional ``area_penalty``; but which
candidate a turn gets is decided by :class:`SelectionRule`: the MLLM box, else the smallest box, that explains the
edit (Eq. 1 normalised per pair), the scores deciding only when no box does. docs/grounding.md gives the rule, the
reason for each change to Eq. 1 and its measurement (``bench/grounding_quality.py``). :func:`make_scorer` picks a
scorer from settings; callers record ``scorer.name`` with every selection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import cv2
import numpy as np

from mcie.config import ConfigError, Settings, get_settings
from mcie.geometry import Box
from mcie.pipeline.boxes import Candidate, ImageLike, to_rgb_array

if TYPE_CHECKING:
    import torch

__all__ = ["BoxScorer", "ClipScorer", "Evidence", "PixelScorer", "SelectionRule", "make_scorer", "select"]

log = logging.getLogger(__name__)

ImagePair = tuple[ImageLike, ImageLike]
BoxLike = Box | Candidate

# file names looked for when a checkpoint *folder* is given (open_clip / Hugging Face conventions)
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


class BoxScorer(Protocol):
    """Scores candidate boxes of (before, after) pairs by Eq. 1; higher is better."""

    @property
    def name(self) -> str:
        """Identifies the scorer and its settings, recorded with each selection."""
        ...

    def score(self, pairs: Sequence[ImagePair], candidates: Sequence[Sequence[BoxLike]]) -> list[list[float]]:
        """One score per candidate of each pair: ``result[i][j]`` for ``candidates[i][j]`` of ``pairs[i]``."""
        ...


def select(candidates: Sequence[object], scores: Sequence[float]) -> int:
    """Index of the best-scoring candidate (the first one on ties)."""
    if len(candidates) != len(scores):
        raise ValueError(f"select: got {len(candidates)} candidates but {len(scores)} scores")
    if not candidates:
        raise ValueError("select: expected at least one candidate")
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def _boxes(pairs: Sequence[ImagePair], candidates: Sequence[Sequence[BoxLike]]) -> list[list[Box]]:
    if len(pairs) != len(candidates):
        raise ValueError(f"score: got {len(pairs)} image pairs but {len(candidates)} candidate lists")
    out: list[list[Box]] = []
    for i, (pair, items) in enumerate(zip(pairs, candidates, strict=True)):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"pairs[{i}]: expected a (before, after) pair of images")
        boxes = []
        for j, item in enumerate(items):
            box = item.box if isinstance(item, Candidate) else item
            if not isinstance(box, Box):
                raise TypeError(
                    f"candidates[{i}][{j}]: expected a Box or Candidate, got {type(item).__name__}"
                )
            boxes.append(box)
        out.append(boxes)
    return out


def _pair_arrays(pair: ImagePair, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The pair as RGB arrays, ``after`` resized to ``before``'s size when they differ."""
    before = to_rgb_array(pair[0], name=f"pairs[{index}] before")
    after = to_rgb_array(pair[1], name=f"pairs[{index}] after")
    if after.shape != before.shape:
        after = cv2.resize(after, (before.shape[1], before.shape[0]), interpolation=cv2.INTER_AREA)
    return before, after


# --- pixel scorer -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PixelScorer:
    """Eq. 1 with a pixel similarity instead of CLIP.

    With d(p) in [0, 1] the mean absolute RGB difference of pixel p (images downscaled to ``work_size``
    on their longest side, area averaging) and N the number of pixels::

        score(B) = 1 - ( sum_{p outside B} d(p) + area_penalty * |B| ) / N

    i.e. one minus the difference left outside the box, per image pixel, minus a price of ``area_penalty``
    per pixel the box covers. Why not the plain mean difference outside the box: every box that contains
    the whole edit leaves only noise outside and scores the same, and the whole-image box leaves nothing to
    compare (0/0), so the criterion alone cannot prefer the tight box. With the price, growing the box over
    a pixel changes the score by (d(p) - area_penalty) / N: the best box covers the pixels that changed
    by more than ``area_penalty`` (default 0.05, i.e. ~13/255, above JPEG / VAE re-encoding noise) and no
    others. CLIP on masked images has the same pull toward big boxes, without an explicit price.
    Box sums come from an integral image, so each candidate costs O(1) after one pass per pair.
    """

    area_penalty: float = 0.05
    work_size: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.area_penalty < 1.0:
            raise ValueError(
                f"PixelScorer.area_penalty: expected a number in [0, 1), got {self.area_penalty}"
            )
        if self.work_size < 8:
            raise ValueError(f"PixelScorer.work_size: expected at least 8, got {self.work_size}")

    @property
    def name(self) -> str:
        return f"pixel:penalty={self.area_penalty:g},size={self.work_size}"

    def difference(self, before: ImageLike, after: ImageLike) -> np.ndarray:
        """d(p): the per-pixel mean absolute RGB difference in [0, 1] at working resolution."""
        src, tar = _pair_arrays((before, after), 0)
        h, w = src.shape[:2]
        scale = min(1.0, self.work_size / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != (w, h):
            src = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
            tar = cv2.resize(tar, size, interpolation=cv2.INTER_AREA)
        return cv2.absdiff(src, tar).astype(np.float32).mean(axis=2) / 255.0

    def score(self, pairs: Sequence[ImagePair], candidates: Sequence[Sequence[BoxLike]]) -> list[list[float]]:
        boxes = _boxes(pairs, candidates)
        out: list[list[float]] = []
        for i, (pair, items) in enumerate(zip(pairs, boxes, strict=True)):
            if not items:
                out.append([])
                continue
            try:
                diff = self.difference(*pair)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"pairs[{i}]: {exc}") from None
            h, w = diff.shape
            integral = cv2.integral(diff, sdepth=cv2.CV_64F)
            total, n = float(integral[h, w]), float(h * w)
            row = []
            for box in items:
                x0, y0, x1, y1 = box.to_pixels(w, h)
                inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
                covered = (x1 - x0) * (y1 - y0)
                row.append(1.0 - (total - float(inside) + self.area_penalty * covered) / n)
            out.append(row)
        return out


# --- the selection rule -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the pixel difference says about one candidate box."""

    explained: float  # share of the pair's change (above the noise floor) inside the box, in [0, 1]
    offset: float  # distance of the change's centre of mass from the box centre, in box sizes (max of x and y)
    from_gain: bool = False  # ``explained`` is a scorer's normalised Eq. 1 gain (CLIP), not the pixel share


@dataclass(frozen=True, slots=True)
class SelectionRule:
    """Which candidate a turn gets, given the scorer's Eq. 1 scores and the pixel evidence (docs/grounding.md).

    1. A candidate *explains* the edit when it holds at least ``explain`` of the change above the noise floor
       (Eq. 1 in pixel form, normalised per pair: the share of the difference its masking removes; with CLIP
       gains, ``explain_gain`` of the normalised CLIP gain) and the change's centre of mass lies within ``centre``
       box sizes of its centre (a shifted or oversized box can hold the change without being about it).
    2. Among the MLLM boxes that explain it and are at most ``max_growth`` times the area of the smallest
       explaining box, the smallest wins: such a box bounds the same thing as the tightest explanation, and the
       MLLM also sees parts of the object the edit left unchanged. A larger MLLM box is a padded one (10% on each
       side is 1.44 times the area) and loses, since masking more must not win by itself (every larger box
       explains too).
    3. Else the smallest explaining box of any source (the tightest explanation of the change).
    4. Else (no box explains it, or nothing changed above the noise floor) the scorer's best Eq. 1 score.

    The change is measured at ``work_size`` pixels on the longest side (fine enough that a box shifted by a
    quarter of a small object's size leaves more than ``1 - explain`` of its change outside); the noise floor is
    ``3 x`` the median pixel difference (re-encoding noise), kept in [``noise_floor``, ``max_noise_floor``]. The
    defaults are those measured by ``bench/grounding_quality.py`` (docs/grounding.md).
    """

    explain: float = 0.98
    explain_gain: float = 0.95
    centre: float = 0.3
    max_growth: float = 1.1
    noise_floor: float = 0.0
    max_noise_floor: float = 0.05
    work_size: int = 256

    def __post_init__(self) -> None:
        for name in ("explain", "explain_gain"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"SelectionRule.{name}: expected a number in (0, 1], got {getattr(self, name)}")
        if self.centre <= 0 or self.max_growth < 1:
            raise ValueError("SelectionRule: expected centre > 0 and max_growth >= 1")
        if not 0.0 <= self.noise_floor <= self.max_noise_floor < 1.0:
            raise ValueError("SelectionRule: expected 0 <= noise_floor <= max_noise_floor < 1")

    def evidence(
        self, pair: ImagePair, boxes: Sequence[Box], gains: Sequence[float] | None = None
    ) -> list[Evidence] | None:
        """The evidence for each box of one pair; None when nothing changed above the noise floor.

        ``gains`` (from a scorer with a ``gains`` method, i.e. CLIP) replace the pixel share of the change as
        ``explained``; the centre of the change always comes from the pixel difference.
        """
        d = PixelScorer(work_size=self.work_size).difference(*pair).astype(np.float64)
        floor = min(self.max_noise_floor, max(self.noise_floor, 3.0 * float(np.median(d))))
        change = np.maximum(d - floor, 0.0)
        total = float(change.sum())
        if total <= 0.0:
            return None
        h, w = change.shape
        ys, xs = np.nonzero(change)
        weights = change[ys, xs]
        cx, cy = float((xs + 0.5) @ weights) / total, float((ys + 0.5) @ weights) / total
        integral = cv2.integral(change, sdepth=cv2.CV_64F)
        out = []
        for box in boxes:
            x0, y0, x1, y1 = box.to_pixels(w, h)
            inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            offset = max(abs((x0 + x1) / 2 - cx) / (x1 - x0), abs((y0 + y1) / 2 - cy) / (y1 - y0))
            out.append(Evidence(min(1.0, float(inside) / total), offset))
        if gains is not None:
            if len(gains) != len(out):
                raise ValueError(f"evidence: got {len(gains)} gains for {len(out)} boxes")
            out = [Evidence(float(g), e.offset, True) for g, e in zip(gains, out, strict=True)]
        return out

    def explains(self, evidence: Evidence) -> bool:
        """Whether a box with this evidence explains the edit (step 1)."""
        threshold = self.explain_gain if evidence.from_gain else self.explain
        return evidence.explained >= threshold and evidence.offset <= self.centre

    def choose(
        self, sources: Sequence[str], boxes: Sequence[Box], scores: Sequence[float], evidence: Sequence[Evidence] | None
    ) -> int:
        """Index of the chosen candidate (see the class docstring)."""
        if not (len(sources) == len(boxes) == len(scores)) or not boxes:
            raise ValueError(f"choose: expected as many sources, boxes and scores (>= 1), got "
                             f"{len(sources)}, {len(boxes)}, {len(scores)}")
        if evidence is None:
            return select(boxes, scores)
        explaining = [i for i, e in enumerate(evidence) if self.explains(e)]
        if not explaining:
            return select(boxes, scores)
        smallest = min(boxes[i].area for i in explaining)
        mllm = [i for i in explaining if sources[i] == "mllm" and boxes[i].area <= self.max_growth * smallest]
        return min(mllm or explaining, key=lambda i: (boxes[i].area, -scores[i], i))


# --- CLIP scorer --------------------------------------------------------------------------------------------


def _resolve_checkpoint(path: str | Path, model_name: str = "") -> Path:
    """A local file for a checkpoint file, folder, Hub id or pretrained tag (see :mod:`mcie.hub`)."""
    from mcie.hub import resolve_open_clip

    return resolve_open_clip(model_name, path, "MCIE_CLIP_CHECKPOINT")


def _normalize_stats(model: Any, preprocess: Any) -> tuple[tuple[int, int], list[float], list[float]]:
    """Input size of ``model`` and the mean/std of ``preprocess``'s Normalize (else the model's config)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean, std = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)
    for transform in getattr(preprocess, "transforms", ()):
        if hasattr(transform, "mean") and hasattr(transform, "std"):
            mean, std = transform.mean, transform.std
    return size, [float(m) for m in mean], [float(s) for s in std]


class ClipScorer:
    """Eq. 1 with open_clip image embeddings: cosine similarity of the masked source and target.

    Images are resized to the model's input size without cropping (a centre crop would hide edits near the
    borders from the comparison) and normalized; the box is then zeroed in the *normalized* tensor, i.e.
    filled with the dataset mean colour, the encoder's neutral input, rather than the black of a literal
    ``I * (1 - M)`` (a black patch is itself a salient object to CLIP). Every distinct masked image (per
    pair, side and box in model pixels; all fully-masked images are one) is encoded once, in batches of
    ``batch_size`` under ``torch.inference_mode``. ``area_penalty`` (default 0) is subtracted times the box
    area from each score.

    ``checkpoint`` is an open_clip checkpoint file, a folder holding one, a Hub id or a pretrained tag of
    ``model_name``, resolved by :func:`mcie.hub.resolve_open_clip` (through the Hugging Face cache).
    ``None`` builds the architecture with random weights, which is only useful for benchmarks.
    One :meth:`score` call holds the prepared images of all its pairs (2 x 3 x 224 x 224 floats each for
    ViT-L-14), so callers pass pairs in chunks of a few hundred at most.
    """

    def __init__(
        self,
        model_name: str,
        checkpoint: str | Path | None,
        device: str = "cpu",
        batch_size: int = 64,
        *,
        precision: str = "fp32",
        area_penalty: float = 0.0,
    ) -> None:
        import open_clip

        path = None if checkpoint is None else _resolve_checkpoint(checkpoint, model_name)
        if path is None:
            log.warning("ClipScorer(%s): no checkpoint given, using random weights", model_name)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None if path is None else str(path), device=device, precision=precision
            )
        except RuntimeError as exc:
            raise ValueError(f"CLIP model {model_name!r} from {path}: cannot load it ({exc})") from None
        name = f"clip:{model_name}" + ("" if path is None else f"@{path.name}")
        self._setup(model, preprocess, name, device, batch_size, area_penalty)

    @classmethod
    def from_model(
        cls,
        model: Any,
        preprocess: Any = None,
        *,
        name: str = "clip:custom",
        device: str | None = None,
        batch_size: int = 64,
        area_penalty: float = 0.0,
    ) -> ClipScorer:
        """A scorer around an already built open_clip model (and its preprocess, for the normalization)."""
        self = cls.__new__(cls)
        if device is None:
            device = str(next(model.parameters()).device)
        self._setup(model, preprocess, name, device, batch_size, area_penalty)
        return self

    def _setup(
        self, model: Any, preprocess: Any, name: str, device: str, batch_size: int, area_penalty: float
    ) -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"ClipScorer.batch_size: expected at least 1, got {batch_size}")
        self._name = name
        self.batch_size = batch_size
        self.area_penalty = float(area_penalty)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = next(model.parameters()).dtype
        self.size, mean, std = _normalize_stats(model, preprocess)
        self._mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(3, 1, 1)

    @property
    def name(self) -> str:
        return self._name

    def prepare(self, image: ImageLike) -> torch.Tensor:
        """``image`` as the model's normalized 3 x H x W float32 input (squash-resized, bicubic)."""
        import torch
        import torch.nn.functional as F

        array = to_rgb_array(image)
        x = torch.from_numpy(np.ascontiguousarray(array)).to(self.device).permute(2, 0, 1)
        x = x.unsqueeze(0).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        return ((x[0].clamp_(0.0, 1.0) - self._mean) / self._std).contiguous()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized float32 embeddings of a batch of prepared (and masked) images."""
        import torch

        with torch.inference_mode():
            features = self.model.encode_image(images.to(self.device, self.dtype))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    def score(self, pairs: Sequence[ImagePair], candidates: Sequence[Sequence[BoxLike]]) -> list[list[float]]:
        import torch

        boxes = _boxes(pairs, candidates)
        h, w = self.size
        # the pairs' prepared tensors (pairs without candidates are skipped)
        prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        keys: dict[tuple, int] = {}  # distinct masked image -> row in the embedding table
        plan: list[tuple[int, int, tuple[int, int, int, int]]] = []  # (pair, side, pixel bounds) per row
        rows: list[list[tuple[int, int]]] = []
        blank = (0, 0, w, h)
        for i, (pair, items) in enumerate(zip(pairs, boxes, strict=True)):
            if items and i not in prepared:
                before, after = _pair_arrays(pair, i)
                prepared[i] = (self.prepare(before), self.prepare(after))
            pair_rows = []
            for box in items:
                bounds = box.to_pixels(w, h)
                ids = []
                for side in (0, 1):
                    key = ("blank",) if bounds == blank else (i, side, bounds)
                    if key not in keys:
                        keys[key] = len(plan)
                        plan.append((i, side, bounds))
                    ids.append(keys[key])
                pair_rows.append((ids[0], ids[1]))
            rows.append(pair_rows)

        chunks = []
        for start in range(0, len(plan), self.batch_size):
            batch = []
            for i, side, (x0, y0, x1, y1) in plan[start : start + self.batch_size]:
                image = prepared[i][side].clone()
                image[:, y0:y1, x0:x1] = 0.0
                batch.append(image)
            chunks.append(self.embed(torch.stack(batch)).cpu())
        table = torch.cat(chunks) if chunks else torch.empty((0, 0))
        out: list[list[float]] = []
        for items, pair_rows in zip(boxes, rows, strict=True):
            out.append(
                [
                    float((table[a] * table[b]).sum()) - self.area_penalty * box.area
                    for box, (a, b) in zip(items, pair_rows, strict=True)
                ]
            )
        return out

    def gains(self, pairs: Sequence[ImagePair], candidates: Sequence[Sequence[BoxLike]]) -> list[list[float]]:
        """Eq. 1 normalised per pair: (sim(B) - sim(nothing masked)) / (1 - sim(nothing masked)), clipped to [0, 1].

        The share of the pair's CLIP dissimilarity that masking the box removes (1 = the masked images embed
        alike); :class:`SelectionRule` uses it, where the pixel scorer's counterpart is the share of the change.
        """
        import torch

        boxes = _boxes(pairs, candidates)
        scores = self.score(pairs, boxes)
        out: list[list[float]] = []
        for i, (pair, items, row) in enumerate(zip(pairs, boxes, scores, strict=True)):
            if not items:
                out.append([])
                continue
            before, after = _pair_arrays(pair, i)
            emb = self.embed(torch.stack([self.prepare(before), self.prepare(after)])).cpu()
            base = float((emb[0] * emb[1]).sum())
            span = max(1e-6, 1.0 - base)
            out.append([min(1.0, max(0.0, (s + self.area_penalty * b.area - base) / span)) for s, b in zip(row, items,
                                                                                                        strict=True)])
        return out


# --- factory ------------------------------------------------------------------------------------------------


def _device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_scorer(
    kind: Literal["clip", "pixel", "auto"] = "auto", settings: Settings | None = None
) -> BoxScorer:
    """The box scorer to use: "clip" (needs ``MCIE_CLIP_CHECKPOINT``), "pixel", or "auto" (clip when a
    checkpoint is configured, else pixel). Record ``scorer.name`` with the selections it makes."""
    settings = settings or get_settings()
    if kind not in ("clip", "pixel", "auto"):
        raise ValueError(f"box scorer: expected 'clip', 'pixel' or 'auto', got {kind!r}")
    if kind == "auto":
        kind = "clip" if settings.clip_checkpoint is not None else "pixel"
    if kind == "pixel":
        return PixelScorer()
    if settings.clip_checkpoint is None:
        raise ConfigError(
            "MCIE_CLIP_CHECKPOINT: the 'clip' box scorer needs a local open_clip checkpoint file "
            f"for MCIE_CLIP_MODEL={settings.clip_model}; set it, or use the 'pixel' scorer"
        )
    try:
        path = _resolve_checkpoint(settings.clip_checkpoint, settings.clip_model)
    except FileNotFoundError as exc:  # the message names MCIE_CLIP_CHECKPOINT (mcie.hub)
        raise ConfigError(str(exc)) from None
    device = _device(settings.device)
    precision = "fp16" if device.startswith("cuda") else "fp32"
    try:
        return ClipScorer(settings.clip_model, path, device=device, precision=precision)
    except ValueError as exc:
        raise ConfigError(f"MCIE_CLIP_MODEL / MCIE_CLIP_CHECKPOINT: {exc}") from None
