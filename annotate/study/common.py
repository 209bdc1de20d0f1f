"""The user study's shared parts: constants, errors, the screens' and reports' types, and the lookups every
study module uses (a study, an enrolment). See :mod:`annotate.study` for the whole picture."""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mcie.db.models import (
    Study,
    StudyAssignment,
    StudyParticipant,
    StudyStatus,
)

ITEMS_FILE = "items.jsonl"
OUTPUT_SUFFIX = ".png"
DEFAULT_CRITERIA: tuple[str, ...] = ("instruction", "background")
LABELS = string.ascii_uppercase
ITEM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
METHOD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
CRITERION_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
ITEM_FIELDS = frozenset({"id", "source_image", "instruction", "attention_check"})
EXPORT_COLUMNS: tuple[str, ...] = (
    "participant",
    "username",
    "item",
    "criterion",
    "method",
    "position",
    "shown_order",
    "latency_ms",
    "voted_at",
    "completed",
    "is_attention",
    "attention_answer",
    "excluded",
)


class StudyError(ValueError):
    """A study request that cannot be done; the message says why."""


class StudyAccessError(StudyError):
    """The user may not take part in this study: not enrolled, or their invitation was revoked."""


class StudyNotOpenError(StudyError):
    """The study is a draft or closed, so nobody can see screens or vote; ``status`` says which."""

    def __init__(self, message: str, status: StudyStatus) -> None:
        self.status = status
        super().__init__(message)


class StudyPreviewsError(StudyError):
    """A study from previews that cannot be made; ``problems`` lists every gap (sample, method, what was found)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot create a study from previews: {len(self.problems)} problem(s)\n{listing}")


class StudyFolderError(StudyError):
    """A study folder with problems; ``problems`` lists every one (each naming its file)."""

    def __init__(self, folder: Path, problems: Sequence[str]) -> None:
        self.folder = folder
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot create a study from {folder}: {len(self.problems)} problem(s)\n{listing}")


@dataclass(frozen=True)
class StudyReport:
    study_id: int
    name: str
    folder: str
    n_items: int
    n_attention_items: int
    methods: tuple[str, ...]
    criteria: tuple[str, ...]
    items_per_participant: int
    n_images: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScreenOutput:
    """One output on a participant's screen: its label (A, B, ...) and image sha256 - never the method."""

    label: str
    image: str


@dataclass(frozen=True)
class ItemScreen:
    """What a participant sees for one item; ``choices`` are their votes so far on it (criterion -> label, None =
    none acceptable; criteria not voted yet are absent)."""

    study_id: int
    item_id: int
    position: int
    total: int
    instruction: str
    source_image: str
    outputs: tuple[ScreenOutput, ...]
    criteria: tuple[str, ...]
    choices: dict[str, str | None]

    @property
    def progress(self) -> str:
        return f"{self.position} of {self.total}"


@dataclass(frozen=True)
class StudyProgress:
    completed: int
    total: int
    finished: bool


@dataclass(frozen=True)
class ParticipantStatus:
    user_id: int
    username: str
    invited_at: datetime
    revoked: bool
    n_assigned: int
    n_completed: int
    finished_at: datetime | None
    excluded: bool
    exclusion_reason: str | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# lookups shared by the study modules


def get_study(session: Session, study_id: int, *, lock: bool = False) -> Study:
    stmt = select(Study).where(Study.id == study_id)
    study = session.scalar(stmt.with_for_update() if lock else stmt)
    if study is None:
        raise StudyError(f"no study with id {study_id}")
    return study


def get_enrolment(session: Session, study_id: int, user_id: int, *, active: bool = True) -> StudyParticipant:
    row = session.scalar(
        select(StudyParticipant).where(StudyParticipant.study_id == study_id, StudyParticipant.user_id == user_id)
    )
    if row is None:
        raise StudyAccessError(f"user {user_id} is not enrolled in study {study_id}")
    if active and row.revoked_at is not None:
        raise StudyAccessError(f"the invitation of user {user_id} to study {study_id} was revoked")
    return row


def assignment_count(session: Session, study_id: int, user_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(StudyAssignment)
            .where(StudyAssignment.study_id == study_id, StudyAssignment.participant_id == user_id)
        )
        or 0
    )
