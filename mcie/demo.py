"""``mcie demo``: a small multi-turn editing dataset in the SEED-Data-Edit Part-3 layout, built offline.

Source pictures are the real photographs that ship inside scikit-image (``skimage.data``: astronaut, cat,
coffee, rocket, motorcycle, cameraman), cropped, sometimes mirrored, and resized to 320-384 px. Each instance
gets 2-5 turns of real region edits done with OpenCV/numpy - recolouring an object (hue shift inside its
mask), removing it by ``cv2.inpaint``, pasting an object cut from another photograph or a drawn shape,
brightening, blurring or greying a region, and now and then a global tone (sunset, fog, night, winter) - each
with an instruction that says what was done and where ("make the spoon in the lower right blue").

The annotations follow :mod:`pipeline.seed_format` exactly (``annotations/split_000N.jsonl``, JPEG images
under ``images/data/``). The ground truth - per-turn box (normalised ``x0, y0, x1, y1``), operation (add /
remove / change) and which turns edit the same region twice (about one instance in six has such a conflict)
- goes to a sidecar ``demo_truth.jsonl``, never into the SEED files. Everything is drawn from one seed: the
same seed gives byte-identical files.

It lives beside the ``mcie`` shell, not in ``pipeline/``: it is no stage but the input the stages are tried on
(``mcie demo``, the tests, the benchmarks); it only writes the layout :mod:`pipeline.seed_format` reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from mcie.pipeline import seed_format as sf

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1
PixelBox = tuple[int, int, int, int]

TRUTH_FILE = "demo_truth.jsonl"
# The pictures' terms, recorded at ingest instead of SEED-Data-Edit's: scikit-image's astronaut and rocket are public
# domain, cat, coffee and cameraman CC0, the motorcycle is from the Middlebury 2014 stereo benchmark (research use);
# no single SPDX id covers them, hence Hugging Face's "other".
DEMO_LICENSE = "other"
LINES_PER_SPLIT = 20
JPEG_QUALITY = 92
CONFLICT_SHARE = 0.17
MIN_TURNS, MAX_TURNS = 2, 5
LONG_SIDES = (320, 352, 384)
CHANGE_THRESHOLD = 30  # a pixel counts as edited when a channel moves by more than this

OPERATION = {
    "recolour": "change",
    "brighten": "change",
    "blur": "change",
    "desaturate": "change",
    "global": "change",
    "remove": "remove",
    "add": "add",
}
EDIT_WEIGHTS = {
    "recolour": 0.30,
    "add": 0.26,
    "remove": 0.18,
    "brighten": 0.08,
    "blur": 0.07,
    "desaturate": 0.06,
    "global": 0.05,
}
COLOURS = {  # OpenCV hue, 0..179
    "red": 0,
    "orange": 12,
    "yellow": 27,
    "green": 60,
    "teal": 87,
    "blue": 112,
    "purple": 138,
    "pink": 163,
}
TONES = {
    "sunset": ("make it look like sunset", "bathe the whole picture in a warm sunset glow"),
    "fog": ("make the scene look foggy", "cover the whole picture in light fog"),
    "night": ("make it look like night time", "turn the scene into a night shot"),
    "winter": ("apply a cold winter tone to the picture", "make the whole image look cold and wintry"),
}


# --- catalogue of the photographs ------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """A named region of a photograph, the edits that make sense on it, and how to find its pixels.

    ``mask`` is ``cut`` (GrabCut inside the box), ``key`` (pixels close in colour to the ``key`` point, by
    default the box centre) or ``ellipse`` (a soft ellipse inscribed in the box).
    """

    name: str
    box: Box
    edits: frozenset[str]
    mask: str = "cut"
    key: tuple[float, float] | None = None


@dataclass(frozen=True)
class PasteSource:
    """A region of a photograph to cut out (``mask`` as in :class:`SceneObject`) and paste elsewhere."""

    photo: str
    box: Box
    name: str
    noun: str
    mask: str = "cut"


def _obj(
    name: str, box: Box, edits: str, mask: str = "cut", key: tuple[float, float] | None = None
) -> SceneObject:
    return SceneObject(name, box, frozenset(edits.split()), mask, key)


def _load_photo(name: str) -> np.ndarray:
    import skimage.data as data

    loaders: dict[str, Callable[[], Any]] = {
        "astronaut": data.astronaut,
        "cat": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "motorcycle": lambda: data.stereo_motorcycle()[0],
        "cameraman": data.camera,
    }
    image = np.asarray(loaders[name]())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


PHOTOS: dict[str, tuple[SceneObject, ...]] = {
    "astronaut": (
        _obj("flag", (0.0, 0.0, 0.19, 0.72), "recolour brighten blur desaturate"),
        _obj("helmet", (0.54, 0.67, 0.98, 1.0), "brighten blur", mask="ellipse"),
        _obj("space shuttle model", (0.69, 0.0, 0.9, 0.55), "remove recolour blur"),
        _obj("mission patch", (0.26, 0.68, 0.42, 0.83), "remove recolour desaturate"),
        _obj("name tag", (0.53, 0.66, 0.65, 0.74), "remove recolour"),
        _obj("orange suit", (0.04, 0.45, 0.55, 1.0), "recolour desaturate", mask="key", key=(0.12, 0.62)),
    ),
    "cat": (
        _obj("eye", (0.29, 0.28, 0.47, 0.5), "recolour brighten"),
        _obj("eye", (0.64, 0.36, 0.79, 0.55), "recolour brighten"),
        _obj("nose", (0.5, 0.7, 0.63, 0.87), "recolour"),
    ),
    "coffee": (
        _obj("cup", (0.28, 0.03, 0.7, 0.62), "recolour brighten"),
        _obj("saucer", (0.12, 0.25, 0.82, 0.95), "recolour desaturate", mask="key", key=(0.2, 0.62)),
        _obj("spoon", (0.53, 0.58, 0.68, 0.82), "remove recolour"),
        _obj("coffee", (0.34, 0.22, 0.62, 0.48), "recolour"),
        _obj("table", (0.8, 0.0, 1.0, 0.42), "blur brighten recolour", mask="key"),
    ),
    "rocket": (
        _obj("rocket", (0.465, 0.29, 0.545, 0.93), "recolour brighten"),
        _obj("launch tower", (0.0, 0.0, 0.14, 1.0), "recolour blur brighten"),
        _obj("launch tower", (0.87, 0.0, 1.0, 1.0), "recolour blur brighten"),
        _obj("small tower", (0.26, 0.28, 0.33, 0.95), "remove", mask="ellipse"),
        _obj("small tower", (0.67, 0.28, 0.74, 0.95), "remove", mask="ellipse"),
        _obj("sky", (0.0, 0.0, 1.0, 0.26), "recolour brighten", mask="key", key=(0.3, 0.1)),
    ),
    "motorcycle": (
        _obj("motorcycle", (0.12, 0.18, 0.93, 0.85), "recolour desaturate", mask="key", key=(0.6, 0.35)),
        _obj("front wheel", (0.68, 0.52, 0.93, 0.85), "blur brighten", mask="ellipse"),
        _obj("rear wheel", (0.15, 0.46, 0.42, 0.82), "blur brighten recolour"),
        _obj("fuel tank", (0.5, 0.3, 0.68, 0.48), "recolour desaturate", mask="key", key=(0.6, 0.35)),
        _obj("seat", (0.2, 0.32, 0.48, 0.43), "brighten", mask="ellipse"),
        _obj("shelves", (0.45, 0.0, 1.0, 0.3), "blur brighten"),
        _obj("cardboard boxes", (0.7, 0.05, 0.92, 0.22), "remove recolour"),
    ),
    "cameraman": (
        _obj("camera", (0.5, 0.26, 0.65, 0.4), "recolour remove", mask="ellipse"),
        _obj("tower", (0.79, 0.22, 0.86, 0.39), "remove", mask="ellipse"),
        _obj("grass", (0.62, 0.5, 1.0, 1.0), "recolour blur", mask="key", key=(0.85, 0.8)),
        _obj("sky", (0.0, 0.0, 1.0, 0.3), "recolour brighten", mask="key", key=(0.12, 0.1)),
    ),
}
PHOTO_NAMES = tuple(PHOTOS)
# Faces: nothing is pasted over them.
PROTECTED: dict[str, tuple[Box, ...]] = {
    "astronaut": ((0.34, 0.1, 0.62, 0.42),),
    "cameraman": ((0.3, 0.12, 0.52, 0.4),),
}

PASTE_SOURCES = (
    PasteSource("cat", (0.15, 0.05, 0.92, 1.0), "cat picture", "a small picture of a cat", mask="ellipse"),
    PasteSource("coffee", (0.26, 0.0, 0.72, 0.64), "coffee cup", "a cup of coffee"),
    PasteSource("motorcycle", (0.1, 0.15, 0.95, 0.88), "motorcycle", "a small red motorcycle"),
    PasteSource("rocket", (0.44, 0.27, 0.57, 0.96), "rocket", "a small rocket"),
    PasteSource("astronaut", (0.26, 0.68, 0.42, 0.83), "patch", "a round mission patch"),
    PasteSource("astronaut", (0.69, 0.0, 0.9, 0.55), "shuttle", "a toy space shuttle"),
)
DRAWN_THINGS = ("ball", "star", "balloon", "cloud", "boat")


@cache
def photo(name: str) -> np.ndarray:
    """The full-size RGB photograph ``name`` from scikit-image (read-only, cached)."""
    image = _load_photo(name)
    image.setflags(write=False)
    return image


# --- geometry and wording ----------------------------------------------------------------------------------


def to_pixels(box: Box, width: int, height: int) -> PixelBox:
    """Pixel box (x0, y0, x1, y1), end exclusive, covering the normalised ``box``."""
    x0 = int(np.floor(box[0] * width))
    y0 = int(np.floor(box[1] * height))
    x1 = int(np.ceil(box[2] * width))
    y1 = int(np.ceil(box[3] * height))
    return max(0, x0), max(0, y0), min(width, max(x1, x0 + 1)), min(height, max(y1, y0 + 1))


def box_area(box: Box) -> float:
    """Area of a normalised box."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersects(a: Box, b: Box, margin: float = 0.0) -> bool:
    """Whether two boxes overlap (after growing ``a`` by ``margin`` on each side)."""
    return not (
        a[2] + margin <= b[0] or b[2] <= a[0] - margin or a[3] + margin <= b[1] or b[3] <= a[1] - margin
    )


