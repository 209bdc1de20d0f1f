"""Benchmark of box selection: CLIP scoring images/s, pixel scoring and diff_boxes throughput; prints one JSON.

CLIP: a tiny random open_clip model on CPU at batch sizes 1/16/64 and, when CUDA is available, a ViT-L-14
with random weights in fp16 on the GPU. "images" are masked images encoded (two per candidate box); each run
scores ``--pairs`` synthetic 512 x 512 edit pairs with 3 candidate boxes each through ``ClipScorer.score``
(resize, masking and encoding included). Usage: ``python bench/box_scoring.py [--pairs 32] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mcie.geometry import Box
from mcie.pipeline.boxes import diff_boxes
from mcie.pipeline.scoring import ClipScorer, PixelScorer

SIZE = 512
BATCH_SIZES = (1, 16, 64)


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[list[Box]]]:
    """``n`` textured 512 x 512 images, each with one pasted rectangle, and 3 candidate boxes per pair."""
    rng = np.random.default_rng(seed)
    pairs, candidates = [], []
    for _ in range(n):
        before = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        after = before.copy()
        x0, y0 = (int(v) for v in rng.integers(0, SIZE // 2, 2))
        w, h = (int(v) for v in rng.integers(SIZE // 8, SIZE // 2, 2))
        after[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3, dtype=np.uint8)
        box = Box.from_pixels(x0, y0, x0 + w, y0 + h, SIZE, SIZE)
        pairs.append((before, after))
        candidates.append([box, box.pad(0.3), Box(0, 0, 0.5, 0.5)])
    return pairs, candidates


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def clip_rates(scorer_for: Callable[[int], ClipScorer], pairs, candidates, repeat: int, sync) -> dict:
    images = 2 * sum(len(c) for c in candidates)
    out = {}
    for batch_size in BATCH_SIZES:
        scorer = scorer_for(batch_size)

        def run(scorer: ClipScorer = scorer) -> None:
            scorer.score(pairs, candidates)
            sync()

        seconds = best_time(run, repeat)
        out[f"batch_{batch_size}"] = {
            "images_per_s": round(images / seconds, 1),
            "seconds": round(seconds, 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import open_clip
    import torch

    from tests.tiny_clip import build_tiny_clip

    pairs, candidates = synthetic_pairs(args.pairs)
    n_candidates = sum(len(c) for c in candidates)
    result: dict = {
        "benchmark": "box_scoring",
        "image_size": SIZE,
        "pairs": args.pairs,
        "candidates_per_pair": 3,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }

    tiny_model, tiny_preprocess = build_tiny_clip(seed=0)
    result["clip_tiny_cpu"] = clip_rates(
        lambda bs: ClipScorer.from_model(tiny_model, tiny_preprocess, device="cpu", batch_size=bs),
        pairs,
        candidates,
        args.repeat,
        lambda: None,
    )

    if torch.cuda.is_available():
        torch.manual_seed(0)
        big = open_clip.create_model("ViT-L-14", pretrained=None, precision="fp16", device="cuda")
        result["clip_vit_l14_fp16_cuda"] = clip_rates(
            lambda bs: ClipScorer.from_model(big, None, device="cuda", batch_size=bs),
            pairs,
            candidates,
            args.repeat,
            torch.cuda.synchronize,
        )
        result["cuda_device"] = torch.cuda.get_device_name()
    else:
        result["clip_vit_l14_fp16_cuda"] = None

    pixel = PixelScorer()
    seconds = best_time(lambda: pixel.score(pairs, candidates), args.repeat)
    result["pixel_scorer"] = {
        "pairs_per_s": round(args.pairs / seconds, 1),
        "images_per_s": round(2 * args.pairs / seconds, 1),
        "candidates_per_s": round(n_candidates / seconds, 1),
    }

    seconds = best_time(lambda: [diff_boxes(b, a) for b, a in pairs], args.repeat)
    result["diff_boxes"] = {"pairs_per_s": round(args.pairs / seconds, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
