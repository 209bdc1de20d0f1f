"""Importing public edit datasets (MagicBrush, OmniEdit, or any dataset given a column map) as an export folder.

Stage 1 of MCIE-E1's training uses public single-edit data (the paper: a subset of OmniEdit-GoT), so ``mcie data
import`` turns a Hugging Face dataset into the record format of ``mcie export`` (:class:`exports.records.ExportRecord`
written by the same :mod:`exports.writers`, with the same ``manifest.json``), which ``mcie train`` reads unchanged.
It lives in ``exports/`` because it produces exports; it reads nothing of ``db/`` and writes only its own folder, so
the data flow stays one way (an imported sample never went through review: its provenance says so, with no reviews
and no decision).

The source is a Hub dataset id, optionally ``@revision`` (through ``datasets.load_dataset(..., streaming=True)``), or a
local Parquet / Arrow (``save_to_disk``) / JSONL file or folder, or an image folder with ``metadata.jsonl``
(``datasets``' ``imagefolder``; other image columns may hold paths relative to the folder). Rows are streamed:
image columns are read as raw bytes (never decoded, except masks) and each record is written before the next row is
read, so memory stays bounded whatever the dataset size. A row that cannot be used (a missing or unreadable image,
an empty instruction, a bad box) is reported with its row number, id and column, and the import goes on.

Column layouts of the presets, taken from the datasets' cards (``dataset_info.features``):

- ``magicbrush`` (``osunlp/MagicBrush``): ``img_id`` (str), ``turn_index`` (int32), ``source_img``, ``mask_img``,
  ``target_img`` (images), ``instruction`` (str). The card describes ``mask_img`` as a free-form mask whose white
  region is the edited area: the box is the bounding box of the pixels brighter than mid-grey (``box_source``
  ``human``; the masks were drawn by the annotators). Turns of one ``img_id`` share the instance (and the split).
- ``omniedit`` (``TIGER-Lab/OmniEdit-Filtered-1.2M``): ``omni_edit_id`` (str), ``task`` (str), ``src_img``,
  ``edited_img`` (images), ``edited_prompt_list`` (sequence of str: phrasings of one edit; the first non-empty one is
  the instruction), ``width``, ``height``, scores. No masks: the sub-instruction has no box (the whole image).

The GoT data (``OmniEdit-GoT``, the paper's stage-1 set) is not a preset: its column layout could not be confirmed
from a dataset card or loader here; import it with ``--columns``.

Each row is one sample with one sub-instruction (the row's instruction, with its box when there is a mask or a boxes
column). The operation (add / remove / change, which the model's data loader needs) comes from an operation column
(OmniEdit's ``task``) or the instruction's leading verb (:func:`operation_of`). Boxes given in a boxes column are
normalised ``[x0, y0, x1, y1]`` (one box or a list; values above 1 are read as pixels of the source image).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import ValidationError

from mcie.exports.manifest import build_manifest, resolve_hashes, write_manifest
from mcie.exports.records import (
    FORMAT_EXTENSIONS,
    SCHEMA_VERSION,
    AggregatedScores,
    ExportRecord,
    ImageRef,
    Provenance,
    SubInstructionRecord,
)
from mcie.exports.splits import SPLITS, split_for
from mcie.exports.writers import DEFAULT_SHARD_SIZE, FileEntry, make_writer

__all__ = [
    "PRESETS",
    "ColumnMap",
    "DataImportError",
    "ImportReport",
    "RowError",
    "import_dataset",
    "mask_box",
    "operation_of",
    "parse_columns",
]

_ROLES = ("source", "target", "instruction", "mask", "boxes", "id", "group", "turn", "operation")
_REQUIRED = ("source", "target", "instruction")
ERRORS_FILE = "import_errors.jsonl"


class DataImportError(ValueError):
    """The import cannot start or finish (unknown source, missing columns, destination in use)."""


class RowError(ValueError):
    """One row cannot be imported; the message names the column and what was expected."""


@dataclass(frozen=True)
class ColumnMap:
    """Which dataset column plays which role; ``group`` keys the instance (split unit), default ``id``."""

    source: str
    target: str
    instruction: str
    mask: str | None = None
    boxes: str | None = None
    id: str | None = None
    group: str | None = None
    turn: str | None = None
    operation: str | None = None

    def columns(self) -> dict[str, str]:
        return {role: name for role, name in asdict(self).items() if name}


@dataclass(frozen=True)
class Preset:
    columns: ColumnMap
    hub_id: str
    box_source: str = "human"


PRESETS: dict[str, Preset] = {
    "magicbrush": Preset(ColumnMap(source="source_img", target="target_img", instruction="instruction",
                                   mask="mask_img", id="img_id", group="img_id", turn="turn_index"),
                         "osunlp/MagicBrush"),
    "omniedit": Preset(ColumnMap(source="src_img", target="edited_img", instruction="edited_prompt_list",
                                 id="omni_edit_id", operation="task"),
                       "TIGER-Lab/OmniEdit-Filtered-1.2M"),
}


def parse_columns(text: str) -> ColumnMap:
    """``source=COL,target=COL,instruction=COL[,mask=COL][,boxes=COL][,id=COL][,group=COL][,turn=COL]
    [,operation=COL]`` to a :class:`ColumnMap`; errors name the bad part."""
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, name = part.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not name:
            raise DataImportError(f"--columns: {part!r} is not ROLE=COLUMN")
        if role not in _ROLES:
            raise DataImportError(f"--columns: unknown role {role!r} (expected {', '.join(_ROLES)})")
        values[role] = name
    missing = [role for role in _REQUIRED if role not in values]
    if missing:
        raise DataImportError(f"--columns: {', '.join(missing)} missing (source, target and instruction are needed)")
    return ColumnMap(**values)


# --------------------------------------------------------------------------------------------------------------
# pure per-row helpers

_ADD = re.compile(r"^\s*(please\s+)?(add|insert|put|place|include|draw|give)\b|\baddition\b", re.I)
_REMOVE = re.compile(r"^\s*(please\s+)?(remove|delete|erase|get rid of|take away|take out|eliminate)\b|\bremov", re.I)


def operation_of(text: str) -> str:
    """add / remove / change from an operation label (OmniEdit's ``task``) or an instruction's leading verb."""
    if _REMOVE.search(text):
        return "remove"
    if _ADD.search(text):
        return "add"
    return "change"


def mask_box(mask: Image.Image) -> tuple[float, float, float, float] | None:
    """The normalised bounding box of a mask's edited region (pixels brighter than mid-grey; an alpha channel, when
    the mask has one and it is not uniform, marks the region instead), or None for an empty mask."""
    region = np.asarray(mask.convert("L")) > 127
    if mask.mode in ("RGBA", "LA"):
        alpha = np.asarray(mask.getchannel("A"))
        if alpha.min() != alpha.max():
            region = alpha > 127
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if cols.size == 0:
        return None
    height, width = region.shape
    return (float(cols[0]) / width, float(rows[0]) / height,
            float(cols[-1] + 1) / width, float(rows[-1] + 1) / height)


def _box(values: Any, size: tuple[int, int], where: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise RowError(f"{where}: expected [x0, y0, x1, y1], got {values!r}") from None
    if max(x0, y0, x1, y1) > 1.0:  # pixels of the source image
        width, height = size
        x0, x1, y0, y1 = x0 / width, x1 / width, y0 / height, y1 / height
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in (x0, y0, x1, y1))
    if not (x0 < x1 and y0 < y1):
        raise RowError(f"{where}: expected x0 < x1 and y0 < y1, got {values!r}")
    return (x0, y0, x1, y1)


def _boxes(value: Any, size: tuple[int, int], where: str) -> list[tuple[float, float, float, float]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"{where}: not a JSON list of boxes: {value[:80]!r}") from None
    if value is None:
        return []
    if isinstance(value, Mapping):
        value = [value.get(k) for k in ("x0", "y0", "x1", "y1")]
    items = list(value)
    if items and not isinstance(items[0], (list, tuple, Mapping, np.ndarray)):
        items = [items]
    return [_box(list(v.values()) if isinstance(v, Mapping) else v, size, f"{where}[{i}]") for i, v in enumerate(items)]


def _instruction(value: Any, where: str) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        value = next((str(v) for v in value if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"{where}: expected a non-empty instruction, got {value!r}")
    return " ".join(value.split())


def _image_bytes(value: Any, where: str, base: Path | None) -> bytes:
    """Raw bytes of an image cell: ``{"bytes", "path"}`` (datasets' Image without decoding), a path, bytes or PIL."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise RowError(f"{where}: cannot read image file {path} ({exc.strerror or exc})") from None
    raise RowError(f"{where}: expected an image (bytes, a path or a datasets Image), got {type(value).__name__}")


@dataclass
class _Image:
    sha256: str
    data: bytes
    format: str
    width: int
    height: int


def _probe(data: bytes, where: str) -> _Image:
    """Format and size from the image header; an unknown format is re-encoded as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = (image.format or "").upper(), image.size
            if fmt not in FORMAT_EXTENSIONS:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                data, fmt = buffer.getvalue(), "PNG"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RowError(f"{where}: not a readable image ({exc})") from None
    return _Image(hashlib.sha256(data).hexdigest(), data, fmt, size[0], size[1])


# --------------------------------------------------------------------------------------------------------------
# reading the source


def _builder(path: Path) -> tuple[str, list[str] | str]:
    """The ``datasets`` builder and data files of a local file or folder."""
    suffixes = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
    if path.is_file():
        if path.suffix not in suffixes:
            raise DataImportError(f"{path}: expected a .parquet, .arrow, .jsonl or .json file, or a folder")
        return suffixes[path.suffix], str(path)
    for suffix, builder in suffixes.items():
        files = sorted(str(p) for p in path.rglob(f"*{suffix}")
                       if p.name not in ("metadata.jsonl", ERRORS_FILE) and ".cache" not in p.parts)
        if files:
            return builder, files
    return "imagefolder", str(path)


def open_rows(
    source: str, split: str, columns: ColumnMap
) -> tuple[Iterable[Mapping[str, Any]], int | None, Path | None]:
    """A streaming iterable of the rows (image columns as raw bytes), its length when known, and the folder that
    relative image paths are read from."""
    import datasets

    path = Path(source).expanduser()
    base: Path | None = None
    try:
        if path.exists():
            builder, files = _builder(path)
            base = path if path.is_dir() else path.parent
            if builder == "imagefolder":
                ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=True)
            else:
                ds = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
        else:
            hub = re.match(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$", source)
            if hub is None:
                raise DataImportError(f"{source}: no such file or folder, and not a Hub dataset id (owner/name[@rev])")
            ds = datasets.load_dataset(hub["repo"], split=split, streaming=True, revision=hub["rev"])
    except DataImportError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        hint = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: the dataset must be in the cache)" if _offline() else ""
        raise DataImportError(f"{source}: cannot open split {split!r}: {exc}{hint}") from None
    features = getattr(ds, "features", None)
    if features is not None:
        missing = sorted(set(columns.columns().values()) - set(features))
        if missing:
            raise DataImportError(f"{source}: no column {', '.join(map(repr, missing))} (it has {', '.join(features)})")
        for role in ("source", "target", "mask"):
            name = getattr(columns, role)
            if name and isinstance(features[name], datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
    total = None
    info = getattr(ds, "info", None)
    if info is not None and info.splits and split in info.splits:
        total = info.splits[split].num_examples or None
    return ds, total, base


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "TRUE", "ON", "YES")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# --------------------------------------------------------------------------------------------------------------
# one row -> one record


@dataclass
class _Ids:
    """Running sample ids and instance ids (an instance per distinct group key)."""

    samples: int = 0
    instances: dict[str, int] = field(default_factory=dict)

    def instance(self, key: str) -> int:
        return self.instances.setdefault(key, len(self.instances) + 1)


def build_row_record(
    row: Mapping[str, Any], number: int, columns: ColumnMap, dataset: str, box_source: str, ids: _Ids,
    val_fraction: float, base: Path | None,
) -> tuple[ExportRecord, dict[str, bytes]]:
    """The record of row ``number`` and the bytes of its images by sha256 (raises :class:`RowError`)."""

    def cell(role: str) -> Any:
        name = getattr(columns, role)
        if name not in row:
            raise RowError(f"column {name!r} ({role}): missing from the row")
        return row[name]

    external = str(cell("id")) if columns.id else f"row-{number}"
    turn = 1
    if columns.turn:
        try:
            turn = max(1, int(cell("turn")))
        except (TypeError, ValueError):
            raise RowError(f"column {columns.turn!r} (turn): expected an integer, got {cell('turn')!r}") from None
    instruction = _instruction(cell("instruction"), f"column {columns.instruction!r} (instruction)")
    images = {role: _probe(_image_bytes(cell(role), f"column {getattr(columns, role)!r} ({role})", base),
                           f"column {getattr(columns, role)!r} ({role})") for role in ("source", "target")}
    source = images["source"]
    boxes: list[tuple[float, float, float, float]] = []
    if columns.mask and cell("mask") is not None:
        where = f"column {columns.mask!r} (mask)"
        data = _image_bytes(cell("mask"), where, base)
        try:
            with Image.open(io.BytesIO(data)) as mask:
                box = mask_box(mask)
        except (OSError, ValueError) as exc:
            raise RowError(f"{where}: not a readable image ({exc})") from None
        boxes = [] if box is None else [box]
    if columns.boxes:
        boxes += _boxes(cell("boxes"), (source.width, source.height), f"column {columns.boxes!r} (boxes)")
    label = str(cell("operation")) if columns.operation and cell("operation") else instruction
    operation = operation_of(label)
    subs = [SubInstructionRecord(turn_index=turn, text=instruction, operation=operation, box=box,  # type: ignore[arg-type]
                                 box_source=box_source, box_score=None) for box in boxes]  # type: ignore[arg-type]
    if not subs:
        subs = [SubInstructionRecord(turn_index=turn, text=instruction, operation=operation,  # type: ignore[arg-type]
                                     box=None, box_source=None, box_score=None)]
    group = str(row.get(columns.group) if columns.group else external)
    try:
        record = _record(ids, group, dataset, external, turn, val_fraction, instruction, images, subs)
    except ValidationError as exc:
        raise RowError(f"not a valid record ({exc.errors()[0]['msg']})") from None
    return record, {image.sha256: image.data for image in images.values()}


def _record(ids: _Ids, group: str, dataset: str, external: str, turn: int, val_fraction: float, instruction: str,
            images: dict[str, _Image], subs: list[SubInstructionRecord]) -> ExportRecord:
    source = images["source"]
    record = ExportRecord(
        sample_id=ids.samples + 1, instance_id=ids.instance(group), dataset=dataset, external_id=external,
        first_turn=turn, last_turn=turn, status="imported", split=split_for(dataset, group, val_fraction),
        instruction=instruction,
        source_image=ImageRef(sha256=source.sha256, format=source.format, width=source.width, height=source.height,
                              after_turn=turn - 1),
        target_image=ImageRef(sha256=images["target"].sha256, format=images["target"].format,
                              width=images["target"].width, height=images["target"].height, after_turn=turn),
        intermediate_images=(), sub_instructions=tuple(subs),
        provenance=Provenance(n_reviews=0, aggregated=AggregatedScores(consistent=None, quality=None, complexity=None),
                              reviews=(), mllm_conflict=None, decision=None),
    )
    ids.samples += 1
    return record


# --------------------------------------------------------------------------------------------------------------
# the import run


@dataclass
class ImportReport:
    source: str
    out: str
    format: str
    rows: int = 0
    written: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    n_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "out": self.out, "format": self.format, "rows": self.rows,
                "written": self.written, "counts": self.counts, "n_errors": self.n_errors,
                "errors": self.errors}


def import_dataset(
    source: str,
    out: str | Path,
    *,
    preset: str | None = None,
    columns: ColumnMap | None = None,
    split: str = "train",
    fmt: str = "jsonl",
    val_fraction: float = 0.0,
    limit: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = False,
    on_error: Callable[[dict[str, Any]], None] | None = None,
    rows: Iterable[Mapping[str, Any]] | None = None,
) -> ImportReport:
    """Stream ``source`` into an export folder ``out`` (see the module docstring); a bad row is reported (in the
    report, ``import_errors.jsonl`` and ``on_error``) and skipped. ``rows`` replaces reading ``source`` (tests)."""
    if (preset is None) == (columns is None):
        raise DataImportError("give exactly one of --preset and --columns")
    if preset is not None and preset not in PRESETS:
        raise DataImportError(f"--preset: unknown preset {preset!r} (expected {', '.join(PRESETS)})")
    if not 0.0 <= val_fraction <= 1.0:
        raise DataImportError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    chosen = PRESETS[preset] if preset is not None else None
    cols = chosen.columns if chosen is not None else columns
    assert cols is not None
    dataset = preset or "import"
    box_source = chosen.box_source if chosen is not None else "truth"
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataImportError(f"{out}: the destination already exists and is not an empty folder")
    total, base = None, None
    if rows is None:
        rows, total, base = open_rows(source, split, cols)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.import.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    report = ImportReport(source, str(out), fmt)
    current: dict[str, bytes] = {}
    try:
        with make_writer(fmt, tmp, lambda _sample, sha: current[sha], shard_size) as writer, \
                (tmp / ERRORS_FILE).open("w", encoding="utf-8") as errors:
            ids = _Ids()
            for number, row in enumerate(_progress(rows, total if limit is None else min(total or limit, limit),
                                                   progress), start=1):
                if limit is not None and number > limit:
                    break
                report.rows = number
                try:
                    record, current = build_row_record(row, number, cols, dataset, box_source, ids, val_fraction, base)
                except RowError as exc:
                    ident = row.get(cols.id) if cols.id and isinstance(row, Mapping) else None
                    problem = {"row": number, "id": None if ident is None else str(ident), "error": str(exc)}
                    report.n_errors += 1
                    if len(report.errors) < 100:
                        report.errors.append(problem)
                    errors.write(json.dumps(problem) + "\n")
                    if on_error is not None:
                        on_error(problem)
                    continue
                writer.write(record)
                current = {}
                report.written += 1
            entries = writer.close()
        report.counts = dict(writer.counts)
        entries = resolve_hashes(tmp, [*entries, FileEntry(ERRORS_FILE, None, (tmp / ERRORS_FILE).stat().st_size)])
        data = [e.path for e in entries if e.path.endswith((".jsonl", ".parquet", ".tar")) and e.path != ERRORS_FILE]
        split_files = {s: [p for p in data if p.startswith((f"{s}.", f"{s}-"))] for s in SPLITS}
        manifest = build_manifest(
            fmt=fmt, schema_version=SCHEMA_VERSION,
            filter_json={"import": {"source": source, "split": split, "preset": preset, "columns": cols.columns(),
                                    "limit": limit}},
            options={"val_fraction": val_fraction, "shard_size": shard_size, "bad_rows": report.n_errors},
            counts=report.counts, split_files=split_files, files=entries, db_revision=None,
        )
        write_manifest(tmp, manifest)
        if out.exists():  # an empty folder (checked above)
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _progress(rows: Iterable[Any], total: int | None, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from rows
        return
    from tqdm.auto import tqdm

    yield from tqdm(rows, total=total, unit="row", desc="import", mininterval=0.5)
