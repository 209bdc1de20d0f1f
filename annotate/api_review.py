"""A small JSON API for reviewing: the review screen's work (lease, submit, skip, progress) for scripts, reviewing
tools and load tests, mounted at ``/api/review`` by :func:`annotate.server.create_app`.

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
:func:`annotate.web_auth.require_reviewer`. Cross-site requests: every POST must carry the session's token in the
``X-CSRF-Token`` header (the token of :func:`annotate.web_auth.csrf_token`, which HTML forms send as a field). A
cross-site form cannot set a header, and a cross-site script cannot read the token, since the app sends no CORS
headers; a page of another site can therefore not submit, skip or lease anything in a reviewer's name.

The MLLM's verdict is in the sample only when the project shows it before submitting
(``show_mllm_verdict_before_submit``), as on the review screen; whether a sample is a gold or calibration sample is
never said.

Serving. Each request does its login check and its database work in one worker thread; at most
:data:`MAX_WORKING` API requests work at once and the others wait first come, first served. The app is one Python
process, so more threads would only take turns on the interpreter lock: under load, a few working at a time finish
each request sooner than twenty sharing it, and the API never takes more than a few of the database pool's
connections from the review screen and the dashboard. Bodies are limited to :data:`MAX_BODY_BYTES` (413).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from annotate import previews, queue
from annotate.project import get_project_config
from annotate.reviews import (
    Answer,
    ReviewError,
    SampleView,
    load_sample_view,
    reviewer_progress,
    skip_sample,
    submit_review,
    validate_answer,
)
from annotate.web_auth import WebUser, check_csrf, csrf_token, require_reviewer
from db.models import Sample
from db.session import session_scope

PREFIX = "/api/review"
CSRF_HEADER = "X-CSRF-Token"
NO_STORE = {"cache-control": "no-store"}
ANSWER_KEYS = frozenset({"consistent", "quality", "complexity", "comment", "box_corrections", "time_spent_s"})
REQUIRED_KEYS = frozenset({"consistent", "quality", "complexity"})
MAX_REASON_CHARS = 2000
MAX_BODY_BYTES = 64 * 1024
MAX_WORKING = 4  # API requests doing database work at once; the rest wait their turn (module docstring)

router = APIRouter(prefix=PREFIX)


# ----------------------------------------------------------------------------------------------------------
# who is asking, and running the work


def _url(request: Request) -> str:
    return request.app.state.settings.database_url


def _json(body: Any, code: int = status.HTTP_200_OK) -> JSONResponse:
    return JSONResponse(body, status_code=code, headers=NO_STORE)


def _error(code: int, message: str) -> JSONResponse:
    return _json({"detail": message}, code)


def _limiter(request: Request) -> anyio.CapacityLimiter:
    """The app's limit on API requests working at once (made on first use, inside the event loop)."""
    limiter = getattr(request.app.state, "review_api_limiter", None)
    if limiter is None:
        limiter = request.app.state.review_api_limiter = anyio.CapacityLimiter(MAX_WORKING)
    return limiter


def _checked(request: Request, work: Callable[[WebUser], Response], csrf: bool) -> Response:
    """Who is asking (401/403 as for every route of the app), the anti-forgery header for writes, then ``work``."""
    user = require_reviewer(request)
    if csrf and not check_csrf(request, request.headers.get(CSRF_HEADER)):
        return _error(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header: send the token of "
                                                 f"GET {PREFIX}/csrf")  # fmt: skip
    return work(user)


async def _serve(request: Request, work: Callable[[WebUser], Response], *, csrf: bool = False) -> Response:
    """Run the login check and ``work`` (blocking database calls) in one worker thread, at most
    :data:`MAX_WORKING` requests at once and first come, first served."""
    return await anyio.to_thread.run_sync(_checked, request, work, csrf, limiter=_limiter(request))


async def _json_body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than :data:`MAX_BODY_BYTES` (read no further than that)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _object(body: bytes | None) -> dict[str, Any] | JSONResponse:
    """The JSON object of a request body, or the 413/422 answer saying why there is none."""
    if body is None:
        return _error(status.HTTP_413_CONTENT_TOO_LARGE, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(body)
    except ValueError:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, "the request body must be a JSON object")
    if not isinstance(payload, dict):
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, "the request body must be a JSON object")
    return payload


# ----------------------------------------------------------------------------------------------------------
# JSON of a sample


def _iso(moment: datetime) -> str:
    return queue.utc(moment).isoformat()


