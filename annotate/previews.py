"""Preview edits: MCIE-E1 run on a sample by a worker, results cached.

A reviewer (or lead) asks for the model's edit of a sample: :func:`request_preview` writes a ``previews`` row
(status ``queued``) and, in the same transaction, a ``preview`` job of the job queue (:mod:`annotate.jobs`); a
worker (``mcie worker --kinds preview`` on a GPU host, or the in-process worker of ``mcie serve``) runs it through
:meth:`PreviewWorker.run_one`. When a :class:`PreviewWorker` thread of its own runs in the process instead
(scripts, tests), the row is handed to it directly. Either way the model is loaded once, lazily, on the first job,
from the settings (``editing_base_model_path``, ``editing_weights_path``, ``device``). The source image is the
sample's first step (the image before its window); the instruction and the sub-instructions with their boxes come
from the sample and go to :class:`model.pipeline.MCIEPipeline` directly (no MLLM). The result goes into the
content-addressed image store and the row becomes ``done`` (or ``failed`` with the error).

Rows are unique per (sample, model version, seed, parameters), so a second identical request is answered from the
table at once (``cached=True``) and never runs the model again; asking again after a failure re-queues the job.
:func:`model_version` names base + weights (the base folder's name and a short hash of the weights file and its
config); a changed weights file therefore gives new previews rather than stale ones (it takes effect when the worker
is restarted). Jobs survive a restart: the job queue hands a dead worker's job to another one once its lease lapses,
and a starting worker queues a job for any row left without one (:func:`enqueue_orphans`). A :class:`PreviewWorker`
thread re-queues rows left ``queued`` or ``running`` when it starts and also picks up rows queued by other processes,
claiming each one atomically. A worker only runs rows of its own model version.

Without ``editing_base_model_path`` (or with a base folder or weights file that cannot be found) previews are off:
:func:`unavailable_reason` says why, and :func:`request_preview` raises :class:`PreviewUnavailable` and queues
nothing.

    worker = PreviewWorker(settings).start()          # a thread of its own (scripts, tests); the server and
                                                      # `mcie worker` use prepare() + run_one() per queued job
    with session_scope(url, write=True) as session:   # the job is handed over when this commits
        status = request_preview(session, sample_id, user_id, seed=0, params={"num_inference_steps": 20})
    with session_scope(url) as session:               # queued -> running -> done (status.image) | failed (status.error)
        status = preview_status(session, status.id)
    worker.stop()

The service functions (:func:`request_preview`, :func:`preview_status`, :func:`previews_for`, :func:`find_preview`,
:func:`enqueue_orphans`) take the caller's ``Session`` and never commit; :func:`request_preview` and
:func:`enqueue_orphans` read then write and want ``session_scope(url, write=True)``. :class:`PreviewWorker` keeps
the database URL: it runs its own transactions, one per step of a job (claim, then the result), around model runs
that take seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Select, event, func, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mcie.config import Settings
from mcie.db.models import AuditLog, JobStatus, Preview, Role, Sample, User, utcnow
from mcie.db.session import require_write, session_scope
from mcie.db.store import ImageStore, register_images
from mcie.device import resolve_device

__all__ = [
    "DEFAULT_PARAMS",
    "PreviewError",
    "PreviewStatus",
    "PreviewUnavailable",
    "PreviewWorker",
    "current_version",
    "enqueue_orphans",
    "find_preview",
    "load_preview_pipeline",
    "model_version",
    "normalize_params",
    "params_hash",
    "preview_status",
    "previews_for",
    "request_preview",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mcie_e1.safetensors"  # model.weights.WEIGHTS_NAME (not imported: that would import torch)
CONFIG_FILE = "mcie_config.json"
DEFAULT_PARAMS: dict[str, Any] = {
    "num_inference_steps": 20,
    "guidance_scale": 7.5,
    "image_guidance_scale": 1.5,
    "max_side": 512,  # the source is scaled down so that its longest side is at most this many pixels
}
PARAM_RANGES: dict[str, tuple[type, float, float]] = {
    "num_inference_steps": (int, 1, 200),
    "guidance_scale": (float, 0.0, 50.0),
    "image_guidance_scale": (float, 0.0, 20.0),
    "max_side": (int, 32, 2048),
}
MAX_SEED = 2**63 - 1
MAX_ERROR_CHARS = 4000
POLL_S = 5.0
REQUESTER_ROLES = frozenset({Role.admin, Role.lead, Role.rater})


class PreviewError(ValueError):
    """A preview request that cannot be done; the message says why, for the person who asked."""


class PreviewUnavailable(PreviewError):
    """Previews are off: no editing model is configured, or its files cannot be found."""


@dataclass(frozen=True)
class PreviewStatus:
    """One ``previews`` row as the callers see it. ``cached``: the request was answered by an existing done row
    (the model did not run); ``ahead``: for a queued job, how many jobs of its model version come before it."""

    id: int
    sample_id: int
    model_version: str
    seed: int
    params: dict[str, Any]
    status: str
    image: str | None
    error: str | None
    requested_by: int | None
    created_at: datetime
    finished_at: datetime | None
    cached: bool = False
    ahead: int | None = None

    @property
    def pending(self) -> bool:
        return self.status in (JobStatus.queued, JobStatus.running)


def _status(row: Preview, *, cached: bool = False, ahead: int | None = None) -> PreviewStatus:
    return PreviewStatus(
        id=row.id,
        sample_id=row.sample_id,
        model_version=row.model_version,
        seed=row.seed,
        params=dict(row.params or {}),
        status=JobStatus(row.status).value,
        image=row.image,
        error=row.error,
        requested_by=row.requested_by,
        created_at=row.created_at,
        finished_at=row.finished_at,
        cached=cached,
        ahead=ahead,
    )


# ----------------------------------------------------------------------------------------------------------
# the model's identity and the job's parameters


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _cached_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per (path, size, modification time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unavailable_reason(settings: Settings) -> str | None:
    """Why previews are off with these settings (for the UI and the refusal), or None when a model is configured."""
    base = settings.editing_base_model_path
    if base is None:
        return "No editing model is configured (set MCIE_EDITING_BASE_MODEL_PATH), so previews are off."
    from mcie.hub import is_offline, parse_ref, resolve_folder

    try:  # a Hub id is checked against the HF cache only offline (online the worker fetches it when it loads)
        ref = parse_ref(base, "MCIE_EDITING_BASE_MODEL_PATH")
        if ref.path is not None and not ref.path.is_dir():
            raise FileNotFoundError(base)
        if ref.path is None and is_offline():
            resolve_folder(base, "MCIE_EDITING_BASE_MODEL_PATH")
    except FileNotFoundError as exc:
        return f"The editing model's base folder (MCIE_EDITING_BASE_MODEL_PATH) was not found: {exc}"
    weights = settings.editing_weights_path
    if weights is not None and not (_weights_folder(weights) / WEIGHTS_FILE).is_file():
        return f"The MCIE-E1 weights (MCIE_EDITING_WEIGHTS_PATH) have no {WEIGHTS_FILE}: {weights}"
    return None


def _weights_folder(weights: str) -> Path:
    """The local folder of a weights path or Hub id (the path itself when it cannot be resolved)."""
    from mcie.hub import resolve_folder

    try:
        return resolve_folder(weights, "MCIE_EDITING_WEIGHTS_PATH")
    except FileNotFoundError:
        return Path(weights)


def model_version(settings: Settings) -> str:
    """A short string naming base + weights: ``<base folder name>:<12 hex digits>`` where the digits hash the
    base folder's name, the weights file and its config; ``<base folder name>:baseline`` without weights (plain
    InstructPix2Pix). Raises :class:`PreviewUnavailable` when no model is configured or its files are missing."""
    reason = unavailable_reason(settings)
    if reason is not None:
        raise PreviewUnavailable(reason)
    base = settings.editing_base_model_path or ""
    name = ((Path(base).resolve().name if Path(base).exists() else base.replace("/", "--")) or "base")[:100]
    weights = settings.editing_weights_path
    if weights is None:
        return f"{name}:baseline"
    digest = hashlib.sha256(name.encode())
    folder = _weights_folder(weights)
    digest.update(_file_digest(folder / WEIGHTS_FILE).encode())
    config = folder / CONFIG_FILE
    if config.is_file():
        digest.update(_file_digest(config).encode())
    return f"{name}:{digest.hexdigest()[:12]}"


def normalize_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full, typed parameters of a job (defaults filled in), or :class:`PreviewError` naming a bad one."""
    given = dict(params or {})
    unknown = sorted(set(given) - set(DEFAULT_PARAMS))
    if unknown:
        raise PreviewError(f"unknown preview parameter {unknown[0]!r} (known: {', '.join(sorted(DEFAULT_PARAMS))})")
    out: dict[str, Any] = {}
    for key, default in DEFAULT_PARAMS.items():
        kind, low, high = PARAM_RANGES[key]
        value = given.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
            raise PreviewError(f"preview parameter {key}: expected {'an integer' if kind is int else 'a number'}, "
                               f"got {value!r}")
        value = kind(value)
        if not low <= value <= high:
            raise PreviewError(f"preview parameter {key}: {value} is outside {low:g}..{high:g}")
        out[key] = value
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """sha256 of the normalized parameters as canonical JSON (what the unique key of ``previews`` uses)."""
    text = json.dumps(normalize_params(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PreviewError(f"seed: expected an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


# ----------------------------------------------------------------------------------------------------------
# the service


def _settings_for(session: Session, settings: Settings | None) -> tuple[Settings, PreviewWorker | None]:
    """The settings of a request (given, else the running worker's, else the process's) and this process's running
    worker for the session's database, if any."""
    worker = _running_worker(session.get_bind().engine.url)
    if settings is not None:
        return settings, worker
    if worker is not None:
        return worker.settings, worker
    from mcie.config import get_settings

    return get_settings(), None


def _current_version(settings: Settings, worker: PreviewWorker | None) -> str:
    if worker is not None and worker.version is not None:
        return worker.version
    return model_version(settings)


def current_version(settings: Settings) -> str:
    """The model version new requests get: the running worker's for the settings' database (fixed when it started),
    else :func:`model_version` of the settings. Raises :class:`PreviewUnavailable` when previews are off."""
    return _current_version(settings, _running_worker(settings.database_url))


def _ahead(session: Session, row: Preview) -> int | None:
    if row.status != JobStatus.queued:
        return None
    return int(session.scalar(
        select(func.count()).select_from(Preview).where(
            Preview.model_version == row.model_version,
            ((Preview.status == JobStatus.queued) & (Preview.id < row.id)) | (Preview.status == JobStatus.running),
        )
    ) or 0)


def _check_requester(session: Session, user_id: int | None) -> None:
    if user_id is None:
        return  # a script or the system (requested_by stays empty)
    user = session.get(User, user_id)
    if user is None or not user.active:
        raise PermissionError(f"no active user with id {user_id}")
    if Role(user.role) not in REQUESTER_ROLES:
        raise PermissionError(f"user {user.username!r} is a {Role(user.role).value}; only raters, leads and admins "
                              "may ask for previews")


def request_preview(
    session: Session,
    sample_id: int,
    user_id: int | None,
    *,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> PreviewStatus:
    """Ask for the model's edit of ``sample_id``; returns at once (the model runs in the worker).

    An existing done row for the same sample, model version, seed and parameters is returned with ``cached=True``;
    a queued or running one is returned as it is; a failed one is queued again. ``settings`` default to the running
    worker's for the session's database (else the process settings). Raises :class:`PreviewUnavailable` when no
    model is configured, :class:`PreviewError` for an unknown sample or a bad seed or parameter,
    :class:`PermissionError` for a user who may not ask.

    Reads then writes: ``session`` must come from ``session_scope(url, write=True)``. The row and its job (or, with
    a :class:`PreviewWorker` thread in this process, the hand-over to it) exist once the caller commits.
    """
    require_write(session, "asking for a preview")
    settings, worker = _settings_for(session, settings)
    version = _current_version(settings, worker)  # raises PreviewUnavailable first: nothing is written then
    seed = _check_seed(seed)
    full = normalize_params(params)
    digest = params_hash(full)
    submit = False
    for attempt in range(2):  # a concurrent identical request may insert the row between our read and write
        try:
            with session.begin_nested():  # a savepoint: a lost race undoes only this attempt
                _check_requester(session, user_id)
                if session.get(Sample, sample_id) is None:
                    raise PreviewError(f"no sample with id {sample_id}")
                row = session.scalar(_same_preview(sample_id, version, seed, digest))
                if row is not None and row.status == JobStatus.done:
                    return _status(row, cached=True)
                if row is None or row.status == JobStatus.failed:
                    if row is None:
                        row = Preview(sample_id=sample_id, model_version=version, seed=seed, params=full,
                                      params_hash=digest)
                        session.add(row)
                    row.status, row.error, row.finished_at, row.image = JobStatus.queued, None, None, None
                    row.requested_by = user_id
                    session.flush()
                    session.add(AuditLog(user_id=user_id, action="preview.request", entity="preview",
                                         entity_id=str(row.id),
                                         details={"sample_id": sample_id, "model_version": version, "seed": seed}))
                    if worker is None:  # no in-process thread: a job for `mcie worker` (or the server's worker)
                        from mcie.annotate import jobs

                        jobs.enqueue(session, "preview", {"preview_id": row.id}, requested_by=user_id,
                                     max_attempts=settings.job_max_attempts)
                submit = row.status == JobStatus.queued
                result = _status(row, ahead=_ahead(session, row))
            break
        except IntegrityError:
            if attempt:
                raise
    if submit and worker is not None:  # the thread must not look for the row before it is committed
        event.listen(session, "after_commit", lambda _session: worker.submit(result.id), once=True)
    return result


def preview_status(session: Session, preview_id: int) -> PreviewStatus:
    """The row ``preview_id`` now; :class:`PreviewError` when there is none."""
    row = session.get(Preview, preview_id)
    if row is None:
        raise PreviewError(f"no preview with id {preview_id}")
    return _status(row, ahead=_ahead(session, row))


def previews_for(session: Session, sample_id: int) -> list[PreviewStatus]:
    """Every preview of a sample (all model versions, seeds and parameters), newest first."""
    rows = session.scalars(
        select(Preview).where(Preview.sample_id == sample_id).order_by(Preview.created_at.desc(), Preview.id.desc())
    )
    return [_status(row) for row in rows]


def _same_preview(sample_id: int, version: str, seed: int, digest: str) -> Select[tuple[Preview]]:
    """The preview row of exactly these (sample, model version, seed, parameters' hash): the cache's key."""
    return select(Preview).where(Preview.sample_id == sample_id, Preview.model_version == version,
                                 Preview.seed == seed, Preview.params_hash == digest)


def find_preview(
    session: Session, sample_id: int, version: str, *, seed: int = 0, params: Mapping[str, Any] | None = None
) -> PreviewStatus | None:
    """The preview of exactly these (sample, model version, seed, parameters), or None; runs nothing."""
    digest = params_hash(params or {})
    row = session.scalar(_same_preview(sample_id, version, seed, digest))
    return None if row is None else _status(row, cached=row.status == JobStatus.done, ahead=_ahead(session, row))


# ----------------------------------------------------------------------------------------------------------
# the model


def load_preview_pipeline(settings: Settings) -> Any:
    """MCIE-E1 (or plain InstructPix2Pix without weights) from the settings, on the configured device (fp16 on CUDA).

    BCCA's open_clip tower comes from ``MCIE_EDITING_VISION_CHECKPOINT`` when set, else from the
    ``clip_vision_checkpoint`` saved in the weights' config."""
    import torch

    from mcie.model.pipeline import MCIEPipeline

    reason = unavailable_reason(settings)
    if reason is not None:
        raise PreviewUnavailable(reason)
    device = resolve_device(settings.device)
    dtype = torch.float16 if device.startswith("cuda") else None
    return MCIEPipeline.from_pretrained(
        settings.editing_base_model_path,  # type: ignore[arg-type]  # checked by unavailable_reason
        weights=settings.editing_weights_path,
        vision_checkpoint=settings.editing_vision_checkpoint,
        torch_dtype=dtype,
        device=device,
    )


@dataclass(frozen=True)
class _Job:
    preview_id: int
    sample_id: int
    seed: int
    params: dict[str, Any]
    instruction: str
    sub_instructions: list[tuple[str, str, tuple[float, float, float, float] | None]]
    source: str


def _source_image(store: ImageStore, sha: str, max_side: int) -> Any:
    from PIL import Image

    image = store.open(sha, "RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# ----------------------------------------------------------------------------------------------------------
# the worker

_WORKERS: dict[URL, PreviewWorker] = {}  # by database URL, parsed (a session's engine knows it so)
_WORKERS_LOCK = threading.Lock()


def _running_worker(url: str | URL) -> PreviewWorker | None:
    with _WORKERS_LOCK:
        return _WORKERS.get(make_url(url))


class PreviewWorker:
    """One background thread that runs the preview jobs of one database, one at a time, with one model.

    ``loader(settings)`` builds the pipeline (default :func:`load_preview_pipeline`); it is called once, on the first
    job (again after a failed load). ``poll_s``: how often an idle worker looks for rows queued by other processes.
    ``calls`` counts the model's runs and ``loads`` its loads (monitoring, tests).
    """

    def __init__(
        self, settings: Settings, *, loader: Callable[[Settings], Any] | None = None, poll_s: float = POLL_S
    ) -> None:
        self.settings = settings
        self.url = settings.database_url
        self.poll_s = poll_s
        self.version: str | None = None
        self.calls = 0
        self.loads = 0
        self._loader = loader or load_preview_pipeline
        self._pipe: Any = None
        self._store: ImageStore | None = None
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- life -------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> PreviewWorker:
        """Start the thread (it re-queues the rows a previous run left behind first); a no-op when no model is
        configured or the worker already runs. Returns the worker."""
        if self.running:
            return self
        reason = unavailable_reason(self.settings)
        if reason is not None:
            log.info("preview worker not started: %s", reason)
            return self
        self.version = model_version(self.settings)
        self._store = ImageStore.from_settings(self.settings)
        self._queue = queue.Queue()  # a fresh queue: a stop() before this start left its sentinel in the old one
        with self._lock:
            self._pending.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mcie-preview-worker", daemon=True)
        self._thread.start()
        with _WORKERS_LOCK:
            _WORKERS[make_url(self.url)] = self
        log.info("preview worker started for model %s", self.version)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the job in progress (a model run cannot be interrupted); its row stays ``running`` and is
        re-queued at the next start if it did not finish within ``timeout`` seconds. Frees the model."""
        with _WORKERS_LOCK:
            if _WORKERS.get(make_url(self.url)) is self:
                del _WORKERS[make_url(self.url)]
        thread = self._thread
        self._stop.set()
        self._queue.put(None)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the preview worker is still running a job after %.0f s; leaving it", timeout)
                return
        self._thread = None
        self._pipe = None

    def submit(self, preview_id: int) -> None:
        """Run the job of row ``preview_id`` when its turn comes (a row that is not queued then is skipped)."""
        with self._lock:
            if preview_id in self._pending:
                return
            self._pending.add(preview_id)
        self._queue.put(preview_id)

    # --- one job at a time, for the job queue's worker (annotate.worker) -------------------------------------
    def prepare(self) -> PreviewWorker:
        """Get ready to :meth:`run_one` without a thread of its own (the model still loads on the first job).
        Raises :class:`PreviewUnavailable` when no model is configured."""
        self.version = model_version(self.settings)
        self._store = ImageStore.from_settings(self.settings)
        return self

    def run_one(self, preview_id: int) -> PreviewStatus:
        """Run the preview of row ``preview_id`` now and return its row. A row left ``running`` or ``failed`` (a
        dead worker's, or a retried job) is queued again first: the job queue's lease says this worker owns it."""
        with session_scope(self.url, write=True) as session:
            session.execute(
                update(Preview)
                .where(Preview.id == preview_id, Preview.status.in_([JobStatus.running, JobStatus.failed]))
                .values(status=JobStatus.queued, error=None)
            )
        with session_scope(self.url) as session:
            version = preview_status(session, preview_id).model_version
        if version != self.version and version == model_version(self.settings):
            self.prepare()  # the weights changed since this worker loaded them: load the new ones
            self._pipe = None
        if version != self.version:
            raise PreviewError(f"preview {preview_id} is for model {version}, but this worker has {self.version}")
        self._process(preview_id)
        with session_scope(self.url) as session:
            return preview_status(session, preview_id)

    # --- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._requeue_left_over()
        except Exception:
            log.exception("could not re-queue the previews left by the last run")
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=self.poll_s)
            except queue.Empty:
                try:
                    self._submit_queued()
                except Exception:  # the loop must outlive a database hiccup
                    log.exception("looking for queued previews failed")
                continue
            if item is None:
                break
            with self._lock:
                self._pending.discard(item)
            try:
                self._process(item)
            except Exception:  # never let one job end the worker
                log.exception("preview %s: unexpected error", item)

    def _requeue_left_over(self) -> None:
        """Rows of this model version left ``running`` (the process ended mid-job) go back to ``queued``; then
        every queued row is submitted, oldest first."""
        with session_scope(self.url, write=True) as session:
            result = session.execute(
                update(Preview)
                .where(Preview.model_version == self.version, Preview.status == JobStatus.running)
                .values(status=JobStatus.queued)
            )
            if result.rowcount:
                log.info("re-queued %d preview(s) left running by the last run", result.rowcount)
        self._submit_queued()

    def _submit_queued(self) -> None:
        with session_scope(self.url) as session:
            ids = list(session.scalars(
                select(Preview.id)
                .where(Preview.model_version == self.version, Preview.status == JobStatus.queued)
                .order_by(Preview.id)
            ))
        for preview_id in ids:
            self.submit(preview_id)

    def _claim(self, preview_id: int) -> _Job | None:
        """Mark the row running if it is still queued for this model version, and read what the job needs."""
        from mcie.annotate.reviews import sample_view

        with session_scope(self.url, write=True) as session:
            claimed = session.execute(
                update(Preview)
                .where(Preview.id == preview_id, Preview.status == JobStatus.queued,
                       Preview.model_version == self.version)
                .values(status=JobStatus.running)
            ).rowcount
            if not claimed:
                return None
            row = session.get(Preview, preview_id)
            assert row is not None
            sample_id, seed, params = row.sample_id, row.seed, dict(row.params or {})
        with session_scope(self.url) as session:  # after the claim is committed: a broken view fails the job
            view = sample_view(session, sample_id)
        subs = [(s.text, s.operation, s.box) for s in view.sub_instructions]
        return _Job(preview_id, sample_id, seed, normalize_params(params), view.instruction, subs, view.steps[0][1])

    def _pipeline(self) -> Any:
        if self._pipe is None:
            log.info("loading the editing model %s", self.version)
            self.loads += 1
            self._pipe = self._loader(self.settings)
        return self._pipe

    def _process(self, preview_id: int) -> None:
        try:
            job = self._claim(preview_id)
        except Exception as exc:
            self._finish(preview_id, error=_error_text(exc))
            return
        if job is None:
            return  # done, failed, taken by another worker, or of another model version
        try:
            assert self._store is not None
            source = _source_image(self._store, job.source, job.params["max_side"])
            pipe = self._pipeline()
            self.calls += 1
            out = pipe(
                source,
                job.instruction,
                sub_instructions=job.sub_instructions,
                num_inference_steps=job.params["num_inference_steps"],
                guidance_scale=job.params["guidance_scale"],
                image_guidance_scale=job.params["image_guidance_scale"],
                seed=job.seed,
            )
            stored = self._store.put_pil(out.images[0], name=f"preview {preview_id}")
        except Exception as exc:
            log.warning("preview %s of sample %s failed: %s", preview_id, job.sample_id, exc)
            self._finish(preview_id, error=_error_text(exc))
            return
        self._finish(preview_id, image=stored)

    def _finish(self, preview_id: int, *, image: Any = None, error: str | None = None) -> None:
        with session_scope(self.url, write=True) as session:
            if image is not None:
                register_images(session, [image])
            session.execute(
                update(Preview)
                .where(Preview.id == preview_id)
                .values(
                    status=JobStatus.done if error is None else JobStatus.failed,
                    image=None if image is None else image.sha256,
                    error=error,
                    finished_at=utcnow(),
                )
            )


# ----------------------------------------------------------------------------------------------------------
# the web app


def enqueue_orphans(session: Session) -> int:
    """Queue a job for every preview row left ``queued`` or ``running`` without a live job (rows written by scripts,
    or by a version before the job queue); returns how many jobs were added. Reads then writes: ``session`` must
    come from ``session_scope(url, write=True)``."""
    from mcie.annotate import jobs
    from mcie.db.models import Job, QueueStatus

    require_write(session, "queueing the previews left without a job")
    wanted = set(session.scalars(select(Preview.id).where(Preview.status.in_([JobStatus.queued, JobStatus.running]))))
    if not wanted:
        return 0
    covered = {
        int((payload or {}).get("preview_id", -1))
        for payload in session.scalars(
            select(Job.payload).where(Job.kind == "preview", Job.status.in_([QueueStatus.queued, QueueStatus.running]))
        )
    }
    missing = sorted(wanted - covered)
    for preview_id in missing:
        jobs.enqueue(session, "preview", {"preview_id": preview_id})
    return len(missing)
