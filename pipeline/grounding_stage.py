"""Stage 4, grounding and box selection: a box for every turn's edited region (paper 3.1, Eq. 1).

For each turn of an instance that still has samples ``filtering``, k candidate boxes come from the MLLM's grounding
(Qwen2.5-VL ``bbox_2d`` in the resized image, mapped back to the original image) when an MLLM is configured, and from
the pixel difference between the images before and after the turn (connected regions of change). The chosen box
maximizes Eq. 1, the similarity of the before and after images with the box masked out, scored in batches by a
:class:`pipeline.scoring.BoxScorer` (open_clip when a checkpoint is configured, else the pixel scorer). Every
candidate is kept in ``box_candidates`` with its source and score; the winner is copied into the sub-instructions of
every sample window containing the turn (unless a human already set that box), and each sample records the scorer.

Candidates belong to turns, not samples: the before/after images of a turn are the same in every window.

Retries and the cache work like the conflict stage's. A turn whose MLLM call failed (server down after the backend's
retries) or whose answer could not be parsed keeps its diff candidates and is asked again by the next run
(``retry=False``, ``mcie pipeline run --no-retry``, asks only turns never asked); unparseable answers at most
``MAX_UNPARSEABLE`` times in all, failed requests until they succeed. An explicit empty list ("nothing to ground",
verdict ``empty``) is a valid answer: the turn keeps its diff candidates and is not asked again. Every call is stored in
``mllm_judgements``, the parser's reason in ``parse_error``. The new MLLM candidates are added after the stored ones
(ranks continue, nothing is duplicated), every candidate is scored again and the choice is made anew. Retries reach
the turns of samples not yet in review (``filtering`` or ``ready``); a box a human set is never overwritten, and
the review priority and "no box" flag of a ``ready`` sample are recomputed. A valid grounding answer (boxes or empty)
is reused for any turn with the same cache key (model, prompt version, both images' hashes, the instruction and k):
its boxes are copied, and the copy's judgement says ``"cached": true``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from mcie.config import Settings
from mcie.db.models import (
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
from mcie.db.session import session_scope
from mcie.pipeline.engines import Engine
from mcie.pipeline.load_stage import refresh_ready
from mcie.pipeline.report import StageReport, recorded_model_name

STAGE = "grounding"
ANSWERED = ("boxes", "empty")  # verdicts of a valid answer: not asked again, reused from the cache
MAX_UNPARSEABLE = 3  # a turn whose answers were unparseable this often is not asked again (server errors always are)


@dataclass(frozen=True)
class CandidateOut:
    box: tuple[float, float, float, float]  # normalized x0, y0, x1, y1
    source: str  # mllm | diff
    label: str | None
    score: float


@dataclass(frozen=True)
class TurnTask:
    turn_id: int
    index: int
    instruction: str
    before_sha: str
    after_sha: str
    cache_key: str | None  # of the MLLM grounding call, None without an MLLM
    existing: tuple[CandidateOut, ...] = ()  # candidates stored by an earlier run, in rank order
    ask: bool = True  # call the MLLM (False: it already answered, or the answer comes from the cache)
    cached: tuple[CandidateOut, ...] | None = None  # MLLM candidates copied from a cached answer
    retry: bool = False  # an earlier call for this turn failed or was unparseable


@dataclass(frozen=True)
class GroundingCall:
    model: str
    prompt_version: str
    cache_key: str
    verdict: str  # boxes | empty (a valid answer naming no box) | unparseable | error
    raw: str | None
    parsed: dict[str, Any] | None
    error: str | None
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    parse_error: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class TurnOutcome:
    turn_id: int
    candidates: tuple[CandidateOut, ...]  # the stored ones first (same ranks), then the new ones
    chosen: int | None
    scorer: str
    call: GroundingCall | None
    n_existing: int = 0
    retry: bool = False


@dataclass(frozen=True)
class GroundingWorker:
    """Picklable worker factory: builds the image store, the box scorer and (optionally) the MLLM once."""

    settings: Settings
    mllm: str
    scorer: str
    k: int

    def __call__(self):
        from mcie.db.store import ImageStore
        from mcie.pipeline.scoring import make_scorer

        store = ImageStore.from_settings(self.settings)
        scorer = make_scorer(self.scorer, self.settings)  # type: ignore[arg-type]
        backend = None
        if self.mllm != "none":
            from mcie.mllm.base import make_backend

            backend = make_backend(self.mllm, self.settings)
        return lambda tasks: ground_turns(tasks, store, scorer, backend, k=self.k)


def ground_turns(tasks: Sequence[TurnTask], store: Any, scorer: Any, backend: Any, *, k: int) -> list[TurnOutcome]:
    """Candidates from the MLLM (asked, or from the cache) and the pixel difference for each turn, added to the
    turn's stored candidates, all scored in one batch and one chosen by :class:`pipeline.scoring.SelectionRule`."""
    from mcie.geometry import Box
    from mcie.pipeline.boxes import diff_boxes
    from mcie.pipeline.scoring import SelectionRule

    rule = SelectionRule()
    pairs = [(store.open(t.before_sha), store.open(t.after_sha)) for t in tasks]
    candidates: list[list[CandidateOut]] = [list(t.existing) for t in tasks]
    calls: list[GroundingCall | None] = [None] * len(tasks)
    for i, task in enumerate(tasks):
        if task.cached is not None:
            candidates[i].extend(task.cached)
    asked = [i for i, t in enumerate(tasks) if backend is not None and t.ask and t.cached is None]
    if asked:
        results = _mllm_candidates([tasks[i] for i in asked], [pairs[i] for i in asked], backend, k)
        for i, (call, boxes) in zip(asked, results, strict=True):
            calls[i] = call
            candidates[i].extend(boxes)
    for i, (before, after) in enumerate(pairs):
        if any(c.source == "diff" for c in tasks[i].existing):
            continue
        for cand in diff_boxes(before, after, k=k):
            candidates[i].append(CandidateOut(cand.box.as_tuple(), "diff", None, 0.0))
    boxes = [[Box(*c.box) for c in cands] for cands in candidates]
    scores = scorer.score(pairs, boxes)
    gains = scorer.gains(pairs, boxes) if hasattr(scorer, "gains") else [None] * len(tasks)
    outcomes = []
    for task, pair, cands, task_boxes, task_scores, task_gains, call in zip(tasks, pairs, candidates, boxes, scores,
                                                                            gains, calls, strict=True):
        scored = tuple(
            CandidateOut(c.box, c.source, c.label, float(s)) for c, s in zip(cands, task_scores, strict=True)
        )
        chosen = None
        if scored:
            evidence = rule.evidence(pair, task_boxes, task_gains)
            chosen = rule.choose([c.source for c in scored], task_boxes, [c.score for c in scored], evidence)
        if call is None and task.cached is not None:
            call = GroundingCall(model="", prompt_version="", cache_key=task.cache_key or "", verdict="boxes",
                                 raw=None, parsed=None, error=None, latency_ms=0.0, prompt_tokens=None,
                                 completion_tokens=None, cached=True)
        outcomes.append(TurnOutcome(task.turn_id, scored, chosen, scorer.name, call, len(task.existing), task.retry))
    return outcomes


