"""Stage 1, ingest: multi-turn instances from a reader into the image store and the database.

Each record from :mod:`pipeline.sources` is either ingested whole (its images validated into the store, the instance
and its turns inserted), recognised as already present (same dataset and external id: re-ingesting adds nothing), or
skipped with its file, line and reason (a reader error, or an image the store refuses). One bad record never stops
the run; the report lists every skipped record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from mcie.db.models import Instance, Turn
from mcie.db.session import session_scope
from mcie.db.store import ImageRejected, ImageStore, StoredImage, register_images
from mcie.pipeline.expand import classify_operation
from mcie.pipeline.sources import IngestLimits, RawInstance, RecordError


@dataclass(frozen=True)
class Skipped:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class IngestReport:
    read: int = 0
    ingested: int = 0
    already_present: int = 0
    turns: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "read": self.read,
            "ingested": self.ingested,
            "already_present": self.already_present,
            "turns": self.turns,
            "skipped": len(self.skipped),
            "skipped_records": [{"file": s.file, "line": s.line, "reason": s.reason} for s in self.skipped],
        }


@dataclass(frozen=True)
class _Prepared:
    record: RawInstance
    source: StoredImage
    turns: tuple[StoredImage, ...]


def _store_images(store: ImageStore, record: RawInstance) -> _Prepared | Skipped:
    try:
        source = store.put_file(record.source_image)
        turns = tuple(store.put_file(turn.image) for turn in record.turns)
    except ImageRejected as exc:
        return Skipped(str(record.source_file), record.line, f"image refused: {exc}")
    return _Prepared(record, source, turns)


def _prepare(
    records: Iterable[RawInstance | RecordError],
    store: ImageStore,
    known: Callable[[RawInstance], bool],
    report: IngestReport,
    workers: int,
) -> Iterator[_Prepared | Skipped]:
    """Validate images of new records in a thread pool (Pillow decodes without the GIL), keeping input order."""

    def triage() -> Iterator[RawInstance | Skipped]:
        for record in records:
            report.read += 1
            if isinstance(record, RecordError):
                yield Skipped(str(record.file), record.line, record.reason)
            elif known(record):
                report.already_present += 1
            else:
                yield record

    def work(item: RawInstance | Skipped) -> _Prepared | Skipped:
        return item if isinstance(item, Skipped) else _store_images(store, item)

    chunk: list[RawInstance | Skipped] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in triage():
            chunk.append(item)
            if len(chunk) >= workers * 8:  # bounded read-ahead: memory does not grow with the input
                yield from pool.map(work, chunk)
                chunk = []
        yield from pool.map(work, chunk)


def ingest(
    records: Iterable[RawInstance | RecordError],
    *,
    url: str,
    store: ImageStore,
    batch_size: int = 200,
    workers: int = 4,
    on_record: Callable[[], None] | None = None,
) -> IngestReport:
    """Ingest ``records``; idempotent (instances already in the database are counted, not inserted again)."""
    report = IngestReport()
    with session_scope(url) as session:
        existing = {(d, e) for d, e in session.execute(select(Instance.dataset, Instance.external_id))}

    def known(record: RawInstance) -> bool:
        return (record.dataset, record.external_id) in existing

    batch: list[_Prepared] = []

    def flush() -> None:
        if not batch:
            return
        with session_scope(url) as session:
            register_images(session, [img for p in batch for img in (p.source, *p.turns)])
            for prepared in batch:
                session.add(_instance_row(prepared))
        for prepared in batch:
            existing.add((prepared.record.dataset, prepared.record.external_id))
            report.ingested += 1
            report.turns += len(prepared.turns)
        batch.clear()

    for item in _prepare(records, store, known, report, workers):
        if isinstance(item, Skipped):
            report.skipped.append(item)
        elif (item.record.dataset, item.record.external_id) in existing:
            report.already_present += 1  # pragma: no cover - readers already refuse duplicates within a run
        else:
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if on_record is not None:
            on_record()
    flush()
    return report


def _instance_row(prepared: _Prepared) -> Instance:
    record = prepared.record
    instance = Instance(
        dataset=record.dataset,
        external_id=record.external_id,
        source_image=prepared.source.sha256,
        n_turns=len(record.turns),
        source_file=f"{record.source_file}:{record.line}",
        license=record.license,
        meta=dict(record.meta),
    )
    instance.turns = [
        Turn(
            index=turn.index,
            instruction=turn.instruction.strip(),
            operation=classify_operation(turn.instruction),
            result_image=stored.sha256,
        )
        for turn, stored in zip(record.turns, prepared.turns, strict=True)
    ]
    return instance


def read_source(
    path: Path, fmt: str, images_root: Path | None, limits: IngestLimits | None = None, license: str | None = None
) -> Iterator[RawInstance | RecordError]:
    """The reader for ``fmt`` (``seed-data-edit`` or ``jsonl``) over ``path``, with ``limits`` (default
    :class:`pipeline.sources.IngestLimits`: images inside the root, instructions and meta of bounded size).
    ``license`` is the source's licence where the data does not state one (SEED-Data-Edit's CC-BY-NC-4.0 by
    default for its layout; none for a manifest)."""
    from mcie.pipeline.seed_format import DATASET_LICENSE
    from mcie.pipeline.sources import read_jsonl_manifest, read_seed_data_edit

    if fmt == "seed-data-edit":
        return read_seed_data_edit(path, images_root, limits, license or DATASET_LICENSE)
    if fmt == "jsonl":
        return read_jsonl_manifest(path, images_root, limits, license)
    raise ValueError(f"--format: expected seed-data-edit or jsonl, got {fmt!r}")
