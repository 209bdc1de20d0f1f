"""Benchmark of the dataset exports: samples/s and peak memory per format for 90,000 accepted samples; prints one JSON.

Setup (not timed): a fresh SQLite database with ``--samples`` accepted samples - 3-turn instances expanded into
their three windows ([1,2], [2,3], [1,3]), 7 sub-instructions with boxes per instance, one review per sample (three
for a 10% calibration share), a rule decision and an MLLM verdict each - and a pool of distinct 64 x 64 PNGs (a
random 16 x 16 pattern upscaled, ~1.3 kB) in a real image store, drawn for the instances' image slots so that a few
images are shared between instances. Each format is then exported by ``exports.api.run_export`` in its own process
(so peak memory is that export's: the process's high-water resident size ``VmHWM``, which includes the interpreter
and libraries, reported along with the resident size just before the export started; ``ru_maxrss`` would not do, as
Linux carries it over from the forking parent).

Usage: ``python bench/export.py [--samples 90000] [--formats jsonl,parquet,webdataset] [--workdir DIR] [--keep]``.
Goal: >= 500 samples/s for JSONL + images and Parquet, peak memory < 1 GiB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WINDOWS = ((1, 2), (2, 3), (1, 3))
N_REVIEWERS = 20
CALIBRATION_SHARE = 0.10
BATCH = 20_000


def _png(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    cell = max(size // 4, 1)
    pattern = rng.integers(0, 256, (cell, cell, 3), dtype=np.uint8)
    pixels = pattern.repeat(size // cell, 0).repeat(size // cell, 1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _insert(session: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    from sqlalchemy import insert

    for start in range(0, len(rows), BATCH):
        session.execute(insert(table), rows[start : start + BATCH])


def build(url: str, blobs: str, n_samples: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Fill a migrated database and image store with ``n_samples`` accepted samples; returns setup facts."""
    from mcie.db.models import Decision, Instance, MllmJudgement, Review, Sample, SubInstruction, Turn, User
    from mcie.db.session import session_scope
    from mcie.db.store import ImageStore, register_images

    rng = np.random.default_rng(seed)
    store = ImageStore(blobs)
    n_instances = -(-n_samples // len(WINDOWS))
    slots = n_instances * 4  # source + 3 turn results
    pool_size = max(int(slots * 0.85), 1)  # ~15% of the image slots reuse an image of another instance
    pool = [store.put_bytes(_png(rng, image_size), f"bench-{i}.png") for i in range(pool_size)]
    picks = np.concatenate([np.arange(pool_size), rng.integers(0, pool_size, slots - pool_size)])
    rng.shuffle(picks)
    with session_scope(url, write=True) as session:
        for start in range(0, len(pool), BATCH):
            register_images(session, pool[start : start + BATCH])
        raters = [{"id": i + 1, "username": f"rater{i:02d}", "role": "rater"} for i in range(N_REVIEWERS)]
        _insert(session, User, raters)
        instances, turns, samples, subs, reviews, decisions, verdicts = [], [], [], [], [], [], []
        sample_id = 0
        for inst in range(n_instances):
            images = [pool[int(k)].sha256 for k in picks[inst * 4 : inst * 4 + 4]]
            instances.append({"id": inst + 1, "dataset": "bench", "external_id": f"inst-{inst:06d}",
                              "source_image": images[0], "n_turns": 3, "meta": {}})
            for t in (1, 2, 3):
                turns.append({"instance_id": inst + 1, "index": t, "instruction": f"edit {t} of {inst}",
                              "operation": ("add", "remove", "change")[t - 1], "result_image": images[t]})
            for first, last in WINDOWS:
                if sample_id >= n_samples:
                    break
                sample_id += 1
                samples.append({"id": sample_id, "instance_id": inst + 1, "first_turn": first, "last_turn": last,
                                "instruction": " and ".join(f"edit {t} of {inst}" for t in range(first, last + 1)),
                                "status": "accepted"})
                for t in range(first, last + 1):
                    x0 = float(rng.uniform(0, 0.5))
                    subs.append({"sample_id": sample_id, "turn_index": t, "text": f"edit {t} of {inst}",
                                 "operation": ("add", "remove", "change")[t - 1], "box_x0": x0, "box_y0": 0.1,
                                 "box_x1": x0 + 0.4, "box_y1": 0.8, "box_source": ("mllm", "diff")[t % 2],
                                 "box_score": 0.7})
                n_rev = 3 if rng.random() < CALIBRATION_SHARE else 1
                for r in rng.choice(N_REVIEWERS, n_rev, replace=False):
                    reviews.append({"sample_id": sample_id, "user_id": int(r) + 1, "consistent": True,
                                    "quality": int(rng.integers(4, 6)), "complexity": int(rng.integers(4, 6)),
                                    "revision": 1})
                decisions.append({"sample_id": sample_id, "outcome": "accepted", "source": "rule",
                                  "rule": {"quality_above": 3, "complexity_above": 3}})
                verdicts.append({"sample_id": sample_id, "stage": "conflict", "model": "bench", "prompt_version": "v1",
                                 "cache_key": f"{sample_id:064x}", "verdict": "no_conflict", "score": 0.9})
        for table, rows in ((Instance, instances), (Turn, turns), (Sample, samples), (SubInstruction, subs),
                            (Review, reviews), (Decision, decisions), (MllmJudgement, verdicts)):
            _insert(session, table, rows)
    return {"instances": n_instances, "distinct_images": pool_size, "image_slots": slots, "reviews": len(reviews),
            "sub_instructions": len(subs)}


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak), in MiB."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the closest figure


def child(fmt: str, url: str, blobs: str, out: str) -> dict[str, Any]:
    """Run one export in this process; measure it."""
    from mcie.db.store import ImageStore
    from mcie.exports.api import run_export

    store = ImageStore(blobs)
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    result = run_export(url, store, out, fmt)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {
        "samples": result.n_samples,
        "seconds": round(seconds, 2),
        "samples_per_s": round(result.n_samples / seconds, 1),
        "peak_rss_mib": round(_status_mib("VmHWM"), 1),
        "rss_before_export_mib": round(before, 1),
        "output_mib": round(size / 2**20, 1),
        "files": result.files,
        "counts": dict(result.counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=90_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--formats", default="jsonl,parquet,webdataset")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database, store and exports")
    parser.add_argument("--child", nargs=4, metavar=("FMT", "URL", "BLOBS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from mcie.db.migrate import upgrade

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mcie-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{work}/bench.db"
    blobs = str(work / "blobs")
    try:
        start = time.perf_counter()
        upgrade(url)
        facts = build(url, blobs, args.samples, args.image_size)
        setup_s = time.perf_counter() - start
        results = {}
        for fmt in args.formats.split(","):
            out = work / f"export-{fmt}"
            done = subprocess.run([sys.executable, __file__, "--child", fmt, url, blobs, str(out)],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{fmt} export failed:\n{done.stderr[-4000:]}")
            results[fmt] = json.loads(done.stdout.strip().splitlines()[-1])
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        report = {
            "benchmark": "exports",
            "samples": args.samples,
            "image_size": args.image_size,
            "setup": {**facts, "seconds": round(setup_s, 1)},
            "formats": results,
            "goal": {"samples_per_s": 500, "peak_rss_mib": 1024},
            "meets_goal": all(
                r["samples_per_s"] >= 500 and r["peak_rss_mib"] < 1024
                for f, r in results.items() if f in ("jsonl", "parquet")
            ),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        }
        print(json.dumps(report, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
