"""Benchmark: expand 21,000 synthetic multi-turn instances (the paper's corpus size) into samples in the database.

Synthetic instances (2-5 turns, real-looking instructions) are inserted first (not timed); then the expand stage
plans every window and writes samples and sub-instructions. Runs on SQLite and, when reachable, on PostgreSQL
(``MCIE_TEST_POSTGRES_URL``, used to create a throw-away database). Goal: under 60 s per database on the dev machine.
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import uuid

import sqlalchemy as sa

from mcie.db import migrate
from mcie.db.models import Image, Instance, Turn
from mcie.db.session import engine_for, session_scope
from mcie.pipeline.expand_stage import expand_stage

N_INSTANCES = int(os.environ.get("BENCH_INSTANCES", "21000"))
VERBS = [
    "add a red umbrella next to the bench", "remove the car on the left", "change the sky to sunset",
    "make the dog brown", "replace the cup with a glass", "put a hat on the man", "erase the sign in the back",
    "turn the wall blue", "add two birds in the sky", "delete the text at the bottom",
]


def _populate(url: str, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    sha = "0" * 64
    with session_scope(url) as session:
        session.add(Image(sha256=sha, format="PNG", width=8, height=8, size_bytes=10))
    turns_total = 0
    batch = 2000
    for start in range(0, n, batch):
        with session_scope(url) as session:
            count = min(batch, n - start)
            rows = [{"dataset": "bench", "external_id": f"i{start + i}", "source_image": sha,
                     "n_turns": rng.randint(2, 5), "meta": {}} for i in range(count)]
            ids = session.scalars(sa.insert(Instance).returning(Instance.id, sort_by_parameter_order=True), rows).all()
            turn_rows = [
                {"instance_id": iid, "index": k, "instruction": rng.choice(VERBS), "result_image": sha}
                for iid, row in zip(ids, rows, strict=True)
                for k in range(1, row["n_turns"] + 1)
            ]
            session.execute(sa.insert(Turn), turn_rows)
            turns_total += len(turn_rows)
    return turns_total


def _run(url: str) -> dict[str, object]:
    migrate.upgrade(url)
    turns = _populate(url, N_INSTANCES)
    t0 = time.perf_counter()
    report = expand_stage(url)
    seconds = time.perf_counter() - t0
    return {
        "instances": N_INSTANCES,
        "turns": turns,
        **report.as_dict(),
        "seconds": round(seconds, 2),
        "samples_per_s": round(report.samples / seconds),
        "goal_seconds": 60,
        "meets_goal": seconds < 60,
    }


def main() -> None:
    results: dict[str, object] = {"benchmark": "pipeline_expand"}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = _run(f"sqlite:///{tmp}/bench.db")
    admin_url = os.environ.get("MCIE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"mcie_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        results["postgresql"] = {"skipped": f"PostgreSQL unreachable: {exc}"}
    else:
        url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        try:
            results["postgresql"] = _run(url)
        finally:
            engine_for(url).dispose()
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps(results))


if __name__ == "__main__":
    main()
