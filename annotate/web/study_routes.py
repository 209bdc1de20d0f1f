"""The user study's web side: invite links, the participants' JSON API, the leads' study API, and the gate that keeps
participants inside their study. :func:`register_study` adds all of it to the app (``annotate.web.server.create_app``).

Routes:

- ``GET /study/join/{token}`` - an invite link: checks the token (:func:`annotate.study.invite_problem`), starts a
  session for the participant that is limited to that study (``session["study"]``) and sends them to ``/study/``;
  an unknown, withdrawn or closed-study link gets a page that says so (404 / 403), and unknown tokens count as
  failures for the login throttle (per IP address, :mod:`annotate.web.throttle`);
- ``/study/`` - the participant's screen (Gradio, :mod:`annotate.web.ui_study`), for any logged-in user; it shows the
  study of the session's invite link, or else the user's first open study;
- ``GET /api/study/{id}/current``, ``POST /api/study/{id}/vote``, ``POST /api/study/{id}/advance`` - the
  participant's flow as JSON (:func:`annotate.study.current_item`, ``cast_vote``, ``advance``), used by the study
  screen's script and by ``bench/study_load.py``; POSTs need the session's CSRF token in the ``X-CSRF-Token``
  header (``current`` returns it). A refused request answers 401 (no session), 403 (not enrolled, revoked,
  another study, bad CSRF token), 409 (not the current screen, a screen already completed, a missing vote, a
  closed study) or 422 (bad body);
- ``GET /api/study`` (every study), ``GET /api/study/{id}/participants``, ``GET /api/study/{id}/results`` and
  ``GET /api/study/{id}/votes.csv`` - for leads and admins;
- ``/studies/`` - the leads' study results page (Gradio: :func:`annotate.web.ui_study.study_results_tab` on its own).

:class:`StudyGate` (ASGI middleware, inside the session middleware) confines a *limited* session - one opened by an
invite link, whatever the account's role, or any session of a ``participant`` account - to ``/study/``, the
participant API of its own study, the images of its own items (``/img`` and ``/thumb`` of the source and outputs of
the items in the participant's sequence), ``/static``, ``/login``, ``/logout``, ``/healthz`` and ``/api/whoami``:
everything else (``/review``, ``/dashboard``, the leads' JSON, images of other studies or samples) is refused with
403. An invite link for a rater's or lead's account therefore never opens more than the study. The gate also
refuses ``/studies`` to anybody but leads and admins, and sends anonymous visitors of ``/study`` to a page that
tells them to open their invitation link again.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from mcie.annotate import study
from mcie.annotate.web.auth import (
    LEAD_ROLES,
    SESSION_STUDY_KEY,
    WebUser,
    client_ip,
    csrf_token,
    current_user,
    require_lead,
    session_study,
    snapshot,
    start_session,
)
from mcie.annotate.web.common import esc, mount_gradio
from mcie.annotate.web.deps import get_session, get_write_session, working_limiter
from mcie.annotate.web.edges import Headers, send_answer, under, wants_html
from mcie.config import Settings
from mcie.db.models import AuditLog, Role, User
from mcie.db.session import session_scope

log = logging.getLogger(__name__)

STUDY_PATH = "/study"
RESULTS_PATH = "/studies"
JOIN_PREFIX = "/study/join/"
API_PREFIX = "/api/study"
CSRF_HEADER = "x-csrf-token"
ALL_ROLES: frozenset[Role] = frozenset(Role)
PARTICIPANT_API_RE = re.compile(r"^/api/study/(\d+)/(current|vote|advance)$")
IMAGE_RE = re.compile(r"^/(?:img|thumb)/([0-9a-f]{64})$")
# Paths a limited (participant) session may use besides its study's API and images.
LIMITED_EXACT = frozenset({"/login", "/logout", "/favicon.ico", "/healthz", "/api/whoami", STUDY_PATH})
LIMITED_PREFIXES = (STUDY_PATH + "/", "/static/")
# Paths where a password session needs no role lookup by this gate (other gates or the route check them).
# /api/review/ checks roles itself (participants get 403 there), so the gate need not load the user again.
PASS_PREFIXES = ("/review/", "/dashboard/", "/static/", "/api/review/", STUDY_PATH + "/")
PASS_EXACT = frozenset({"/review", "/dashboard", "/login", "/logout", "/favicon.ico", "/healthz", "/api/whoami"})
NO_STORE = {"cache-control": "no-store"}
PARTICIPANT_ONLY = "Study participants can only open their study screen."


# ----------------------------------------------------------------------------------------------------------
# wiring


def register_study(app: FastAPI, settings: Settings, *, mount_ui: bool = True) -> None:
    """Add the study's routes, its Gradio pages (``/study``, ``/studies``; not with ``mount_ui=False``) and
    :class:`StudyGate` to ``app``. Call it in ``create_app`` before the session middleware is added (the gate must
    sit inside it)."""
    app.include_router(router)
    if mount_ui:
        _mount_pages(app, settings)
    app.add_middleware(StudyGate, database_url=settings.database_url)


def _mount_pages(app: FastAPI, settings: Settings) -> None:
    from mcie.annotate.web import ui_study  # Gradio loads only when the screens are mounted

    mount_gradio(app, settings, STUDY_PATH, ui_study.build(settings), ALL_ROLES, ui_study.page_assets())
    mount_gradio(app, settings, RESULTS_PATH, ui_study.build_results(settings), LEAD_ROLES,
                 ui_study.results_page_assets())


router = APIRouter()
ReadDB = Annotated[Session, Depends(get_session, scope="function")]
# A write session takes SQLite's write lock only when first used: a route can hold both and write only when needed.
# It must end its read (``session.commit()``) before it writes: a request holding one pooled connection while it
# waits for a second deadlocks the pool when a crowd arrives at once (50 participants opening their links: joins
# failed with 500 after the pool's 30 s timeout in bench/study_load.py).
WriteDB = Annotated[Session, Depends(get_write_session, scope="function")]
MAX_WORKING = 4  # participants' requests doing database work at once (8 measured worse: vote p95 158 vs 139 ms)


async def _working(request: Request) -> AsyncIterator[None]:
    """One of :data:`MAX_WORKING` slots while a participant's request is served (:func:`deps.working_limiter`): 50
    participants opening their links at once otherwise held every pooled connection while their first screens were
    assigned one by one (serialised on the study row) and the rest failed after the pool's 30 s."""
    async with working_limiter(request, "study_api_limiter", MAX_WORKING):
        yield