_PLACES = {
    ("top", "left"): ("in the upper left", "in the top left corner", "at the top left"),
    ("top", ""): ("at the top", "near the top", "in the upper part of the picture"),
    ("top", "right"): ("in the upper right", "in the top right corner", "at the top right"),
    ("", "left"): ("on the left", "on the left side", "at the left"),
    ("", ""): ("in the center", "in the middle", "in the middle of the picture"),
    ("", "right"): ("on the right", "on the right side", "at the right"),
    ("bottom", "left"): ("in the lower left", "in the bottom left corner", "at the bottom left"),
    ("bottom", ""): ("at the bottom", "near the bottom", "in the lower part of the picture"),
    ("bottom", "right"): ("in the lower right", "in the bottom right corner", "at the bottom right"),
}


def place_key(box: Box) -> tuple[str, str]:
    """Vertical and horizontal third of the box centre: ("top" | "" | "bottom", "left" | "" | "right")."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    horizontal = "left" if cx < 0.36 else "right" if cx > 0.64 else ""
    vertical = "top" if cy < 0.36 else "bottom" if cy > 0.64 else ""
    return vertical, horizontal


def position_phrase(box: Box, choice: int = 0) -> str:
    """Where a box lies, in words ("in the lower left"); ``choice`` picks one of the synonyms."""
    options = _PLACES[place_key(box)]
    return options[choice % len(options)]


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": (
        "make the {name} {pos} {colour}",
        "change the colour of the {name} {pos} to {colour}",
        "turn the {name} {pos} {colour}",
        "paint the {name} {pos} {colour}",
        "recolor the {name} {pos} so that {it_is} {colour}",
    ),
    "remove": (
        "remove the {name} {pos}",
        "erase the {name} {pos}",
        "get rid of the {name} {pos}",
        "take out the {name} {pos}",
        "delete the {name} {pos}",
    ),
    "add": (
        "add {noun} {pos}",
        "put {noun} {pos}",
        "place {noun} {pos}",
        "insert {noun} {pos}",
    ),
    "brighten": (
        "brighten the {name} {pos}",
        "make the {name} {pos} brighter",
        "lighten the {name} {pos}",
    ),
    "blur": (
        "blur the {name} {pos}",
        "make the {name} {pos} blurry",
        "soften the {name} {pos} with a strong blur",
    ),
    "desaturate": (
        "make the {name} {pos} black and white",
        "turn the {name} {pos} grey",
        "drain the colour from the {name} {pos}",
    ),
}
_INVERSE: dict[str, str] = {
    "recolour": "change the {name} {pos} back to {its} original colour",
    "remove": "put the {name} back {pos}",
    "add": "remove the {name} {pos}",
    "brighten": "make the {name} {pos} darker again",
    "blur": "make the {name} {pos} sharp again",
    "desaturate": "bring the colour back to the {name} {pos}",
    "global": "restore the original colours of the whole picture",
}


def instruction_text(
    edit: str, name: str, box: Box, *, colour: str = "", noun: str = "", variant: int = 0
) -> str:
    """The instruction of one local edit, worded from the template ``variant`` and the box's position."""
    templates = _TEMPLATES[edit]
    plural = is_plural(name)
    text = templates[variant % len(templates)].format(
        name=name,
        pos=position_phrase(box, variant // len(templates)),
        colour=colour,
        noun=noun,
        it_is="they are" if plural else "it is",
    )
    return text[0].upper() + text[1:]


def is_plural(name: str) -> bool:
    """Whether an object name is plural ("cardboard boxes", "shelves"), for agreeing pronouns."""
    last = name.split()[-1] if name.split() else name
    return last.endswith("s") and not last.endswith(("ss", "us"))


def inverse_text(edit: str, name: str, box: Box) -> str:
    """The inverse instruction that undoes one edit."""
    text = _INVERSE[edit].format(
        name=name, pos=position_phrase(box), its="their" if is_plural(name) else "its"
    )
    return text[0].upper() + text[1:]


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
def _source_cutout(index: int) -> tuple[np.ndarray, np.ndarray]:
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
    rgb, alpha = _source_cutout(index)
    size = (width, height)
    return (
        cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
        np.clip(cv2.resize(alpha, size, interpolation=cv2.INTER_AREA), 0.0, 1.0),
    )


def changed_pixels(before: np.ndarray, after: np.ndarray, threshold: int = CHANGE_THRESHOLD) -> np.ndarray:
    """Boolean map of the pixels where some channel moved by more than ``threshold``."""
    return np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=-1) > threshold


