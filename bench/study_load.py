"""Load test of the user study's vote path: 50 participants voting at once over HTTP; prints one JSON object.

Setup (not timed): a fresh PostgreSQL database (created here, dropped at the end unless ``--keep``) migrated to the
newest schema; a study of ``--items`` items with ``--methods`` methods made from a folder of tiny PNGs
(:func:`annotate.study.create_study_from_folder`), ``--items-per-participant`` screens each, and ``--participants``
participants enrolled with invite links. The app (``annotate.web.server.create_app``, Gradio pages mounted, as ``mcie
serve`` runs it: uvicorn, one process) is served from a subprocess on a free port.

Each participant is an asyncio task with its own cookie jar (httpx): it opens its invite link, loads its first
screen (``GET /api/study/{id}/current``; this assigns its sequence - timed apart, as "first_screen": assignments
are serialised on the study row and all participants arrive at once), then, for every screen, votes on each
question (``POST /api/study/{id}/vote``; a share ``--change-rate`` of votes is changed by a second vote, as a
participant changing their mind), advances (``POST .../advance``) and loads the next screen.
Between actions it waits a random think time drawn uniformly from ``--think-ms LO,HI`` (``0,0``: as fast as the
server answers, a saturation test). All participants start together.

Reported: p50/p95/p99/max latency per endpoint (client-side, ms, from the request to the full answer), votes per
second, the server process's CPU time, the load average, errors by status, and *lost votes*: every acknowledged
vote (HTTP 200; the last one per participant, item and question) is compared with the ``votes`` table afterwards -
a missing row or another choice counts as lost (must be 0); rows the database has without an acknowledgement are
reported too. The machine's other work shows in the load average: the client, the server and PostgreSQL share it.

Usage: ``python bench/study_load.py [--participants 50] [--items-per-participant 20] [--think-ms 200,800]
[--admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--keep]``.
Goal: vote p95 under 150 ms on PostgreSQL on the development machine, no lost votes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
GOAL_P95_MS = 150.0
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------------------------------------
# setup


def _database(admin_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _create_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()


def _drop_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    from mcie.db.session import engine_for

    engine_for(_database(admin_url, name)).dispose()
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _study_folder(root: Path, n_items: int, n_methods: int) -> Path:
    from PIL import Image

    methods = [f"method-{k}" for k in range(n_methods)]
    lines = []
    for i in range(n_items):
        item_id = f"item-{i:04d}"
        lines.append(json.dumps({"id": item_id, "source_image": f"sources/{item_id}.png",
                                 "instruction": f"turn object {i} red and remove the lamp"}))
        for folder, colour in (
            ("sources", (i % 256, 0, 0)),
            *((m, (i % 256, k + 1, 9)) for k, m in enumerate(methods)),
        ):
            path = root / folder / f"{item_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12), colour).save(path, format="PNG")
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings_kwargs(url: str, data_dir: Path) -> dict[str, Any]:
    return {"data_dir": str(data_dir), "database_url": url, "blob_url": str(data_dir / "blobs"),
            "secret_key": "bench-" + uuid.uuid4().hex, "log_level": "WARNING"}


def serve(config: str) -> None:
    """The server subprocess: the whole app (UI mounted) under uvicorn, one process, like ``mcie serve``."""
    import uvicorn

    from mcie.annotate.web.server import create_app
    from mcie.config import load_settings

    options = json.loads(config)
    port = options.pop("port")
    app = create_app(load_settings(**options))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ----------------------------------------------------------------------------------------------------------
# the participants


@dataclass
class Stats:
    latency: dict[str, list[float]] = field(
        default_factory=lambda: {"vote": [], "advance": [], "current": [], "join": [], "first_screen": []}
    )
    errors: Counter[str] = field(default_factory=Counter)
    acknowledged: dict[tuple[int, int, str], str | None] = field(default_factory=dict)
    votes_sent: int = 0


async def _timed(stats: Stats, kind: str, call: Any) -> Any:
    start = time.perf_counter()
    try:
        response = await call
    except Exception as exc:  # a transport error counts as an error of its endpoint
        stats.errors[f"{kind}:{type(exc).__name__}"] += 1
        return None
    stats.latency[kind].append((time.perf_counter() - start) * 1000)
    if response.status_code != (303 if kind == "join" else 200):
        stats.errors[f"{kind}:{response.status_code}"] += 1
    return response


async def participant(
    base: str, study_id: int, user_id: int, token: str, stats: Stats, start: asyncio.Event, args: argparse.Namespace
) -> None:
    import httpx

    rng = random.Random(user_id)
    low, high = args.think
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as client:
        await _timed(stats, "join", client.get(f"/study/join/{token}"))
        response = await _timed(stats, "first_screen", client.get(f"/api/study/{study_id}/current"))
        if response is None or response.status_code != 200:
            return
        screen = response.json()
        csrf = screen["csrf"]
        headers = {"x-csrf-token": csrf}
        await start.wait()
        while not screen.get("finished"):
            labels = [o["label"] for o in screen["outputs"]]
            for criterion in screen["criteria"]:
                choices = [*labels, None]
                tries = 2 if rng.random() < args.change_rate else 1
                for _ in range(tries):
                    if high > 0:
                        await asyncio.sleep(rng.uniform(low, high) / 1000)
                    choice = rng.choice(choices)
                    body = {"item_id": screen["item_id"], "criterion": criterion, "choice": choice,
                            "latency_ms": round(rng.uniform(800, 9000), 1)}
                    stats.votes_sent += 1
                    answer = await _timed(stats, "vote", client.post(f"/api/study/{study_id}/vote", json=body,
                                                                     headers=headers))
                    if answer is not None and answer.status_code == 200:
                        stats.acknowledged[(user_id, screen["item_id"], criterion)] = choice
            if high > 0:
                await asyncio.sleep(rng.uniform(low, high) / 1000)
            step = await _timed(
                stats,
                "advance",
                client.post(f"/api/study/{study_id}/advance", json={"item_id": screen["item_id"]}, headers=headers),
            )
            if step is None or step.status_code != 200:
                return
            response = await _timed(stats, "current", client.get(f"/api/study/{study_id}/current"))
            if response is None or response.status_code != 200:
                return
            screen = response.json()


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))], 2)

    return {"n": len(ordered), "p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2)}


def _check_votes(url: str, study_id: int, stats: Stats) -> dict[str, int]:
    from sqlalchemy import select

    from mcie.db.models import StudyAssignment, Vote
    from mcie.db.session import session_scope

    with session_scope(url) as session:
        rows = session.execute(
            select(Vote.participant_id, Vote.item_id, Vote.criterion, Vote.shown_position)
            .join(StudyAssignment, StudyAssignment.id == Vote.assignment_id)
            .where(StudyAssignment.study_id == study_id)
        ).all()
    stored = {(p, i, c): None if pos is None else LABELS[pos - 1] for p, i, c, pos in rows}
    lost = sum(1 for key, choice in stats.acknowledged.items() if key not in stored or stored[key] != choice)
    return {"acknowledged": len(stats.acknowledged), "stored": len(stored), "lost": lost,
            "stored_without_acknowledgement": len(set(stored) - set(stats.acknowledged))}


async def _load(
    base: str, study_id: int, people: list[tuple[int, str]], args: argparse.Namespace
) -> tuple[Stats, float]:
    stats = Stats()
    start = asyncio.Event()
    tasks = [asyncio.create_task(participant(base, study_id, uid, token, stats, start, args)) for uid, token in people]
    while len(stats.latency["first_screen"]) + sum(stats.errors.values()) < len(people):  # all have a first screen
        await asyncio.sleep(0.05)
    began = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return stats, time.perf_counter() - began


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_until_up(base: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=50)
    parser.add_argument("--items", type=int, default=400, help="items in the study")
    parser.add_argument("--items-per-participant", type=int, default=20)
    parser.add_argument("--methods", type=int, default=5)
    parser.add_argument("--think-ms", default="200,800", help="LO,HI think time between actions; 0,0 = none")
    parser.add_argument("--change-rate", type=float, default=0.2, help="share of votes changed once")
    parser.add_argument("--admin-url", default=os.environ.get("MCIE_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    parser.add_argument("--keep", action="store_true", help="keep the database and data folder")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    low, high = (float(v) for v in args.think_ms.split(","))
    args.think = (low, high)

    from mcie.annotate import study
    from mcie.config import load_settings
    from mcie.db.migrate import upgrade
    from mcie.db.session import session_scope
    from mcie.db.store import ImageStore

    name = f"mcie_bench_study_{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix="mcie-study-load-"))
    _create_database(args.admin_url, name)
    process: subprocess.Popen[bytes] | None = None
    try:
        url = _database(args.admin_url, name)
        upgrade(url)
        options = _settings_kwargs(url, work / "data")
        settings = load_settings(**options)
        t0 = time.perf_counter()
        created = study.create_study_from_folder(url, ImageStore.from_settings(settings),
                                                 _study_folder(work / "folder", args.items, args.methods), "load",
                                                 items_per_participant=args.items_per_participant)
        people = []
        with session_scope(url, write=True) as session:
            for _ in range(args.participants):
                user, token = study.enrol(session, created.study_id)
                people.append((user.id, token))
        setup_s = time.perf_counter() - t0
        port = _free_port()
        config = json.dumps({**options, "port": port})
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", config], cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(base, process)
        load_before, cpu_before = os.getloadavg()[0], _cpu_seconds(process.pid)
        stats, duration = asyncio.run(_load(base, created.study_id, people, args))
        load_after, server_cpu = os.getloadavg()[0], _cpu_seconds(process.pid) - cpu_before
        n_requests = sum(len(v) for v in stats.latency.values())
        votes = _check_votes(url, created.study_id, stats)
        vote = _percentiles(stats.latency["vote"])
        report = {
            "benchmark": "study_load",
            "database": "postgresql",
            "server": "uvicorn, 1 process, create_app() with the Gradio pages mounted",
            "participants": args.participants,
            "items_per_participant": args.items_per_participant,
            "methods": args.methods,
            "criteria": list(created.criteria),
            "think_ms": [low, high],
            "change_rate": args.change_rate,
            "setup_s": round(setup_s, 2),
            "duration_s": round(duration, 2),
            "votes_sent": stats.votes_sent,
            "votes_per_s": round(len(stats.latency["vote"]) / duration, 1) if duration else None,
            "latency_ms": {kind: _percentiles(values) for kind, values in stats.latency.items()},
            "server_cpu": {"seconds": round(server_cpu, 2), "share_of_one_core": round(server_cpu / duration, 2),
                           "ms_per_request": round(1000 * server_cpu / max(n_requests, 1), 2)},
            "errors": dict(stats.errors),
            "votes": votes,
            "lost_votes": votes["lost"],
            "goal": {"vote_p95_ms_below": GOAL_P95_MS,
                     "met": vote["p95"] is not None and vote["p95"] < GOAL_P95_MS and votes["lost"] == 0},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)}},
        }
        print(json.dumps(report, indent=2))
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not args.keep:
            _drop_database(args.admin_url, name)
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
