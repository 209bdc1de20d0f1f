"""Qwen2.5-VL image geometry: the processor's resize rule, and boxes mapped from its pixels to the original.

Qwen2.5-VL answers grounding questions with absolute pixel boxes in the image *as its processor resized it*:
both sides rounded to multiples of 28 (14-pixel patches merged 2x2) with the area kept within
[min_pixels, max_pixels]. :func:`smart_resize` is that rule; boxes are mapped back to the original image with
:func:`box_to_original`. The prompt builders resize images on the client to exactly this size, so the server's
processor leaves them alone and the coordinate frame of an answer is known.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from PIL import Image

PATCH_FACTOR = 28
# Defaults of transformers' Qwen2VLImageProcessor (size shortest_edge / longest_edge).
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 28 * 28 * 1280
# max_pixels in the preprocessor_config.json published with Qwen/Qwen2.5-VL-*-Instruct (16384 visual tokens).
HUB_MAX_PIXELS = 28 * 28 * 16384
MAX_ASPECT_RATIO = 200

Box4 = tuple[float, float, float, float]


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_FACTOR,
    min_pixels: int = PROCESSOR_MIN_PIXELS,
    max_pixels: int = PROCESSOR_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) the Qwen2.5-VL processor resizes an image of ``height`` x ``width`` to.

    The same formula as ``smart_resize`` in transformers' ``models/qwen2_vl/image_processing_qwen2_vl.py``
    (used by Qwen2.5-VL's processor and by vLLM) and in Qwen's ``qwen_vl_utils.vision_process``: both sides
    become multiples of ``factor``, the area stays within [min_pixels, max_pixels], the aspect ratio is kept
    as closely as possible.
    """
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize: expected a positive height and width, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"smart_resize: min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"smart_resize: absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)} for {height}x{width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_frame(
    size: tuple[int, int], min_pixels: int = PROCESSOR_MIN_PIXELS, max_pixels: int = PROCESSOR_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of the processor's pixel space for an image of ``size`` = (width, height)."""
    height, width = smart_resize(size[1], size[0], min_pixels=min_pixels, max_pixels=max_pixels)
    return width, height


def resize_for_qwen(
    image: Image.Image,
    min_pixels: int = PROCESSOR_MIN_PIXELS,
    max_pixels: int = PROCESSOR_MAX_PIXELS,
    *,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """``image`` as RGB at its Qwen frame (or at ``size`` = (width, height) when given), bicubic like the
    processor. Returns the image itself when it already has that size and mode."""
    target = size or qwen_frame(image.size, min_pixels, max_pixels)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if rgb.size == target:
        return rgb
    return rgb.resize(target, Image.Resampling.BICUBIC)


def box_to_original(box: Box4, frame: tuple[int, int], original: tuple[int, int]) -> Box4:
    """A pixel box in the resized ``frame`` = (width, height) mapped to the ``original`` (width, height)
    image, clipped to it. Coordinates are (x0, y0, x1, y1) in pixels with x0 <= x1 and y0 <= y1 expected."""
    (fw, fh), (ow, oh) = frame, original
    if fw <= 0 or fh <= 0 or ow <= 0 or oh <= 0:
        raise ValueError(
            f"box_to_original: expected positive sizes, got frame {frame} and original {original}"
        )
    sx, sy = ow / fw, oh / fh
    x0, y0, x1, y1 = box
    return (
        min(max(x0 * sx, 0.0), float(ow)),
        min(max(y0 * sy, 0.0), float(oh)),
        min(max(x1 * sx, 0.0), float(ow)),
        min(max(y1 * sy, 0.0), float(oh)),
    )


def boxes_to_original(boxes: Iterable[Box4], frame: tuple[int, int], original: tuple[int, int]) -> list[Box4]:
    """:func:`box_to_original` for each box."""
    return [box_to_original(box, frame, original) for box in boxes]