# --- building one instance -------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    box: Box
    edits: frozenset[str]
    source: tuple[str, int] | None = None  # (photo, object index) for catalogue objects
    alpha: np.ndarray | None = None  # scene-sized mask for pasted objects


@dataclass(frozen=True)
class TruthTurn:
    """Ground truth of one turn: what was done, to what, where (normalised box), and the instruction."""

    turn: int
    operation: str
    edit: str
    target: str
    box: Box
    instruction: str
    inverse_instruction: str


@dataclass
class _Scene:
    image: np.ndarray
    targets: list[_Target]
    crop: PixelBox  # of the full photograph
    flip: bool
    protected: list[Box] = field(default_factory=list)
    used: list[tuple[int, Box]] = field(default_factory=list)
    tone_used: bool = False


def _scene(photo_name: str, rng: np.random.Generator) -> _Scene:
    """Crop, maybe mirror and resize a photograph; carry its object boxes along."""
    full = photo(photo_name)
    height, width = full.shape[:2]
    fx, fy = rng.uniform(0.84, 1.0, size=2)
    ox, oy = rng.uniform(0.0, 1.0 - fx), rng.uniform(0.0, 1.0 - fy)
    x0, y0, x1, y1 = to_pixels((ox, oy, ox + fx, oy + fy), width, height)
    crop = (x0 / width, y0 / height, x1 / width, y1 / height)
    flip = bool(rng.random() < 0.5)
    image = full[y0:y1, x0:x1]
    if flip:
        image = image[:, ::-1]
    long_side = int(rng.choice(LONG_SIDES))
    scale = long_side / max(image.shape[:2])
    size = (max(16, round(image.shape[1] * scale)), max(16, round(image.shape[0] * scale)))
    image = np.ascontiguousarray(cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA))
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]

    def transform(box: Box, min_visible: float) -> Box | None:
        clipped = (max(box[0], crop[0]), max(box[1], crop[1]), min(box[2], crop[2]), min(box[3], crop[3]))
        if box_area(clipped) <= 0 or box_area(clipped) < min_visible * box_area(box):
            return None
        nx0, ny0 = (clipped[0] - crop[0]) / cw, (clipped[1] - crop[1]) / ch
        nx1, ny1 = (clipped[2] - crop[0]) / cw, (clipped[3] - crop[1]) / ch
        if flip:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        return (round(nx0, 4), round(ny0, 4), round(nx1, 4), round(ny1, 4))

    targets: list[_Target] = []
    for index, obj in enumerate(PHOTOS[photo_name]):
        box = transform(obj.box, 0.85)
        if box is not None:
            targets.append(_Target(obj.name, box, obj.edits, source=(photo_name, index)))
    protected = [b for b in (transform(p, 0.0) for p in PROTECTED.get(photo_name, ())) if b is not None]
    return _Scene(image, targets, (x0, y0, x1, y1), flip, protected)


