"""Run an export: select, write, card, manifest, and record it - atomically. Used by ``mcie export`` and the dashboard.

:func:`run_export` records the run in ``exports`` (status ``running``), streams the selected records into a writer
inside a temporary folder next to the destination (``.<name>.export-<id>.partial``), writes the plots, the dataset
card and finally ``manifest.json``, then, in one database transaction, stores the ``export_items`` (sample, split),
marks the row ``done`` and renames the folder into place. Any failure removes the temporary folder, marks the row
``failed`` with the error (an image failure names the sample and the sha256) and raises :class:`ExportError`. A
killed process leaves only the hidden ``.partial`` folder and a ``running`` row: never a folder with a manifest at
the destination.

The database is read in one snapshot (SQLite's read transaction; REPEATABLE READ on PostgreSQL), so an export is
consistent even while reviews go on.

:func:`run_export` takes the database URL, not a ``Session``: it runs its own transactions - the ``running`` row is
committed first (so a killed run leaves it), the records are read in one snapshot while files are written (minutes),
the items and the ``done`` row are committed at the end, and a failure is recorded in a transaction of its own.

:func:`export_reviews` (re-exported from :mod:`exports.reviews`) writes every raw review and decision for analysis.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from mcie.db.migrate import current
from mcie.db.models import AuditLog, Export, ExportItem, Instance, JobStatus, Split, utcnow
from mcie.db.session import require_write, session_scope
from mcie.exports.card import CardStats, agreement_figures, plots, render_readme
from mcie.exports.manifest import build_manifest, resolve_hashes, write_manifest
from mcie.exports.records import SCHEMA_VERSION
from mcie.exports.reviews import ReviewsExport, export_reviews
from mcie.exports.select import DEFAULT_CHUNK, ExportFilter, iter_records
from mcie.exports.splits import SPLITS
from mcie.exports.writers import DEFAULT_SHARD_SIZE, FORMATS, FileEntry, make_writer, verified_fetch

__all__ = [
    "ExportError",
    "ExportFilter",
    "ExportOptions",
    "ExportResult",
    "ReviewsExport",
    "export_reviews",
    "run_export",
]

_ITEM = struct.Struct("<qB")
_ITEM_BATCH = 5000
_ERROR_LIMIT = 4000


class ImageSource(Protocol):
    def get(self, sha256: str) -> bytes: ...


class ExportError(RuntimeError):
    """An export could not be made; the message says why (and the ``exports`` row holds it too)."""

    def __init__(self, message: str, export_id: int | None = None) -> None:
        super().__init__(message)
        self.export_id = export_id


class ExportOptions(BaseModel):
    """How an export is written, stored as JSON in ``exports.options`` and in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    val_fraction: float = Field(0.05, ge=0, le=1, description="Share of instances (not samples) put in val.")
    shard_size: int = Field(DEFAULT_SHARD_SIZE, ge=1, description="Samples per Parquet/WebDataset shard.")
    include_reviewers: bool = Field(False, description="Put reviewers' and leads' usernames in the records.")
    since: int | None = Field(None, ge=1, description="Only samples accepted after this export and not in it.")


@dataclass(frozen=True)
class ExportResult:
    export_id: int
    path: Path
    format: str
    n_samples: int
    counts: Mapping[str, int]
    manifest_sha256: str
    db_revision: str | None
    files: int = 0


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: the destination already exists and is not an empty folder")


def _check_since(session: Session, since: int) -> None:
    row = session.get(Export, since)
    if row is None:
        raise ExportError(f"--since {since}: there is no export with that id")
    if row.status != JobStatus.done:
        raise ExportError(f"--since {since}: that export is {row.status}, not done")


def _start(session: Session, fmt: str, out: Path, flt: ExportFilter, options: ExportOptions, revision: str | None,
           actor_id: int | None) -> int:
    """Check ``since`` and add the ``running`` row; returns its id."""
    require_write(session, "starting an export")
    if options.since is not None:
        _check_since(session, options.since)
    row = Export(
        format=fmt,
        status=JobStatus.running,
        path=str(out),
        filter=flt.model_dump(mode="json"),
        options=options.model_dump(mode="json"),
        since_export_id=options.since,
        db_revision=revision,
        created_by=actor_id,
    )
    session.add(row)
    session.flush()
    return row.id


def _spooled_items(spool: IO[bytes], export_id: int) -> Iterator[list[dict[str, Any]]]:
    spool.seek(0)
    splits = [Split(s) for s in SPLITS]
    while chunk := spool.read(_ITEM.size * _ITEM_BATCH):
        yield [
            {"export_id": export_id, "sample_id": sample_id, "split": splits[code]}
            for sample_id, code in _ITEM.iter_unpack(chunk)
        ]


def source_licenses(session: Session, datasets: Iterable[str]) -> dict[str, set[str | None]]:
    """Each exported source dataset's licences as recorded at ingest (one per dataset unless ingested twice with
    different ``--license``; then the card lists every one)."""
    found: dict[str, set[str | None]] = {name: set() for name in datasets}
    if found:
        rows = session.execute(select(Instance.dataset, Instance.license).where(Instance.dataset.in_(found)).distinct())
        for dataset, license in rows:
            found[dataset].add(license)
    return found


def _split_files(entries: list[FileEntry]) -> dict[str, list[str]]:
    data = [e.path for e in entries if e.path.endswith((".jsonl", ".parquet", ".tar"))]
    return {split: [p for p in data if p.startswith(f"{split}.") or p.startswith(f"{split}-")] for split in SPLITS}


