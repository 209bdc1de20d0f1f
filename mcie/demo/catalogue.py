"""What the demo draws from: the photographs of scikit-image with their objects and paste sources, the edits and
their weights, colours and tones (constants and a cached loader; no randomness here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1
PixelBox = tuple[int, int, int, int]

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
