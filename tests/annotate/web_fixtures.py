"""What the web tests share: a throw-away site's settings, the login form, the JSON API's anti-forgery header, a
test client per app, and Gradio widget dataclasses filled with their own field names (to read handler outputs)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from mcie.config import Settings, load_settings
from mcie.db.session import session_scope

PASSWORD = "correct-horse-9"
W = TypeVar("W")


def site_settings(folder: Path, database_url: str | None = None, **extra: Any) -> Settings:
    """Settings of a throw-away site; every path is given, so a developer's MCIE_* variables cannot leak in (module
    fixtures are set up before the per-test isolation of tests/conftest.py)."""
    url = database_url or f"sqlite:///{folder}/web.db"
    return load_settings(data_dir=folder, database_url=url, blob_url=str(folder / "blobs"), secret_key=None, **extra)


@contextmanager
def open_client(app: FastAPI) -> Iterator[TestClient]:
    """A client that does not follow redirects (tests check the 303s), with the app's lifespan running."""
    with TestClient(app, follow_redirects=False) as client:
        yield client


def login_csrf(client: TestClient) -> str:
    """The anti-forgery token of the login form (from the signed pre-login cookie's session)."""
    page = client.get("/login")
    match = re.search(r"name=csrf value='([^']+)'", page.text)
    assert match, page.text
    return match.group(1)


def log_in(
    client: TestClient,
    username: str,
    password: str = PASSWORD,
    *,
    next_path: str = "",
    headers: dict[str, str] | None = None,
) -> Any:
    """Post the login form; returns the response (303 on success)."""
    form = {"username": username, "password": password, "csrf": login_csrf(client), "next": next_path}
    return client.post("/login", data=form, headers=headers or {})


def api_headers(client: TestClient) -> dict[str, str]:
    """The header a logged-in client's JSON POSTs need (the session's CSRF token from ``/api/review/csrf``)."""
    body = client.get("/api/review/csrf").json()
    return {body["header"]: body["csrf_token"]}


def user_id(url: str, username: str) -> int:
    from mcie.db.models import User

    with session_scope(url) as session:
        return int(session.scalar(select(User.id).where(User.username == username)))


def named_widgets(cls: type[W]) -> W:
    """A widgets dataclass whose every component is its own field name, so handler outputs read by name."""
    return cls(**{f.name: f.name for f in fields(cls)})  # type: ignore[arg-type]
