"""The review web app: one FastAPI application around the two Gradio apps (``mcie serve``).

Routes:

- ``/healthz`` - JSON: is the database reachable, at which schema revision (200 when usable, 503 otherwise);
- ``/login`` (form, throttled per (username, IP) and per IP by :mod:`annotate.web.throttle`), ``/logout`` (POST;
  revokes the session and releases the user's leases);
- ``/`` - sends each role where it works (raters to ``/review/``, leads and admins to ``/dashboard/``);
- ``/api/whoami`` - the logged-in user (401 without a session); ``/api/status``, ``/api/agreement`` - JSON for
  leads and admins (403 for anyone else);
- ``/img/{sha256}`` and ``/thumb/{sha256}`` - images by content hash only, for logged-in users, cacheable
  (ETag = the hash); a path from a request never reaches the file system;
- ``/review`` - the reviewers' Gradio app (:mod:`annotate.web.ui_review`), for raters, leads and admins;
- ``/dashboard`` - the leads' Gradio app (:mod:`annotate.web.ui_dashboard`), for leads and admins (403 for a rater,
  on every route under it, the event queue included);
- ``/static`` - the app's own CSS and JavaScript.

Sessions are server-side (:mod:`annotate.web.sessions`); the edges (body limits, uploads, CORS, Secure cookies) are
described in :mod:`annotate.web.edges` and docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcie.annotate.sessions import SessionPolicy
from mcie.annotate.web import api_review
from mcie.annotate.web.auth import (
    LEAD_ROLES,
    REVIEWER_ROLES,
    GateRule,
    RoleGate,
    WebUser,
    check_csrf,
    client_ip,
    csrf_token,
    end_session,
    load_secret_key,
    refusal_page,
    require_lead,
    require_user,
    session_user,
    snapshot,
    start_session,
)
from mcie.annotate.web.common import STATIC_DIR, esc, mount_gradio
from mcie.annotate.web.deps import get_session
from mcie.annotate.web.edges import BodyLimit, is_loopback, secure_cookies_for, validation_error_handler
from mcie.annotate.web.sessions import ServerSessionMiddleware
from mcie.annotate.web.study_routes import register_study
from mcie.annotate.web.throttle import LoginThrottle, ThrottlePolicy
from mcie.annotate.worker import attach_job_worker
from mcie.config import Settings
from mcie.db.models import Assignment, AssignmentState, AuditLog
from mcie.db.models import Image as ImageRow
from mcie.db.session import session_scope
from mcie.db.store import ImageStore

NO_STORE = {"cache-control": "no-store"}
log = logging.getLogger(__name__)


SHA256_RE = re.compile(r"[0-9a-f]{64}")
THUMB_SIZES = (128, 256, 384, 768)
BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
IMAGE_CACHE = "private, max-age=31536000, immutable"  # content-addressed: a hash never changes its bytes
LEASE_SWEEP_S = 60.0
REVIEW_PATH = "/review"
DASHBOARD_PATH = "/dashboard"


# ----------------------------------------------------------------------------------------------------------
# the application


def create_app(
    settings: Settings,
    *,
    throttle: LoginThrottle | None = None,
    secure_cookies: bool = False,
    mount_ui: bool = True,
    worker: bool = True,
) -> FastAPI:
    """The whole web app for ``settings`` (the database must already be migrated; :func:`serve` does that).

    ``secure_cookies`` marks the session cookie Secure (:func:`serve` turns it on unless the app is served on
    loopback or ``MCIE_PUBLIC_URL`` is http://); ``mount_ui=False`` leaves the Gradio apps out (fast tests of the
    plain routes); ``worker=False`` runs no job worker in the process (``mcie serve --no-worker``: the web tier).
    """
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="mcie review", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.settings = settings
    app.state.store = ImageStore.from_settings(settings)
    app.state.throttle = throttle or LoginThrottle(settings.database_url, ThrottlePolicy.from_settings(settings))
    app.state.secure_cookies = secure_cookies
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.state.job_worker = None
    if worker:
        attach_job_worker(app)  # exports, previews
    secret = load_secret_key(settings.data_dir, settings.secret_key.get_secret_value() if settings.secret_key else None)

    _add_routes(app)
    app.include_router(api_review.router)  # JSON review API
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if mount_ui:
        _mount_gradio(app, settings)
    register_study(app, settings, mount_ui=mount_ui)

    # Added last = outermost: headers wrap everything; the body limit comes before anything reads a body; CORS
    # (Starlette's, which also turns Gradio's origin-reflecting CORS off) answers before the session is read;
    # trusted proxies set the client address before the session and the throttle read it.
    app.add_middleware(
        RoleGate,
        database_url=settings.database_url,
        rules=[GateRule(DASHBOARD_PATH, LEAD_ROLES), GateRule(REVIEW_PATH, REVIEWER_ROLES)],
    )
    app.add_middleware(
        ServerSessionMiddleware,
        database_url=settings.database_url,
        secret_key=secret,
        policy=SessionPolicy.from_settings(settings),
        secure=secure_cookies,
    )
    if settings.trusted_proxy_list():
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxy_list())
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origin_list(),
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=["content-type", "x-csrf-token"],
    )
    app.add_middleware(BodyLimit, default_limit=settings.max_request_bytes)
    app.add_middleware(SecurityHeaders)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app runs, expire abandoned leases every minute so their samples go back to the queue, and queue a
    refit of rater reliability (a ``reliability`` job) when enough new reviews came in (``adaptive.refit_every``)."""
    task = asyncio.create_task(_expire_leases_forever(app.state.settings.database_url, app.state.throttle))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _expire_leases_forever(url: str, throttle: LoginThrottle, every_s: float = LEASE_SWEEP_S) -> None:
    """Every minute: abandoned review leases go back to the queue, and a rater-reliability refit is queued when due.
    Every hour: ended sessions (30 days after they ended) and forgotten failed-login counts are deleted, so neither
    table grows without bound."""
    from mcie.annotate.queue import expire_leases
    from mcie.annotate.reliability_service import queue_refit_when_due

    def sweep_leases() -> int:
        with session_scope(url, write=True) as session:
            return expire_leases(session)

    def queue_refit() -> int | None:
        with session_scope(url, write=True) as session:
            return queue_refit_when_due(session)

    sweeps = 0
    while True:
        try:
            expired = await anyio.to_thread.run_sync(sweep_leases)
            if expired:
                log.info("expired %d abandoned lease(s)", expired)
            job_id = await anyio.to_thread.run_sync(queue_refit)
            if job_id is not None:
                log.info("queued a refit of rater reliability (job %d)", job_id)
            if sweeps % 60 == 0:
                await anyio.to_thread.run_sync(_purge_runtime_tables, url, throttle)
        except Exception:  # the sweep must outlive a database hiccup
            log.exception("the periodic sweep failed")
        sweeps += 1
        await asyncio.sleep(every_s)


