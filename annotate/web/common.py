"""What every screen of the web layer shares: escaping, the top bar, KPI tiles, status lines, the role check that
each Gradio event repeats, and the one way a Gradio app is mounted into the FastAPI app.

Gradio passes the logged-in username to every event (``request.username``, set by
:func:`annotate.web.auth.gradio_auth_dependency` at mount time); :func:`event_user` turns it back into the user and
checks the role again on each event, not only at page load, so a role change or a revoked session applies at once.
"""

from __future__ import annotations

import html
import secrets
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from mcie.annotate.web.auth import WebUser, gradio_auth_dependency, user_for_username
from mcie.config import Settings
from mcie.db.models import Role

if TYPE_CHECKING:  # Gradio is imported where a screen is built, not by the plain routes
    import gradio as gr

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "mcie-downloads"  # under the temp folder, which Gradio serves
DOWNLOAD_MAX_AGE_S = 3600


def esc(value: Any) -> str:
    """Text from data, safe inside HTML text and quoted attributes (None shows as nothing)."""
    return html.escape("" if value is None else str(value), quote=True)


def static_text(name: str) -> str:
    """One file of ``annotate/static`` (the pages' CSS and JavaScript)."""
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def render_topbar(user: WebUser) -> str:
    """The review app's and the dashboard's top bar: the screens this user may open, who they are, Log out."""
    links = ['<a href="/review/">Review</a>']
    if user.is_lead:
        links.append('<a href="/dashboard/">Dashboard</a>')
    return (
        '<div class="mcie-topbar"><span class="mcie-brand">MCIE review</span>'
        f'<nav>{"".join(links)}</nav><span class="mcie-user">{esc(user.shown_name)} · {esc(user.role.value)}</span>'
        '<form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form></div>'
    )


def render_kpis(values: Sequence[tuple[str, str, str]]) -> str:
    """KPI tiles from (element id, value, caption) triples."""
    cells = "".join(
        f'<div class="mcie-kpi" id="{esc(i)}"><b>{esc(v)}</b><span>{esc(t)}</span></div>' for i, v, t in values
    )
    return f'<div class="mcie-kpis">{cells}</div>'


def status_line(message: str, *, error: bool = False) -> str:
    """A screen-reader announced result line under a form; nothing for an empty message."""
    if not message:
        return ""
    return f'<div class="{"mcie-error" if error else "mcie-ok"}" role="status">{esc(message)}</div>'


def event_user(url: str, request: gr.Request | None, allowed: Callable[[WebUser], bool], refusal: str) -> WebUser:
    """The user behind a Gradio event if ``allowed``; otherwise the event fails with ``refusal`` on screen."""
    user = user_for_username(url, getattr(request, "username", None))
    if user is None or not allowed(user):
        import gradio as gr

        raise gr.Error(refusal)
    return user


def lead_of(
    url: str, request: gr.Request | None, *, refusal: str = "Only leads and admins may use the dashboard."
) -> WebUser:
    """The lead or admin behind an event on a leads' screen."""
    return event_user(url, request, lambda u: u.is_lead, refusal)


def reviewer_of(url: str, request: gr.Request | None) -> WebUser:
    """The logged-in reviewer behind a review event."""
    return event_user(
        url, request, lambda u: u.is_reviewer,
        "Your session has ended or you may not review samples; please log in again.",
    )


def mount_gradio(
    app: FastAPI,
    settings: Settings,
    path: str,
    blocks: gr.Blocks,
    roles: Collection[Role],
    assets: Mapping[str, Any],
) -> None:
    """Mount one Gradio app at ``path`` for users with one of ``roles``, with the app's hardening settings."""
    import gradio as gr

    gr.mount_gradio_app(
        app,
        blocks,
        path=path,
        auth_dependency=gradio_auth_dependency(settings.database_url, roles),
        footer_links=[],
        run_history=False,
        max_file_size="1mb",  # nothing is uploaded; Gradio's upload route must not fill the disk
        blocked_paths=[str(settings.data_dir.resolve())],  # never the database, blobs or secret key
        show_error=True,
        ssr_mode=False,
        mcp_server=False,
        **assets,
    )
    blocks.config = blocks.get_config_file()  # mount sets head/js/css after building the config


def review_page_assets() -> dict[str, str]:
    """The review screen's script and style, which the dashboard's sample views share."""
    return {"head": f"<script>{static_text('review.js')}</script>", "css": static_text("review.css")}


def fresh_download(name: str, suffix: str) -> Path:
    """A new file for a download button (``name`` made safe, a timestamp and a random tag added); files left there
    more than an hour ago are removed first."""
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - DOWNLOAD_MAX_AGE_S
    for old in DOWNLOAD_DIR.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:60] or "download"
    return DOWNLOAD_DIR / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}{suffix}"
