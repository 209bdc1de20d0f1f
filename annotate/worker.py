"""``mcie worker``: processes that run the job queue (:mod:`annotate.jobs`), apart from the web tier.

A :class:`Worker` runs ``concurrency`` threads; each claims a job of the worker's kinds, runs its handler and
records the outcome. While a handler works, a heartbeat renews the job's lease every third of
``MCIE_JOB_LEASE_S``, so a live worker keeps its job however long it takes and a dead one (``kill -9``) loses it
within one lease. When a renewal finds the job cancelled or taken over, the handler is told through
:meth:`JobContext.should_stop` and its outcome is dropped.

Stopping (:meth:`Worker.stop`, SIGTERM/SIGINT in :func:`run_worker`) takes no new jobs and waits up to
``grace_s`` for the running ones; a handler that has not finished then is released (queued again, the try not
counted) when it next checks :meth:`JobContext.should_stop`, or by its lease running out.

Handlers (``kind -> handler(ctx, payload) -> result dict``):

- ``export``: :func:`exports.api.run_export` with the payload's format, destination, filter and options;
- ``preview``: one model preview (:mod:`annotate.previews`), with the model loaded once per worker process -
  GPU hosts run ``mcie worker --kinds preview``, the web tier needs no GPU;
- ``reliability``: a refit of rater reliability (:func:`annotate.reliability_service.refit_when_due`), queued by
  the web tier's minute sweep when enough new reviews came in.

``mcie serve`` runs one in-process worker for every kind unless ``--no-worker`` is given.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mcie.annotate import jobs
from mcie.config import Settings
from mcie.db.session import session_scope

log = logging.getLogger(__name__)

Handler = Callable[["JobContext", dict[str, Any]], dict[str, Any] | None]


class JobStopped(BaseException):
    """Raised by :meth:`JobContext.check` when the job must stop (cancelled, taken over, or the worker stops). A
    BaseException, so that handlers' ``except Exception`` (and :func:`exports.api.run_export`'s error wrapping) let
    it through."""

    def __init__(self, message: str = "stopped: the job was cancelled or taken over, or the worker is stopping"):
        super().__init__(message)


@dataclass
class JobContext:
    """What a handler gets besides its payload: the settings, progress reporting and the stop signal."""

    settings: Settings
    job: jobs.JobView
    worker: Worker
    _progress: float | None = None
    _note: str | None = None
    lost: threading.Event = field(default_factory=threading.Event)

    def progress(self, fraction: float | None = None, note: str | None = None) -> None:
        """Report progress (0..1) and/or a short note; written at the next lease renewal."""
        self._progress, self._note = fraction, note

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.worker.stopping.is_set()

    def check(self) -> None:
        if self.should_stop():
            raise JobStopped()


# ----------------------------------------------------------------------------------------------------------
# handlers


def _export_size(url: str, flt: dict[str, Any], since: int | None) -> int | None:
    """How many samples the export will take at most (for its progress; score thresholds are applied while the
    records are written, so they may leave fewer), or None when the filter cannot be read."""
    from sqlalchemy import func, select

    from mcie.exports.select import ExportFilter, selection_query

    try:
        selection = ExportFilter.model_validate(flt or {})
    except ValueError:
        return None  # run_export reports the bad filter
    with session_scope(url) as session:
        query = selection_query(selection, since, dialect=session.get_bind().dialect.name)
        return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)


def export_handler(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    from mcie.db.store import ImageStore
    from mcie.exports.api import run_export

    total = _export_size(ctx.settings.database_url, payload.get("filter") or {}, payload.get("since"))
    of = "" if total is None else f" of at most {total}"
    done = [0]
    ctx.progress(0.0, f"0{of} samples written")

    def on_record() -> None:
        done[0] += 1
        if done[0] % 50 == 0 or done[0] == total:
            fraction = min(0.99, done[0] / total) if total else None  # 1.0 once the manifest is written
            ctx.progress(fraction, f"{done[0]}{of} samples written")
            ctx.check()

    result = run_export(
        ctx.settings.database_url,
        ImageStore.from_settings(ctx.settings),
        payload["out"],
        payload["format"],
        payload.get("filter") or {},
        since=payload.get("since"),
        val_fraction=float(payload.get("val_fraction", 0.05)),
        shard_size=int(payload.get("shard_size", 1000)),
        include_reviewers=bool(payload.get("include_reviewers", False)),
        actor_id=ctx.job.requested_by,
        on_record=on_record,
    )
    return {"export_id": result.export_id, "path": str(result.path), "n_samples": result.n_samples,
            "counts": dict(result.counts), "manifest_sha256": result.manifest_sha256}


def preview_handler(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    from mcie.annotate import previews

    runner = ctx.worker.preview_runner()
    status = runner.run_one(int(payload["preview_id"]))
    if status.status == "failed":
        raise RuntimeError(status.error or "the preview failed")
    return {"preview_id": status.id, "status": status.status, "image": status.image,
            "model_version": status.model_version, "sample_id": status.sample_id,
            "unchanged": status.status != previews.JobStatus.done.value}


def reliability_handler(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    from mcie.annotate.reliability_service import refit_when_due

    ctx.progress(None, "fitting rater reliability")
    return {"fit_id": refit_when_due(ctx.settings.database_url)}


HANDLERS: dict[str, Handler] = {"export": export_handler, "preview": preview_handler,
                                "reliability": reliability_handler}


# ----------------------------------------------------------------------------------------------------------
# the worker


class Worker:
    """Threads that run jobs of ``kinds`` from the database of ``settings``.

    ``handlers`` replaces the default :data:`HANDLERS` (tests); ``poll_s`` is how long an idle thread waits before
    looking for work again; ``lease_s`` defaults to ``MCIE_JOB_LEASE_S``.

    It keeps the database URL and runs its own transactions, one per step: a claim, each lease renewal, and the
    finish, failure or release are separate, committed before the handler runs on or the thread moves on.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        kinds: tuple[str, ...] | list[str] = jobs.KINDS,
        concurrency: int = 1,
        handlers: dict[str, Handler] | None = None,
        poll_s: float = 1.0,
        lease_s: float | None = None,
        worker_id: str | None = None,
        preview_loader: Callable[[Settings], Any] | None = None,
    ) -> None:
        unknown = sorted(set(kinds) - set(jobs.KINDS))
        if unknown or not kinds:
            raise ValueError(f"--kinds: unknown kind(s) {', '.join(unknown) or '(none)'} "
                             f"(expected some of {', '.join(jobs.KINDS)})")
        if concurrency < 1:
            raise ValueError("--concurrency: expected at least 1")
        self.settings = settings
        self.url = settings.database_url
        self.kinds = tuple(kinds)
        self.concurrency = concurrency
        self.handlers = dict(handlers or HANDLERS)
        self.poll_s = poll_s
        self.lease_s = float(lease_s or settings.job_lease_s)
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self.completed = 0
        self._preview_loader = preview_loader
        self._preview_runner: Any = None
        self._runner_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._wake = threading.Event()

    def preview_runner(self) -> Any:
        """The process's preview model runner (its model is loaded once, on the first preview)."""
        from mcie.annotate import previews

        with self._runner_lock:
            if self._preview_runner is None:
                self._preview_runner = previews.PreviewWorker(self.settings, loader=self._preview_loader).prepare()
            return self._preview_runner

    # --- life -----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self) -> Worker:
        if self.running:
            return self
        self.stopping.clear()
        if "preview" in self.kinds:
            try:
                from mcie.annotate.previews import enqueue_orphans

                with session_scope(self.url, write=True) as session:
                    enqueue_orphans(session)
            except Exception:
                log.exception("could not queue the previews left without a job")
        self._threads = [
            threading.Thread(target=self._loop, name=f"mcie-worker-{i}", daemon=True) for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        jobs.add_listener(self.wake)
        log.info("worker %s started: kinds %s, concurrency %d", self.id, ",".join(self.kinds), self.concurrency)
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        """Take no new jobs; wait up to ``grace_s`` for the running ones (then they are released)."""
        jobs.remove_listener(self.wake)
        self.stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(grace_s)
        if self.running:
            log.warning("worker %s: jobs still running after %.0f s; their leases will lapse", self.id, grace_s)
        with self._runner_lock:
            self._preview_runner = None

    def wake(self) -> None:
        """Look for work now (after a job was queued in this process)."""
        self._wake.set()

    # --- one thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                with session_scope(self.url, write=True) as session:
                    job = jobs.claim(session, self.id, self.kinds, self.lease_s)
            except Exception:  # the loop must outlive a database hiccup
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: jobs.JobView) -> None:
        ctx = JobContext(self.settings, job, self)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, done), name=f"mcie-lease-{job.id}", daemon=True)
        beat.start()
        handler = self.handlers.get(job.kind)
        try:
            if handler is None:
                raise RuntimeError(f"this worker has no handler for jobs of kind {job.kind!r}")
            result = handler(ctx, job.payload)
        except JobStopped:
            done.set()
            if not ctx.lost.is_set():
                with session_scope(self.url) as session:
                    jobs.release(session, job.id, self.id)
                log.info("job %s released (the worker is stopping)", job.id)
            return
        except Exception as exc:
            done.set()
            beat.join()
            if not ctx.lost.is_set():
                with session_scope(self.url, write=True) as session:
                    state = jobs.fail(session, job.id, self.id, f"{type(exc).__name__}: {exc}")
                log.warning("job %s (%s) failed, try %d of %d: %s -> %s", job.id, job.kind, job.attempts,
                            job.max_attempts, exc, state)
            return
        done.set()
        beat.join()
        if ctx.lost.is_set():
            return
        with session_scope(self.url) as session:
            finished = jobs.finish(session, job.id, self.id, result or {})
        if finished:
            self.completed += 1
            log.info("job %s (%s) done", job.id, job.kind)

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        every = max(0.2, self.lease_s / 3)
        while not done.wait(every):
            try:
                with session_scope(self.url) as session:
                    mine = jobs.renew(session, ctx.job.id, self.id, self.lease_s, progress=ctx._progress,
                                      note=ctx._note)
            except Exception:
                log.exception("renewing the lease of job %s failed", ctx.job.id)
                continue
            if not mine:
                log.warning("job %s is no longer this worker's (cancelled or taken over)", ctx.job.id)
                ctx.lost.set()
                return


