"""Benchmark: `mcie data import` throughput (rows/s) and peak memory on a generated local dataset; one JSON object.

The dataset has MagicBrush's columns and Hugging Face image features (``img_id``, ``turn_index``, ``source_img``,
``mask_img``, ``instruction``, ``target_img``), ``--rows`` rows (20,000 by default) of distinct ``--size`` px images
(256: JPEG source and target, PNG mask), written as Parquet shards by ``datasets`` (cached in ``--workdir`` between
runs). The import runs in a fresh child process with ``--preset magicbrush`` into a JSONL export, so its peak
resident memory (``ru_maxrss``) is the import's alone; ``rss_before_mb`` is the same process after its imports (torch
included: ``datasets``' streaming imports it), before the first row, and ``rss_at_quarters_mb`` the resident memory
at a quarter, half, three quarters and the end of the run: bounded memory means it levels off instead of growing with
the rows read.

Usage: ``python bench/data_import.py [--rows 20000] [--size 256] [--workdir /tmp/mcie-bench-import]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, sys.argv[1])
from mcie.exports.importer import import_dataset
import datasets, PIL.Image, torch  # noqa: F401  (datasets' streaming imports torch: before the baseline)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss_mb()
samples, running = [], True
def sample():
    while running:
        samples.append(rss_mb())
        time.sleep(0.5)
sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
report = import_dataset(sys.argv[2], sys.argv[3], preset="magicbrush")
elapsed = time.perf_counter() - start
running = False
sampler.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
quarters = [round(samples[min(len(samples) - 1, len(samples) * q // 4)], 1) for q in (1, 2, 3, 4)]
print(json.dumps({"rows": report.rows, "written": report.written, "errors": report.n_errors, "seconds": elapsed,
                  "rss_before_mb": before, "peak_rss_mb": peak, "rss_at_quarters_mb": quarters}))
"""


def _rows(n: int, size: int) -> Any:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1).astype(np.uint8)
        source = Image.fromarray(base)
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        rect = (int(box[0][0]), int(box[1][0]), int(box[0][1]) + 1, int(box[1][1]) + 1)
        target = source.copy()
        ImageDraw.Draw(target).rectangle(rect, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(source).text((4, 4), str(i), fill=(255, 255, 255))  # every image distinct
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).rectangle(rect, fill=255)
        encoded = {}
        for name, image, fmt in (("source_img", source, "JPEG"), ("target_img", target, "JPEG"),
                                 ("mask_img", mask, "PNG")):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, quality=90)
            encoded[name] = {"bytes": buffer.getvalue(), "path": None}
        yield {"img_id": str(100000 + i // 3), "turn_index": i % 3 + 1, "instruction": f"put a box number {i} there",
               **encoded}


def generate(folder: Path, n: int, size: int) -> Path:
    """MagicBrush-layout Parquet shards of ``n`` rows (reused when already there)."""
    import datasets

    data = folder / f"magicbrush-like-{n}-{size}"
    if (data / "done").is_file():
        return data
    shutil.rmtree(data, ignore_errors=True)
    (data / "data").mkdir(parents=True)
    features = datasets.Features({
        "img_id": datasets.Value("string"), "turn_index": datasets.Value("int32"), "source_img": datasets.Image(),
        "mask_img": datasets.Image(), "instruction": datasets.Value("string"), "target_img": datasets.Image(),
    })
    ds = datasets.Dataset.from_generator(_rows, gen_kwargs={"n": n, "size": size}, features=features,
                                         cache_dir=str(folder / "cache"))
    shards = max(1, n // 5000)
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(data / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"))
    shutil.rmtree(folder / "cache", ignore_errors=True)
    (data / "done").write_text("ok")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mcie-bench-import"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source = generate(args.workdir, args.rows, args.size)
    generated_s = time.perf_counter() - start
    out_dir = args.workdir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(source), str(out_dir)], capture_output=True,
                           text=True, env=env, check=True)
    run = json.loads(child.stdout.strip().splitlines()[-1])
    input_mb = sum(p.stat().st_size for p in source.rglob("*.parquet")) / 2**20
    output_mb = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()) / 2**20
    result = {
        "benchmark": "data_import",
        "python": platform.python_version(),
        "rows": run["rows"],
        "written": run["written"],
        "bad_rows": run["errors"],
        "image_size": args.size,
        "input_mb": round(input_mb, 1),
        "output_mb": round(output_mb, 1),
        "seconds": round(run["seconds"], 2),
        "rows_per_s": round(run["rows"] / run["seconds"], 1),
        "mb_per_s": round(input_mb / run["seconds"], 1),
        "rss_before_mb": round(run["rss_before_mb"], 1),
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "rss_at_quarters_mb": run["rss_at_quarters_mb"],
        "generate_seconds": round(generated_s, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
