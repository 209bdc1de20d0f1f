"""A small JSON API for reviewing: the review screen's work (lease, submit, skip, progress) for scripts, reviewing
tools and load tests, mounted at ``/api/review`` by :func:`annotate.web.server.create_app`.

Routes (all answers are JSON with ``Cache-Control: no-store``; errors are ``{"detail": message}``):

- ``GET /api/review/csrf`` - the session's anti-forgery token, to send back as ``X-CSRF-Token`` on every POST;
- ``GET /api/review/next`` - the sample to review now, leased to the caller (:func:`annotate.queue.next_sample`): a
  reload gets the same sample until it is submitted or skipped; ``?exclude=ID`` (at most twice) leases another one
  next to it, as the review screen prefetches. 200 with the sample (id, instruction, sub-instructions with their
  boxes, image hashes and URLs, lease expiry), 204 when the caller's queue is empty, 409 when they already hold two
  leases that are both excluded;
- ``POST /api/review/{sample_id}`` - submit an answer ``{"consistent": bool, "quality": 1-5, "complexity": 1-5,
  "comment": str?, "box_corrections": [{"turn_index": k, "box": [x0, y0, x1, y1]}]?, "time_spent_s": float?}``
  (:func:`annotate.reviews.submit_review`): 201 with the review id and revision; 422 when the answer is invalid,
  404 for an unknown sample, 409 when the sample cannot take this review (not assigned, already reviewed, skipped,
  or it has all its reviews from others) - each with the reviewer-facing message;
- ``POST /api/review/{sample_id}/skip`` - give a leased sample up, ``{"reason": str}`` (required);
- ``GET /api/review/progress`` - reviews done today (UTC) and in total, and pool samples still left for the caller;
- ``POST /api/review/{sample_id}/preview`` - ask for the model's edit of a sample, ``{"seed": int?, "params":
  {...}?}`` (:func:`annotate.previews.request_preview`): 202 with the preview's id and status while a worker makes it
  (a job of the queue: the web process needs no GPU), 200 when it is done already (cached), 503 when no model is
  configured, 404 for an unknown sample, 422 for a bad seed or parameter;
- ``GET /api/review/previews/{preview_id}`` - the preview's status (``queued``, ``running``, ``done`` with the
  image's hash and URL, or ``failed`` with the error).

Who may call: the same session cookie as the web app (log in through ``/login``); raters, leads and admins
only (401 without a session, 403 for study participants), checked on every request by
:func:`annotate.web.auth.require_reviewer`. Cross-site requests: every POST must carry the session's token in the
``X-CSRF-Token`` header (the token of :func:`annotate.web.auth.csrf_token`, which HTML forms send as a field). A
cross-site form cannot set a header, and a cross-site script cannot read the token, since the app sends no CORS
headers; a page of another site can therefore not submit, skip or lease anything in a reviewer's name.

The MLLM's verdict is in the sample only when the project shows it before submitting
(``show_mllm_verdict_before_submit``), as on the review screen; whether a sample is a gold or calibration sample is
never said.

Serving. FastAPI's idiom: pydantic models in and out, the user, the anti-forgery check and the database session
through ``Depends`` (a write transaction, :func:`annotate.web.deps.get_write_session`, for the routes that lease,
submit or skip). Every route first takes a working slot (:func:`work_slot`): at most :data:`MAX_WORKING` API
requests do their login check and database work at once, and the others wait first come, first served. The app is
one Python process, so more threads would only take turns on the interpreter lock: under load, a few working at a
time finish each request sooner than twenty sharing it, and the API never takes more than a few of the database
pool's connections from the review screen and the dashboard. Bodies are limited to :data:`MAX_BODY_BYTES` (413, by
:class:`annotate.web.edges.BodyLimit` before anything reads them). The bodies' models check their keys with the
reviewer-facing messages of the review screen (:func:`annotate.web.edges.user_message`), so a 422 says in words
what to fix; the values are checked by the services.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.annotate import previews, queue
from mcie.annotate.project import get_project_config
from mcie.annotate.reviews import (
    Answer,
    ReviewError,
    SampleView,
    reviewer_progress,
    sample_view,
    skip_sample,
    submit_review,
    validate_answer,
)
from mcie.annotate.web.auth import WebUser, check_csrf, csrf_token, require_reviewer
from mcie.annotate.web.deps import get_session, get_write_session, working_limiter
from mcie.annotate.web.edges import ROUTE_LIMITS, user_message
from mcie.db.models import Sample

PREFIX = "/api/review"
CSRF_HEADER = "X-CSRF-Token"
NO_STORE = {"cache-control": "no-store"}
ANSWER_KEYS = frozenset({"consistent", "quality", "complexity", "comment", "box_corrections", "time_spent_s"})
REQUIRED_KEYS = frozenset({"consistent", "quality", "complexity"})
MAX_REASON_CHARS = 2000
MAX_BODY_BYTES = dict(ROUTE_LIMITS)[PREFIX + "/"]  # enforced by edges.BodyLimit before a body is read
MAX_WORKING = 4  # API requests doing database work at once; the rest wait their turn (module docstring)


# ----------------------------------------------------------------------------------------------------------
# dependencies: a working slot, who is asking, the anti-forgery header


async def work_slot(request: Request, response: Response) -> AsyncIterator[None]:
    """Hold one of :data:`MAX_WORKING` slots (first come, first served) while the request is checked and served;
    every answer of the API is ``no-store``."""
    response.headers.update(NO_STORE)
    async with working_limiter(request, "review_api_limiter", MAX_WORKING):
        yield


def _error(code: int, message: str) -> HTTPException:
    return HTTPException(code, message, headers=NO_STORE)


Reviewer = Annotated[WebUser, Depends(require_reviewer)]


async def csrf_checked(
    request: Request, user: Reviewer, token: Annotated[str | None, Header(alias=CSRF_HEADER)] = None
) -> WebUser:
    """The reviewer of a POST that carries the session's anti-forgery token (403 otherwise; async: pure work)."""
    if not check_csrf(request, token):
        raise _error(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header: send the token of "
                                                f"GET {PREFIX}/csrf")
    return user


