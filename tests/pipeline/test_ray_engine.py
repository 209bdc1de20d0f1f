"""The Ray engine runs the same stage functions over a Ray Dataset and produces the same rows as the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from mcie.config import load_settings
from mcie.db import migrate
from mcie.db.models import BoxCandidate, Instance, Sample, SubInstruction, Turn
from mcie.db.session import session_scope
from mcie.db.store import ImageStore
from mcie.demo import build_demo
from mcie.pipeline.ingest import ingest, read_source
from mcie.pipeline.run import run_pipeline

pytestmark = pytest.mark.slow


def _rows(url: str) -> dict[str, set]:
    with session_scope(url) as session:
        samples = {
            (ext, s.first_turn, s.last_turn, str(s.status), s.priority, s.box_scorer, s.flagged)
            for ext, s in session.execute(
                select(Instance.external_id, Sample).join(Sample, Sample.instance_id == Instance.id)
            )
        }
        subs = {
            (ext, s.first_turn, si.turn_index, si.text, str(si.operation), si.box_x0, si.box_y0, si.box_x1,
             si.box_y1, str(si.box_source))
            for ext, s, si in session.execute(
                select(Instance.external_id, Sample, SubInstruction)
                .join(Sample, Sample.instance_id == Instance.id)
                .join(SubInstruction, SubInstruction.sample_id == Sample.id)
            )
        }
        candidates = {
            (ext, t.index, c.rank, str(c.source), c.box_x0, c.box_y0, c.box_x1, c.box_y1, round(c.score, 9), c.chosen)
            for ext, t, c in session.execute(
                select(Instance.external_id, Turn, BoxCandidate)
                .join(Turn, Turn.instance_id == Instance.id)
                .join(BoxCandidate, BoxCandidate.turn_id == Turn.id)
            )
        }
    return {"samples": samples, "sub_instructions": subs, "box_candidates": candidates}


def test_ray_engine_gives_the_same_rows_as_local(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    build_demo(demo, instances=6, seed=5)
    results = {}
    for engine in ("local", "ray"):
        settings = load_settings(data_dir=tmp_path / engine, database_url=f"sqlite:///{tmp_path}/{engine}.db")
        migrate.upgrade(settings.database_url)
        ingest(read_source(demo, "seed-data-edit", None), url=settings.database_url,
               store=ImageStore.from_settings(settings))
        summary = run_pipeline(settings, engine=engine, mllm="none", scorer="pixel", ray_workers=2, progress=False)
        assert summary.engine == engine
        results[engine] = _rows(settings.database_url)
    import ray

    ray.shutdown()
    assert results["local"]["box_candidates"], "the pipeline produced candidates"
    for table in ("samples", "sub_instructions", "box_candidates"):
        assert results["ray"][table] == results["local"][table], table


class _Double:
    """A picklable worker factory for the engine test."""

    def __call__(self):
        return lambda batch: [2 * x for x in batch]


def test_ray_engine_uses_an_actor_pool_not_the_deprecated_concurrency_argument(monkeypatch) -> None:
    import ray.data

    from mcie.pipeline.engines import RayEngine

    seen: list[dict] = []
    original = ray.data.Dataset.map_batches

    def recording(self, fn, *args, **kwargs):
        seen.append(kwargs)
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    engine = RayEngine(num_cpus=2, workers=2, progress=False)
    try:
        out = [x for batch in engine.map_batches(_Double(), list(range(10)), batch_size=4, desc="t") for x in batch]
    finally:
        engine.shutdown()
    assert out == [2 * x for x in range(10)]
    assert seen and "concurrency" not in seen[0]
    compute = seen[0]["compute"]
    assert isinstance(compute, ray.data.ActorPoolStrategy) and compute.min_size == compute.max_size == 2
    with pytest.raises(ValueError, match="--ray-workers"):
        RayEngine(workers=0, progress=False)