def _purge_runtime_tables(url: str, throttle: LoginThrottle) -> None:
    """The app's own throttle purges its counts, so 'old' is measured on the clock that wrote them."""
    from mcie.annotate import sessions

    with session_scope(url) as session:
        ended = sessions.purge(session)
    forgotten = throttle.purge()
    if ended or forgotten:
        log.info("deleted %d ended session(s) and %d old failed-login count(s)", ended, forgotten)


def _mount_gradio(app: FastAPI, settings: Settings) -> None:
    from mcie.annotate.web import ui_dashboard, ui_review  # Gradio loads only when the screens are mounted

    mount_gradio(app, settings, REVIEW_PATH, ui_review.build(settings), REVIEWER_ROLES, ui_review.page_assets())
    mount_gradio(app, settings, DASHBOARD_PATH, ui_dashboard.build(settings), LEAD_ROLES, ui_dashboard.page_assets())


def serve(
    host: str,
    port: int,
    settings: Settings | None = None,
    *,
    secure_cookies: bool | None = None,
    worker: bool = True,
) -> None:
    """Upgrade the database schema, then serve the app with uvicorn until interrupted (``mcie serve``).

    ``secure_cookies=None`` decides by :func:`annotate.web.edges.secure_cookies_for`; ``worker=False`` serves the web
    tier alone (jobs are run by ``mcie worker`` processes). ``X-Forwarded-*`` headers are believed only from
    ``MCIE_TRUSTED_PROXIES`` (the app's own middleware; uvicorn's is off)."""
    import uvicorn

    from mcie.config import get_settings
    from mcie.db import migrate

    settings = settings or get_settings()
    migrate.upgrade(settings.database_url)
    secure = secure_cookies_for(settings.public_url, host, secure_cookies)
    if not secure:  # expected on a laptop (loopback); anywhere else the deployer should know
        level = logging.INFO if is_loopback(host) else logging.WARNING
        log.log(level, "session cookies are not Secure (served on %s, MCIE_PUBLIC_URL=%s)", host, settings.public_url)
    app = create_app(settings, secure_cookies=secure, worker=worker)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), proxy_headers=False)


