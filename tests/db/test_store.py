"""The image store validates every image on the way in and stores it once, by content."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from mcie.db.store import ImageRejected, ImageStore, validate_image


def _png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (with a valid CRC) but carries almost no data."""
    data = bytearray(_png((8, 8)))
    ihdr_start = 8 + 4  # signature, then chunk length
    assert data[ihdr_start : ihdr_start + 4] == b"IHDR"
    body = bytearray(data[ihdr_start + 4 : ihdr_start + 4 + 13])
    body[0:8] = struct.pack(">II", width, height)
    data[ihdr_start + 4 : ihdr_start + 4 + 13] = body
    crc = zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF
    data[ihdr_start + 4 + 13 : ihdr_start + 4 + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_put_is_content_addressed_and_deduplicated(store: ImageStore, tmp_path) -> None:
    data = _png()
    first = store.put_bytes(data, "a.png")
    path = tmp_path / "copy.png"
    path.write_bytes(data)
    second = store.put_file(path)
    assert first == second
    assert (first.width, first.height, first.format) == (64, 48, "PNG")
    assert store.get(first.sha256) == data
    blobs = [p for p in (tmp_path / "blobs" / "images").rglob("*") if p.is_file()]
    assert len(blobs) == 1
    other = store.put_bytes(_png(color=(0, 0, 255)), "b.png")
    assert other.sha256 != first.sha256


def test_truncated_png_is_refused_with_path_and_reason(store: ImageStore, tmp_path) -> None:
    path = tmp_path / "truncated.png"
    full = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(full, format="PNG")
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(ImageRejected) as info:
        store.put_file(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value) or "corrupt" in str(info.value)


def test_huge_image_is_refused_before_decoding(store: ImageStore, tmp_path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_claiming(20000, 20000))
    with pytest.raises(ImageRejected) as info:
        store.put_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "20000x20000" in message and "MCIE_MAX_IMAGE_PIXELS" in message


def test_text_file_named_png_is_refused(store: ImageStore, tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageRejected, match=r"notes\.png: not an image file"):
        store.put_file(path)


def test_missing_empty_and_oversized_files(tmp_path) -> None:
    store = ImageStore(str(tmp_path / "blobs"), max_bytes=1000)
    with pytest.raises(ImageRejected, match="file not found"):
        store.put_file(tmp_path / "absent.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty"):
        store.put_file(tmp_path / "empty.png")
    big = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(big, format="PNG")
    with pytest.raises(ImageRejected, match="MCIE_MAX_IMAGE_BYTES"):
        store.put_bytes(big.getvalue(), "big.png")


def test_exif_orientation_is_applied(store: ImageStore) -> None:
    image = Image.new("RGB", (80, 40), (10, 200, 10))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # a red corner to follow through the rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif, quality=95)
    stored = store.put_bytes(out.getvalue(), "phone.jpg")
    assert (stored.width, stored.height) == (40, 80)
    assert stored.format == "PNG"
    upright = store.open(stored.sha256)
    assert upright.size == (40, 80)
    r, g, _ = upright.getpixel((35, 3))
    assert r > 150 and g < 100  # the red corner moved to the top right


def test_disallowed_format_is_refused() -> None:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, format="GIF")
    with pytest.raises(ImageRejected, match="GIF is not accepted"):
        validate_image(out.getvalue(), "anim.gif", max_pixels=10**6, max_bytes=10**6)


def test_thumbnail_is_webp_and_cached(store: ImageStore, tmp_path) -> None:
    stored = store.put_bytes(_png((1000, 500)), "wide.png")
    thumb = store.thumbnail(stored.sha256, size=128)
    image = Image.open(io.BytesIO(thumb))
    assert image.format == "WEBP" and max(image.size) == 128
    cached = list((tmp_path / "blobs" / "thumbs" / "128").rglob("*.webp"))
    assert len(cached) == 1
    assert store.thumbnail(stored.sha256, size=128) == thumb


def test_object_storage_url_works_alike() -> None:
    store = ImageStore("memory://mcie-test-bucket/blobs")
    stored = store.put_bytes(_png(), "a.png")
    assert store.exists(stored.sha256)
    assert store.get(stored.sha256) == _png()
    with pytest.raises(KeyError):
        store.get("0" * 64)


def test_register_images_is_idempotent(migrated_url: str, store: ImageStore) -> None:
    from sqlalchemy import func, select

    from mcie.db.models import Image as ImageRow
    from mcie.db.session import session_scope
    from mcie.db.store import register_images

    a = store.put_bytes(_png(), "a.png")
    b = store.put_bytes(_png(color=(1, 2, 3)), "b.png")
    for _ in range(2):
        with session_scope(migrated_url) as session:
            register_images(session, [a, b, a])
    with session_scope(migrated_url) as session:
        assert session.scalar(select(func.count()).select_from(ImageRow)) == 2
