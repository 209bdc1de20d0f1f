"""Tests of the Qwen2.5-VL geometry: resize rule, frames, and boxes mapped back to the original image.

smart_resize is checked against transformers' own implementation and processor in test_mllm_transformers.py,
which imports transformers anyway (the import alone takes seconds).
"""

from __future__ import annotations

import pytest
from PIL import Image

from mcie.mllm.qwen import (
    box_to_original,
    boxes_to_original,
    qwen_frame,
    resize_for_qwen,
    smart_resize,
)


def test_smart_resize_examples() -> None:
    assert smart_resize(480, 640) == (476, 644)  # rounded to multiples of 28
    assert smart_resize(1080, 1920) == (728, 1316)  # shrunk under 1280 visual tokens
    assert smart_resize(10, 10) == (56, 56)  # grown to min_pixels
    h, w = smart_resize(4000, 6000, max_pixels=512 * 28 * 28)
    assert h * w <= 512 * 28 * 28 and h % 28 == 0 and w % 28 == 0


def test_smart_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="larger than max_pixels"):
        smart_resize(100, 100, min_pixels=10_000, max_pixels=100)


def test_qwen_frame_is_width_height_and_already_sized_images_are_kept() -> None:
    assert qwen_frame((1920, 1080)) == (1316, 728)  # (width, height) order
    image = Image.new("RGB", (1316, 728))
    assert resize_for_qwen(image) is image
    resized = resize_for_qwen(Image.new("RGBA", (1920, 1080)))
    assert resized.size == (1316, 728) and resized.mode == "RGB"
    assert resize_for_qwen(Image.new("RGB", (100, 100)), size=(56, 84)).size == (56, 84)


def test_box_to_original_scales_each_axis_and_clips() -> None:
    frame, original = (1316, 728), (1920, 1080)
    x0, y0, x1, y1 = box_to_original((131.6, 72.8, 658.0, 364.0), frame, original)
    assert (x0, y0, x1, y1) == pytest.approx((192.0, 108.0, 960.0, 540.0))
    assert box_to_original((-10, -10, 2000, 2000), frame, original) == (0.0, 0.0, 1920.0, 1080.0)
    assert boxes_to_original([(0, 0, 1316, 728)], frame, original) == [(0.0, 0.0, 1920.0, 1080.0)]
    with pytest.raises(ValueError, match="positive sizes"):
        box_to_original((0, 0, 1, 1), (0, 10), original)


def test_a_box_drawn_on_the_resized_image_lands_on_the_same_object_in_the_original() -> None:
    original = Image.new("RGB", (1000, 700), "white")
    original.paste((255, 0, 0), (300, 200, 500, 400))  # red square
    resized = resize_for_qwen(original)
    frame = resized.size
    red = [
        (x, y)
        for y in range(frame[1])
        for x in range(frame[0])
        if resized.getpixel((x, y))[0] > 200 and resized.getpixel((x, y))[1] < 60
    ]
    xs, ys = [p[0] for p in red], [p[1] for p in red]
    box = box_to_original((min(xs), min(ys), max(xs) + 1, max(ys) + 1), frame, original.size)
    assert box == pytest.approx((300, 200, 500, 400), abs=3)