WORKING = Depends(_working, scope="function")


# ----------------------------------------------------------------------------------------------------------
# invite links


def join_page(title: str, message: str, *, link: tuple[str, str] | None = None) -> str:
    """A small HTML page for the participant (everything escaped)."""
    extra = f"<p><a href='{esc(link[0])}'>{esc(link[1])}</a></p>" if link else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>mcie study - {esc(title)}</title><link rel=stylesheet href=/static/app.css></head>"
        f"<body class=mcie-page><main class=mcie-card id=study-message><h1>{esc(title)}</h1><p>{esc(message)}</p>"
        f"{extra}</main></body></html>"
    )


@router.get(JOIN_PREFIX + "{token}", response_class=HTMLResponse, dependencies=[WORKING])
def join(request: Request, token: str, session: ReadDB, write: WriteDB) -> Response:
    """Open an invite link: a session limited to the link's study, then the study screen (the token is checked in
    the read transaction; only a working link writes, its audit row)."""
    throttle = request.app.state.throttle
    ip = client_ip(request)
    if throttle.retry_after(ip, join=True) is not None:
        body = join_page("Too many attempts", "Too many invalid invitation links were opened from here. Please "
                         "wait a few minutes and open your link again.")
        return HTMLResponse(body, status_code=status.HTTP_429_TOO_MANY_REQUESTS, headers=NO_STORE)
    token = token.strip()
    problem = study.invite_problem(session, token) if len(token) <= 200 else study.INVITE_UNKNOWN
    found = None if problem else study.participant_from_token(session, token)
    if found is None:
        problem = problem or study.INVITE_UNKNOWN
        unknown = problem == study.INVITE_UNKNOWN
        if unknown:
            throttle.record_failure(ip, join=True)
        title = "Invitation not valid" if unknown else "This link does not open the study"
        code = status.HTTP_404_NOT_FOUND if unknown else status.HTTP_403_FORBIDDEN
        return HTMLResponse(join_page(title, problem), status_code=code, headers=NO_STORE)
    study_id, user_id = found
    session.commit()  # the read's connection goes back to the pool before the write takes one (see ReadDB)
    user = snapshot(write.get(User, user_id))  # the write transaction: BEGIN IMMEDIATE on SQLite
    write.add(
        AuditLog(
            user_id=user_id,
            action="study.join",
            entity="study",
            entity_id=str(study_id),
            details={"ip": ip},
        )
    )
    if user is None:  # disabled between the two reads
        return HTMLResponse(join_page("This link does not open the study", study.INVITE_DISABLED), status_code=403)
    start_session(request, user)
    request.session[SESSION_STUDY_KEY] = study_id
    csrf_token(request)
    return RedirectResponse(STUDY_PATH + "/", status_code=status.HTTP_303_SEE_OTHER, headers=NO_STORE)


