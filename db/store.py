"""The image store: the only module that reads or writes image bytes.

Images are content-addressed (sha256 of the stored bytes) and therefore deduplicated, and live behind fsspec, so a
local folder and object storage (``s3://bucket/prefix``, ``gs://...``, ``memory://``) work alike. Every image is
validated on the way in with Pillow: a real, allowed format, a file-size limit, a pixel limit checked from the
header before anything is decoded (the decompression-bomb guard), a full decode (truncated or corrupt files are
refused), and EXIF orientation applied (such an image is re-encoded losslessly as PNG, so every reader sees it
upright). A refused image raises :class:`ImageRejected` naming the file and the reason. WebP thumbnails for the web
UI are made once and cached next to the blobs.

Layout under the store root: ``images/ab/cd/<sha256>`` (format and size are in the ``images`` table) and
``thumbs/<size>/ab/<sha256>.webp``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mcie.config import Settings

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF"})
EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """An image that may not enter the store; ``str()`` names the file and the reason."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    format: str
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class ValidatedImage:
    data: bytes
    format: str
    width: int
    height: int


def validate_image(data: bytes, name: str, *, max_pixels: int, max_bytes: int) -> ValidatedImage:
    """Check that ``data`` is a complete image of an allowed format within the limits; apply EXIF orientation.

    Returns the bytes to store (the input itself unless the orientation had to be applied).
    """
    if len(data) == 0:
        raise ImageRejected(name, "the file is empty")
    if len(data) > max_bytes:
        raise ImageRejected(
            name, f"the file has {len(data):,} bytes, more than the limit of {max_bytes:,} (MCIE_MAX_IMAGE_BYTES)"
        )
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Read the header with Pillow's own bomb check lifted: ours below is stricter and names the size.
        Image.MAX_IMAGE_PIXELS = None
        probe = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(name, "not an image file (Pillow cannot identify its format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(name, f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(name, f"unreadable image header ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    fmt = (probe.format or "").upper()
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(name, f"format {fmt or 'unknown'} is not accepted (expected one of "
                            f"{', '.join(sorted(ALLOWED_FORMATS))})")
    width, height = probe.size
    if width < 1 or height < 1:
        raise ImageRejected(name, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            name,
            f"{width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(MCIE_MAX_IMAGE_PIXELS)",
        )
    image = _decode_fully(probe, name)
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in (1, None):
        upright = ImageOps.exif_transpose(image)
        out = io.BytesIO()
        upright.save(out, format="PNG", optimize=False)
        return ValidatedImage(out.getvalue(), "PNG", upright.width, upright.height)
    return ValidatedImage(data, fmt, width, height)


def _decode_fully(image: Image.Image, name: str) -> Image.Image:
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # some libraries switch this on globally
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(name, f"corrupt or truncated image data ({exc})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(name, f"refused as a decompression bomb ({exc})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return image


class ImageStore:
    """Content-addressed image blobs behind an fsspec URL."""

    def __init__(
        self,
        url: str,
        *,
        max_pixels: int = 64_000_000,
        max_bytes: int = 64 * 1024 * 1024,
        thumbnail_size: int = 384,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.thumbnail_size = thumbnail_size
        self._local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageStore:
        assert settings.blob_url is not None
        return cls(
            settings.blob_url,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            thumbnail_size=settings.thumbnail_size,
            storage_options=settings.storage_options(),
        )

    # --- paths -------------------------------------------------------------------------------------------
    def _blob_path(self, sha256: str) -> str:
        _check_sha(sha256)
        return f"{self.root}/images/{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def _thumb_path(self, sha256: str, size: int) -> str:
        return f"{self.root}/thumbs/{size}/{sha256[:2]}/{sha256}.webp"

    # --- writing -----------------------------------------------------------------------------------------
    def put_bytes(self, data: bytes, name: str = "<bytes>") -> StoredImage:
        """Validate and store ``data``; ``name`` is used in error messages. Storing the same bytes twice is a no-op."""
        checked = validate_image(data, name, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        sha = hashlib.sha256(checked.data).hexdigest()
        path = self._blob_path(sha)
        if not self.fs.exists(path):
            self._write(path, checked.data)
        return StoredImage(sha, checked.format, checked.width, checked.height, len(checked.data))

    def put_file(self, path: str | os.PathLike[str]) -> StoredImage:
        """Validate and store the image file at ``path`` (local path or fsspec URL)."""
        name = str(path)
        try:
            with fsspec.open(name, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ImageRejected(name, "file not found") from None
        except IsADirectoryError:
            raise ImageRejected(name, "is a folder, not an image file") from None
        except OSError as exc:
            raise ImageRejected(name, f"cannot be read ({exc})") from None
        return self.put_bytes(data, name)

    def put_pil(self, image: Image.Image, name: str = "<generated>", fmt: str = "PNG") -> StoredImage:
        """Store an image made in memory (previews, generated outputs), encoded losslessly by default."""
        out = io.BytesIO()
        image.save(out, format=fmt)
        return self.put_bytes(out.getvalue(), name)

    def _write(self, path: str, data: bytes) -> None:
        if self._local:
            folder = Path(path).parent
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            self.fs.pipe_file(path, data)

    # --- reading -----------------------------------------------------------------------------------------
    def exists(self, sha256: str) -> bool:
        return self.fs.exists(self._blob_path(sha256))

    def get(self, sha256: str) -> bytes:
        """The stored bytes of an image; KeyError if the store has no such image."""
        try:
            return self.fs.cat_file(self._blob_path(sha256))
        except FileNotFoundError:
            raise KeyError(f"image {sha256} is not in the store at {self.url}") from None

    def open(self, sha256: str, mode: str = "RGB") -> Image.Image:
        image = Image.open(io.BytesIO(self.get(sha256)))
        image.load()
        return image.convert(mode) if mode and image.mode != mode else image

    def thumbnail(self, sha256: str, size: int | None = None) -> bytes:
        """A WebP thumbnail whose longest side is ``size`` (default the configured size), made once and cached."""
        size = size or self.thumbnail_size
        path = self._thumb_path(sha256, size)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            pass
        image = self.open(sha256)
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="WEBP", quality=85, method=4)
        data = out.getvalue()
        self._write(path, data)
        return data


def _check_sha(sha256: str) -> None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")


def register_images(session: Session, images: Iterable[StoredImage]) -> None:
    """Insert rows into ``images`` for stored images that have none yet (idempotent, one statement)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from mcie.db.models import Image as ImageRow

    rows = {
        img.sha256: {
            "sha256": img.sha256,
            "format": img.format,
            "width": img.width,
            "height": img.height,
            "size_bytes": img.size_bytes,
        }
        for img in images
    }
    if not rows:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(ImageRow).values(list(rows.values())).on_conflict_do_nothing(index_elements=["sha256"]))