def _mask_for(scene: _Scene, target: _Target) -> np.ndarray:
    """The target's mask in scene pixels, zero outside its box."""
    h, w = scene.image.shape[:2]
    if target.alpha is not None:
        return target.alpha
    if target.source is None:
        return ellipse_mask(h, w, to_pixels(target.box, w, h))
    x0, y0, x1, y1 = scene.crop
    mask = object_mask(*target.source)[y0:y1, x0:x1]
    if scene.flip:
        mask = mask[:, ::-1]
    mask = cv2.resize(np.ascontiguousarray(mask), (w, h), interpolation=cv2.INTER_AREA)
    bx0, by0, bx1, by1 = to_pixels(target.box, w, h)
    inside = np.zeros_like(mask)
    inside[by0:by1, bx0:bx1] = 1.0
    return np.clip(mask, 0.0, 1.0) * inside


def visible_box(alpha: np.ndarray, fallback: Box) -> Box:
    """Normalised bounding box of the pixels a soft mask can visibly change; ``fallback`` if there are none.

    This is the true box of a local edit. Every edit blends its result in through the object's mask, and a pixel
    blended at weight ``a`` moves by at most ``255 * a``, so below ``CHANGE_THRESHOLD / 255`` (about 0.12) it can
    never count as edited: the box of ``mask > CHANGE_THRESHOLD / 255`` bounds the object the edit changed. The
    rectangle the edit was placed by is not: a pasted patch keeps transparent margins (a drawn ball a tenth of its
    size on each side, a cut-out the part of its source box GrabCut left out), and the catalogue's hand-drawn
    object boxes are loose around what the mask found (the rocket's sky on both sides, the fuel tank's frame). A
    reviewer or an MLLM boxes the visible object, so that is the truth. (A removal inpaints the mask grown by a
    few pixels to leave no outline; the truth stays the object's own mask.)
    """
    h, w = alpha.shape
    ys, xs = np.nonzero(alpha > CHANGE_THRESHOLD / 255)
    if len(xs) == 0:
        return fallback
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return (round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4))