# ----------------------------------------------------------------------------------------------------------
# the participant's JSON API


class VoteBody(BaseModel):
    """A choice on the current screen: ``choice`` is a label (``"A"``) or null for "none is acceptable"."""

    model_config = ConfigDict(extra="forbid")

    item_id: int
    criterion: str = Field(min_length=1, max_length=32)
    choice: str | None = Field(default=None, min_length=1, max_length=1)
    latency_ms: float | None = Field(default=None, ge=0, le=7 * 24 * 3600 * 1000)


class AdvanceBody(BaseModel):
    """Complete the current screen; ``render`` asks for the next screen's HTML (the study page) as well."""

    model_config = ConfigDict(extra="forbid")

    item_id: int
    render: bool = False


async def participant(request: Request, study_id: int) -> WebUser:
    """The session's user, allowed to act in ``study_id`` (401/403 otherwise; read with the session row by the
    session middleware, so no database work here)."""
    user = await current_user(request.scope, request.app.state.settings.database_url)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "your session has ended: open your invitation link again")
    limited = session_study(request)
    if limited is not None and limited != study_id:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this session belongs to another study")
    return user


async def voter(
    request: Request,
    user: Annotated[WebUser, Depends(participant)],
    token: Annotated[str | None, Header(alias=CSRF_HEADER)] = None,
) -> WebUser:
    """:func:`participant` for a POST, which must carry the session's CSRF token."""
    expected = request.session.get("csrf")
    if not expected or not token or not secrets.compare_digest(str(expected), token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header; reload the page")
    return user


Participant = Annotated[WebUser, Depends(participant)]
Voter = Annotated[WebUser, Depends(voter)]


def _study_error(exc: study.StudyError) -> HTTPException:
    code = status.HTTP_403_FORBIDDEN if isinstance(exc, study.StudyAccessError) else status.HTTP_409_CONFLICT
    return HTTPException(code, str(exc), headers=NO_STORE)


class OutputOut(BaseModel):
    label: str
    image: str


class ScreenOut(BaseModel):
    """The participant's current screen (labels and image hashes, never method names), or ``finished`` with their
    progress; ``html`` when the page asked for it rendered, ``csrf`` on ``/current``."""

    finished: bool
    study_id: int
    item_id: int | None = None
    position: int | None = None
    total: int
    progress: str | None = None
    instruction: str | None = None
    source_image: str | None = None
    outputs: list[OutputOut] | None = None
    criteria: list[str] | None = None
    choices: dict[str, str | None] | None = None
    completed: int | None = None
    html: str | None = None
    csrf: str | None = None


class VoteOut(BaseModel):
    ok: bool
    study_id: int
    item_id: int
    criterion: str
    choice: str | None


class AdvanceOut(BaseModel):
    ok: bool
    completed: int
    total: int
    finished: bool
    next: ScreenOut | None = None


def screen_json(screen: study.ItemScreen) -> ScreenOut:
    """An :class:`~annotate.study.ItemScreen` for the API."""
    return ScreenOut(
        finished=False,
        study_id=screen.study_id,
        item_id=screen.item_id,
        position=screen.position,
        total=screen.total,
        progress=screen.progress,
        instruction=screen.instruction,
        source_image=screen.source_image,
        outputs=[OutputOut(label=o.label, image=o.image) for o in screen.outputs],
        criteria=list(screen.criteria),
        choices=dict(screen.choices),
    )


def screen_payload(
    session: Session,
    study_id: int,
    user_id: int,
    *,
    render: bool,
    csrf: str = "",
    screen: study.ItemScreen | None = None,
) -> ScreenOut:
    """The participant's current screen (or ``finished`` with their progress), with its HTML if asked; ``screen``
    when it was read already (a read session is then enough; otherwise :func:`annotate.study.current_item` needs a
    write session: it assigns the sequence on first use)."""
    screen = screen or study.current_item(session, study_id, user_id)
    if screen is None:
        progress = study.participant_progress(session, study_id, user_id)
        body = ScreenOut(finished=True, study_id=study_id, completed=progress.completed, total=progress.total)
    else:
        body = screen_json(screen)
    if render:
        from mcie.annotate.web import ui_study  # Gradio's modules load only when a page is rendered

        if screen is None:
            body.html = ui_study.render_finished(body.total)
        else:
            upcoming = study.upcoming_images(session, study_id, user_id, screen.position)
            body.html = ui_study.render_screen(screen, csrf=csrf, prefetch=upcoming)
    return body


async def _no_store(response: Response) -> None:
    response.headers.update(NO_STORE)


SCREEN = {"response_model_exclude_unset": True, "dependencies": [WORKING, Depends(_no_store)]}


@router.get(API_PREFIX + "/{study_id}/current", **SCREEN)
def api_current(
    request: Request,
    study_id: int,
    user: Participant,
    session: ReadDB,
    write: WriteDB,
    render: Annotated[bool, Query()] = False,
) -> ScreenOut:
    """The participant's current screen (their sequence is assigned on the first call), with the session's CSRF
    token for the POSTs (a same-origin read: other sites cannot read it)."""
    try:
        screen = study.quick_current_item(session, study_id, user.id)  # the usual case: reads only
        csrf = csrf_token(request)
        if screen is None:  # no screen yet (the first call assigns the sequence), finished, or refused: a write
            session.commit()  # the read's connection goes back to the pool before the write takes one (see ReadDB)
        body = screen_payload(session if screen else write, study_id, user.id, render=render, csrf=csrf,
                              screen=screen)
    except study.StudyError as exc:
        raise _study_error(exc) from None
    body.csrf = csrf
    return body


@router.post(API_PREFIX + "/{study_id}/vote", **SCREEN)
def api_vote(study_id: int, vote: VoteBody, user: Voter, session: WriteDB) -> VoteOut:
    """Store (or change) a choice on the current screen at once."""
    try:
        study.cast_vote(session, study_id, user.id, vote.item_id, vote.criterion, vote.choice, vote.latency_ms)
    except study.StudyError as exc:
        raise _study_error(exc) from None
    return VoteOut(ok=True, study_id=study_id, item_id=vote.item_id, criterion=vote.criterion, choice=vote.choice)


@router.post(API_PREFIX + "/{study_id}/advance", **SCREEN)
def api_advance(request: Request, study_id: int, step: AdvanceBody, user: Voter, session: WriteDB) -> AdvanceOut:
    """Complete the current screen (every criterion needs a vote) and move on; ``render`` adds the next screen."""
    try:
        progress = study.advance(session, study_id, user.id, step.item_id)
        body = AdvanceOut(ok=True, completed=progress.completed, total=progress.total, finished=progress.finished)
        if step.render:
            body.next = screen_payload(session, study_id, user.id, render=True, csrf=request.session.get("csrf", ""))
    except study.StudyError as exc:
        raise _study_error(exc) from None
    return body


# ----------------------------------------------------------------------------------------------------------
# the leads' study API


def _lead_study(session: Session, key: str) -> int:
    try:
        return study.resolve_study(session, key)
    except study.StudyError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc), headers=NO_STORE) from None


