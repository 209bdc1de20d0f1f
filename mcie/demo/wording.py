"""The demo's geometry and wording: boxes in pixels, overlaps, and the instruction that says what a turn did and where
("make the spoon in the lower right blue"), with its inverse."""

from __future__ import annotations

import numpy as np

from mcie.demo.catalogue import Box, PixelBox

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