def _mllm_candidates(tasks: Sequence[TurnTask], pairs: Sequence[tuple[Any, Any]], backend: Any, k: int):
    from mcie.geometry import Box
    from mcie.mllm.parsing import ParseFailure, parse_grounding
    from mcie.mllm.prompts import PROMPT_VERSION, grounding_prompt

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
            yield GroundingCall(**common, verdict="unparseable", parsed=None, error=None, parse_error=answer.reason), []
            continue
        if not answer.boxes:  # "nothing to ground": a valid answer, cached like any other, never asked again
            yield GroundingCall(**common, verdict="empty", parsed=answer.to_dict(), error=None), []
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


OPEN_STATUSES = (SampleStatus.filtering, SampleStatus.ready)  # not yet in review: boxes may still change


def pending_tasks(session: Session, model: str | None, version: str | None, k: int, *, retry: bool) -> list[TurnTask]:
    """Turns to ground: those without candidates, and (with an MLLM) those it has not answered yet.

    A turn counts as answered once a judgement of this model and prompt version is a valid answer (boxes, or an
    explicit empty list), once its answers were unparseable ``MAX_UNPARSEABLE`` times (a model that cannot follow
    the format for this turn is not asked forever; failed requests are always asked again), or, with
    ``retry=False``, once it was asked at all. Only turns of instances with a sample not yet in review qualify.
    """
    from mcie.mllm.prompts import cache_key

    open_sample = exists().where(Sample.instance_id == Turn.instance_id, Sample.status.in_(OPEN_STATUSES))
    has_candidates = exists().where(BoxCandidate.turn_id == Turn.id)
    filtering = exists().where(Sample.instance_id == Turn.instance_id, Sample.status == SampleStatus.filtering)
    needed = ~has_candidates & filtering  # new turns; with an MLLM, also every open turn it has not answered yet
    if model is not None:
        this_model = (
            MllmJudgement.turn_id == Turn.id,
            MllmJudgement.stage == MllmStage.grounding,
            MllmJudgement.model == model,
            MllmJudgement.prompt_version == version,
        )
        if retry:
            unparseable = select(func.count()).where(*this_model, MllmJudgement.verdict == "unparseable")
            answered = exists().where(*this_model, MllmJudgement.verdict.in_(ANSWERED)) | (
                unparseable.correlate(Turn).scalar_subquery() >= MAX_UNPARSEABLE
            )
        else:
            answered = exists().where(*this_model)
        needed = needed | ~answered
    rows = session.execute(
        select(Turn.id, Turn.instance_id, Turn.index, Turn.instruction, Turn.result_image)
        .where(needed, open_sample)
        .order_by(Turn.instance_id, Turn.index)
    ).all()
    if not rows:
        return []
    instance_ids = sorted({r.instance_id for r in rows})
    turn_ids = [r.id for r in rows]
    sources: dict[int, str] = {}
    images: dict[tuple[int, int], str] = {}
    existing: dict[int, list[CandidateOut]] = {}
    verdicts: dict[int, list[str]] = {}  # turn -> verdicts of its grounding calls by this model and version
    for start in range(0, len(instance_ids), 5000):
        chunk = instance_ids[start : start + 5000]
        sources.update(session.execute(select(Instance.id, Instance.source_image).where(Instance.id.in_(chunk))).all())
        for instance_id, index, image in session.execute(
            select(Turn.instance_id, Turn.index, Turn.result_image).where(Turn.instance_id.in_(chunk))
        ):
            images[(instance_id, index)] = image
    for start in range(0, len(turn_ids), 5000):
        chunk = turn_ids[start : start + 5000]
        for cand in session.scalars(
            select(BoxCandidate)
            .where(BoxCandidate.turn_id.in_(chunk))
            .order_by(BoxCandidate.turn_id, BoxCandidate.rank)
        ):
            existing.setdefault(cand.turn_id, []).append(
                CandidateOut((cand.box_x0, cand.box_y0, cand.box_x1, cand.box_y1), str(cand.source), cand.label, 0.0)
            )
        if model is not None:
            for turn_id, verdict in session.execute(
                select(MllmJudgement.turn_id, MllmJudgement.verdict).where(
                    MllmJudgement.turn_id.in_(chunk), MllmJudgement.stage == MllmStage.grounding,
                    MllmJudgement.model == model, MllmJudgement.prompt_version == version)
            ):
                verdicts.setdefault(turn_id, []).append(verdict or "")
    tasks = []
    for turn_id, instance_id, index, instruction, after in rows:
        before = sources[instance_id] if index == 1 else images[(instance_id, index - 1)]
        key = cache_key(model, version, before, after, instruction, k) if model and version else None
        asked = verdicts.get(turn_id, [])
        settled = any(v in ANSWERED for v in asked) or asked.count("unparseable") >= MAX_UNPARSEABLE
        ask = model is not None and not settled and (retry or not asked)
        tasks.append(TurnTask(turn_id, index, instruction, before, after, key, tuple(existing.get(turn_id, ())),
                              ask, None, ask and bool(asked)))
    return tasks


