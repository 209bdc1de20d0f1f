"""Load benchmark of the review app: 20 reviewers lease and submit at once over HTTP on PostgreSQL; prints one JSON.

Setup (not timed): a fresh PostgreSQL database on the server of ``MCIE_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``; only used to create and, at the end, drop the bench's own
database), migrated, then filled with core bulk inserts: ``--samples`` ready samples (3-turn instances expanded into
their windows [1,2], [2,3], [1,3], each sub-instruction with a box), random priorities, a few gold samples, the
project's default review settings (1 review per sample, a 10% calibration share with 3 reviews, 5% gold), 20 rater
accounts sharing one argon2 hash, and a handful of real tiny PNGs in an image store that every sample shares.

Then ``--servers`` ``mcie serve --no-worker`` processes are started (the real app, Gradio mounted, server-side
sessions in the database: the web tier of a deployment, whose jobs run in ``mcie worker`` processes elsewhere) and
``--reviewers`` threads (reviewer k on server k mod n), each with its own ``httpx`` client and login, loop
``GET /api/review/next`` -> ``POST /api/review/{id}`` (:mod:`annotate.web.api_review`) for ``--seconds`` after
``--warmup`` seconds that are not counted, optionally pausing ``--think-ms`` between a lease and its submit (a
reviewer looking at the sample; 0 = back to back, the server saturated). Reported: p50/p95/p99/max latency of
next-sample and submit as the client sees it, reviews/s, errors by kind, the server processes' CPU use, and a check
that every 201 is a review in the database.

Usage: ``python bench/review_load.py [--samples 100000] [--reviewers 20] [--seconds 30] [--warmup 3] [--think-ms 0]
[--servers 1] [--port 0] [--keep] [--review-policy fixed|adaptive] [--decision-rule paper|weighted]``. Goal: p95
under 150 ms for next-sample and for submit, under either policy (the adaptive policy's server refits rater
reliability meanwhile).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PASSWORD = "bench-password-1"
WINDOWS = ((1, 2), (2, 3), (1, 3))
OPERATIONS = ("add", "remove", "change")
N_IMAGES = 6
N_GOLD = 200
BATCH = 10_000
GOAL_P95_MS = 150.0


# ----------------------------------------------------------------------------------------------------------
# the database


def admin_url() -> str:
    return os.environ.get("MCIE_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)


def create_database() -> tuple[str, str]:
    """A new, empty database on the admin URL's server; returns (name, url)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"mcie_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return name, make_url(admin_url()).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str, url: str) -> None:
    import sqlalchemy as sa

    from mcie.db.session import engine_for

    engine_for(url).dispose()
    admin = sa.create_engine(admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _png(seed: int, size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(60, 220) for _ in range(3)))
    ImageDraw.Draw(image).ellipse([8, 8, 8 + seed * 4 % 30, 30], fill=tuple(rng.randrange(0, 255) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def fill(url: str, blobs: str, n_samples: int, n_reviewers: int, seed: int = 0) -> dict[str, Any]:
    """Fill a migrated database with ``n_samples`` ready samples and the reviewer accounts; returns setup facts."""
    from sqlalchemy import insert, text

    from mcie.annotate.accounts import hash_password
    from mcie.db.models import GoldAnswer, Instance, Sample, SubInstruction, Turn, User
    from mcie.db.session import session_scope
    from mcie.db.store import ImageStore, register_images

    rng = random.Random(seed)
    store = ImageStore(blobs)
    images = [store.put_bytes(_png(k), f"bench-{k}.png") for k in range(N_IMAGES)]
    shas = [image.sha256 for image in images]
    n_instances = -(-n_samples // len(WINDOWS))
    password_hash = hash_password(PASSWORD)

    def rows_in_batches(table: Any, rows: list[dict[str, Any]]) -> None:
        for start in range(0, len(rows), BATCH):
            session.execute(insert(table), rows[start : start + BATCH])

    with session_scope(url, write=True) as session:
        register_images(session, images)
        session.flush()
        users = [{"id": k + 1, "username": f"bench-rater{k:02d}", "role": "rater", "password_hash": password_hash}
                 for k in range(n_reviewers)]
        rows_in_batches(User, users)
        instances: list[dict[str, Any]] = []
        turns: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        subs: list[dict[str, Any]] = []
        sample_id = 0
        for inst in range(1, n_instances + 1):
            instances.append({"id": inst, "dataset": "bench", "external_id": f"inst-{inst:06d}",
                              "source_image": shas[inst % N_IMAGES], "n_turns": 3, "meta": {}})
            for t in (1, 2, 3):
                turns.append({"instance_id": inst, "index": t, "instruction": f"edit {t} of instance {inst}",
                              "operation": OPERATIONS[t - 1], "result_image": shas[(inst + t) % N_IMAGES]})
            for first, last in WINDOWS:
                if sample_id >= n_samples:
                    break
                sample_id += 1
                samples.append({"id": sample_id, "instance_id": inst, "first_turn": first, "last_turn": last,
                                "instruction": ", then ".join(f"edit {t} of instance {inst}"
                                                              for t in range(first, last + 1)),
                                "status": "ready", "priority": round(rng.random(), 3)})
                for t in range(first, last + 1):
                    x0 = round(rng.uniform(0, 0.5), 3)
                    subs.append({"sample_id": sample_id, "turn_index": t, "text": f"edit {t} of instance {inst}",
                                 "operation": OPERATIONS[t - 1], "box_x0": x0, "box_y0": 0.1, "box_x1": x0 + 0.4,
                                 "box_y1": 0.8, "box_source": "mllm", "box_score": 0.7})
        for table, rows in ((Instance, instances), (Turn, turns), (Sample, samples), (SubInstruction, subs)):
            rows_in_batches(table, rows)
        gold_ids = rng.sample(range(1, n_samples + 1), min(N_GOLD, n_samples // 10))
        rows_in_batches(GoldAnswer, [{"sample_id": s, "consistent": True, "quality": 4, "complexity": 4}
                                     for s in gold_ids])
        for table in ("users", "instances", "turns", "samples", "sub_instructions"):
            session.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                 f"(SELECT max(id) FROM {table}))"))
    from mcie.db.session import engine_for

    with engine_for(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    return {"samples": n_samples, "instances": n_instances, "sub_instructions": len(subs),
            "gold_samples": len(gold_ids), "images": N_IMAGES, "reviewers": n_reviewers}


# ----------------------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(url: str, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """``mcie serve --no-worker`` on ``port`` with a settings environment of its own (no developer config leaks in)."""
    import httpx

    config = data_dir / "empty.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCIE_") or k.startswith("MCIE_TEST_")}
    env |= {"MCIE_DATABASE_URL": url, "MCIE_DATA_DIR": str(data_dir), "MCIE_BLOB_URL": str(data_dir / "blobs"),
            "MCIE_CONFIG": str(config), "MCIE_LOG_LEVEL": "WARNING"}
    mcie = Path(sys.executable).with_name("mcie")
    command = [str(mcie)] if mcie.exists() else [sys.executable, "-m", "mcie.cli"]
    log_path = data_dir / f"server-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until it stops
    server = subprocess.Popen([*command, "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker"],
                              cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mcie serve exited with {server.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise SystemExit("mcie serve did not become healthy within 120 s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def postgres_cpu_seconds() -> float:
    """CPU seconds of every local ``postgres`` process (the server's backends for the app's pooled connections
    live through the run, so the difference over the run is the database's share); NaN where /proc is missing."""
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            found = True
            total += cpu_seconds(int(stat.parent.name))
    return total if found else float("nan")


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------------------------------------
# the reviewers


class Reviewer(threading.Thread):
    """One reviewer: own client and login; loops next -> submit until told to stop, timing every request."""

    def __init__(self, base: str, username: str, think_s: float, seed: int, start: threading.Barrier) -> None:
        super().__init__(name=f"bench-{username}", daemon=True)
        import httpx

        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=60)
        self.username = username
        self.think_s = think_s
        self.rng = random.Random(seed)
        self.start_barrier = start
        self.stop = threading.Event()
        self.measuring = threading.Event()
        self.next_ms: list[float] = []
        self.submit_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.created: list[int] = []  # review ids of every 201, measured or not
        self.empty = 0

    def log_in(self) -> None:
        form = self.http.get("/login")
        token = re.search(r"name=csrf value='([^']+)'", form.text)
        assert token, form.text
        answer = self.http.post("/login", data={"username": self.username, "password": PASSWORD,
                                                "csrf": token.group(1)})
        if answer.status_code != 303:
            raise SystemExit(f"login of {self.username} failed: {answer.status_code} {answer.text[:300]}")
        self.headers = {"X-CSRF-Token": self.http.get("/api/review/csrf").json()["csrf_token"]}

    def _timed(self, method: str, path: str, **kwargs: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        response = self.http.request(method, path, **kwargs)
        return response, (time.perf_counter() - start) * 1000

    def run(self) -> None:
        self.start_barrier.wait()
        while not self.stop.is_set():
            try:
                response, ms = self._timed("GET", "/api/review/next")
                if self.measuring.is_set():
                    self.next_ms.append(ms)
                if response.status_code == 204:
                    self.empty += 1
                    time.sleep(0.5)
                    continue
                if response.status_code != 200:
                    self.errors[f"next {response.status_code}"] += 1
                    continue
                sample_id = response.json()["sample_id"]
                if self.think_s:
                    time.sleep(self.rng.uniform(0.5, 1.5) * self.think_s)
                answer = {"consistent": self.rng.random() < 0.8, "quality": self.rng.randint(2, 5),
                          "complexity": self.rng.randint(2, 5), "time_spent_s": round(self.rng.uniform(5, 90), 1)}
                response, ms = self._timed("POST", f"/api/review/{sample_id}", json=answer, headers=self.headers)
                if self.measuring.is_set():
                    self.submit_ms.append(ms)
                if response.status_code == 201:
                    self.created.append(int(response.json()["review_id"]))
                else:
                    self.errors[f"submit {response.status_code}"] += 1
            except Exception as exc:  # a transport error is a result, not a crash of the bench
                self.errors[type(exc).__name__] += 1


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))], 1)

    return {"n": len(ordered), "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1),
            "mean": round(sum(ordered) / len(ordered), 1)}


def load(
    bases: list[str], n_reviewers: int, seconds: float, warmup: float, think_ms: float, pids: list[int]
) -> dict[str, Any]:
    """Run the reviewers against the servers at ``bases`` (reviewer k uses server k mod n); measure."""
    barrier = threading.Barrier(n_reviewers + 1)
    reviewers = [Reviewer(bases[k % len(bases)], f"bench-rater{k:02d}", think_ms / 1000, k, barrier)
                 for k in range(n_reviewers)]

    def server_cpu() -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    for r in reviewers:
        r.log_in()
    for r in reviewers:
        r.start()
    barrier.wait()
    time.sleep(warmup)
    cpu_before, started = (server_cpu(), postgres_cpu_seconds(), own_cpu_seconds()), time.perf_counter()
    for r in reviewers:
        r.measuring.set()
    time.sleep(seconds)
    for r in reviewers:
        r.measuring.clear()
    elapsed, cpu_after = time.perf_counter() - started, (server_cpu(), postgres_cpu_seconds(), own_cpu_seconds())
    for r in reviewers:
        r.stop.set()
    for r in reviewers:
        r.join(timeout=120)
        r.http.close()
    next_ms = [ms for r in reviewers for ms in r.next_ms]
    submit_ms = [ms for r in reviewers for ms in r.submit_ms]
    errors = sum((r.errors for r in reviewers), Counter())
    return {
        "next_sample_ms": percentiles(next_ms),
        "submit_ms": percentiles(submit_ms),
        "reviews_per_s": round(len(submit_ms) / elapsed, 1),
        "requests_per_s": round((len(next_ms) + len(submit_ms)) / elapsed, 1),
        "errors": dict(errors),
        "empty_queue_answers": sum(r.empty for r in reviewers),
        # cores busy on average (1.0 = one core all the time): the app's process, PostgreSQL, this load generator
        "cpu_cores_used": {
            name: round((after - before) / elapsed, 2)
            for name, before, after in zip(("server", "postgres", "clients"), cpu_before, cpu_after, strict=True)
        },
        "measured_s": round(elapsed, 1),
        "created": [rid for r in reviewers for rid in r.created],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--reviewers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--think-ms", type=float, default=0.0, help="mean pause between a lease and its submit")
    parser.add_argument("--port", type=int, default=0, help="port of the (first) server (0: a free one)")
    parser.add_argument("--servers", type=int, default=1,
                        help="mcie serve --no-worker processes on one database (the web tier's replicas)")
    parser.add_argument("--keep", action="store_true", help="keep the database and data folder (and print them)")
    parser.add_argument("--review-policy", choices=("fixed", "adaptive"), default="fixed",
                        help="the project's review policy (adaptive: follow-ups, adaptive gold, refits queued as jobs)")
    parser.add_argument("--decision-rule", choices=("paper", "weighted"), default="paper")
    args = parser.parse_args()

    from mcie.db.migrate import upgrade
    from mcie.db.models import Review
    from mcie.db.session import session_scope

    work = Path(tempfile.mkdtemp(prefix="mcie-bench-review-"))
    name, url = create_database()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        start = time.perf_counter()
        upgrade(url)
        facts = fill(url, str(work / "blobs"), args.samples, args.reviewers)
        from mcie.annotate.project import set_project_config

        with session_scope(url, write=True) as session:
            set_project_config(session, {"review_policy": args.review_policy, "decision_rule": args.decision_rule},
                               actor_id=None)
        setup_s = time.perf_counter() - start
        ports = [args.port + k if args.port else free_port() for k in range(args.servers)]
        for port in ports:
            servers.append(start_server(url, work, port))
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        result = load(bases, args.reviewers, args.seconds, args.warmup, args.think_ms, [s.pid for s in servers])
        created = result.pop("created")
        from sqlalchemy import func, select

        with session_scope(url) as session:
            stored = int(session.scalar(select(func.count()).select_from(Review).where(Review.id.in_(created))) or 0)
            total = int(session.scalar(select(func.count()).select_from(Review)) or 0)
        p95s = [result["next_sample_ms"]["p95"], result["submit_ms"]["p95"]]
        report = {
            "benchmark": "review_load",
            "setup": {**facts, "seconds": round(setup_s, 1)},
            "load": {"reviewers": args.reviewers, "seconds": args.seconds, "warmup_s": args.warmup,
                     "think_ms": args.think_ms, "servers": args.servers, "review_policy": args.review_policy,
                     "decision_rule": args.decision_rule},
            **result,
            "submits_201": len(created),
            "submits_201_in_database": stored,
            "reviews_in_database": total,
            "goal": {"p95_ms": GOAL_P95_MS},
            "meets_goal": all(p is not None and p < GOAL_P95_MS for p in p95s) and not result["errors"],
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average": os.getloadavg()[0]},
        }
        if args.keep:
            report["kept"] = {"database": url, "data_dir": str(work)}
        print(json.dumps(report))
    finally:
        for server in servers:
            stop_server(server)
        if not args.keep:
            drop_database(name, url)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