def sample_json(view: SampleView, lease: queue.Lease, *, show_mllm: bool) -> dict[str, Any]:
    """The leased sample as the API returns it (no purpose: a reviewer must not know a gold sample)."""
    body: dict[str, Any] = {
        "sample_id": view.sample_id,
        "assignment_id": lease.assignment_id,
        "lease_expires_at": _iso(lease.expires_at),
        "dataset": view.dataset,
        "external_id": view.external_id,
        "first_turn": view.first_turn,
        "last_turn": view.last_turn,
        "instruction": view.instruction,
        "sub_instructions": [
            {
                "turn_index": sub.turn_index,
                "text": sub.text,
                "operation": sub.operation,
                "box": None if sub.box is None else list(sub.box),
                "box_source": sub.box_source,
            }
            for sub in view.sub_instructions
        ],
        "images": [
            {"label": label, "sha256": sha, "url": f"/img/{sha}", "thumbnail_url": f"/thumb/{sha}"}
            for label, sha in view.steps
        ],
        "flagged": view.flagged,
        "flag_reason": view.flag_reason,
    }
    if show_mllm:
        body["mllm"] = {"verdict": view.mllm_verdict, "conflict": view.mllm_conflict, "reason": view.mllm_reason}
    return body


def _shows_mllm(url: str) -> bool:
    with session_scope(url) as session:
        return get_project_config(session).show_mllm_verdict_before_submit


# ----------------------------------------------------------------------------------------------------------
# answers


@dataclass(frozen=True)
class Window:
    """The turns of a sample, which box corrections must refer to."""

    first_turn: int
    last_turn: int


def parse_answer(payload: dict[str, Any]) -> tuple[Answer, float | None]:
    """The answer and the seconds spent from a JSON body; raises ReviewError for unknown or missing keys (the values
    are checked by :func:`annotate.reviews.validate_answer`, so the API and the screen give the same messages)."""
    unknown = sorted(set(payload) - ANSWER_KEYS)
    missing = sorted(REQUIRED_KEYS - set(payload))
    if unknown or missing:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else []
        )
        raise ReviewError(f"the answer needs consistent, quality and complexity ({'; '.join(parts)})")
    spent = payload.get("time_spent_s")
    if spent is not None and (
        isinstance(spent, bool) or not isinstance(spent, int | float) or not math.isfinite(spent) or spent < 0
    ):
        raise ReviewError(f"time_spent_s must be a non-negative number of seconds; got {spent!r}")
    answer = Answer(
        consistent=payload["consistent"],
        quality=payload["quality"],
        complexity=payload["complexity"],
        comment=payload.get("comment"),
        box_corrections=payload.get("box_corrections"),
    )
    return answer, None if spent is None else float(spent)


def _window(url: str, sample_id: int) -> Window | None:
    with session_scope(url) as session:
        row = session.execute(select(Sample.first_turn, Sample.last_turn).where(Sample.id == sample_id)).first()
        return None if row is None else Window(int(row[0]), int(row[1]))


# ----------------------------------------------------------------------------------------------------------
# the work of each route (in a worker thread, after the login check)


def _next(url: str, user: WebUser, exclude: list[int]) -> Response:
    try:
        lease = queue.next_sample(url, user.id, exclude=exclude)
    except queue.QueueError as exc:
        return _error(status.HTTP_409_CONFLICT, str(exc))
    if lease is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT, headers=NO_STORE)
    try:
        with session_scope(url) as session:  # the view and the project setting in one read transaction
            view = load_sample_view(session, lease.sample_id)
            show_mllm = get_project_config(session).show_mllm_verdict_before_submit
    except ReviewError as exc:  # broken data (images missing): the lease stays, a lead must look at the sample
        return _error(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
    return _json(sample_json(view, lease, show_mllm=show_mllm))


def _submit(url: str, user: WebUser, sample_id: int, body: bytes | None) -> Response:
    payload = _object(body)
    if isinstance(payload, Response):
        return payload
    try:
        answer, spent = parse_answer(payload)
    except ReviewError as exc:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
    try:
        record = submit_review(url, user.id, sample_id, answer, time_spent_s=spent)
    except ReviewError as exc:
        return _refusal(url, sample_id, answer, exc)
    except PermissionError as exc:
        return _error(status.HTTP_403_FORBIDDEN, str(exc))
    body_out = {
        "review_id": record.review_id,
        "sample_id": record.sample_id,
        "revision": record.revision,
        "created_at": _iso(record.created_at),
    }
    return _json(body_out, status.HTTP_201_CREATED)


def _refusal(url: str, sample_id: int, answer: Answer, exc: ReviewError) -> JSONResponse:
    """The status of a refused submit: 404 for an unknown sample, 422 for an invalid answer, else 409 (the sample
    cannot take this review now). Only refusals pay for the extra read that tells them apart."""
    window = _window(url, sample_id)
    if window is None:
        return _error(status.HTTP_404_NOT_FOUND, f"no sample with id {sample_id}")
    try:
        validate_answer(answer, window)
    except ReviewError:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
    return _error(status.HTTP_409_CONFLICT, str(exc))


def _skip(url: str, user: WebUser, sample_id: int, body: bytes | None) -> Response:
    payload = _object(body)
    if isinstance(payload, Response):
        return payload
    reason = payload.get("reason")
    if set(payload) - {"reason"} or not isinstance(reason, str) or not reason.strip():
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, 'send {"reason": "why you skip it"}: a reason is required')
    if len(reason) > MAX_REASON_CHARS:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, f"the reason is longer than {MAX_REASON_CHARS} characters")
    try:
        skip_sample(url, user.id, sample_id, reason)
    except ReviewError as exc:
        if _window(url, sample_id) is None:
            return _error(status.HTTP_404_NOT_FOUND, f"no sample with id {sample_id}")
        return _error(status.HTTP_409_CONFLICT, str(exc))
    return _json({"sample_id": sample_id, "skipped": True})


