"""Stage 3, conflict filter: an MLLM judges whether merging a sample's turns into one instruction conflicts.

For every sample still ``filtering``, the MLLM gets the guideline, an in-context example and the test instance (the
image before the window, each turn's instruction and the image after it; paper 3.1 "Data Filtering") and answers in
JSON. Every call is stored whole in ``mllm_judgements`` (verdict, turns, reason, raw text, model, prompt version,
latency, tokens). A sample with a conflict becomes ``filtered_out`` (never deleted); an answer that cannot be parsed
is stored with its raw text and the parser's reason (``parse_error``) and flags the sample for the reviewers; a
request that failed (server down after the retries) is stored with its error and retried by the next run (unless
``retry=False``: ``mcie pipeline run --no-retry``).

Results are cached by (model, prompt version, inputs): the cache key covers the model, the prompt version, the
instructions and the images' content hashes, so a re-run, or another sample with the same inputs, costs no call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.config import Settings
from mcie.db.models import Instance, MllmJudgement, MllmStage, Sample, SampleStatus, Turn
from mcie.db.session import session_scope
from mcie.db.windows import window_images
from mcie.pipeline.engines import Engine
from mcie.pipeline.report import StageReport, recorded_model_name

STAGE = "conflict"


@dataclass(frozen=True)
class ConflictTask:
    sample_id: int
    cache_key: str
    source_sha: str
    turns: tuple[tuple[str, str], ...]  # (instruction, image after the turn) for each turn of the window


@dataclass(frozen=True)
class ConflictOutcome:
    sample_id: int
    cache_key: str
    model: str
    prompt_version: str
    verdict: str  # conflict | no_conflict | unparseable | error
    reason: str | None  # the MLLM's own reason for its verdict
    raw: str | None
    parsed: dict[str, Any] | None
    error: str | None
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    parse_error: str | None = None  # why the answer could not be parsed


@dataclass(frozen=True)
class ConflictWorker:
    """Picklable worker factory: builds the image store and the MLLM backend once per worker."""

    settings: Settings
    mllm: str

    def __call__(self):
        from mcie.db.store import ImageStore
        from mcie.mllm.base import make_backend

        store = ImageStore.from_settings(self.settings)
        backend = make_backend(self.mllm, self.settings)
        return lambda tasks: judge_conflicts(tasks, store, backend)


def judge_conflicts(tasks: Sequence[ConflictTask], store: Any, backend: Any) -> list[ConflictOutcome]:
    """Ask the MLLM about every task (one batch, the backend keeps the server busy) and parse the answers."""
    from mcie.mllm.parsing import ParseFailure, parse_conflict
    from mcie.mllm.prompts import PROMPT_VERSION, conflict_prompt

    def lazy(task: ConflictTask):
        return lambda: conflict_prompt(
            store.open(task.source_sha), [(text, store.open(sha)) for text, sha in task.turns]
        ).request

    responses = backend.generate([lazy(task) for task in tasks])
    outcomes = []
    for task, response in zip(tasks, responses, strict=True):
        common = {
            "sample_id": task.sample_id,
            "cache_key": task.cache_key,
            "model": backend.model,
            "prompt_version": PROMPT_VERSION["conflict"],
            "raw": response.text or None,
            "latency_ms": response.latency_s * 1000,
            "prompt_tokens": response.prompt_tokens,
            "completion_tokens": response.completion_tokens,
        }
        if not response.ok:
            outcomes.append(ConflictOutcome(**common, verdict="error", reason=None, parsed=None, error=response.error))
            continue
        parsed = parse_conflict(response.text, n_turns=len(task.turns))
        if isinstance(parsed, ParseFailure):
            outcomes.append(
                ConflictOutcome(**common, verdict="unparseable", reason=None, parsed=None, error=None,
                                parse_error=parsed.reason)
            )
        else:
            verdict = "conflict" if parsed.conflict else "no_conflict"
            outcomes.append(
                ConflictOutcome(**common, verdict=verdict, reason=parsed.reason, parsed=parsed.to_dict(), error=None)
            )
    return outcomes


def pending_tasks(session: Session, model: str, version: str, *, retry: bool = True) -> list[ConflictTask]:
    """Samples still ``filtering`` without an answer of this model and prompt version (with ``retry=False``:
    never asked at all)."""
    from mcie.mllm.prompts import cache_key

    judged = (
        select(MllmJudgement.sample_id)
        .where(
            MllmJudgement.stage == MllmStage.conflict,
            MllmJudgement.model == model,
            MllmJudgement.prompt_version == version,
            *((MllmJudgement.error.is_(None),) if retry else ()),
            MllmJudgement.sample_id.is_not(None),
        )
        .scalar_subquery()
    )
    samples = session.execute(
        select(Sample.id, Sample.instance_id, Sample.first_turn, Sample.last_turn)
        .where(Sample.status == SampleStatus.filtering, Sample.id.not_in(judged))
        .order_by(Sample.id)
    ).all()
    if not samples:
        return []
    instance_ids = sorted({s.instance_id for s in samples})
    sources: dict[int, str] = {}
    turns: dict[int, dict[int, tuple[str, str]]] = {}
    for chunk_start in range(0, len(instance_ids), 5000):
        chunk = instance_ids[chunk_start : chunk_start + 5000]
        sources.update(session.execute(select(Instance.id, Instance.source_image).where(Instance.id.in_(chunk))).all())
        for instance_id, index, text, image in session.execute(
            select(Turn.instance_id, Turn.index, Turn.instruction, Turn.result_image).where(
                Turn.instance_id.in_(chunk)
            )
        ):
            turns.setdefault(instance_id, {})[index] = (text, image)
    tasks = []
    for sample_id, instance_id, first, last in samples:
        by_index = turns[instance_id]
        images = window_images(sources[instance_id], {i: v[1] for i, v in by_index.items()}, first, last)
        before = images.source[1]
        if before is None or images.missing:
            raise KeyError(f"sample {sample_id}: instance {instance_id} has no image for turn(s) {images.missing}")
        window = tuple(by_index[i] for i in range(first, last + 1))
        key = cache_key(model, version, before, [text for text, _ in window], [sha for _, sha in window])
        tasks.append(ConflictTask(sample_id, key, before, window))
    return tasks


def _apply(session: Session, outcome: ConflictOutcome, *, copied_from_cache: bool = False) -> None:
    session.add(
        MllmJudgement(
            sample_id=outcome.sample_id,
            stage=MllmStage.conflict,
            model=outcome.model,
            prompt_version=outcome.prompt_version,
            cache_key=outcome.cache_key,
            verdict=outcome.verdict,
            rationale=outcome.reason,
            raw_response=outcome.raw,
            parsed=(outcome.parsed or {}) | ({"cached": True} if copied_from_cache else {}) or None,
            latency_ms=0.0 if copied_from_cache else outcome.latency_ms,
            prompt_tokens=None if copied_from_cache else outcome.prompt_tokens,
            completion_tokens=None if copied_from_cache else outcome.completion_tokens,
            error=outcome.error,
            parse_error=outcome.parse_error,
        )
    )
    sample = session.get(Sample, outcome.sample_id)
    assert sample is not None
    if outcome.verdict == "conflict":
        sample.status = SampleStatus.filtered_out
    elif outcome.verdict == "unparseable":
        sample.flagged = True
        sample.flag_reason = f"the MLLM's conflict answer could not be parsed: {outcome.parse_error}"


def from_cache(session: Session, tasks: list[ConflictTask]) -> tuple[list[ConflictOutcome], list[ConflictTask]]:
    """Outcomes already known for the tasks' cache keys (from any sample), and the tasks still to ask."""
    known: dict[str, MllmJudgement] = {}
    keys = sorted({t.cache_key for t in tasks})
    for start in range(0, len(keys), 5000):
        rows = session.scalars(
            select(MllmJudgement).where(
                MllmJudgement.cache_key.in_(keys[start : start + 5000]),
                MllmJudgement.stage == MllmStage.conflict,
                MllmJudgement.error.is_(None),
            )
        )
        for row in rows:
            known.setdefault(row.cache_key, row)
    hits, misses = [], []
    for task in tasks:
        row = known.get(task.cache_key)
        if row is None:
            misses.append(task)
            continue
        parsed = {k: v for k, v in (row.parsed or {}).items() if k != "cached"} or None
        hits.append(ConflictOutcome(task.sample_id, task.cache_key, row.model, row.prompt_version, row.verdict or "",
                                    row.rationale, row.raw_response, parsed, None, 0.0, None, None,
                                    row.parse_error))
    return hits, misses


