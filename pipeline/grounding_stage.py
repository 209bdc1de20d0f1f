"""Stage 4, grounding and box selection: a box for every turn's edited region (paper 3.1, Eq. 1).

For each turn of an instance that still has samples ``filtering``, k candidate boxes come from the MLLM's grounding
(Qwen2.5-VL ``bbox_2d`` in the resized image, mapped back to the original image) when an MLLM is configured, and from
the pixel difference between the images before and after the turn (connected regions of change). The chosen box
maximizes Eq. 1, the similarity of the before and after images with the box masked out, scored in batches by a
:class:`pipeline.scoring.BoxScorer` (open_clip when a checkpoint is configured, else the pixel scorer). Every
candidate is kept in ``box_candidates`` with its source and score; the winner is copied into the sub-instructions of
every sample window containing the turn (unless a human already set that box), and each sample records the scorer.

Candidates belong to turns, not samples: the before/after images of a turn are the same in every window.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from db.models import (
    BoxCandidate,
    BoxSource,
    Instance,
    MllmJudgement,
    MllmStage,
    Sample,
    SampleStatus,
    SubInstruction,
    Turn,
)
from db.session import session_scope
from mcie.config import Settings
from pipeline.conflict_stage import StageReport, _model_name
from pipeline.engines import Engine

STAGE = "grounding"


@dataclass(frozen=True)
class TurnTask:
    turn_id: int
    index: int
    instruction: str
    before_sha: str
    after_sha: str
    cache_key: str | None  # of the MLLM grounding call, None without an MLLM


@dataclass(frozen=True)
class CandidateOut:
    box: tuple[float, float, float, float]  # normalized x0, y0, x1, y1
    source: str  # mllm | diff
    label: str | None
    score: float


@dataclass(frozen=True)
class GroundingCall:
    model: str
    prompt_version: str
    cache_key: str
    verdict: str  # boxes | unparseable | error
    raw: str | None
    parsed: dict[str, Any] | None
    error: str | None
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class TurnOutcome:
    turn_id: int
    candidates: tuple[CandidateOut, ...]
    chosen: int | None
    scorer: str
    call: GroundingCall | None


@dataclass(frozen=True)
class GroundingWorker:
    """Picklable worker factory: builds the image store, the box scorer and (optionally) the MLLM once."""

    settings: Settings
    mllm: str
    scorer: str
    k: int

    def __call__(self):
        from db.store import ImageStore
        from pipeline.scoring import make_scorer

        store = ImageStore.from_settings(self.settings)
        scorer = make_scorer(self.scorer, self.settings)  # type: ignore[arg-type]
        backend = None
        if self.mllm != "none":
            from pipeline.mllm.base import make_backend

            backend = make_backend(self.mllm, self.settings)
        return lambda tasks: ground_turns(tasks, store, scorer, backend, k=self.k)


def ground_turns(tasks: Sequence[TurnTask], store: Any, scorer: Any, backend: Any, *, k: int) -> list[TurnOutcome]:
    """Candidates from the MLLM (if any) and the pixel difference for each turn, scored by Eq. 1 in one batch."""
    from pipeline.boxes import Box, diff_boxes

    pairs = [(store.open(t.before_sha), store.open(t.after_sha)) for t in tasks]
    candidates: list[list[CandidateOut]] = [[] for _ in tasks]
    calls: list[GroundingCall | None] = [None] * len(tasks)
    if backend is not None:
        for i, (call, boxes) in enumerate(_mllm_candidates(tasks, pairs, backend, k)):
            calls[i] = call
            candidates[i].extend(boxes)
    for i, (before, after) in enumerate(pairs):
        for cand in diff_boxes(before, after, k=k):
            candidates[i].append(CandidateOut(cand.box.as_tuple(), "diff", None, 0.0))
    scores = scorer.score(pairs, [[Box(*c.box) for c in cands] for cands in candidates])
    outcomes = []
    for task, cands, task_scores, call in zip(tasks, candidates, scores, calls, strict=True):
        scored = tuple(
            CandidateOut(c.box, c.source, c.label, float(s)) for c, s in zip(cands, task_scores, strict=True)
        )
        chosen = max(range(len(scored)), key=lambda j: (scored[j].score, -j)) if scored else None
        outcomes.append(TurnOutcome(task.turn_id, scored, chosen, scorer.name, call))
    return outcomes


def _mllm_candidates(tasks: Sequence[TurnTask], pairs: Sequence[tuple[Any, Any]], backend: Any, k: int):
    from pipeline.boxes import Box
    from pipeline.mllm.parsing import ParseFailure, parse_grounding
    from pipeline.mllm.prompts import PROMPT_VERSION, grounding_prompt

    prompts: list[Any] = [None] * len(tasks)

    def lazy(i: int):
        def build():
            before, after = pairs[i]
            prompts[i] = grounding_prompt(before, after, tasks[i].instruction, k=k)
            return prompts[i].request

        return build

    responses = backend.generate([lazy(i) for i in range(len(tasks))])
    for task, prompt, response in zip(tasks, prompts, responses, strict=True):
        common = {
            "model": backend.model,
            "prompt_version": PROMPT_VERSION["grounding"],
            "cache_key": task.cache_key or "",
            "raw": response.text or None,
            "latency_ms": response.latency_s * 1000,
            "prompt_tokens": response.prompt_tokens,
            "completion_tokens": response.completion_tokens,
        }
        if not response.ok or prompt is None:
            yield GroundingCall(**common, verdict="error", parsed=None, error=response.error), []
            continue
        assert prompt.frame is not None and prompt.image_size is not None
        answer = parse_grounding(response.text, *prompt.frame, k=k)
        if isinstance(answer, ParseFailure):
            yield GroundingCall(**common, verdict="unparseable", parsed={"reason": answer.reason}, error=None), []
            continue
        width, height = prompt.image_size
        boxes = []
        for box in answer.boxes:
            x0, y0, x1, y1 = prompt.to_original(box)
            try:
                normalized = Box.from_pixels(x0, y0, x1, y1, width, height, clip=True)
            except ValueError:
                continue
            boxes.append(CandidateOut(normalized.as_tuple(), "mllm", box.label, 0.0))
        yield GroundingCall(**common, verdict="boxes", parsed=answer.to_dict(), error=None), boxes


def _pending_tasks(session: Session, model: str | None, version: str | None) -> list[TurnTask]:
    from pipeline.mllm.prompts import cache_key

    has_candidates = exists().where(BoxCandidate.turn_id == Turn.id)
    needs_boxes = exists().where(Sample.instance_id == Turn.instance_id, Sample.status == SampleStatus.filtering)
    rows = session.execute(
        select(Turn.id, Turn.instance_id, Turn.index, Turn.instruction, Turn.result_image)
        .where(~has_candidates, needs_boxes)
        .order_by(Turn.instance_id, Turn.index)
    ).all()
    if not rows:
        return []
    instance_ids = sorted({r.instance_id for r in rows})
    sources: dict[int, str] = {}
    images: dict[tuple[int, int], str] = {}
    for start in range(0, len(instance_ids), 5000):
        chunk = instance_ids[start : start + 5000]
        sources.update(session.execute(select(Instance.id, Instance.source_image).where(Instance.id.in_(chunk))).all())
        for instance_id, index, image in session.execute(
            select(Turn.instance_id, Turn.index, Turn.result_image).where(Turn.instance_id.in_(chunk))
        ):
            images[(instance_id, index)] = image
    tasks = []
    for turn_id, instance_id, index, instruction, after in rows:
        before = sources[instance_id] if index == 1 else images[(instance_id, index - 1)]
        key = cache_key(model, version, before, after, instruction) if model and version else None
        tasks.append(TurnTask(turn_id, index, instruction, before, after, key))
    return tasks


def _apply(session: Session, outcome: TurnOutcome) -> None:
    for rank, cand in enumerate(outcome.candidates, start=1):
        x0, y0, x1, y1 = cand.box
        session.add(
            BoxCandidate(turn_id=outcome.turn_id, rank=rank, source=BoxSource(cand.source), box_x0=x0, box_y0=y0,
                         box_x1=x1, box_y1=y1, label=cand.label, score=cand.score, scorer=outcome.scorer,
                         chosen=(rank - 1) == outcome.chosen)
        )
    if outcome.call is not None:
        call = outcome.call
        session.add(
            MllmJudgement(turn_id=outcome.turn_id, stage=MllmStage.grounding, model=call.model,
                          prompt_version=call.prompt_version, cache_key=call.cache_key, verdict=call.verdict,
                          raw_response=call.raw, parsed=call.parsed, latency_ms=call.latency_ms,
                          prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
                          error=call.error)
        )
    turn = session.get(Turn, outcome.turn_id)
    assert turn is not None
    windows = select(Sample.id).where(
        Sample.instance_id == turn.instance_id, Sample.first_turn <= turn.index, Sample.last_turn >= turn.index
    )
    if outcome.chosen is not None:
        best = outcome.candidates[outcome.chosen]
        x0, y0, x1, y1 = best.box
        session.execute(
            update(SubInstruction)
            .where(
                SubInstruction.sample_id.in_(windows.scalar_subquery()),
                SubInstruction.turn_index == turn.index,
                SubInstruction.box_source.is_distinct_from(BoxSource.human),
            )
            .values(box_x0=x0, box_y0=y0, box_x1=x1, box_y1=y1, box_source=BoxSource(best.source),
                    box_score=best.score)
        )
    session.execute(update(Sample).where(Sample.id.in_(windows.scalar_subquery())).values(box_scorer=outcome.scorer))


def grounding_stage(
    url: str,
    engine: Engine,
    settings: Settings,
    *,
    mllm: str,
    scorer: str,
    k: int = 3,
    batch_size: int = 32,
) -> StageReport:
    """Ground every pending turn; resumable (each batch is committed as it arrives)."""
    from pipeline.mllm.prompts import PROMPT_VERSION

    report = StageReport(STAGE)
    started = time.perf_counter()
    model = _model_name(settings, mllm) if mllm != "none" else None
    version = PROMPT_VERSION["grounding"] if mllm != "none" else None
    with session_scope(url) as session:
        tasks = _pending_tasks(session, model, version)
    report.pending = len(tasks)
    worker = GroundingWorker(settings, mllm, scorer, k)
    for outcomes in engine.map_batches(worker, tasks, batch_size=batch_size, desc=STAGE):
        with session_scope(url) as session:
            for outcome in outcomes:
                _apply(session, outcome)
                report.count("turns")
                report.count("candidates", len(outcome.candidates))
                if outcome.chosen is None:
                    report.count("no_box")
                if outcome.call is not None:
                    report.add_call(outcome.call)
                    report.count(f"mllm_{outcome.call.verdict}")
                    if outcome.call.verdict == "error":
                        report.failures += 1
                report.counts[f"scorer:{outcome.scorer}"] = report.counts.get(f"scorer:{outcome.scorer}", 0) + 1
    report.seconds = round(time.perf_counter() - started, 3)
    return report