Writer = Annotated[WebUser, Depends(csrf_checked)]
DB = Annotated[Session, Depends(get_session, scope="function")]
WriteDB = Annotated[Session, Depends(get_write_session, scope="function")]  # leases, reviews, skips

router = APIRouter(prefix=PREFIX, dependencies=[Depends(work_slot, scope="function")])


# ----------------------------------------------------------------------------------------------------------
# models in


class AnswerIn(BaseModel):
    """A submitted answer. Its keys are checked here; its values by :func:`annotate.reviews.validate_answer`, so the
    API and the review screen say the same thing about the same mistake."""

    model_config = ConfigDict(extra="forbid")

    consistent: Any
    quality: Any
    complexity: Any
    comment: Any = None
    box_corrections: Any = None
    time_spent_s: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise user_message("the request body must be a JSON object")
        unknown = sorted(set(data) - ANSWER_KEYS)
        missing = sorted(REQUIRED_KEYS - set(data))
        if unknown or missing:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else []
            )
            raise user_message(f"the answer needs consistent, quality and complexity ({'; '.join(parts)})")
        spent = data.get("time_spent_s")
        if spent is not None and (
            isinstance(spent, bool) or not isinstance(spent, int | float) or not math.isfinite(spent) or spent < 0
        ):
            raise user_message(f"time_spent_s must be a non-negative number of seconds; got {spent!r}")
        return data

    def answer(self) -> Answer:
        return Answer(consistent=self.consistent, quality=self.quality, complexity=self.complexity,
                      comment=self.comment, box_corrections=self.box_corrections)


class SkipIn(BaseModel):
    """Why a reviewer gives a sample up (required)."""

    model_config = ConfigDict(extra="forbid")

    reason: str

    @model_validator(mode="before")
    @classmethod
    def _reason(cls, data: Any) -> Any:
        reason = data.get("reason") if isinstance(data, dict) else None
        if not isinstance(data, dict) or set(data) - {"reason"} or not isinstance(reason, str) or not reason.strip():
            raise user_message('send {"reason": "why you skip it"}: a reason is required')
        if len(reason) > MAX_REASON_CHARS:
            raise user_message(f"the reason is longer than {MAX_REASON_CHARS} characters")
        return data


class PreviewIn(BaseModel):
    """A preview request; the seed and parameters are checked by :func:`annotate.previews.request_preview`."""

    model_config = ConfigDict(extra="forbid")

    seed: Any = 0
    params: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise user_message("the request body must be a JSON object")
        if set(data) - {"seed", "params"}:
            raise user_message('expected {"seed": int?, "params": object?}')
        if data.get("params") is not None and not isinstance(data["params"], dict):
            raise user_message("params: expected an object")
        return data