def from_cache(session: Session, tasks: list[TurnTask]) -> list[TurnTask]:
    """``tasks`` with the MLLM candidates of a successful answer already stored under the same cache key."""
    keys = sorted({t.cache_key for t in tasks if t.ask and t.cache_key})
    answers: dict[str, int] = {}  # cache key -> turn whose answer had boxes
    for start in range(0, len(keys), 5000):
        for key, turn_id in session.execute(
            select(MllmJudgement.cache_key, MllmJudgement.turn_id)
            .where(MllmJudgement.cache_key.in_(keys[start : start + 5000]),
                   MllmJudgement.stage == MllmStage.grounding, MllmJudgement.verdict.in_(ANSWERED),
                   MllmJudgement.turn_id.is_not(None))
            .order_by(MllmJudgement.id)
        ):
            answers.setdefault(key, turn_id)
    boxes: dict[int, list[CandidateOut]] = {turn_id: [] for turn_id in answers.values()}
    ids = sorted(boxes)
    for start in range(0, len(ids), 5000):
        for cand in session.scalars(
            select(BoxCandidate)
            .where(BoxCandidate.turn_id.in_(ids[start : start + 5000]), BoxCandidate.source == BoxSource.mllm)
            .order_by(BoxCandidate.turn_id, BoxCandidate.rank)
        ):
            boxes[cand.turn_id].append(
                CandidateOut((cand.box_x0, cand.box_y0, cand.box_x1, cand.box_y1), "mllm", cand.label, 0.0)
            )
    out = []
    for task in tasks:
        source = answers.get(task.cache_key or "") if task.ask else None
        if source is None or source == task.turn_id:
            out.append(task)
        else:
            out.append(replace(task, ask=False, cached=tuple(boxes[source])))
    return out