class SecurityHeaders:
    """Adds the headers every answer should carry (no MIME sniffing, no framing, no referrer leaks)."""

    HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------------------------------------
# routes


def _add_routes(app: FastAPI) -> None:
    app.add_api_route("/healthz", healthz, methods=["GET"], responses={503: {"model": HealthOut}})
    app.add_api_route("/favicon.ico", lambda: Response(status_code=204), methods=["GET"], include_in_schema=False)
    app.add_api_route("/", home, methods=["GET"])
    app.add_api_route("/login", login_page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/login", login_submit, methods=["POST"], response_class=HTMLResponse)
    app.add_api_route("/logout", logout, methods=["POST"])
    app.add_api_route("/api/whoami", whoami, methods=["GET"], dependencies=[Depends(no_store)])
    app.add_api_route("/api/status", api_status, methods=["GET"], dependencies=[Depends(no_store)])
    app.add_api_route("/api/agreement", api_agreement, methods=["GET"], dependencies=[Depends(no_store)])
    app.add_api_route("/img/{sha256}", full_image, methods=["GET", "HEAD"])
    app.add_api_route("/thumb/{sha256}", thumbnail, methods=["GET", "HEAD"])


def _settings(request: Request) -> Settings:
    return request.app.state.settings


class HealthOut(BaseModel):
    """``GET /healthz``: 200 when the database answers at the newest schema, else 503 (load balancers, compose)."""

    ok: bool
    database: bool
    schema_revision: str | None
    schema_head: str
    schema_current: bool
    error: str | None = None  # the exception's type only: never the URL


def healthz(request: Request, response: Response) -> HealthOut:
    from mcie.db import migrate
    from mcie.db.session import ping

    url = _settings(request).database_url
    database, revision, error = False, None, None
    try:
        ping(url)
        database = True
        revision = migrate.current(url)
    except Exception as exc:  # any failure means "not reachable"; say which without leaking the URL
        error = type(exc).__name__
    head = migrate.head()
    body = HealthOut(ok=database and revision == head, database=database, schema_revision=revision, schema_head=head,
                     schema_current=revision == head, error=error)
    response.status_code = 200 if body.ok else 503
    response.headers.update(NO_STORE)
    return body


def home_path(user: WebUser) -> str:
    """Where a user starts: leads and admins on the dashboard, raters on the review screen."""
    if user.is_lead:
        return DASHBOARD_PATH + "/"
    if user.is_reviewer:
        return REVIEW_PATH + "/"
    return "/"  # participants: the start page explains that the study has its own link


def home(request: Request) -> Response:
    user = session_user(request)
    if user is None:
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    if not user.is_reviewer:
        return HTMLResponse(
            refusal_page(403, "Study participants take part through their invitation link; this app is for reviewers."),
            status_code=403,
        )
    return RedirectResponse(home_path(user), status_code=status.HTTP_303_SEE_OTHER)


def _safe_next(target: str | None) -> str | None:
    """A redirect target from a request, only when it is a path on this site (no open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ord(c) < 32 for c in target):
        return None
    return target


def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    user = session_user(request)
    return HTMLResponse(_login_html(request, next_path=_safe_next(next), user=user))


def _login_html(
    request: Request, *, next_path: str | None, user: WebUser | None, error: str | None = None, username: str = ""
) -> str:
    already = ""
    if user is not None:
        already = (
            f"<p class=mcie-note>You are logged in as <b>{esc(user.shown_name)}</b> ({esc(user.role.value)}). "
            f"<a href='{esc(home_path(user))}'>Continue</a>, or log in as someone else below.</p>"
        )
    problem = f"<p class=mcie-error role=alert>{esc(error)}</p>" if error else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'><title>mcie - log in</title>"
        "<link rel=stylesheet href=/static/app.css></head><body class=mcie-page><main class=mcie-card>"
        "<h1>MCIE review</h1><p class=mcie-sub>Expert review of complex-instruction image edits.</p>"
        f"{already}{problem}"
        "<form method=post action=/login id=login-form>"
        f"<input type=hidden name=csrf value='{esc(csrf_token(request))}'>"
        f"<input type=hidden name=next value='{esc(next_path or '')}'>"
        f"<label>Username <input id=username name=username autocomplete=username required autofocus "
        f"value='{esc(username)}'></label>"
        "<label>Password <input id=password name=password type=password autocomplete=current-password required>"
        "</label><button type=submit id=login-button>Log in</button></form></main></body></html>"
    )


def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    from mcie.annotate.accounts import authenticate

    settings = _settings(request)
    throttle: LoginThrottle = request.app.state.throttle
    username = username.strip().lower()
    next_path = _safe_next(next)
    ip = client_ip(request)

    def page(error: str, code: int, headers: dict[str, str] | None = None) -> HTMLResponse:
        body = _login_html(request, next_path=next_path, user=None, error=error, username=username)
        return HTMLResponse(body, status_code=code, headers=headers)

    def too_many(wait: float) -> HTMLResponse:
        seconds = math.ceil(wait)
        when = f"{seconds} seconds" if seconds < 120 else f"about {math.ceil(seconds / 60)} minutes"
        return page(f"Too many failed logins from here. Try again in {when}.", status.HTTP_429_TOO_MANY_REQUESTS,
                    {"Retry-After": str(seconds)})

    if not check_csrf(request, csrf):
        return page("The login form had expired. Please log in again.", status.HTTP_400_BAD_REQUEST)
    wait = throttle.retry_after(ip, username or None)
    if wait is not None:
        return too_many(wait)
    with session_scope(settings.database_url, write=True) as session:  # reads the user, then writes
        user = snapshot(authenticate(session, username, password) if username and password else None)
        session.add(
            AuditLog(
                user_id=user.id if user else None,
                action="user.login" if user else "user.login_failed",
                entity="user",
                details={"username": username[:64], "ip": ip},
            )
        )
    if user is None:
        wait = throttle.record_failure(ip, username or None)
        if wait is not None:
            return page(f"Wrong username or password. Wait {math.ceil(wait)} seconds before the next try.",
                        status.HTTP_401_UNAUTHORIZED, {"Retry-After": str(math.ceil(wait))})
        return page("Wrong username or password.", status.HTTP_401_UNAUTHORIZED)
    throttle.record_success(ip, username)
    start_session(request, user)
    target = next_path if next_path and next_path != "/login" else home_path(user)
    return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)


def logout(request: Request) -> Response:
    """End the session and give the user's leased samples back to the queue at once."""
    user = session_user(request)
    if user is not None:
        release_leases(_settings(request).database_url, user.id)
    end_session(request)
    return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)


