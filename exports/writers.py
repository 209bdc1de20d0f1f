"""Dataset writers: JSONL + image files, Parquet shards (Hugging Face Image layout), WebDataset tar shards.

Every writer takes :class:`~exports.records.ExportRecord` objects one at a time, in sample id order, and writes them
into a folder (the export's temporary folder: :mod:`exports.api` makes the export atomic). Output is a function of
the records alone, byte for byte: no timestamps, fixed ordering, fixed tar headers, fixed Parquet options.

* ``jsonl``: ``train.jsonl`` and ``val.jsonl`` (one record per line, image ``path`` relative to the folder) and
  ``images/<sha256>.<ext>``, each image written once however many records use it.
* ``parquet``: ``<split>-00000-of-0000N.parquet`` shards of ``shard_size`` records with the images embedded as
  ``{"bytes", "path"}`` structs and the ``huggingface`` features metadata in the schema, so
  ``datasets.load_dataset("parquet", ...)`` decodes them as PIL images. Provenance is a JSON string column.
* ``webdataset``: ``<split>-000000.tar`` shards with ``<key>.json``, ``<key>.source.<ext>``,
  ``<key>.intermediate_<turn>.<ext>`` and ``<key>.target.<ext>`` members (key = zero-padded sample id), members
  sorted, mtime 0, uid/gid 0, no user names.

Each split always gets at least one (possibly empty) file, so readers find the layout they expect.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from mcie.exports.records import ExportRecord, record_dict
from mcie.exports.splits import SPLITS, SplitName

FORMATS = ("jsonl", "parquet", "webdataset")
DEFAULT_SHARD_SIZE = 1000
_ROW_GROUP_ROWS = 256
_ROW_GROUP_BYTES = 64 * 1024 * 1024
_TAR_KEY_DIGITS = 10


class ImageFetchError(RuntimeError):
    """An image of a sample could not be read from the store (missing, unreadable, or corrupt)."""

    def __init__(self, sample_id: int, sha256: str, reason: str) -> None:
        super().__init__(f"sample {sample_id}: image {sha256}: {reason}")
        self.sample_id = sample_id
        self.sha256 = sha256
        self.reason = reason


Fetch = Callable[[int, str], bytes]


def verified_fetch(get: Callable[[str], bytes]) -> Fetch:
    """A fetch function over ``get(sha) -> bytes`` (e.g. ``ImageStore.get``) that checks each image's content hash."""

    def fetch(sample_id: int, sha: str) -> bytes:
        try:
            data = get(sha)
        except KeyError:
            raise ImageFetchError(sample_id, sha, "not in the image store") from None
        except (OSError, ValueError) as exc:
            raise ImageFetchError(sample_id, sha, f"cannot be read from the image store ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != sha:
            raise ImageFetchError(sample_id, sha, "the stored bytes do not match their sha256 (corrupt blob)")
        return data

    return fetch


@dataclass(frozen=True)
class FileEntry:
    """A written file, relative to the export folder, with its sha256 (None: hash it when finalizing) and size."""

    path: str
    sha256: str | None
    size: int


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class DatasetWriter(ABC):
    """Streams records into ``root``; :meth:`close` finishes the files and lists them."""

    format: ClassVar[str]

    def __init__(self, root: Path, fetch: Fetch, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1; got {shard_size}")
        self.root = root
        self.fetch = fetch
        self.shard_size = shard_size
        self.counts: dict[SplitName, int] = dict.fromkeys(SPLITS, 0)

    def write(self, record: ExportRecord) -> None:
        self._write(record)
        self.counts[record.split] += 1

    @abstractmethod
    def _write(self, record: ExportRecord) -> None: ...

    @abstractmethod
    def close(self) -> list[FileEntry]: ...

    @abstractmethod
    def abort(self) -> None:
        """Release open files after a failure (the folder is thrown away)."""

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------------------------------------
# JSONL + images


class JsonlWriter(DatasetWriter):
    format = "jsonl"

    def __init__(self, root: Path, fetch: Fetch, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        super().__init__(root, fetch, shard_size)
        (root / "images").mkdir(parents=True, exist_ok=True)
        self._files = {split: (root / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") for split in SPLITS}
        self._images: dict[str, tuple[str, int]] = {}  # relative path -> (sha256, size)

    def _image(self, sample_id: int, sha: str, ext: str) -> str:
        rel = f"images/{sha}.{ext}"
        if rel not in self._images:
            data = self.fetch(sample_id, sha)
            (self.root / rel).write_bytes(data)
            self._images[rel] = (sha, len(data))
        return rel

    def _write(self, record: ExportRecord) -> None:
        paths = {role: self._image(record.sample_id, img.sha256, img.extension) for role, img in record.images()}
        line = json.dumps(record_dict(record, paths), ensure_ascii=False, separators=(",", ":"))
        self._files[record.split].write(line + "\n")

    def close(self) -> list[FileEntry]:
        for handle in self._files.values():
            handle.close()
        entries = [FileEntry(f"{split}.jsonl", None, (self.root / f"{split}.jsonl").stat().st_size) for split in SPLITS]
        entries += [FileEntry(rel, sha, size) for rel, (sha, size) in self._images.items()]
        return entries

    def abort(self) -> None:
        for handle in self._files.values():
            handle.close()


# ----------------------------------------------------------------------------------------------------------
# Parquet (Hugging Face datasets layout)

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_SUB = pa.struct(
    [
        ("turn_index", pa.int32()),
        ("text", pa.string()),
        ("operation", pa.string()),
        ("box", pa.list_(pa.float64())),
        ("box_source", pa.string()),
        ("box_score", pa.float64()),
    ]
)


def _value(dtype: str) -> dict[str, str]:
    return {"dtype": dtype, "_type": "Value"}


# The `datasets` features of the schema, in the form every datasets release since 2.x reads (a JSON list is a list of
# that feature; "Sequence" of a plain value is a list of it).
HF_FEATURES: dict[str, Any] = {
    "schema_version": _value("int32"),
    "sample_id": _value("int64"),
    "instance_id": _value("int64"),
    "dataset": _value("string"),
    "external_id": _value("string"),
    "first_turn": _value("int32"),
    "last_turn": _value("int32"),
    "status": _value("string"),
    "split": _value("string"),
    "instruction": _value("string"),
    "source_image": {"_type": "Image"},
    "target_image": {"_type": "Image"},
    "intermediate_images": [{"_type": "Image"}],
    "sub_instructions": [
        {
            "turn_index": _value("int32"),
            "text": _value("string"),
            "operation": _value("string"),
            "box": {"feature": _value("float64"), "_type": "Sequence"},
            "box_source": _value("string"),
            "box_score": _value("float64"),
        }
    ],
    "provenance": _value("string"),
}

PARQUET_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("sample_id", pa.int64()),
        ("instance_id", pa.int64()),
        ("dataset", pa.string()),
        ("external_id", pa.string()),
        ("first_turn", pa.int32()),
        ("last_turn", pa.int32()),
        ("status", pa.string()),
        ("split", pa.string()),
        ("instruction", pa.string()),
        ("source_image", _IMAGE),
        ("target_image", _IMAGE),
        ("intermediate_images", pa.list_(_IMAGE)),
        ("sub_instructions", pa.list_(_SUB)),
        ("provenance", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}}, separators=(",", ":"))},
)


def parquet_row(record: ExportRecord, fetch: Fetch) -> dict[str, Any]:
    """One Parquet row: the record's fields with embedded images (``path`` = ``<sha256>.<ext>``)."""

    def image(sha: str, ext: str) -> dict[str, Any]:
        return {"bytes": fetch(record.sample_id, sha), "path": f"{sha}.{ext}"}

    return {
        "schema_version": record.schema_version,
        "sample_id": record.sample_id,
        "instance_id": record.instance_id,
        "dataset": record.dataset,
        "external_id": record.external_id,
        "first_turn": record.first_turn,
        "last_turn": record.last_turn,
        "status": record.status,
        "split": record.split,
        "instruction": record.instruction,
        "source_image": image(record.source_image.sha256, record.source_image.extension),
        "target_image": image(record.target_image.sha256, record.target_image.extension),
        "intermediate_images": [image(i.sha256, i.extension) for i in record.intermediate_images],
        "sub_instructions": [
            {
                "turn_index": s.turn_index,
                "text": s.text,
                "operation": s.operation,
                "box": None if s.box is None else list(s.box),
                "box_source": s.box_source,
                "box_score": s.box_score,
            }
            for s in record.sub_instructions
        ],
        "provenance": record.provenance.model_dump_json(),
    }


def _row_bytes(row: dict[str, Any]) -> int:
    images = [row["source_image"], row["target_image"], *row["intermediate_images"]]
    return sum(len(i["bytes"]) for i in images)


class _ParquetSplit:
    """The shards of one split: rows are buffered into row groups; shards are renamed ``-of-N`` at the end."""

    def __init__(self, root: Path, split: str, shard_size: int) -> None:
        self.root, self.split, self.shard_size = root, split, shard_size
        self.shards: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0

    def _open(self) -> pq.ParquetWriter:
        path = self.root / f".{self.split}-{len(self.shards):05d}.parquet.partial"
        self.shards.append(path)
        self._in_shard = 0
        return pq.ParquetWriter(
            path,
            PARQUET_SCHEMA,
            compression="snappy",
            use_dictionary=["dataset", "status", "split"],
            write_statistics=["schema_version", "sample_id", "instance_id"],
            store_schema=True,
        )

    def _flush(self) -> None:
        if self._rows and self._writer is not None:
            table = pa.Table.from_pylist(self._rows, schema=PARQUET_SCHEMA)
            self._writer.write_table(table, row_group_size=len(self._rows))
        self._rows, self._bytes = [], 0

    def add(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._open()
        self._rows.append(row)
        self._bytes += _row_bytes(row)
        self._in_shard += 1
        if len(self._rows) >= _ROW_GROUP_ROWS or self._bytes >= _ROW_GROUP_BYTES or self._in_shard >= self.shard_size:
            self._flush()
        if self._in_shard >= self.shard_size:
            self._writer.close()
            self._writer = None

    def close(self) -> list[Path]:
        if self._writer is None and not self.shards:
            self._writer = self._open()  # an empty split still gets one (empty) shard
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        total = len(self.shards)
        final = []
        for i, path in enumerate(self.shards):
            target = self.root / f"{self.split}-{i:05d}-of-{total:05d}.parquet"
            path.rename(target)
            final.append(target)
        return final

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _ShardedWriter(DatasetWriter):
    """A writer with one shard sequence per split (Parquet and WebDataset): ``_split_type`` writes the shards,
    ``_item`` turns a record into what a shard takes."""

    _split_type: Any

    def __init__(self, root: Path, fetch: Fetch, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        super().__init__(root, fetch, shard_size)
        root.mkdir(parents=True, exist_ok=True)
        self._splits = {split: self._split_type(root, split, shard_size) for split in SPLITS}

    def _item(self, record: ExportRecord) -> Any:
        raise NotImplementedError

    def _write(self, record: ExportRecord) -> None:
        self._splits[record.split].add(self._item(record))

    def close(self) -> list[FileEntry]:
        paths = [p for split in SPLITS for p in self._splits[split].close()]
        return [FileEntry(p.name, None, p.stat().st_size) for p in paths]

    def abort(self) -> None:
        for split in self._splits.values():
            split.abort()


class ParquetWriter(_ShardedWriter):
    format = "parquet"
    _split_type = _ParquetSplit

    def _item(self, record: ExportRecord) -> dict[str, Any]:
        return parquet_row(record, self.fetch)


# ----------------------------------------------------------------------------------------------------------
# WebDataset


def tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar header that depends on the name and size only (mtime 0, root owner, no user names, mode 0644)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def webdataset_members(record: ExportRecord, fetch: Fetch) -> list[tuple[str, bytes]]:
    """The sorted ``(member name, bytes)`` of one sample; the JSON's image paths are the member names."""
    key = f"{record.sample_id:0{_TAR_KEY_DIGITS}d}"
    members: list[tuple[str, bytes]] = []
    paths: dict[str, str] = {}
    for role, image in record.images():
        suffix = role if not role.startswith("intermediate_") else f"intermediate_{image.after_turn:03d}"
        name = f"{key}.{suffix}.{image.extension}"
        paths[role] = name
        members.append((name, fetch(record.sample_id, image.sha256)))
    data = json.dumps(record_dict(record, paths), ensure_ascii=False, separators=(",", ":")).encode()
    members.append((f"{key}.json", data))
    return sorted(members)


class _TarSplit:
    def __init__(self, root: Path, split: str, shard_size: int) -> None:
        self.root, self.split, self.shard_size = root, split, shard_size
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _open(self) -> tarfile.TarFile:
        path = self.root / f"{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(path)
        self._in_shard = 0
        return tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, members: Iterable[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._tar = self._open()
        for name, data in members:
            self._tar.addfile(*tar_member(name, data))
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._tar.close()
            self._tar = None

    def close(self) -> list[Path]:
        if self._tar is None and not self.shards:
            self._tar = self._open()
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.fileobj.close()  # type: ignore[union-attr]
            self._tar = None


class WebDatasetWriter(_ShardedWriter):
    format = "webdataset"
    _split_type = _TarSplit

    def _item(self, record: ExportRecord) -> Iterable[tuple[str, bytes]]:
        return webdataset_members(record, self.fetch)


WRITERS: dict[str, type[DatasetWriter]] = {w.format: w for w in (JsonlWriter, ParquetWriter, WebDatasetWriter)}


def make_writer(fmt: str, root: Path, fetch: Fetch, shard_size: int = DEFAULT_SHARD_SIZE) -> DatasetWriter:
    try:
        cls = WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})") from None
    return cls(root, fetch, shard_size)