Lead = Annotated[WebUser, Depends(require_lead)]
LEADS = {"dependencies": [Depends(_no_store)]}


class StudyOut(BaseModel):
    id: int
    name: str
    status: str
    items: int
    methods: list[str]
    criteria: list[str]
    items_per_participant: int | None
    enrolled: int
    finished: int
    created_at: str


class ParticipantOut(BaseModel):
    user_id: int
    username: str
    invited_at: str
    revoked: bool
    assigned: int
    completed: int
    finished_at: str | None
    excluded: bool
    exclusion_reason: str | None


@router.get(API_PREFIX, **LEADS)
def api_studies(user: Lead, session: ReadDB) -> list[StudyOut]:
    """Every study with its counts (leads and admins)."""
    return [
        StudyOut(id=s.id, name=s.name, status=s.status, items=s.n_items, methods=list(s.methods),
                 criteria=list(s.criteria), items_per_participant=s.items_per_participant, enrolled=s.enrolled,
                 finished=s.finished, created_at=s.created_at.isoformat())
        for s in study.list_studies(session)
    ]


def participants_json(session: Session, study_id: int) -> list[ParticipantOut]:
    """Every participant of a study with their progress (the API's and ``mcie study participants --json``'s)."""
    return [
        ParticipantOut(user_id=p.user_id, username=p.username, invited_at=p.invited_at.isoformat(),
                       revoked=p.revoked, assigned=p.n_assigned, completed=p.n_completed,
                       finished_at=p.finished_at.isoformat() if p.finished_at else None, excluded=p.excluded,
                       exclusion_reason=p.exclusion_reason)
        for p in study.participants_status(session, study_id)
    ]


