"""What a server-side session costs per request, against the signed cookie it replaced; prints one JSON.

On a fresh PostgreSQL database (``MCIE_TEST_POSTGRES_URL``'s server, as ``bench/review_load.py``), one logged-in
rater asks ``GET /api/whoami`` ``--requests`` times, in process through httpx's ASGI transport (no network, so the
difference is the session handling itself), from two apps:

- ``server_side``: the app of :func:`annotate.web.server.create_app` (``web_sessions`` row read with its user in one
  query; the user read is then shared by the route; ``last_seen_at`` written at most once a minute);
- ``signed_cookie``: the same app with the previous design's session - Starlette's ``SessionMiddleware`` (signed
  cookie) in its place, so the route reads the user by the id in the cookie (:func:`annotate.web.auth.load_user`),
  as ``whoami`` did before. Every other layer (body limit, CORS, headers, the study and role gates) is the same.

The two are measured in alternating blocks so that drift (other processes on the box) hits both alike. Reported:
p50 / p95 per request of each, and the added p50 (goal: under 2 ms).

Usage: ``python bench/session_cost.py [--requests 3000] [--blocks 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

GOAL_MS = 2.0
PASSWORD = "bench-password-1"


def signed_cookie_app(settings: Any, secret: str) -> Any:
    """The same app with the previous design's session: Starlette's signed-cookie ``SessionMiddleware`` in the place
    of the server-side one. Its routes then read the user by the id in the cookie, as they did before."""
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware

    from mcie.annotate.web.server import create_app
    from mcie.annotate.web.sessions import ServerSessionMiddleware

    app = create_app(settings, mount_ui=False, worker=False)
    swapped = [
        Middleware(SessionMiddleware, secret_key=secret, session_cookie="mcie_session", same_site="lax",
                   max_age=settings.session_max_age_s) if m.cls is ServerSessionMiddleware else m
        for m in app.user_middleware
    ]
    assert swapped != app.user_middleware
    app.user_middleware = swapped
    return app


async def run(apps: dict[str, Any], n: int, blocks: int) -> dict[str, list[float]]:
    import httpx

    clients: dict[str, httpx.AsyncClient] = {}
    for name, app in apps.items():
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        page = await client.get("/login")
        csrf = re.search(r"name=csrf value='([^']+)'", page.text)
        assert csrf
        answer = await client.post("/login", data={"username": "rater1", "password": PASSWORD, "csrf": csrf.group(1)})
        assert answer.status_code == 303, answer.text
        assert (await client.get("/api/whoami")).status_code == 200
        for _ in range(50):  # warm the pools and caches
            await client.get("/api/whoami")
        clients[name] = client
    times: dict[str, list[float]] = {name: [] for name in apps}
    per_block = max(1, n // blocks)
    for _ in range(blocks):
        for name, client in clients.items():
            for _ in range(per_block):
                start = time.perf_counter()
                response = await client.get("/api/whoami")
                times[name].append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200
    for client in clients.values():
        await client.aclose()
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per design")
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()

    import review_load

    from mcie.annotate.accounts import hash_password
    from mcie.annotate.web.server import create_app
    from mcie.config import load_settings
    from mcie.db.migrate import upgrade
    from mcie.db.models import Role, User
    from mcie.db.session import session_scope

    work = Path(tempfile.mkdtemp(prefix="mcie-bench-session-"))
    name, url = review_load.create_database()
    try:
        upgrade(url)
        settings = load_settings(database_url=url, data_dir=work, blob_url=str(work / "blobs"), secret_key="k" * 48,
                                 log_level="WARNING")
        with session_scope(url) as session:
            session.add(User(username="rater1", role=Role.rater, password_hash=hash_password(PASSWORD), active=True))
        apps = {"server_side": create_app(settings, mount_ui=False, worker=False),
                "signed_cookie": signed_cookie_app(settings, "k" * 48)}
        times = asyncio.run(run(apps, args.requests, args.blocks))
        result = {name: {"p50_ms": pct(t, 0.5), "p95_ms": pct(t, 0.95), "mean_ms": round(statistics.fmean(t), 3),
                         "requests": len(t)} for name, t in times.items()}
        added = round(result["server_side"]["p50_ms"] - result["signed_cookie"]["p50_ms"], 3)
        print(json.dumps({
            "benchmark": "session_cost",
            "route": "GET /api/whoami (in process, ASGI)",
            "database": "postgresql",
            **result,
            "added_p50_ms": added,
            "goal": {"added_p50_ms": GOAL_MS},
            "meets_goal": added < GOAL_MS,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average": os.getloadavg()[0]},
        }))
    finally:
        review_load.drop_database(name, url)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
