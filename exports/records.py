"""The exported record of one accepted sample (:class:`ExportRecord`, versioned) and the pure function that builds it.

A record carries everything a trainer or an analyst needs about one complex-instruction sample: the window of the
instance it came from, its source image (the image before the window's first turn: the instance's source image when
the window starts at turn 1, else the result of the turn before), its target image (the result of the last turn) and
the intermediate results, the complex instruction, the sub-instructions with their normalized boxes, and the review
provenance (scores, aggregated scores, the MLLM conflict verdict and the deciding rule or lead). Reviewer identities
are left out unless asked for.

:func:`build_record` is pure: the database rows come in as plain values (see :mod:`exports.select` for the query
side), the record comes out. Bump :data:`SCHEMA_VERSION` whenever a field changes meaning or is removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mcie.annotate.aggregation import aggregate
from mcie.db.windows import window_images
from mcie.exports.splits import SplitName

SCHEMA_VERSION = 1

FORMAT_EXTENSIONS: dict[str, str] = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}

OperationName = Literal["add", "remove", "change"]
BoxSourceName = Literal["mllm", "diff", "human", "truth"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageRef(_Frozen):
    """An image of the record. ``after_turn`` is the turn that produced it (0 = the instance's source image);
    ``path`` is where this export stores it, relative to the file holding the record (set by the writer)."""

    sha256: str
    format: str
    width: int
    height: int
    after_turn: int
    path: str | None = None

    @property
    def extension(self) -> str:
        return image_extension(self.format)


class SubInstructionRecord(_Frozen):
    """One turn of the window: text, operation, and the chosen box ``[x0, y0, x1, y1]`` normalized to 0..1."""

    turn_index: int
    text: str
    operation: OperationName
    box: tuple[float, float, float, float] | None
    box_source: BoxSourceName | None
    box_score: float | None


class ReviewScores(_Frozen):
    """One expert review (its current revision); ``reviewer`` is a username only with ``include_reviewers``."""

    consistent: bool
    quality: int
    complexity: int
    revision: int
    reviewer: str | None = None


class AggregatedScores(_Frozen):
    """Majority consistency (None on a tie or without reviews) and median quality/complexity (None without)."""

    consistent: bool | None
    quality: float | None
    complexity: float | None


class MllmVerdict(_Frozen):
    """The newest MLLM conflict-filter judgement of the sample."""

    verdict: str | None
    score: float | None
    model: str
    prompt_version: str


class DecisionRecord(_Frozen):
    """The newest decision of the sample; ``decided_by`` (a lead's username) only with ``include_reviewers``."""

    outcome: Literal["accepted", "rejected"]
    source: Literal["rule", "lead"]
    rule: dict[str, Any] | None = None
    decided_by: str | None = None


class Provenance(_Frozen):
    n_reviews: int
    aggregated: AggregatedScores
    reviews: tuple[ReviewScores, ...]
    mllm_conflict: MllmVerdict | None
    decision: DecisionRecord | None


class ExportRecord(_Frozen):
    """One exported sample (schema version :data:`SCHEMA_VERSION`)."""

    schema_version: int = SCHEMA_VERSION
    sample_id: int
    instance_id: int
    dataset: str
    external_id: str
    first_turn: int
    last_turn: int
    status: str
    split: SplitName
    instruction: str
    source_image: ImageRef
    target_image: ImageRef
    intermediate_images: tuple[ImageRef, ...]
    sub_instructions: tuple[SubInstructionRecord, ...]
    provenance: Provenance

    def images(self) -> list[tuple[str, ImageRef]]:
        """``(role, image)`` in a fixed order: source, the intermediates (``intermediate_<turn>``), target."""
        roles = [("source", self.source_image)]
        roles += [(f"intermediate_{img.after_turn}", img) for img in self.intermediate_images]
        roles.append(("target", self.target_image))
        return roles


# ----------------------------------------------------------------------------------------------------------
# plain inputs of build_record (one sample's rows, as read by exports.select)


@dataclass(frozen=True)
class SubRow:
    turn_index: int
    text: str
    operation: str
    box: tuple[float, float, float, float] | None
    box_source: str | None
    box_score: float | None


@dataclass(frozen=True)
class ReviewRow:
    consistent: bool
    quality: int
    complexity: int
    revision: int
    username: str


@dataclass(frozen=True)
class JudgementRow:
    verdict: str | None
    score: float | None
    model: str
    prompt_version: str


@dataclass(frozen=True)
class DecisionRow:
    outcome: str
    source: str
    rule: dict[str, Any] | None
    decided_by: str | None


@dataclass(frozen=True)
class SampleRows:
    """Everything :func:`build_record` needs about one sample."""

    sample_id: int
    instance_id: int
    dataset: str
    external_id: str
    first_turn: int
    last_turn: int
    status: str
    instruction: str
    instance_source: str
    turn_results: Mapping[int, str]  # turn index -> sha256 of its result image
    subs: Sequence[SubRow] = ()
    reviews: Sequence[ReviewRow] = ()
    judgement: JudgementRow | None = None
    decision: DecisionRow | None = None


class RecordError(ValueError):
    """A sample's rows cannot make a record (missing turn, unknown image ...); the message names the sample."""


def image_extension(fmt: str) -> str:
    try:
        return FORMAT_EXTENSIONS[fmt.upper()]
    except KeyError:
        raise ValueError(f"unknown image format {fmt!r} (expected one of {', '.join(FORMAT_EXTENSIONS)})") from None


def record_window(rows: SampleRows) -> tuple[tuple[int, str], tuple[tuple[int, str], ...], tuple[int, str]]:
    """``(after_turn, sha)`` of the source, the intermediates and the target of the window
    (:func:`db.windows.window_images`); :class:`RecordError` naming the first missing turn."""
    images = window_images(rows.instance_source, rows.turn_results, rows.first_turn, rows.last_turn)
    if images.missing:
        raise RecordError(
            f"sample {rows.sample_id}: instance {rows.instance_id} has no turn {images.missing[0]} "
            f"(window {rows.first_turn}..{rows.last_turn})"
        )
    (before, source), (last, target) = images.source, images.target
    middle = tuple((t, str(sha)) for t, sha in images.intermediates)
    return (before, str(source)), middle, (last, str(target))


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def aggregated_scores(reviews: Sequence[ReviewRow]) -> AggregatedScores:
    """The acceptance rule's aggregation (:func:`annotate.aggregation.aggregate`) as the record's scores."""
    agg = aggregate(reviews)
    return AggregatedScores(consistent=agg.consistent, quality=_finite(agg.quality), complexity=_finite(agg.complexity))


def build_record(
    rows: SampleRows,
    images: Mapping[str, tuple[str, int, int]],
    split: SplitName,
    *,
    include_reviewers: bool = False,
) -> ExportRecord:
    """The record of one sample; ``images`` maps sha256 -> (format, width, height)."""

    def ref(after_turn: int, sha: str) -> ImageRef:
        try:
            fmt, width, height = images[sha]
        except KeyError:
            raise RecordError(f"sample {rows.sample_id}: image {sha} has no row in the images table") from None
        return ImageRef(sha256=sha, format=fmt, width=width, height=height, after_turn=after_turn)

    source, middle, target = record_window(rows)
    reviews = tuple(
        ReviewScores(
            consistent=r.consistent,
            quality=r.quality,
            complexity=r.complexity,
            revision=r.revision,
            reviewer=r.username if include_reviewers else None,
        )
        for r in rows.reviews
    )
    judgement = rows.judgement
    decision = rows.decision
    return ExportRecord(
        sample_id=rows.sample_id,
        instance_id=rows.instance_id,
        dataset=rows.dataset,
        external_id=rows.external_id,
        first_turn=rows.first_turn,
        last_turn=rows.last_turn,
        status=rows.status,
        split=split,
        instruction=rows.instruction,
        source_image=ref(*source),
        target_image=ref(*target),
        intermediate_images=tuple(ref(t, sha) for t, sha in middle),
        sub_instructions=tuple(
            SubInstructionRecord(
                turn_index=s.turn_index,
                text=s.text,
                operation=s.operation,  # type: ignore[arg-type]
                box=s.box,
                box_source=s.box_source,  # type: ignore[arg-type]
                box_score=s.box_score,
            )
            for s in rows.subs
        ),
        provenance=Provenance(
            n_reviews=len(reviews),
            aggregated=aggregated_scores(rows.reviews),
            reviews=reviews,
            mllm_conflict=None
            if judgement is None
            else MllmVerdict(
                verdict=judgement.verdict,
                score=judgement.score,
                model=judgement.model,
                prompt_version=judgement.prompt_version,
            ),
            decision=None
            if decision is None
            else DecisionRecord(
                outcome=decision.outcome,  # type: ignore[arg-type]
                source=decision.source,  # type: ignore[arg-type]
                rule=decision.rule,
                decided_by=decision.decided_by if include_reviewers else None,
            ),
        ),
    )


def record_dict(record: ExportRecord, paths: Mapping[str, str]) -> dict[str, Any]:
    """The record as JSON-ready data with each image's ``path`` set from ``paths`` (role -> relative path)."""
    data = record.model_dump(mode="json")
    data["source_image"]["path"] = paths["source"]
    data["target_image"]["path"] = paths["target"]
    for image in data["intermediate_images"]:
        image["path"] = paths[f"intermediate_{image['after_turn']}"]
    return data
