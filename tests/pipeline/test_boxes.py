"""Tests of the Box type and of candidate boxes found from the pixel difference of synthetic edits."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from mcie.geometry import Box
from mcie.pipeline.boxes import Candidate, change_mask, dedupe, diff_boxes, to_rgb_array, union_mask

# --- synthetic scenes ---------------------------------------------------------------------------------------


def scene(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """A gradient with random coloured rectangles and mild sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([80 + 100 * xx / w, 60 + 120 * yy / h, 150 - 60 * xx / w], axis=2)
    for _ in range(12):
        colour = rng.integers(0, 255, 3).tolist()
        x0, y0 = int(rng.integers(0, max(1, w - 20))), int(rng.integers(0, max(1, h - 20)))
        x1, y1 = x0 + int(rng.integers(10, 60)), y0 + int(rng.integers(10, 60))
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, -1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


RECT = (96, 60, 176, 144)  # x0, y0, x1, y1 on the 320 x 240 scene


def truth(rect: tuple[int, int, int, int] = RECT, w: int = 320, h: int = 240) -> Box:
    return Box.from_pixels(*rect, w, h)


def recolour(img: np.ndarray, rect=RECT) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = rect
    after = img.copy()
    after[y0:y1, x0:x1] = np.roll(after[y0:y1, x0:x1], 1, axis=2)  # hue rotation R->G->B
    return img, after