@router.get(API_PREFIX + "/{key}/participants", **LEADS)
def api_participants(key: str, user: Lead, session: ReadDB) -> list[ParticipantOut]:
    """Every participant of the study with their progress (leads and admins)."""
    return participants_json(session, _lead_study(session, key))


@router.get(API_PREFIX + "/{key}/results", **LEADS)
def api_results(
    key: str, user: Lead, session: ReadDB, n_boot: Annotated[int, Query(ge=0, le=5000)] = 1000
) -> dict[str, Any]:
    """The study's results (:func:`annotate.study.study_results`; what ``mcie study results --json`` prints)."""
    body = study.study_results(session, _lead_study(session, key), n_boot=n_boot)
    return json.loads(json.dumps(body, default=str))


@router.get(API_PREFIX + "/{key}/votes.csv")
def api_votes_csv(key: str, user: Lead, session: ReadDB) -> Response:
    """Every stored vote as CSV (:func:`annotate.study.export_votes`)."""
    study_id = _lead_study(session, key)
    with tempfile.TemporaryDirectory(prefix="mcie-votes-") as folder:
        path = Path(folder) / f"study-{study_id}-votes.csv"
        study.export_votes(session, study_id, path)
        data = path.read_bytes()
    headers = {**NO_STORE, "content-disposition": f'attachment; filename="study-{study_id}-votes.csv"'}
    return Response(data, media_type="text/csv; charset=utf-8", headers=headers)


# ----------------------------------------------------------------------------------------------------------
# the gate


async def _answer(scope: Scope, send: Send, code: int, body: bytes, ctype: str, extra: Headers) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4000 + code})
        return
    await send_answer(send, code, body, ctype, [(b"cache-control", b"no-store"), *extra])


async def _refuse(scope: Scope, send: Send, code: int, message: str, *, title: str | None = None) -> None:
    from mcie.annotate.web.auth import refusal_page

    if wants_html(scope):
        page = join_page(title, message) if title else refusal_page(code, message)
        await _answer(scope, send, code, page.encode(), "text/html; charset=utf-8", [])
    else:
        await _answer(scope, send, code, json.dumps({"detail": message}).encode(), "application/json", [])