# ----------------------------------------------------------------------------------------------------------
# models out


class CsrfOut(BaseModel):
    csrf_token: str
    header: str
    username: str


class SubInstructionOut(BaseModel):
    turn_index: int
    text: str
    operation: str | None
    box: list[float] | None
    box_source: str | None


class ImageOut(BaseModel):
    label: str
    sha256: str
    url: str
    thumbnail_url: str


class MllmOut(BaseModel):
    verdict: str | None
    conflict: bool | None
    reason: str | None


class SampleOut(BaseModel):
    """The leased sample (no purpose: a reviewer must not know a gold sample; ``mllm`` only when the project shows
    it before submitting)."""

    sample_id: int
    assignment_id: int
    lease_expires_at: str
    dataset: str | None
    external_id: str | None
    first_turn: int
    last_turn: int
    instruction: str
    sub_instructions: list[SubInstructionOut]
    images: list[ImageOut]
    flagged: bool
    flag_reason: str | None
    mllm: MllmOut | None = None


class ReviewOut(BaseModel):
    review_id: int
    sample_id: int
    revision: int
    created_at: str


class SkipOut(BaseModel):
    sample_id: int
    skipped: bool


class ProgressOut(BaseModel):
    done_today: int
    done_total: int
    queue_left: int


class PreviewOut(BaseModel):
    preview_id: int
    sample_id: int
    status: str
    cached: bool
    model_version: str | None
    seed: int | None
    params: dict[str, Any] | None
    ahead: int | None
    image: str | None
    image_url: str | None
    error: str | None


def _iso(moment: datetime) -> str:
    return queue.utc(moment).isoformat()


def sample_json(view: SampleView, lease: queue.Lease, *, show_mllm: bool) -> SampleOut:
    """The leased sample as the API returns it."""
    out = SampleOut(
        sample_id=view.sample_id,
        assignment_id=lease.assignment_id,
        lease_expires_at=_iso(lease.expires_at),
        dataset=view.dataset,
        external_id=view.external_id,
        first_turn=view.first_turn,
        last_turn=view.last_turn,
        instruction=view.instruction,
        sub_instructions=[
            SubInstructionOut(
                turn_index=sub.turn_index,
                text=sub.text,
                operation=sub.operation,
                box=None if sub.box is None else list(sub.box),
                box_source=sub.box_source,
            )
            for sub in view.sub_instructions
        ],
        images=[
            ImageOut(label=label, sha256=sha, url=f"/img/{sha}", thumbnail_url=f"/thumb/{sha}")
            for label, sha in view.steps
        ],
        flagged=view.flagged,
        flag_reason=view.flag_reason,
    )
    if show_mllm:
        out.mllm = MllmOut(verdict=view.mllm_verdict, conflict=view.mllm_conflict, reason=view.mllm_reason)
    return out


def _preview_out(found: previews.PreviewStatus) -> PreviewOut:
    return PreviewOut(
        preview_id=found.id, sample_id=found.sample_id, status=found.status, cached=found.cached,
        model_version=found.model_version, seed=found.seed, params=found.params, ahead=found.ahead,
        image=found.image, image_url=f"/img/{found.image}" if found.image else None, error=found.error,
    )


# ----------------------------------------------------------------------------------------------------------
# routes (plain functions: FastAPI runs them in worker threads, inside the working slot)


@router.get("/csrf")
def get_csrf(request: Request, user: Reviewer) -> CsrfOut:
    """The session's anti-forgery token (made on first use) for the ``X-CSRF-Token`` header of POST requests."""
    return CsrfOut(csrf_token=csrf_token(request), header=CSRF_HEADER, username=user.username)


@router.get("/next", response_model=SampleOut, response_model_exclude_unset=True,
            responses={204: {"description": "nothing left for the caller"}})
