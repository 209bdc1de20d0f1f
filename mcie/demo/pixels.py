"""The demo's pixel operations, pure (new arrays in, new arrays out): masks, recolouring, removal by inpainting,
pasting, drawn shapes, tones, and which pixels an edit changed."""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

from mcie.demo.catalogue import (
    CHANGE_THRESHOLD,
    COLOURS,
    DRAWN_THINGS,
    PASTE_SOURCES,
    PHOTOS,
    TONES,
    Box,
    PixelBox,
    photo,
)
from mcie.demo.wording import to_pixels

# --- pixel operations (pure: new arrays in, new arrays out) --------------------------------------------


def ellipse_mask(height: int, width: int, box: PixelBox) -> np.ndarray:
    """Soft (float 0..1) ellipse inscribed in ``box``; exactly zero outside the box."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    hard = np.zeros((height, width), np.uint8)
    feather = max(1, min(bw, bh) // 10)
    axes = (max(1, bw // 2 - feather), max(1, bh // 2 - feather))
    cv2.ellipse(hard, ((x0 + x1) // 2, (y0 + y1) // 2), axes, 0, 0, 360, 255, -1)
    soft = cv2.GaussianBlur(hard.astype(np.float32) / 255.0, (0, 0), max(0.8, feather / 2))
    inside = np.zeros_like(soft)
    inside[y0:y1, x0:x1] = 1.0
    return soft * inside


def colour_key_mask(image: np.ndarray, box: PixelBox, key: tuple[int, int]) -> np.ndarray:
    """Soft mask of the pixels in ``box`` whose colour is close (in Lab) to the colour around ``key``."""
    x0, y0, x1, y1 = box
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    kx, ky = key
    patch = lab[max(0, ky - 2) : ky + 3, max(0, kx - 2) : kx + 3].reshape(-1, 3)
    reference = np.median(patch, axis=0)
    distance = np.linalg.norm(lab - reference, axis=-1)
    hard = np.zeros(image.shape[:2], np.uint8)
    hard[y0:y1, x0:x1] = (distance[y0:y1, x0:x1] < 32).astype(np.uint8) * 255
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    hard = cv2.morphologyEx(hard, cv2.MORPH_OPEN, kernel)
    hard = cv2.morphologyEx(hard, cv2.MORPH_CLOSE, kernel)
    soft = cv2.GaussianBlur(hard.astype(np.float32) / 255.0, (0, 0), 1.2)
    inside = np.zeros_like(soft)
    inside[y0:y1, x0:x1] = 1.0
    return soft * inside


def edge_taper(height: int, width: int, box: PixelBox, share: float = 0.15) -> np.ndarray:
    """1 inside ``box``, falling linearly to 0 towards each box edge that lies inside the image (over
    ``share`` of the box size); edges on the image border stay hard. Zero outside the box."""
    x0, y0, x1, y1 = box
    ramp_x = max(1.0, share * (x1 - x0))
    ramp_y = max(1.0, share * (y1 - y0))
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5
    fx = np.ones_like(xs)
    fy = np.ones_like(ys)
    if x0 > 0:
        fx = np.minimum(fx, (xs - x0) / ramp_x)
    if x1 < width:
        fx = np.minimum(fx, (x1 - xs) / ramp_x)
    if y0 > 0:
        fy = np.minimum(fy, (ys - y0) / ramp_y)
    if y1 < height:
        fy = np.minimum(fy, (y1 - ys) / ramp_y)
    taper = np.zeros((height, width), np.float32)
    taper[y0:y1, x0:x1] = np.clip(fy[:, None], 0, 1) * np.clip(fx[None, :], 0, 1)
    return taper


def blend(image: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``edited`` where the mask is 1, ``image`` where it is 0, linear in between."""
    alpha = mask[..., None]
    out = image.astype(np.float32) * (1.0 - alpha) + edited.astype(np.float32) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def recolour(image: np.ndarray, mask: np.ndarray, hue: int) -> np.ndarray:
    """Shift the hue inside the mask to ``hue`` (OpenCV 0..179), raising weak saturation so it shows."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = hue
    hsv[..., 1] = np.maximum(hsv[..., 1], 150)
    hsv[..., 2] = np.clip(hsv[..., 2].astype(np.int16) * 0.85 + 30, 0, 255).astype(np.uint8)
    return blend(image, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), mask)


def brighten(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Lift the brightness inside the mask."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 2] = np.clip(hsv[..., 2] * 1.35 + 45, 0, 255)
    return blend(image, cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB), mask)


def blur_region(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur the masked region."""
    return blend(image, cv2.GaussianBlur(image, (0, 0), sigma), mask)