async def _redirect(scope: Scope, send: Send, target: str) -> None:
    await _answer(scope, send, 303, b"", "text/plain", [(b"location", target.encode("latin-1"))])


class StudyGate:
    """ASGI middleware confining participant sessions to their study (see the module docstring).

    Invite-link sessions are recognised from the session alone (no database read on the vote path); a password
    session is looked up (one read) only on paths where a participant would be refused and no other gate decides:
    images, the leads' JSON, ``/studies`` and whatever else the app serves.
    """

    def __init__(self, app: ASGIApp, *, database_url: str) -> None:
        self.app = app
        self.database_url = database_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        session = scope.get("session")
        uid = session.get("uid") if isinstance(session, dict) else None
        if not uid:
            await self._anonymous(scope, receive, send, path)
            return
        assert isinstance(session, dict)
        limited = session_study(scope)
        if limited is not None:
            await self._limited(scope, receive, send, path, int(uid), limited)
            return
        if path in PASS_EXACT or path.startswith(PASS_PREFIXES) or PARTICIPANT_API_RE.match(path):
            if under(path, STUDY_PATH):
                session.setdefault("csrf", secrets.token_urlsafe(24))
            await self.app(scope, receive, send)
            return
        user = await current_user(scope, self.database_url)
        if user is None:  # a stale session: the routes and other gates answer 401
            await self.app(scope, receive, send)
        elif user.role is Role.participant:
            await self._limited(scope, receive, send, path, user.id, None)
        elif under(path, RESULTS_PATH) and not user.is_lead:
            await _refuse(scope, send, 403, "only leads and admins may open the study results")
        else:
            await self.app(scope, receive, send)

    def _participant_study(self, user_id: int) -> int | None:
        with session_scope(self.database_url) as session:
            return study.participant_study(session, user_id)

    def _may_see_image(self, user_id: int, sha256: str, study_id: int | None) -> bool:
        with session_scope(self.database_url) as session:
            return study.may_see_image(session, user_id, sha256, study_id)

    async def _anonymous(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if PARTICIPANT_API_RE.match(path):  # refused before anything reads the body
            await _refuse(scope, send, 401, "your session has ended: open your invitation link again")
        elif under(path, STUDY_PATH) and not path.startswith(JOIN_PREFIX):
            await _refuse(
                scope, send, 401,
                "You are not signed in to a study (or your session has ended). Open the invitation link you were "
                "sent again: you continue where you stopped.",
                title="Open your invitation link",
            )
        elif under(path, RESULTS_PATH):
            if wants_html(scope):
                await _redirect(scope, send, "/login?next=" + RESULTS_PATH + "/")
            else:
                await _refuse(scope, send, 401, "log in first")
        else:
            await self.app(scope, receive, send)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, path: str, user_id: int, study_id: int | None
    ) -> None:
        """A participant's request: their study screen, API and images only."""
        session = scope["session"]
        if path == "/":
            target = study_id or await anyio.to_thread.run_sync(self._participant_study, user_id)
            if target is not None:
                await _redirect(scope, send, STUDY_PATH + "/")
                return
            await self.app(scope, receive, send)  # the start page explains that participants need their link
            return
        if path in LIMITED_EXACT or path.startswith(LIMITED_PREFIXES):
            if under(path, STUDY_PATH):
                session.setdefault("csrf", secrets.token_urlsafe(24))
            await self.app(scope, receive, send)
            return
        api = PARTICIPANT_API_RE.match(path)
        if api is not None:
            if study_id is not None and int(api.group(1)) != study_id:
                await _refuse(scope, send, 403, "this session belongs to another study")
                return
            await self.app(scope, receive, send)
            return
        image = IMAGE_RE.match(path)
        if image is not None:
            allowed = await anyio.to_thread.run_sync(self._may_see_image, user_id, image.group(1), study_id)
            if allowed:
                await self.app(scope, receive, send)
            else:
                await _refuse(scope, send, 403, "this image is not part of your study")
            return
        await _refuse(scope, send, 403, PARTICIPANT_ONLY)