def run_worker(settings: Settings, *, kinds: list[str], concurrency: int, grace_s: float = 60.0) -> None:
    """Run a worker until SIGTERM or SIGINT (``mcie worker``); the running jobs get ``grace_s`` to finish."""
    worker = Worker(settings, kinds=kinds, concurrency=concurrency)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the running jobs", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    stop.wait()
    worker.stop(grace_s)


def attach_job_worker(app: Any, *, concurrency: int = 2) -> Worker:
    """Run an in-process :class:`Worker` of every kind while the FastAPI ``app`` runs (``mcie serve`` without
    ``--no-worker``, so ``make demo`` stays one command): two threads, so an export does not hold up previews, each
    looking for work every 2 s when idle (and at once when this process queues a job). It is
    ``app.state.job_worker``. Start and stop happen off
    the event loop."""
    import contextlib
    from collections.abc import AsyncIterator

    import anyio.to_thread

    inner = app.router.lifespan_context
    worker = app.state.job_worker = Worker(app.state.settings, concurrency=concurrency, poll_s=2.0)

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        await anyio.to_thread.run_sync(worker.start)
        try:
            async with inner(app_) as state:
                yield state
        finally:
            await anyio.to_thread.run_sync(worker.stop, 10.0)

    app.router.lifespan_context = lifespan
    return worker