def inpaint_like(img: np.ndarray, rect=RECT) -> tuple[np.ndarray, np.ndarray]:
    """An object (checkerboard) removed by blurring it away, as an inpainting model would."""
    x0, y0, x1, y1 = rect
    before = img.copy()
    yy, xx = np.mgrid[y0:y1, x0:x1]
    before[y0:y1, x0:x1] = np.where((((xx // 8) + (yy // 8)) % 2)[..., None] == 1, 235, 25)
    after = before.copy()
    after[y0:y1, x0:x1] = cv2.GaussianBlur(np.ascontiguousarray(before[y0:y1, x0:x1]), (0, 0), 12)
    return before, after


def pasted(img: np.ndarray, rect=RECT) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = rect
    after = img.copy()
    patch = scene(y1 - y0, x1 - x0, seed=7)
    cv2.circle(patch, ((x1 - x0) // 2, (y1 - y0) // 2), 15, (250, 250, 20), -1)
    after[y0:y1, x0:x1] = patch
    return img, after


EDITS = {"recolour": recolour, "inpaint": inpaint_like, "paste": pasted}


# --- Box ----------------------------------------------------------------------------------------------------


def test_box_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"Box\.x0"):
        Box(-0.1, 0, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"Box\.y1"):
        Box(0, 0, 0.5, 1.2)
    with pytest.raises(ValueError, match="x0 < x1"):
        Box(0.5, 0, 0.5, 1)
    with pytest.raises(ValueError, match="y0 < y1"):
        Box(0, 0.7, 1, 0.2)
    with pytest.raises(ValueError, match=r"Box\.x1"):
        Box(0, 0, float("nan"), 1)
    with pytest.raises(ValueError, match=r"Box\.x0"):
        Box("0", 0, 1, 1)  # type: ignore[arg-type]


def test_box_pixels_round_trip_and_mask() -> None:
    box = Box.from_pixels(3, 2, 6, 5, 10, 8)
    assert box.as_tuple() == pytest.approx((0.3, 0.25, 0.6, 0.625))
    assert box.to_pixels(10, 8) == (3, 2, 6, 5)
    m = box.mask(8, 10)
    assert m.shape == (8, 10) and m.dtype == bool
    assert m.sum() == 3 * 3 and m[2:5, 3:6].all()
    # on a coarser grid the covering pixel rectangle is returned, never empty
    assert Box(0.31, 0.26, 0.32, 0.27).to_pixels(10, 8) == (3, 2, 4, 3)
    assert Box(0, 0, 1, 1).to_pixels(7, 5) == (0, 0, 7, 5)


def test_box_area_iou_pad_hull_clip() -> None:
    a = Box(0, 0, 0.5, 0.5)
    b = Box(0.25, 0.25, 0.75, 0.75)
    assert a.area == pytest.approx(0.25)
    assert a.iou(a) == pytest.approx(1.0)
    assert a.iou(b) == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert a.iou(Box(0.6, 0.6, 1, 1)) == 0.0
    assert a.pad(0.1).as_tuple() == pytest.approx((0, 0, 0.55, 0.55))
    assert Box.hull([a, b]).as_tuple() == (0, 0, 0.75, 0.75)
    assert Box.clip(-0.2, 0.1, 1.3, 0.9).as_tuple() == (0, 0.1, 1, 0.9)
    with pytest.raises(ValueError, match="no area"):
        Box.clip(1.1, 0, 1.5, 1)
    with pytest.raises(ValueError, match="at least one"):
        Box.hull([])
    assert Box.from_pixels(-5, 0, 12, 8, 10, 8, clip=True).as_tuple() == (0, 0, 1, 1)


def test_union_mask_and_dedupe() -> None:
    boxes = [Box(0, 0, 0.5, 0.5), Box(0.5, 0.5, 1, 1)]
    m = union_mask(boxes, 4, 4)
    assert m.sum() == 8 and m[0, 0] and m[3, 3] and not m[0, 3]
    assert not union_mask([], 4, 4).any()
    kept = dedupe([Box(0, 0, 0.5, 0.5), Box(0, 0, 0.5, 0.52), Box(0.5, 0.5, 1, 1)], 0.9)
    assert kept == [Box(0, 0, 0.5, 0.5), Box(0.5, 0.5, 1, 1)]


def test_candidate_validation() -> None:
    with pytest.raises(ValueError, match="source"):
        Candidate(Box(0, 0, 1, 1), "clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prior"):
        Candidate(Box(0, 0, 1, 1), "mllm", 1.5)


def test_to_rgb_array_accepts_pil_grey_rgba_and_rejects_others() -> None:
    rgb = scene(20, 30)
    assert to_rgb_array(Image.fromarray(rgb)).shape == (20, 30, 3)
    assert to_rgb_array(rgb[:, :, 0]).shape == (20, 30, 3)
    assert to_rgb_array(np.dstack([rgb, rgb[:, :, :1]])).shape == (20, 30, 3)
    with pytest.raises(ValueError, match=r"after: expected a uint8 array, got dtype float64"):
        to_rgb_array(rgb.astype(float), name="after")
    with pytest.raises(ValueError, match="HxWx3"):
        to_rgb_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="before"):
        to_rgb_array([[1]], name="before")  # type: ignore[arg-type]


# --- diff_boxes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("quality", [None, 85, 60])
def test_best_candidate_finds_the_edited_rectangle(edit: str, quality: int | None) -> None:
    before, after = EDITS[edit](scene())
    if quality is not None:  # JPEG noise everywhere, different settings for the two images
        before, after = jpeg(before, quality), jpeg(after, quality + 10)
    candidates = diff_boxes(before, after, k=3)
    assert 1 <= len(candidates) <= 3
    assert all(c.source == "diff" and c.prior is not None and 0 < c.prior <= 1 for c in candidates)
    assert max(c.box.iou(truth()) for c in candidates) > 0.7
    # the largest region comes first and fits the edit best
    assert candidates[0].box.iou(truth()) > 0.8


def test_no_change_gives_no_candidates() -> None:
    img = scene()
    assert diff_boxes(img, img) == []
    assert diff_boxes(jpeg(img, 70), jpeg(img, 70)) == []
    assert diff_boxes(jpeg(img, 90), jpeg(img, 60)) == []  # re-encoding noise alone is no edit
    assert not change_mask(img, img).any()


@pytest.mark.parametrize("shift", [40, -50])
def test_global_tone_change_gives_the_whole_image(shift: int) -> None:
    img = scene()
    after = np.clip(img.astype(int) + shift, 0, 255).astype(np.uint8)
    candidates = diff_boxes(jpeg(img, 85), jpeg(after, 85))
    assert len(candidates) == 1
    assert candidates[0].box.iou(Box(0, 0, 1, 1)) > 0.95


def test_after_of_another_size_is_resized() -> None:
    before, after = recolour(scene())
    big = cv2.resize(after, (640, 480), interpolation=cv2.INTER_CUBIC)
    candidates = diff_boxes(before, Image.fromarray(big))
    assert candidates[0].box.iou(truth()) > 0.8


def test_two_separate_edits_give_each_region_and_their_union() -> None:
    img = scene()
    first, second = (20, 20, 80, 70), (220, 150, 300, 220)
    _, after = recolour(img, first)
    _, after = pasted(after, second)
    candidates = diff_boxes(img, after, k=5)
    boxes = [c.box for c in candidates]
    union = Box.hull([truth(first), truth(second)])
    for expected in (truth(first), truth(second), union):
        assert max(b.iou(expected) for b in boxes) > 0.8
    # the union is second, right after the largest region
    assert boxes[1].iou(union) > 0.8
    # k limits the list, and no two candidates are near-duplicates
    assert len(diff_boxes(img, after, k=2)) == 2
    assert all(a.iou(b) < 0.85 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_near_fragments_are_merged_into_one_region() -> None:
    img = scene()
    _, after = pasted(img, (100, 100, 130, 140))
    _, after = pasted(after, (134, 100, 164, 140))  # 4 px apart
    candidates = diff_boxes(img, after, k=1)
    assert candidates[0].box.iou(truth((100, 100, 164, 140))) > 0.8


def test_specks_are_ignored() -> None:
    img = scene()
    after = img.copy()
    after[50:52, 50:52] = 255 - after[50:52, 50:52]  # 4 pixels
    assert diff_boxes(img, after) == []


def test_diff_boxes_rejects_bad_input() -> None:
    img = scene(20, 30)
    with pytest.raises(ValueError, match="k >= 1"):
        diff_boxes(img, img, k=0)
    with pytest.raises(ValueError, match="before"):
        diff_boxes(img.astype(np.float32), img)