def get_next(
    user: Reviewer,
    session: WriteDB,
    exclude: Annotated[list[int] | None, Query(max_length=queue.MAX_LEASES)] = None,
) -> SampleOut | Response:
    """Lease (or get back) the caller's sample; 204 when there is nothing left for them."""
    try:
        lease = queue.next_sample(session, user.id, exclude=exclude or [])
    except queue.QueueError as exc:
        raise _error(status.HTTP_409_CONFLICT, str(exc)) from None
    if lease is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT, headers=NO_STORE)
    session.commit()  # the lease stays even when reading the sample's view below fails
    try:  # the view and the project setting in one transaction, begun after the lease was committed
        view = sample_view(session, lease.sample_id)
        show_mllm = get_project_config(session).show_mllm_verdict_before_submit
    except ReviewError as exc:  # broken data (images missing): the lease stays, a lead must look at the sample
        raise _error(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from None
    return sample_json(view, lease, show_mllm=show_mllm)


@router.post("/{sample_id}", status_code=status.HTTP_201_CREATED)
def post_review(sample_id: int, body: AnswerIn, user: Writer, session: WriteDB) -> ReviewOut:
    """Submit the caller's answer for a sample they were given: 201, or 404/409/422 with the reason."""
    answer = body.answer()
    try:
        record = submit_review(session, user.id, sample_id, answer, time_spent_s=body.time_spent_s)
    except ReviewError as exc:
        raise _refusal(session, sample_id, answer, exc) from None
    except PermissionError as exc:
        raise _error(status.HTTP_403_FORBIDDEN, str(exc)) from None
    return ReviewOut(review_id=record.review_id, sample_id=record.sample_id, revision=record.revision,
                     created_at=_iso(record.created_at))


def _refusal(session: Session, sample_id: int, answer: Answer, exc: ReviewError) -> HTTPException:
    """The status of a refused submit: 404 for an unknown sample, 422 for an invalid answer, else 409 (the sample
    cannot take this review now). Only refusals pay for the extra read that tells them apart."""
    window = session.execute(select(Sample.first_turn, Sample.last_turn).where(Sample.id == sample_id)).first()
    if window is None:
        return _error(status.HTTP_404_NOT_FOUND, f"no sample with id {sample_id}")
    try:
        validate_answer(answer, window)
    except ReviewError:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
    return _error(status.HTTP_409_CONFLICT, str(exc))


@router.post("/{sample_id}/skip")
def post_skip(sample_id: int, body: SkipIn, user: Writer, session: WriteDB) -> SkipOut:
    """Give up a leased sample with a reason; nobody gets it twice, its slot goes to another reviewer."""
    try:
        skip_sample(session, user.id, sample_id, body.reason)
    except ReviewError as exc:
        if session.get(Sample, sample_id) is None:
            raise _error(status.HTTP_404_NOT_FOUND, f"no sample with id {sample_id}") from None
        raise _error(status.HTTP_409_CONFLICT, str(exc)) from None
    return SkipOut(sample_id=sample_id, skipped=True)


@router.get("/progress")
def get_progress(user: Reviewer, session: DB) -> ProgressOut:
    """Reviews done today (UTC) and in total, and how many pool samples the caller could still be given."""
    progress = reviewer_progress(session, user.id)
    return ProgressOut(done_today=progress.done_today, done_total=progress.done_total, queue_left=progress.queue_left)


@router.post("/{sample_id}/preview", responses={202: {"description": "queued: a worker makes it"}})
def post_preview(
    response: Response,
    sample_id: int,
    user: Writer,
    session: WriteDB,
    body: PreviewIn | None = None,
) -> PreviewOut:
    """Ask for the model's edit of a sample; a worker makes it (202), or it is in the cache already (200). An empty
    body asks with the defaults."""
    body = body or PreviewIn()
    try:
        found = previews.request_preview(session, sample_id, user.id, seed=body.seed, params=body.params)
    except previews.PreviewUnavailable as exc:
        raise _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    except previews.PreviewError as exc:
        code = status.HTTP_404_NOT_FOUND if str(exc).startswith("no sample") else status.HTTP_422_UNPROCESSABLE_CONTENT
        raise _error(code, str(exc)) from None
    except PermissionError as exc:
        raise _error(status.HTTP_403_FORBIDDEN, str(exc)) from None
    response.status_code = status.HTTP_200_OK if found.status == "done" else status.HTTP_202_ACCEPTED
    return _preview_out(found)


@router.get("/previews/{preview_id}")
def get_preview(preview_id: int, user: Reviewer, session: DB) -> PreviewOut:
    """A preview's status, and its image once done."""
    try:
        return _preview_out(previews.preview_status(session, preview_id))
    except previews.PreviewError as exc:
        raise _error(status.HTTP_404_NOT_FOUND, str(exc)) from None