def _write_card(tmp: Path, stats: CardStats, fmt: str, flt: ExportFilter, options: ExportOptions,
                revision: str | None, entries: list[FileEntry]) -> list[FileEntry]:
    written = []
    for rel, data in plots(stats).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
        written.append(FileEntry(rel, None, len(data)))
    n_images = sum(1 for e in entries if e.path.startswith("images/")) if fmt == "jsonl" else None
    readme = render_readme(
        stats,
        fmt=fmt,
        schema_version=SCHEMA_VERSION,
        filter_json=flt.model_dump(mode="json"),
        options=options.model_dump(mode="json"),
        db_revision=revision,
        n_images=n_images,
        agreement=agreement_figures(stats),
    ).encode()
    (tmp / "README.md").write_bytes(readme)
    written.append(FileEntry("README.md", None, len(readme)))
    return written


def _mark_failed(session: Session, export_id: int, message: str) -> None:
    """Record the run ``failed`` with ``message``."""
    require_write(session, "recording a failed export")
    row = session.get(Export, export_id)
    if row is not None:
        row.status = JobStatus.failed
        row.error = message[:_ERROR_LIMIT]
        row.finished_at = utcnow()


def run_export(
    url: str,
    store: ImageSource,
    out_dir: str | os.PathLike[str],
    fmt: str,
    filter: ExportFilter | Mapping[str, Any] | None = None,
    *,
    since: int | None = None,
    val_fraction: float = 0.05,
    shard_size: int = DEFAULT_SHARD_SIZE,
    include_reviewers: bool = False,
    actor_id: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_record: Callable[[], None] | None = None,
) -> ExportResult:
    """Export the selected samples of the database at ``url`` to ``out_dir`` in ``fmt`` (jsonl, parquet, webdataset).
    It runs its own transactions (the module docstring says which), hence the URL.

    ``filter`` defaults to the accepted samples; ``since`` takes only samples accepted after that (done) export and
    not in it. ``out_dir`` must not exist (or be an empty folder). ``on_record`` is called after each record
    written (progress; an exception it raises aborts the export like any failure). Raises :class:`ExportError` on
    any failure.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    try:
        flt = filter if isinstance(filter, ExportFilter) else ExportFilter.model_validate(filter or {})
        options = ExportOptions(
            val_fraction=val_fraction, shard_size=shard_size, include_reviewers=include_reviewers, since=since
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'filter'}: {e['msg']}" for e in exc.errors())
        raise ExportError(f"invalid export settings: {problems}") from None
    out = Path(out_dir).absolute()
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    revision = current(url)
    with session_scope(url, write=True) as session:
        export_id = _start(session, fmt, out, flt, options, revision, actor_id)
    tmp = out.parent / f".{out.name}.export-{export_id}.partial"
    renamed = False
    try:
        tmp.mkdir()
        stats = CardStats()
        with tempfile.TemporaryFile() as spool:
            with session_scope(url) as session:
                if session.get_bind().dialect.name == "postgresql":
                    session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                with make_writer(fmt, tmp, verified_fetch(store.get), options.shard_size) as writer:
                    for record in iter_records(
                        session, flt, since=since, val_fraction=val_fraction,
                        include_reviewers=include_reviewers, chunk_size=chunk_size,
                    ):
                        writer.write(record)
                        stats.add(record)
                        spool.write(_ITEM.pack(record.sample_id, SPLITS.index(record.split)))
                        if on_record is not None:
                            on_record()
                    entries = writer.close()
                stats.licenses = source_licenses(session, stats.datasets)
            entries += _write_card(tmp, stats, fmt, flt, options, revision, entries)
            entries = resolve_hashes(tmp, entries)
            counts = {split: stats.splits.get(split, 0) for split in SPLITS}
            manifest = build_manifest(
                fmt=fmt,
                schema_version=SCHEMA_VERSION,
                filter_json=flt.model_dump(mode="json"),
                options=options.model_dump(mode="json"),
                counts=counts,
                split_files=_split_files(entries),
                files=entries,
                db_revision=revision,
            )
            manifest_sha = write_manifest(tmp, manifest)
            with session_scope(url, write=True) as session:
                for batch in _spooled_items(spool, export_id):
                    session.execute(insert(ExportItem), batch)
                row = session.get(Export, export_id)
                assert row is not None
                row.status = JobStatus.done
                row.n_samples = stats.total
                row.manifest_sha256 = manifest_sha
                row.finished_at = utcnow()
                session.add(AuditLog(user_id=actor_id, action="export", entity="exports", entity_id=str(export_id),
                                     details={"format": fmt, "n_samples": stats.total, "path": str(out)}))
                session.flush()
                if out.exists():
                    out.rmdir()  # an empty folder given as the destination
                tmp.rename(out)
                renamed = True
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if renamed:
            shutil.rmtree(out, ignore_errors=True)
        message = str(exc) or type(exc).__name__
        try:
            with session_scope(url, write=True) as session:
                _mark_failed(session, export_id, message)
        except Exception:  # the database may be what failed; the original error matters more
            pass
        if isinstance(exc, Exception):
            raise ExportError(f"export {export_id} failed: {message}", export_id) from exc
        raise
    return ExportResult(
        export_id=export_id,
        path=out,
        format=fmt,
        n_samples=stats.total,
        counts=counts,
        manifest_sha256=manifest_sha,
        db_revision=revision,
        files=len(entries) + 1,
    )
