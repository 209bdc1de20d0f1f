"""Benchmark: the MLLM conflict stage against a local OpenAI-compatible server that answers after a fixed delay.

The demo data (real photographs, 3-5 images per prompt) is ingested and expanded into samples; then the pipeline's
conflict stage (prompt building, the openai backend's bounded concurrency, parsing, and the database writes) runs
against ``tests/mcie/mllm/chat_server.py`` answering every request after ``BENCH_DELAY_S``. Throughput is compared to
the ideal ``concurrency / delay``. Goal: at least 90% of the ideal. Prints one JSON object.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mcie.config import load_settings
from mcie.db import migrate
from mcie.db.store import ImageStore
from mcie.demo import build_demo
from mcie.pipeline.conflict_stage import conflict_stage
from mcie.pipeline.engines import LocalEngine
from mcie.pipeline.expand_stage import expand_stage
from mcie.pipeline.ingest import ingest, read_source
from tests.mcie.mllm.chat_server import chat_server

ANSWER = json.dumps({"conflict": False, "turns": [], "reason": "different objects"})
DELAY_S = float(os.environ.get("BENCH_DELAY_S", "0.5"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
INSTANCES = int(os.environ.get("BENCH_INSTANCES", "80"))


def _serve(delay_s: float, to_parent: Any, stop: Any) -> None:
    """Child process (so the server does not compete with the pipeline for the GIL)."""
    with chat_server(ANSWER, delay_s=delay_s) as server:
        to_parent.put(server.base_url)
        stop.wait()
        to_parent.put(server.max_in_flight)


def main() -> None:
    context = mp.get_context("spawn")
    queue, stop = context.Queue(), context.Event()
    child = context.Process(target=_serve, args=(DELAY_S, queue, stop), daemon=True)
    child.start()
    try:
        base_url = queue.get(timeout=60)
        result = _run(base_url)
        stop.set()
        result["server_max_in_flight"] = queue.get(timeout=30)
    finally:
        stop.set()
        child.join(timeout=10)
    print(json.dumps(result))


def _run(base_url: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_demo(root / "demo", instances=INSTANCES, seed=11)
        settings = load_settings(
            data_dir=root / "data",
            database_url=f"sqlite:///{root}/bench.db",
            mllm_backend="openai",
            mllm_base_url=base_url,
            mllm_model="bench-model",
            mllm_concurrency=CONCURRENCY,
        )
        migrate.upgrade(settings.database_url)
        ingest(read_source(root / "demo", "seed-data-edit", None), url=settings.database_url,
               store=ImageStore.from_settings(settings))
        expand_stage(settings.database_url)
        started = time.perf_counter()
        report = conflict_stage(settings.database_url, LocalEngine(progress=False), settings, mllm="openai")
        seconds = time.perf_counter() - started
        ideal = CONCURRENCY / DELAY_S
        throughput = report.calls / seconds
        return {
            "benchmark": "pipeline_mllm",
            "samples": report.pending,
            "calls": report.calls,
            "failures": report.failures,
            "delay_s": DELAY_S,
            "concurrency": CONCURRENCY,
            "seconds": round(seconds, 2),
            "requests_per_s": round(throughput, 2),
            "ideal_requests_per_s": round(ideal, 2),
            "fraction_of_ideal": round(throughput / ideal, 3),
            "goal_fraction": 0.9,
            "meets_goal": throughput / ideal >= 0.9,
        }


if __name__ == "__main__":
    main()