def _progress(url: str, user: WebUser) -> Response:
    progress = reviewer_progress(url, user.id)
    return _json(
        {"done_today": progress.done_today, "done_total": progress.done_total, "queue_left": progress.queue_left}
    )


def _preview_json(found: previews.PreviewStatus) -> dict[str, Any]:
    return {
        "preview_id": found.id, "sample_id": found.sample_id, "status": found.status, "cached": found.cached,
        "model_version": found.model_version, "seed": found.seed, "params": found.params, "ahead": found.ahead,
        "image": found.image, "image_url": f"/img/{found.image}" if found.image else None, "error": found.error,
    }  # fmt: skip


def _preview(url: str, user: WebUser, sample_id: int, raw: bytes | None) -> Response:
    body = _object(b"{}" if raw == b"" else raw)  # an empty body asks with the defaults
    if isinstance(body, JSONResponse):
        return body
    if set(body) - {"seed", "params"}:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, 'expected {"seed": int?, "params": object?}')
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, "params: expected an object")
    try:
        found = previews.request_preview(url, sample_id, user.id, seed=body.get("seed", 0), params=params)
    except previews.PreviewUnavailable as exc:
        return _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))
    except previews.PreviewError as exc:
        code = status.HTTP_404_NOT_FOUND if str(exc).startswith("no sample") else status.HTTP_422_UNPROCESSABLE_CONTENT
        return _error(code, str(exc))
    except PermissionError as exc:
        return _error(status.HTTP_403_FORBIDDEN, str(exc))
    return _json(_preview_json(found), status.HTTP_200_OK if found.status == "done" else status.HTTP_202_ACCEPTED)


def _preview_status(url: str, preview_id: int) -> Response:
    try:
        return _json(_preview_json(previews.preview_status(url, preview_id)))
    except previews.PreviewError as exc:
        return _error(status.HTTP_404_NOT_FOUND, str(exc))


# ----------------------------------------------------------------------------------------------------------
# routes


@router.get("/csrf", response_model=None)
async def get_csrf(request: Request) -> Response:
    """The session's anti-forgery token (made on first use) for the ``X-CSRF-Token`` header of POST requests."""

    def work(user: WebUser) -> Response:
        return _json({"csrf_token": csrf_token(request), "header": CSRF_HEADER, "username": user.username})

    return await _serve(request, work)


@router.get("/next", response_model=None)
async def get_next(
    request: Request, exclude: Annotated[list[int] | None, Query(max_length=queue.MAX_LEASES)] = None
) -> Response:
    """Lease (or get back) the caller's sample; 204 when there is nothing left for them."""
    url = _url(request)
    return await _serve(request, lambda user: _next(url, user, exclude or []))


@router.post("/{sample_id}", response_model=None)
async def post_review(request: Request, sample_id: int) -> Response:
    """Submit the caller's answer for a sample they were given: 201, or 404/409/422 with the reason."""
    url, body = _url(request), await _json_body(request)
    return await _serve(request, lambda user: _submit(url, user, sample_id, body), csrf=True)


@router.post("/{sample_id}/skip", response_model=None)
async def post_skip(request: Request, sample_id: int) -> Response:
    """Give up a leased sample with a reason; nobody gets it twice, its slot goes to another reviewer."""
    url, body = _url(request), await _json_body(request)
    return await _serve(request, lambda user: _skip(url, user, sample_id, body), csrf=True)


@router.get("/progress", response_model=None)
async def get_progress(request: Request) -> Response:
    """Reviews done today (UTC) and in total, and how many pool samples the caller could still be given."""
    url = _url(request)
    return await _serve(request, lambda user: _progress(url, user))


@router.post("/{sample_id}/preview", response_model=None)
async def post_preview(request: Request, sample_id: int) -> Response:
    """Ask for the model's edit of a sample; a worker makes it (202), or it is in the cache already (200)."""
    url, body = _url(request), await _json_body(request)
    return await _serve(request, lambda user: _preview(url, user, sample_id, body), csrf=True)


@router.get("/previews/{preview_id}", response_model=None)
async def get_preview(request: Request, preview_id: int) -> Response:
    """A preview's status, and its image once done."""
    url = _url(request)
    return await _serve(request, lambda user: _preview_status(url, preview_id))
