"""Test helpers that put users, instances, samples, reviews, gold answers and MLLM verdicts into a database.

Every helper takes an open :class:`~sqlalchemy.orm.Session` (``with session_scope(url) as session: ...``), adds rows
through the ORM and flushes, so ids are set on return; none of them commits. Images are metadata rows with made-up
sha256 values (no bytes in a store): enough for everything that refers to images by hash.

    with session_scope(url) as session:
        rater = make_user(session, role="rater")
        sample = make_sample(session, n_turns=3, first_turn=2, last_turn=3, priority=0.5)
        add_review(session, sample, rater, consistent=True, quality=4, complexity=4)
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from mcie.annotate.accounts import hash_password
from mcie.annotate.project import ProjectConfig, set_project_config
from mcie.db.models import (
    Assignment,
    AssignmentPurpose,
    AssignmentState,
    BoxSource,
    GoldAnswer,
    Image,
    Instance,
    MllmJudgement,
    MllmStage,
    Operation,
    Review,
    ReviewRevision,
    Role,
    Sample,
    SampleStatus,
    SubInstruction,
    Turn,
    User,
    utcnow,
)

_counter = itertools.count(1)
OPERATIONS = (Operation.add, Operation.remove, Operation.change)


def sha(label: str) -> str:
    """A stable fake sha256 for an image label."""
    return hashlib.sha256(label.encode()).hexdigest()


def make_image(session: Session, label: str | None = None) -> str:
    """An ``images`` row (no bytes); returns its sha256."""
    digest = sha(label or f"image-{next(_counter)}")
    if session.get(Image, digest) is None:
        session.add(Image(sha256=digest, format="PNG", width=64, height=48, size_bytes=1000))
        session.flush()
    return digest


def make_user(
    session: Session,
    username: str | None = None,
    role: str | Role = Role.rater,
    *,
    password: str | None = None,
    active: bool = True,
) -> User:
    """A user (no password unless given: hashing is slow and most tests never log in)."""
    user = User(
        username=username or f"user{next(_counter)}",
        role=Role(role),
        password_hash=hash_password(password) if password is not None else None,
        active=active,
    )
    session.add(user)
    session.flush()
    return user


def make_users(session: Session, n: int, role: str | Role = Role.rater, prefix: str = "rater") -> list[User]:
    base = next(_counter)
    return [make_user(session, f"{prefix}{base}-{k}", role) for k in range(n)]


def make_instance(
    session: Session,
    n_turns: int = 3,
    *,
    dataset: str = "demo",
    external_id: str | None = None,
    images: Sequence[str] | None = None,
) -> Instance:
    """An instance with a source image and ``n_turns`` turns (turn k's result image labelled ``<external_id>/k``).
    ``images``: the hashes of real stored images to use instead (the source, then one per turn)."""
    external_id = external_id or f"inst-{next(_counter)}"
    if images is not None:
        n_turns = len(images) - 1

    def image(k: int) -> str:
        return images[k] if images is not None else make_image(session, f"{dataset}/{external_id}/{k}")

    instance = Instance(dataset=dataset, external_id=external_id, source_image=image(0), n_turns=n_turns)
    session.add(instance)
    session.flush()
    for k in range(1, n_turns + 1):
        session.add(
            Turn(
                instance_id=instance.id,
                index=k,
                instruction=f"edit number {k}",
                operation=OPERATIONS[(k - 1) % 3],
                result_image=image(k),
            )
        )
    session.flush()
    return instance


def make_sample(
    session: Session,
    instance: Instance | None = None,
    *,
    n_turns: int = 2,
    first_turn: int = 1,
    last_turn: int | None = None,
    status: str | SampleStatus = SampleStatus.ready,
    priority: float = 0.0,
    boxes: bool = True,
) -> Sample:
    """A sample over turns ``first_turn..last_turn`` (default: to the instance's last turn) of ``instance`` (a new one
    of ``n_turns`` turns when None), with one sub-instruction per turn; ``boxes`` gives each an MLLM box."""
    instance = instance or make_instance(session, max(n_turns, last_turn or 0))
    last_turn = last_turn or instance.n_turns
    sample = Sample(
        instance_id=instance.id,
        first_turn=first_turn,
        last_turn=last_turn,
        instruction=", then ".join(f"edit number {k}" for k in range(first_turn, last_turn + 1)),
        status=SampleStatus(status),
        priority=priority,
    )
    session.add(sample)
    session.flush()
    for k in range(first_turn, last_turn + 1):
        box: dict[str, Any] = {}
        if boxes:
            box = {"box_x0": 0.1, "box_y0": 0.2, "box_x1": 0.5, "box_y1": 0.6, "box_source": BoxSource.mllm}
        session.add(
            SubInstruction(
                sample_id=sample.id, turn_index=k, text=f"edit number {k}", operation=OPERATIONS[(k - 1) % 3], **box
            )
        )
    session.flush()
    return sample


def make_samples(session: Session, n: int, **kwargs: Any) -> list[Sample]:
    """``n`` samples, each on its own instance (keyword arguments as for :func:`make_sample`)."""
    return [make_sample(session, **kwargs) for _ in range(n)]


def make_gold(
    session: Session,
    sample: Sample,
    *,
    consistent: bool = True,
    quality: int = 4,
    complexity: int = 4,
    tolerance: int = 1,
    created_by: User | None = None,
) -> GoldAnswer:
    """Make ``sample`` a gold sample with the given reference answer."""
    gold = GoldAnswer(
        sample_id=sample.id,
        consistent=consistent,
        quality=quality,
        complexity=complexity,
        tolerance=tolerance,
        created_by=created_by.id if created_by else None,
    )
    session.add(gold)
    session.flush()
    return gold


def add_conflict_judgement(
    session: Session,
    sample: Sample,
    verdict: str = "no_conflict",
    reason: str | None = "the turns edit different objects",
    *,
    created_at: datetime | None = None,
) -> MllmJudgement:
    """A conflict-stage MLLM judgement of ``sample`` (verdict conflict | no_conflict | unparseable | error)."""
    judgement = MllmJudgement(
        sample_id=sample.id,
        stage=MllmStage.conflict,
        model="test-mllm",
        prompt_version="v1",
        cache_key=sha(f"judgement-{next(_counter)}"),
        verdict=verdict,
        rationale=reason,
        created_at=created_at or utcnow(),
    )
    session.add(judgement)
    session.flush()
    return judgement


def add_review(
    session: Session,
    sample: Sample,
    user: User,
    *,
    consistent: bool = True,
    quality: int = 4,
    complexity: int = 4,
    comment: str | None = None,
    time_spent_s: float | None = 30.0,
    created_at: datetime | None = None,
    purpose: str | AssignmentPurpose = AssignmentPurpose.regular,
) -> Review:
    """A submitted review written directly (a submitted assignment, the review and its revision 1), bypassing the
    queue and the acceptance rule: for building reviewed databases quickly."""
    at = created_at or utcnow()
    session.add(
        Assignment(
            sample_id=sample.id,
            user_id=user.id,
            state=AssignmentState.submitted,
            purpose=AssignmentPurpose(purpose),
            leased_at=at,
            lease_expires_at=at,
            finished_at=at,
        )
    )
    review = Review(
        sample_id=sample.id,
        user_id=user.id,
        consistent=consistent,
        quality=quality,
        complexity=complexity,
        comment=comment,
        time_spent_s=time_spent_s,
        created_at=at,
        updated_at=at,
    )
    session.add(review)
    session.flush()
    session.add(
        ReviewRevision(
            review_id=review.id,
            revision=1,
            consistent=consistent,
            quality=quality,
            complexity=complexity,
            comment=comment,
            time_spent_s=time_spent_s,
            created_at=at,
        )
    )
    session.flush()
    return review


def add_reviews(
    session: Session, sample: Sample, users: Sequence[User], answers: Sequence[tuple[bool, int, int]], **kwargs: Any
) -> list[Review]:
    """One review per (user, (consistent, quality, complexity)) pair."""
    return [
        add_review(session, sample, user, consistent=c, quality=q, complexity=x, **kwargs)
        for user, (c, q, x) in zip(users, answers, strict=True)
    ]


def configure(session: Session, **changes: Any) -> ProjectConfig:
    """Change project settings (``reviews_per_sample=2``, ``gold_rate=0`` ...); returns the new configuration."""
    return set_project_config(session, changes, actor_id=None)


def agreement_project(session: Session) -> list[int]:
    """Six samples reviewed by three raters, two agreeing on each and the third giving the next sample's answer:
    enough for every agreement figure and a reliability fit. Returns the raters' ids."""
    raters = make_users(session, 3)
    answers = [(True, 4, 4), (True, 4, 5), (False, 2, 3), (False, 2, 2), (True, 5, 5), (True, 3, 3)]
    for i, sample in enumerate(make_samples(session, 6)):
        add_reviews(session, sample, raters, [answers[i]] * 2 + [answers[(i + 1) % 6]])
    return raters