def _visible(before: np.ndarray, after: np.ndarray, mask: np.ndarray | None) -> bool:
    changed = changed_pixels(before, after)
    if mask is None:
        return float(np.abs(before.astype(np.int16) - after.astype(np.int16)).mean()) > 12
    region = mask > 0.5
    return int(region.sum()) > 0 and int(changed[region].sum()) >= 0.25 * int(region.sum())


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _free(scene: _Scene, box: Box) -> bool:
    return all(not intersects(box, used, margin=0.01) for _, used in scene.used)


def _try_local(
    scene: _Scene, target: _Target, edit: str, rng: np.random.Generator, avoid_colour: str | None = None
) -> tuple[np.ndarray, dict[str, str]] | None:
    """Apply one edit to a target; None when it would not be visible."""
    mask = _mask_for(scene, target)
    details: dict[str, str] = {}
    h, w = scene.image.shape[:2]
    if edit == "recolour":
        colours = [c for c in COLOURS if c != avoid_colour]
        order = rng.permutation(len(colours))
        for index in order[:3]:
            colour = colours[int(index)]
            after = recolour(scene.image, mask, COLOURS[colour])
            if _visible(scene.image, after, mask):
                return after, {"colour": colour}
        return None
    if edit == "remove":  # grow the mask a little (inside the box) so no outline of the object is left
        x0, y0, x1, y1 = to_pixels(target.box, w, h)
        size = max(3, int(0.08 * min(x1 - x0, y1 - y0)) | 1)
        grown = cv2.dilate((mask > 0.05).astype(np.uint8), np.ones((size, size), np.uint8)).astype(np.float32)
        inside = np.zeros_like(grown)
        inside[y0:y1, x0:x1] = 1.0
        mask = grown * inside
        after = inpaint_remove(scene.image, mask)
    elif edit == "brighten":
        after = brighten(scene.image, mask)
    elif edit == "blur":
        x0, y0, x1, y1 = to_pixels(target.box, w, h)
        after = blur_region(scene.image, mask, max(3.0, min(x1 - x0, y1 - y0) / 8))
    elif edit == "desaturate":
        after = desaturate(scene.image, mask)
    else:
        raise ValueError(f"unknown local edit {edit!r}")
    return (after, details) if _visible(scene.image, after, mask) else None


