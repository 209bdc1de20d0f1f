"""Benchmark: client overhead of the OpenAI-compatible MLLM backend.

A local chat-completions server (tests/mcie/mllm/chat_server.py, in its own process by default) answers every
request after a fixed delay, like a model with a constant latency. N requests go through
``OpenAIBackend.generate`` with concurrency C, after a warm-up call of C requests that pays the one-time
imports. The ideal throughput is C / delay; the efficiency (measured / ideal) shows how well the client keeps
the server busy (goal: >= 0.9). Prints one JSON object.

    .venv/bin/python bench/mllm_overhead.py --requests 1000 --concurrency 16 --delay-ms 50
    .venv/bin/python bench/mllm_overhead.py --image-size 1024 [--image-format png | --pre-encoded]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image

from mcie.mllm.base import MLLMRequest, user
from mcie.mllm.openai_backend import OpenAIBackend, RetryPolicy, chat_payload
from tests.mcie.mllm.chat_server import chat_server


def _serve(delay_s: float, to_parent: Any, stop: Any) -> None:
    """Child process: run the server until told to stop, then report its peak concurrency."""
    with chat_server('{"ok": true}', delay_s=delay_s) as server:
        to_parent.put(server.base_url)
        stop.wait()
        to_parent.put(server.max_in_flight)


def _photo_like(size: int) -> Image.Image:
    """A smooth gradient with mild noise: compresses roughly like a photograph."""
    gradient = Image.linear_gradient("L").resize((size, size))
    noise = Image.effect_noise((size, size), 12)
    return Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.ROTATE_90)))


def _requests(n: int, image_size: int, pre_encoded: bool) -> list[MLLMRequest]:
    """n requests, each with its own image part when ``image_size`` > 0 (so each is encoded for itself,
    as in the pipeline), or sharing PNG bytes encoded beforehand when ``pre_encoded``."""
    if not image_size:
        return [MLLMRequest((user(f"request {i}"),), max_tokens=16) for i in range(n)]
    image = _photo_like(image_size)
    if pre_encoded:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        source: Any = buffer.getvalue()
    else:
        source = image
    return [MLLMRequest((user(f"request {i}", source),), max_tokens=16) for i in range(n)]


def _body_size(request: MLLMRequest, image_format: Any) -> int:
    return len(json.dumps(chat_payload(request, "bench", "none", image_format)).encode())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    requests: int,
    concurrency: int,
    delay_s: float,
    image_size: int = 0,
    image_format: str = "jpeg",
    pre_encoded: bool = False,
    in_process: bool = False,
) -> dict[str, Any]:
    batch = _requests(requests, image_size, pre_encoded)
    warmup = _requests(concurrency, image_size, pre_encoded)  # one-time imports and connections
    options: dict[str, Any] = {
        "concurrency": concurrency,
        "retry": RetryPolicy(0),
        "image_format": image_format,
    }
    if in_process:
        with chat_server('{"ok": true}', delay_s=delay_s) as server:
            backend = OpenAIBackend(server.base_url, "bench", **options)
            backend.generate(warmup)
            start = time.perf_counter()
            responses = backend.generate(batch)
            wall = time.perf_counter() - start
            max_in_flight = server.max_in_flight
    else:
        context = mp.get_context("spawn")
        queue, stop = context.Queue(), context.Event()
        child = context.Process(target=_serve, args=(delay_s, queue, stop), daemon=True)
        child.start()
        try:
            base_url = queue.get(timeout=60)
            backend = OpenAIBackend(base_url, "bench", **options)
            backend.generate(warmup)
            start = time.perf_counter()
            responses = backend.generate(batch)
            wall = time.perf_counter() - start
            stop.set()
            max_in_flight = queue.get(timeout=30)
        finally:
            stop.set()
            child.join(timeout=10)
            if child.is_alive():
                child.terminate()
    latencies = [r.latency_s for r in responses if r.ok]
    ideal = concurrency / delay_s
    throughput = requests / wall
    p50 = statistics.median(latencies) if latencies else float("nan")
    return {
        "benchmark": "mllm_overhead",
        "requests": requests,
        "concurrency": concurrency,
        "delay_s": delay_s,
        "image_size": image_size,
        "image_format": ("png bytes" if pre_encoded else image_format) if image_size else None,
        "request_bytes": _body_size(batch[0], image_format),
        "server": "thread" if in_process else "process",
        "wall_s": round(wall, 3),
        "throughput_rps": round(throughput, 1),
        "ideal_rps": round(ideal, 1),
        "efficiency": round(throughput / ideal, 3),
        "latency_p50_s": round(p50, 4),
        "latency_p95_s": round(_percentile(latencies, 0.95), 4) if latencies else None,
        "latency_max_s": round(max(latencies), 4) if latencies else None,
        "overhead_p50_ms": round((p50 - delay_s) * 1000, 2),
        "failures": sum(1 for r in responses if not r.ok),
        "max_in_flight": max_in_flight,
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--image-size", type=int, default=0, help="side of one image per request (0: none)")
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="jpeg", help="PIL image encoding")
    parser.add_argument("--pre-encoded", action="store_true", help="send PNG bytes encoded beforehand")
    parser.add_argument("--in-process", action="store_true", help="server in a thread, not a process")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.delay_ms <= 0:
        parser.error("--requests and --concurrency must be >= 1 and --delay-ms > 0")
    result = run(
        args.requests,
        args.concurrency,
        args.delay_ms / 1000,
        image_size=args.image_size,
        image_format=args.image_format,
        pre_encoded=args.pre_encoded,
        in_process=args.in_process,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