def release_leases(url: str, user_id: int) -> int:
    """Release every sample leased to ``user_id`` (through :func:`annotate.queue.release`); returns how many."""
    from mcie.annotate import queue

    with session_scope(url) as session:
        sample_ids = list(
            session.scalars(
                select(Assignment.sample_id).where(
                    Assignment.user_id == user_id, Assignment.state == AssignmentState.leased
                )
            )
        )
    for sample_id in sample_ids:
        try:  # one transaction per sample: a failed one does not undo the others
            with session_scope(url, write=True) as session:
                queue.release(session, user_id, sample_id)
        except Exception:  # one failed release must not keep the user logged in
            log.exception("could not release sample %s of user %s", sample_id, user_id)
    return len(sample_ids)


# ----------------------------------------------------------------------------------------------------------
# JSON for leads (monitoring, scripts)


async def no_store(response: Response) -> None:
    """Answers about the moment are never cached."""
    response.headers.update(NO_STORE)


User = Annotated[WebUser, Depends(require_user)]
Lead = Annotated[WebUser, Depends(require_lead)]
DB = Annotated[Session, Depends(get_session, scope="function")]


class WhoamiOut(BaseModel):
    username: str
    role: str
    name: str


class StatusOut(BaseModel):
    samples: dict[str, int]
    remaining_reviews: int