def desaturate(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey out the masked region."""
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return blend(image, grey, mask)


def inpaint_remove(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Remove what is under the mask by OpenCV inpainting (Telea); pixels outside the mask are kept."""
    hard = (mask > 0.05).astype(np.uint8) * 255
    return cv2.inpaint(image, hard, 7, cv2.INPAINT_TELEA)


def global_tone(image: np.ndarray, tone: str) -> np.ndarray:
    """Change the tone of the whole picture: ``sunset``, ``fog``, ``night`` or ``winter``."""
    f = image.astype(np.float32)
    if tone == "sunset":
        out = f * np.array([1.18, 0.9, 0.62], np.float32) + np.array([30, 8, 0], np.float32)
    elif tone == "fog":
        out = f * 0.5 + 0.5 * np.array([222, 224, 228], np.float32)
    elif tone == "night":
        out = f * np.array([0.32, 0.38, 0.62], np.float32)
    elif tone == "winter":
        out = f * np.array([0.8, 0.95, 1.15], np.float32) + np.array([10, 25, 45], np.float32)
    else:
        raise ValueError(f"unknown tone {tone!r}; expected one of {', '.join(TONES)}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def paste(image: np.ndarray, patch: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Alpha-composite an RGB patch into the image with its top-left corner at (x0, y0)."""
    h, w = patch.shape[:2]
    if x0 < 0 or y0 < 0 or x0 + w > image.shape[1] or y0 + h > image.shape[0]:
        raise ValueError(f"patch {w}x{h} at ({x0}, {y0}) does not fit into {image.shape[1]}x{image.shape[0]}")
    out = image.copy()
    region = out[y0 : y0 + h, x0 : x0 + w]
    out[y0 : y0 + h, x0 : x0 + w] = blend(region, patch, alpha)
    return out


def draw_thing(kind: str, colour: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB patch and soft alpha of a drawn object (ball, star, balloon, cloud, boat) of the given size."""
    rgb = np.zeros((height, width, 3), np.uint8)
    hard = np.zeros((height, width), np.uint8)
    hue = COLOURS.get(colour, 0)
    base = cv2.cvtColor(np.array([[[hue, 210, 230]]], np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
    fill = tuple(int(c) for c in base)
    cx, cy = width // 2, height // 2
    m = max(2, min(width, height) // 10)  # margin so the feathered alpha stays inside the patch
    if kind == "ball":
        r = min(width, height) // 2 - m
        cv2.circle(rgb, (cx, cy), r, fill, -1)
        cv2.circle(rgb, (cx - r // 3, cy - r // 3), max(1, r // 4), (255, 255, 255), -1)
        cv2.circle(hard, (cx, cy), r, 255, -1)
    elif kind == "star":
        r = min(width, height) / 2 - m
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(rgb, [points], fill)
        cv2.fillPoly(hard, [points], 255)
    elif kind == "balloon":
        rx, ry = max(2, width // 2 - m), max(2, int(height * 0.32))
        centre = (cx, m + ry)
        cv2.ellipse(rgb, centre, (rx, ry), 0, 0, 360, fill, -1)
        cv2.ellipse(hard, centre, (rx, ry), 0, 0, 360, 255, -1)
        cv2.line(rgb, (cx, m + 2 * ry), (cx, height - m), (60, 60, 60), 2)
        cv2.line(hard, (cx, m + 2 * ry), (cx, height - m), 255, 2)
    elif kind == "cloud":
        for fx, fy, fr in ((0.3, 0.6, 0.22), (0.5, 0.45, 0.3), (0.7, 0.6, 0.22), (0.5, 0.65, 0.22)):
            centre, radius = (int(fx * width), int(fy * height)), int(fr * min(width, height * 1.6))
            radius = min(radius, centre[0] - m, width - m - centre[0], centre[1] - m, height - m - centre[1])
            cv2.circle(rgb, centre, max(1, radius), (245, 245, 248), -1)
            cv2.circle(hard, centre, max(1, radius), 255, -1)
    elif kind == "boat":
        hull = np.array(
            [
                [m, int(height * 0.62)],
                [width - m, int(height * 0.62)],
                [int(width * 0.78), height - m],
                [int(width * 0.22), height - m],
            ],
            np.int32,
        )
        sail = np.array([[cx, m], [cx, int(height * 0.58)], [int(width * 0.8), int(height * 0.58)]], np.int32)
        cv2.fillPoly(rgb, [hull], (120, 70, 35))
        cv2.fillPoly(rgb, [sail], (250, 250, 250))
        cv2.line(rgb, (cx, m), (cx, int(height * 0.62)), (80, 50, 30), 2)
        cv2.fillPoly(hard, [hull, sail], 255)
        cv2.line(hard, (cx, m), (cx, int(height * 0.62)), 255, 2)
    else:
        raise ValueError(f"unknown drawn object {kind!r}; expected one of {', '.join(DRAWN_THINGS)}")
    alpha = cv2.GaussianBlur(hard.astype(np.float32) / 255.0, (0, 0), 0.8)
    return rgb, alpha


def grabcut_mask(image: np.ndarray, box: PixelBox) -> np.ndarray | None:
    """Soft mask of the object inside ``box`` found by OpenCV GrabCut; None when it finds almost nothing.

    Runs on a crop around the box scaled to at most 160 px, with OpenCV's RNG seeded, so it is fast and
    deterministic. The mask is zero outside the box.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    margin = max(4, int(0.15 * max(x1 - x0, y1 - y0)))
    cx0, cy0, cx1, cy1 = max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # GrabCut wants BGR
    scale = min(1.0, 160 / max(crop.shape[:2]))
    small_w, small_h = max(8, round(crop.shape[1] * scale)), max(8, round(crop.shape[0] * scale))
    small = cv2.resize(crop, (small_w, small_h), interpolation=cv2.INTER_AREA)
    rx, ry = round((x0 - cx0) * scale), round((y0 - cy0) * scale)
    rect = (
        rx,
        ry,
        max(2, min(small_w - rx, round((x1 - x0) * scale))),
        max(2, min(small_h - ry, round((y1 - y0) * scale))),
    )
    labels = np.zeros((small_h, small_w), np.uint8)
    cv2.setRNGSeed(20240407)
    try:
        cv2.grabCut(small, labels, rect, np.zeros((1, 65)), np.zeros((1, 65)), 4, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return None
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    count, components, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if count > 2:  # keep the large pieces, drop specks
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.flatnonzero(areas >= 0.15 * areas.max()) + 1
        fg = np.isin(components, keep).astype(np.uint8)
    full = np.zeros((h, w), np.float32)
    full[cy0:cy1, cx0:cx1] = cv2.resize(fg.astype(np.float32), (cx1 - cx0, cy1 - cy0))
    inside = np.zeros_like(full)
    inside[y0:y1, x0:x1] = 1.0
    hard = (full > 0.5).astype(np.float32) * inside
    share = float(hard[y0:y1, x0:x1].mean())
    if not 0.1 <= share <= 0.97:
        return None
    return cv2.GaussianBlur(hard, (0, 0), 1.0) * inside


def region_mask(image: np.ndarray, box: Box, mode: str, key: tuple[float, float] | None = None) -> np.ndarray:
    """Soft mask (float 0..1, zero outside the box) of an object: ``cut``, ``key`` or ``ellipse``, with the
    ellipse as fallback when the other two find too little."""
    h, w = image.shape[:2]
    pixels = to_pixels(box, w, h)
    mask = None
    if mode == "cut":
        mask = grabcut_mask(image, pixels)
    elif mode == "key":
        kx, ky = key if key is not None else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        point = (min(w - 1, max(0, int(kx * w))), min(h - 1, max(0, int(ky * h))))
        mask = colour_key_mask(image, pixels, point) * edge_taper(h, w, pixels)
        area = (pixels[2] - pixels[0]) * (pixels[3] - pixels[1])
        if (mask > 0.5).sum() < 0.03 * area:
            mask = None
    elif mode != "ellipse":
        raise ValueError(f"unknown mask mode {mode!r}; expected cut, key or ellipse")
    return mask if mask is not None else ellipse_mask(h, w, pixels)


@cache
def object_mask(photo_name: str, index: int) -> np.ndarray:
    """Full-size mask of object ``index`` of a photograph (cached, read-only)."""
    obj = PHOTOS[photo_name][index]
    mask = region_mask(photo(photo_name), obj.box, obj.mask, obj.key)
    mask.setflags(write=False)
    return mask


@cache
def source_cutout(index: int) -> tuple[np.ndarray, np.ndarray]:
    source = PASTE_SOURCES[index]
    full = photo(source.photo)
    x0, y0, x1, y1 = to_pixels(source.box, full.shape[1], full.shape[0])
    alpha = region_mask(full, source.box, source.mask)[y0:y1, x0:x1]
    rgb = np.ascontiguousarray(full[y0:y1, x0:x1])
    rgb.setflags(write=False)
    alpha.setflags(write=False)
    return rgb, alpha


def cut_patch(index: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB patch and soft alpha of paste source ``index``, cut from its photograph and resized."""
    rgb, alpha = source_cutout(index)
    size = (width, height)
    return (
        cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
        np.clip(cv2.resize(alpha, size, interpolation=cv2.INTER_AREA), 0.0, 1.0),
    )


def changed_pixels(before: np.ndarray, after: np.ndarray, threshold: int = CHANGE_THRESHOLD) -> np.ndarray:
    """Boolean map of the pixels where some channel moved by more than ``threshold``."""
    return np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=-1) > threshold