def conflict_stage(
    url: str,
    engine: Engine,
    settings: Settings,
    *,
    mllm: str,
    batch_size: int | None = None,
    retry: bool = True,
) -> StageReport:
    """Judge every pending sample; resumable (each batch is committed as it arrives)."""
    from mcie.mllm.prompts import PROMPT_VERSION

    report = StageReport("conflict")
    started = time.perf_counter()
    model = recorded_model_name(settings, mllm)
    version = PROMPT_VERSION["conflict"]
    with session_scope(url) as session:
        tasks = pending_tasks(session, model, version, retry=retry)
        report.pending = len(tasks)
        hits, misses = from_cache(session, tasks)
        for outcome in hits:
            _apply(session, outcome, copied_from_cache=True)
            report.count(outcome.verdict)
        report.cached = len(hits)
    # Large batches keep the server busy (requests are built lazily, a bounded window ahead of the ones in flight);
    # each batch's results are committed as it finishes, which is how far a crash can set the stage back.
    batch_size = batch_size or max(64, settings.mllm_concurrency * 32)
    for outcomes in engine.map_batches(ConflictWorker(settings, mllm), misses, batch_size=batch_size, desc=STAGE):
        with session_scope(url) as session:
            for outcome in outcomes:
                _apply(session, outcome)
                report.add_call(outcome)
                report.count(outcome.verdict)
                if outcome.verdict in ("error", "unparseable"):
                    report.add_failure(outcome.verdict, outcome.error or outcome.parse_error)
    report.seconds = round(time.perf_counter() - started, 3)
    return report