def whoami(user: User) -> WhoamiOut:
    """The logged-in user (the review page asks now and then, to say so at once when the session has ended)."""
    return WhoamiOut(username=user.username, role=user.role.value, name=user.shown_name)


def api_status(user: Lead, session: DB) -> StatusOut:
    """Samples by status and the reviews still wanted (leads and admins)."""
    from mcie.annotate import dashboard_data

    return StatusOut(samples=dashboard_data.status_counts(session),
                     remaining_reviews=dashboard_data.remaining_reviews(session))


def api_agreement(user: Lead, session: DB, n_boot: Annotated[int, Query(ge=0, le=5000)] = 1000) -> dict[str, Any]:
    """Every agreement figure of the dashboard as JSON (leads and admins; what ``mcie agreement --json`` prints, from
    :func:`annotate.dashboard_data.agreement_figures`: one shape for the CLI and the API)."""
    from mcie.annotate import dashboard_data

    return dashboard_data.agreement_figures(session, n_boot=n_boot)


# ----------------------------------------------------------------------------------------------------------
# images by content hash


def stored_image(request: Request, sha256: str) -> str:
    """The path's image hash, known to the database (400 for a malformed hash, 404 for an unknown one); its format,
    upper-case (``PNG``). The lookup's transaction ends before the bytes are read."""
    if not SHA256_RE.fullmatch(sha256):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "expected a sha256: 64 lower-case hex digits")
    with session_scope(_settings(request).database_url) as session:
        fmt = session.scalar(select(ImageRow.format).where(ImageRow.sha256 == sha256))
    if fmt is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such image")
    return fmt.upper()


StoredImage = Annotated[str, Depends(stored_image)]
MISSING_BYTES = "the image's bytes are missing from the store"


def _not_modified(request: Request, etag: str) -> bool:
    given = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, f"W/{etag}", "*") for tag in given.split(","))


def _image_response(request: Request, data: bytes, media_type: str, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE}
    return Response(b"" if request.method == "HEAD" else data, media_type=media_type, headers=headers)


def full_image(request: Request, sha256: str, user: User, fmt: StoredImage) -> Response:
    """The image with this content hash (PNG, JPEG, WebP as stored; BMP and TIFF converted to PNG for browsers)."""
    etag = f'"{sha256}"'
    if _not_modified(request, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMAGE_CACHE})
    store: ImageStore = request.app.state.store
    try:
        if fmt in BROWSER_FORMATS:
            return _image_response(request, store.get(sha256), BROWSER_FORMATS[fmt], etag)
        out = io.BytesIO()
        store.open(sha256).save(out, format="PNG")
        return _image_response(request, out.getvalue(), "image/png", etag)
    except KeyError:
        log.error("image %s is in the database but not in the store", sha256)
        raise HTTPException(status.HTTP_404_NOT_FOUND, MISSING_BYTES) from None


def thumb_size(request: Request, size: Annotated[int | None, Query()] = None) -> int:
    """The thumbnail's longest side: one of :data:`THUMB_SIZES` or the configured size (400 otherwise)."""
    settings = _settings(request)
    size = size or settings.thumbnail_size
    if size not in (*THUMB_SIZES, settings.thumbnail_size):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"size must be one of {sorted({*THUMB_SIZES, settings.thumbnail_size})}")
    return size


def thumbnail(
    request: Request, sha256: str, user: User, size: Annotated[int, Depends(thumb_size)], fmt: StoredImage
) -> Response:
    """A WebP thumbnail of the image with this hash; ``size`` (longest side) is one of :data:`THUMB_SIZES`."""
    etag = f'"{sha256}"'  # an ETag is per URL, and the size is part of the URL
    if _not_modified(request, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMAGE_CACHE})
    try:
        data = request.app.state.store.thumbnail(sha256, size)
    except KeyError:
        log.error("image %s is in the database but not in the store", sha256)
        raise HTTPException(status.HTTP_404_NOT_FOUND, MISSING_BYTES) from None
    return _image_response(request, data, "image/webp", etag)