def _apply(session: Session, outcome: TurnOutcome) -> list[int]:
    """Store one turn's outcome; returns the ids of the ``ready`` samples whose boxes it may have changed."""
    stored = session.scalars(
        select(BoxCandidate).where(BoxCandidate.turn_id == outcome.turn_id).order_by(BoxCandidate.rank)
    ).all()
    if len(stored) != outcome.n_existing:
        raise RuntimeError(
            f"grounding: turn {outcome.turn_id} has {len(stored)} candidate boxes, expected {outcome.n_existing} "
            "(another pipeline run is writing the same turns?)"
        )
    next_rank = (stored[-1].rank if stored else 0) + 1
    for position, cand in enumerate(outcome.candidates):
        chosen = position == outcome.chosen
        if position < outcome.n_existing:  # a stored candidate: scored and chosen anew, never written twice
            row = stored[position]
            row.score, row.scorer, row.chosen = cand.score, outcome.scorer, chosen
            continue
        x0, y0, x1, y1 = cand.box
        session.add(
            BoxCandidate(turn_id=outcome.turn_id, rank=next_rank, source=BoxSource(cand.source), box_x0=x0,
                         box_y0=y0, box_x1=x1, box_y1=y1, label=cand.label, score=cand.score,
                         scorer=outcome.scorer, chosen=chosen)
        )
        next_rank += 1
    if outcome.call is not None:
        call = outcome.call
        if call.cached:
            source = session.scalars(
                select(MllmJudgement)
                .where(MllmJudgement.cache_key == call.cache_key, MllmJudgement.stage == MllmStage.grounding,
                       MllmJudgement.verdict.in_(ANSWERED))
                .order_by(MllmJudgement.id)
                .limit(1)
            ).one()
            session.add(
                MllmJudgement(turn_id=outcome.turn_id, stage=MllmStage.grounding, model=source.model,
                              prompt_version=source.prompt_version, cache_key=source.cache_key, verdict=source.verdict,
                              raw_response=source.raw_response, parsed=(source.parsed or {}) | {"cached": True},
                              latency_ms=0.0)
            )
        else:
            session.add(
                MllmJudgement(turn_id=outcome.turn_id, stage=MllmStage.grounding, model=call.model,
                              prompt_version=call.prompt_version, cache_key=call.cache_key, verdict=call.verdict,
                              raw_response=call.raw, parsed=call.parsed, latency_ms=call.latency_ms,
                              prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
                              error=call.error, parse_error=call.parse_error)
            )
    turn = session.get(Turn, outcome.turn_id)
    assert turn is not None
    windows = select(Sample.id).where(
        Sample.instance_id == turn.instance_id,
        Sample.first_turn <= turn.index,
        Sample.last_turn >= turn.index,
        Sample.status.in_(OPEN_STATUSES),
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
    return list(session.scalars(windows.where(Sample.status == SampleStatus.ready)))


def grounding_stage(
    url: str,
    engine: Engine,
    settings: Settings,
    *,
    mllm: str,
    scorer: str,
    k: int = 3,
    batch_size: int = 32,
    retry: bool = True,
) -> StageReport:
    """Ground every pending turn; resumable (each batch is committed as it arrives)."""
    from mcie.mllm.prompts import PROMPT_VERSION

    report = StageReport(STAGE)
    started = time.perf_counter()
    model = recorded_model_name(settings, mllm) if mllm != "none" else None
    version = PROMPT_VERSION["grounding"] if mllm != "none" else None
    with session_scope(url) as session:
        tasks = from_cache(session, pending_tasks(session, model, version, k, retry=retry))
    report.pending = len(tasks)
    report.cached = sum(t.cached is not None for t in tasks)
    worker = GroundingWorker(settings, mllm, scorer, k)
    for outcomes in engine.map_batches(worker, tasks, batch_size=batch_size, desc=STAGE):
        with session_scope(url) as session:
            ready: list[int] = []
            for outcome in outcomes:
                ready.extend(_apply(session, outcome))
                report.count("turns")
                report.count("candidates", len(outcome.candidates) - outcome.n_existing)
                if outcome.chosen is None:
                    report.count("no_box")
                if outcome.retry:
                    report.count("retried")
                if outcome.call is not None and not outcome.call.cached:
                    report.add_call(outcome.call)
                    report.count(f"mllm_{outcome.call.verdict}")
                    if outcome.call.verdict not in ANSWERED:
                        report.add_failure(outcome.call.verdict, outcome.call.error or outcome.call.parse_error)
                report.counts[f"scorer:{outcome.scorer}"] = report.counts.get(f"scorer:{outcome.scorer}", 0) + 1
            if ready:  # samples already loaded for review: their "no box" flag and priority follow the new boxes
                session.flush()
                report.count("ready_refreshed", refresh_ready(session, ready))
    report.seconds = round(time.perf_counter() - started, 3)
    return report