def _try_add(
    scene: _Scene, photo_name: str, rng: np.random.Generator
) -> tuple[np.ndarray, _Target, str] | None:
    """Paste a drawn or cut-out object at a free spot; returns the image, the new target and its noun."""
    h, w = scene.image.shape[:2]
    make: tuple[str, Any]
    if rng.random() < 0.5:
        choices = [i for i, source in enumerate(PASTE_SOURCES) if source.photo != photo_name]
        index = _pick(rng, choices)
        source = PASTE_SOURCES[index]
        cut_rgb = _source_cutout(index)[0]
        aspect = cut_rgb.shape[1] / cut_rgb.shape[0]
        name, noun, make = source.name, source.noun, ("cut", index)
    else:
        kind = _pick(rng, DRAWN_THINGS)
        colour = _pick(rng, tuple(COLOURS)) if kind in ("ball", "star", "balloon") else ""
        aspect = {"ball": 1.0, "star": 1.0, "balloon": 0.7, "cloud": 1.8, "boat": 1.2}[kind]
        name = f"{colour} {kind}".strip()
        article = "an" if name[0] in "aeiou" else "a"
        noun = {"cloud": "a white cloud", "boat": "a small boat"}.get(kind, f"{article} {name}")
        make = ("draw", (kind, colour))
    side = rng.uniform(0.2, 0.32) * min(w, h)
    spot = None
    for attempt in range(80):  # shrink the object every 20 failed spots
        size = side * 0.75 ** (attempt // 20)
        pw = int(np.clip(size * np.sqrt(aspect), 14, w * 0.45))
        ph = int(np.clip(size / np.sqrt(aspect), 14, h * 0.45))
        x0, y0 = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        candidate = (x0 / w, y0 / h, (x0 + pw) / w, (y0 + ph) / h)
        if _free(scene, candidate) and not any(intersects(candidate, p) for p in scene.protected):
            spot = x0, y0, pw, ph
            break
    if spot is None:
        return None
    x0, y0, pw, ph = spot
    if make[0] == "cut":
        rgb, alpha = cut_patch(make[1], pw, ph)
    else:
        rgb, alpha = draw_thing(make[1][0], make[1][1], pw, ph)
    after = paste(scene.image, rgb, alpha, x0, y0)
    box = (round(x0 / w, 4), round(y0 / h, 4), round((x0 + pw) / w, 4), round((y0 + ph) / h, 4))
    full_alpha = np.zeros((h, w), np.float32)
    full_alpha[y0 : y0 + ph, x0 : x0 + pw] = alpha
    if not _visible(scene.image, after, full_alpha):
        return None
    edits = frozenset({"recolour", "remove", "brighten", "desaturate", "blur"})
    target = _Target(name, box, edits, alpha=full_alpha)
    return after, target, noun


@dataclass
class _Instance:
    photo: str
    images: list[np.ndarray]
    turns: list[TruthTurn]
    conflicts: list[tuple[int, int]]


def _instance(photo_name: str, n_turns: int, conflict: bool, rng: np.random.Generator) -> _Instance:
    """Plan and apply the turns of one instance; a conflict instance edits one region twice."""
    scene = _scene(photo_name, rng)
    images = [scene.image]
    turns: list[TruthTurn] = []
    edited: dict[int, _Target] = {}  # turn -> what it edited (local edits only)
    colours: dict[int, str] = {}
    conflict_at = int(rng.integers(2, n_turns + 1)) if conflict else 0
    first_of_conflict = int(rng.integers(1, conflict_at)) if conflict else 0
    conflicts: list[tuple[int, int]] = []

    for turn in range(1, n_turns + 1):
        result = None
        if turn == conflict_at and first_of_conflict in edited:
            result = _conflicting_edit(scene, edited[first_of_conflict], colours.get(first_of_conflict), rng)
            if result is not None:
                conflicts.append((first_of_conflict, turn))
        if result is None:
            must_be_targetable = turn == first_of_conflict
            result = _fresh_edit(scene, photo_name, rng, targetable=must_be_targetable)
        after, target, edit, details = result
        variant = int(rng.integers(0, 15))
        if edit == "global":
            tone = details["tone"]
            text = TONES[tone][variant % 2]
            text = text[0].upper() + text[1:]
        elif edit == "add":
            text = instruction_text("add", target.name, target.box, noun=details["noun"], variant=variant)
        else:
            colour = details.get("colour", "")
            text = instruction_text(edit, target.name, target.box, colour=colour, variant=variant)
        inverse = inverse_text(edit, target.name, target.box)
        # the truth is the visible extent of what the edit changed, not the rectangle it was placed by (visible_box)
        truth_box = target.box if edit == "global" else visible_box(_mask_for(scene, target), target.box)
        turns.append(TruthTurn(turn, OPERATION[edit], edit, target.name, truth_box, text, inverse))
        if edit != "global":
            scene.used.append((turn, target.box))
            if edit != "remove":
                edited[turn] = target
            if edit == "recolour":
                colours[turn] = details["colour"]
            if edit == "add":
                scene.targets.append(target)
        else:
            scene.tone_used = True
        scene.image = after
        images.append(after)
    return _Instance(photo_name, images, turns, conflicts)


def _conflicting_edit(
    scene: _Scene, target: _Target, colour: str | None, rng: np.random.Generator
) -> tuple[np.ndarray, _Target, str, dict[str, str]] | None:
    """Edit again the region an earlier turn edited: another colour, or remove / brighten / blur it."""
    options = ["recolour"] + [e for e in ("remove", "brighten", "desaturate", "blur") if e in target.edits]
    first = options[0] if rng.random() < 0.5 else _pick(rng, options)
    for edit in [first] + [o for o in options if o != first]:
        applied = _try_local(scene, target, edit, rng, avoid_colour=colour)
        if applied is not None:
            return applied[0], target, edit, applied[1]
    return None


def _fresh_edit(
    scene: _Scene, photo_name: str, rng: np.random.Generator, *, targetable: bool
) -> tuple[np.ndarray, _Target, str, dict[str, str]]:
    """An edit on a region no earlier turn touched; ``targetable`` rules out remove and global edits."""
    kinds = [k for k in EDIT_WEIGHTS if not (targetable and k in ("remove", "global"))]
    for _ in range(40):
        weights = np.array([EDIT_WEIGHTS[k] for k in kinds])
        edit = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        if edit == "global":
            if scene.tone_used:
                continue
            tone = _pick(rng, tuple(TONES))
            after = global_tone(scene.image, tone)
            if _visible(scene.image, after, None):
                return (
                    after,
                    _Target("whole picture", (0.0, 0.0, 1.0, 1.0), frozenset()),
                    "global",
                    {"tone": tone},
                )
            continue
        if edit == "add":
            added = _try_add(scene, photo_name, rng)
            if added is not None:
                return added[0], added[1], "add", {"noun": added[2]}
            continue
        candidates = [
            t
            for t in scene.targets
            if edit in t.edits and _free(scene, t.box) and (edit != "remove" or box_area(t.box) < 0.16)
        ]
        if not candidates:
            continue
        target = _pick(rng, candidates)
        applied = _try_local(scene, target, edit, rng)
        if applied is not None:
            return applied[0], target, edit, applied[1]
    raise RuntimeError(
        f"could not find a visible edit on {photo_name!r}: edited {[b for _, b in scene.used]}"
    )


# --- writing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`build_demo` wrote."""

    out_dir: Path
    n_instances: int
    n_turns: int
    n_conflicts: int
    files: tuple[Path, ...]


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False
    )
    return buffer.getvalue()


