"""Dataset exports started from the dashboard: the request's checks (format, settings, a folder name that cannot
leave ``<data_dir>/exports``), the ``export`` jobs that a worker runs (:mod:`annotate.jobs`), and the list of recorded
exports. The dashboard (:mod:`annotate.web.ui_dashboard`) only renders what this module returns.

The functions take the caller's ``Session`` and never commit (the dashboard's callbacks open the transaction);
:meth:`ExportJobs.start` reads the active export jobs then queues one, so it wants ``session_scope(url,
write=True)``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.annotate import jobs
from mcie.config import Settings
from mcie.db.models import Export, SampleStatus, User
from mcie.db.session import require_write, session_scope

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("jsonl", "parquet", "webdataset")
EXPORT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_RUNNING_EXPORTS = 2
EXPORT_LIST_LIMIT = 50


class Requester(Protocol):
    """Who asks for an export (the web layer's user)."""

    id: int
    username: str

    @property
    def is_lead(self) -> bool: ...


class ExportRequestError(ValueError):
    """An export request from the dashboard that cannot be started; the message says why, for the lead."""


def exports_root(data_dir: Path) -> Path:
    """The only folder dashboard exports are written into: ``<data_dir>/exports`` (resolved)."""
    return (Path(data_dir) / "exports").resolve()


def export_destination(root: Path, name: str | None) -> Path:
    """``root / name`` for a plain folder name (letters, digits, ``.``, ``_``, ``-``; not hidden); anything that
    could lead elsewhere (``..``, ``/``, an absolute path, a symlink out of ``root``) is refused."""
    name = (name or "").strip()
    if not EXPORT_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ExportRequestError(
            f"the folder name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, and "
            f"is created under {root}; got {name!r}"
        )
    root = root.resolve()
    destination = (root / name).resolve()
    if destination.parent != root:
        raise ExportRequestError(f"{name!r} would leave the exports folder {root}")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ExportRequestError(f"{destination} already exists: choose another name")
    return destination


def export_filter(
    statuses: Sequence[str] | None, min_quality: float | None, min_complexity: float | None
) -> dict[str, Any]:
    """The :class:`exports.select.ExportFilter` fields of the form: the accepted samples when no status is chosen; a
    median-score threshold of 0 (or none) does not filter."""
    flt: dict[str, Any] = {"statuses": list(statuses or [SampleStatus.accepted.value])}
    for key, value in (("min_quality", min_quality), ("min_complexity", min_complexity)):
        if value is not None and not math.isnan(float(value)) and float(value) != 0:
            flt[key] = float(value)
    return flt


def exports_frame(session: Session, limit: int = EXPORT_LIST_LIMIT) -> pd.DataFrame:
    """The newest recorded exports (whoever started them: dashboard or ``mcie export``), newest first."""
    columns = ["id", "format", "status", "samples", "path", "manifest_sha256", "started_by", "created_at",
               "finished_at", "error"]
    rows = session.execute(
        select(Export.id, Export.format, Export.status, Export.n_samples, Export.path, Export.manifest_sha256,
               User.username, Export.created_at, Export.finished_at, Export.error)
        .outerjoin(User, User.id == Export.created_by)
        .order_by(Export.id.desc())
        .limit(limit)
    ).all()
    frame = pd.DataFrame([list(r) for r in rows], columns=columns)
    if not frame.empty:
        frame["status"] = frame["status"].map(str)
        for column in ("created_at", "finished_at"):
            frame[column] = frame[column].map(lambda t: "" if t is None or pd.isna(t) else str(t)[:19])
        frame = frame.fillna("")
    return frame


@dataclass
class ExportJob:
    """One export started from this dashboard: a job of the job queue (:mod:`annotate.jobs`)."""

    name: str
    destination: Path
    fmt: str
    lead: str
    job_id: int


class ExportJobs:
    """Exports started from the dashboard become ``export`` jobs of the job queue, run by a worker (the server's
    in-process one, or ``mcie worker`` processes when it is served with ``--no-worker``), so no Gradio worker - and
    no web process - waits for an export. At most :data:`MAX_RUNNING_EXPORTS` export jobs are queued or running at
    once, and one per destination, over every replica (the check reads the ``jobs`` table).

    The ``exports`` table is the record of every run (run_export writes it, errors included); the ``jobs`` table
    holds what a worker did with each request, such as an error raised before the export had a row. A worker
    killed during an export leaves its row ``running`` and a hidden ``.partial`` folder, never a half-written
    destination; the job is run again by another worker once its lease lapses.
    """

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.root = exports_root(settings.data_dir)
        self.max_attempts = settings.job_max_attempts
        self.jobs: list[ExportJob] = []  # started from this dashboard object (newest last)
        self._lock = threading.Lock()

    def running(self, session: Session) -> list[jobs.JobView]:
        """Export jobs queued or running now (any replica's)."""
        return [j for j in jobs.list_jobs(session, kind="export", limit=200) if j.status in ("queued", "running")]

    def start(
        self,
        session: Session,
        lead: Requester,
        fmt: str | None,
        name: str | None,
        val_fraction: float | None,
        flt: dict[str, Any],
    ) -> ExportJob:
        """Check the request and queue the export; raises ExportRequestError when it cannot be started. Reads the
        active exports then queues one: ``session`` must come from ``session_scope(url, write=True)`` (the job
        exists, and a worker starts on it, once the caller commits)."""
        from pydantic import ValidationError

        from mcie.exports.api import ExportOptions
        from mcie.exports.select import ExportFilter

        if not lead.is_lead:  # the handlers check first; this keeps the runner safe on its own
            raise PermissionError("only leads and admins may export the dataset")
        require_write(session, "starting an export")
        if fmt not in EXPORT_FORMATS:
            raise ExportRequestError(f"choose a format: {', '.join(EXPORT_FORMATS)}")
        fraction = 0.05 if val_fraction is None else float(val_fraction)
        try:
            ExportOptions(val_fraction=fraction)
            ExportFilter.model_validate(flt)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise ExportRequestError(f"invalid export settings: {problems}") from None
        name = (name or "").strip() or f"export-{time.strftime('%Y%m%d-%H%M%S')}-{fmt}"
        with self._lock:
            destination = export_destination(self.root, name)
            active = self.running(session)
            if len(active) >= MAX_RUNNING_EXPORTS:
                raise ExportRequestError(f"{len(active)} exports are queued or running; start another when one has "
                                         "finished")
            if any(j.payload.get("out") == str(destination) for j in active):
                raise ExportRequestError(f"an export into {destination} is already queued or running")
            payload = {"format": fmt, "out": str(destination), "filter": flt, "val_fraction": fraction}
            queued = jobs.submit(session, "export", payload, requested_by=lead.id, max_attempts=self.max_attempts)
            job = ExportJob(name, destination, fmt, lead.username, queued.id)
            self.jobs = [*self.jobs[-(EXPORT_LIST_LIMIT - 1) :], job]
        log.info("export %r (%s) queued by %s into %s as job %d", name, fmt, lead.username, destination, queued.id)
        return job

    def _active_ids(self) -> set[int]:
        with session_scope(self.url) as session:
            return {j.id for j in self.running(session)}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until this dashboard's export jobs have ended (tests, shutdown); True when none is left active. Polls:
        it runs its own transactions, one per look."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = {job.job_id for job in self.jobs}
        while ids & self._active_ids():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