def _write(path: Path, data: bytes, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append(path)


def _prepare(out_dir: Path, overwrite: bool) -> None:
    ours = [out_dir / sf.ANNOTATIONS_DIR, out_dir / sf.IMAGES_DIR, out_dir / TRUTH_FILE]
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"demo output must be a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} is not empty; pass overwrite=True to replace a previous demo there"
            )
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def build_demo(out_dir: Path, instances: int = 30, seed: int = 0, *, overwrite: bool = False) -> DemoSummary:
    """Write ``instances`` multi-turn instances in the SEED-Data-Edit Part-3 layout under ``out_dir``.

    Layout: ``annotations/split_000N.jsonl`` (20 lines each), JPEGs under
    ``images/data/demo_seed<seed>/Data/``, ground truth in ``demo_truth.jsonl``. Deterministic in ``seed``.
    ``out_dir`` must be empty or absent unless ``overwrite`` is set, which replaces only those three entries.
    """
    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}")
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    n_conflicts = max(1, round(instances * CONFLICT_SHARE)) if instances >= 3 else 0
    conflict_ids = {int(i) for i in rng.choice(instances, size=n_conflicts, replace=False)}
    batch = f"demo_seed{seed}"
    images_root = out_dir / sf.IMAGES_DIR / sf.IMAGES_DATA_DIR

    written: list[Path] = []
    lines: list[str] = []
    truth_lines: list[str] = []
    total_turns = 0
    total_conflicts = 0
    for index in range(instances):
        instance_rng = np.random.default_rng([seed, index])
        photo_name = PHOTO_NAMES[(index + seed) % len(PHOTO_NAMES)]
        n_turns = int(instance_rng.integers(MIN_TURNS, MAX_TURNS + 1))
        built = _instance(photo_name, n_turns, index in conflict_ids, instance_rng)
        stem = hashlib.sha1(f"mcie-demo:{seed}:{index}".encode()).hexdigest()[:32]
        folder = f"{batch}/Data/{index}"
        source_rel = f"{folder}/{stem}.jpg"
        _write(images_root / source_rel, _jpeg_bytes(built.images[0]), written)
        seed_turns = []
        for truth, image in zip(built.turns, built.images[1:], strict=True):
            rel = f"{folder}/{sf.edit_image_name(stem, truth.turn)}"
            _write(images_root / rel, _jpeg_bytes(image), written)
            seed_turns.append(sf.SeedTurn(truth.turn, truth.instruction, rel, truth.inverse_instruction))
        lines.append(json.dumps(sf.build_record(source_rel, seed_turns), ensure_ascii=False))
        height, width = built.images[0].shape[:2]
        truth_lines.append(
            json.dumps(
                {
                    "dataset": sf.DATASET_NAME,
                    "external_id": sf.external_id_from_source(source_rel),
                    "photo": photo_name,
                    "width": width,
                    "height": height,
                    "turns": [
                        {
                            "turn": t.turn,
                            "operation": t.operation,
                            "edit": t.edit,
                            "target": t.target,
                            "box": list(t.box),
                            "instruction": t.instruction,
                        }
                        for t in built.turns
                    ],
                    "conflicts": [list(pair) for pair in built.conflicts],
                },
                ensure_ascii=False,
            )
        )
        total_turns += len(built.turns)
        total_conflicts += bool(built.conflicts)

    annotations = out_dir / sf.ANNOTATIONS_DIR
    for number, start in enumerate(range(0, len(lines), LINES_PER_SPLIT), start=1):
        chunk = lines[start : start + LINES_PER_SPLIT]
        _write(annotations / sf.split_file_name(number), ("\n".join(chunk) + "\n").encode(), written)
    _write(out_dir / TRUTH_FILE, ("\n".join(truth_lines) + "\n").encode(), written)
    return DemoSummary(out_dir, instances, total_turns, total_conflicts, tuple(sorted(written)))
