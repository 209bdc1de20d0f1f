"""The user study's database edge: creating a study from a folder, invites, the participant's flow, votes, results.

Every function takes the database as ``db``: a SQLAlchemy URL (the function opens and commits its own transaction
with :func:`db.session.session_scope`) or an open :class:`~sqlalchemy.orm.Session` (the caller's transaction; nothing
is committed here). Images go through the :class:`~db.store.ImageStore` passed in. The design
(:mod:`annotate.study_design`) and the statistics (:mod:`annotate.study_analysis`) are pure modules called from here.

Creating a study from a folder (:func:`create_study_from_folder`)::

    study/
      items.jsonl            one JSON object per line: {"id": "0001", "source_image": "sources/0001.png",
                             "instruction": "...", "attention_check": "method-name" (optional)}
      sources/0001.png       source images, anywhere under the folder (paths relative to it)
      mcie-e1/0001.png       one sub-folder per method holding <item id>.png for every item
      smartedit/0001.png

Method folders are the sub-folders of the study folder, except hidden ones (``.``/``_`` prefix) and those holding
source images (or name them with ``methods=``). Everything is checked before anything is written: a malformed line,
an unknown attention answer, and every missing or unreadable image are reported together (with their paths) in one
:class:`StudyFolderError`, and no study is created.

The participant's flow. A participant is enrolled (:func:`enrol`: an account with the ``participant`` role and no
password is created if needed, and a random invite token is returned once; only its sha256 is stored, and enrolling
again replaces it). :func:`participant_from_token` resolves an invite link. The participant's sequence is
materialised from the design into ``study_assignments`` on their first screen (:func:`assign_participant`; the n-th
participant to start takes the design's n-th sequence). :func:`current_item` returns the first screen not yet
completed - the outputs labelled A, B, C ... in the recorded screen order, never the method names - so a participant
who closes the browser resumes where they stopped. :func:`cast_vote` stores a choice per criterion (changeable until
:func:`advance` moves on; votes on completed or later screens are refused); :func:`advance` needs a vote on every
criterion and marks the participant finished after the last screen.

Votes are stored with the method chosen (``chosen_output_id``; NULL = none acceptable), its 1-based screen position
(``shown_position``, A = 1), the screen order and the latency (of the latest change). :func:`votes_frame` builds the
analysis input, :func:`export_votes` writes the raw votes, :func:`study_results` applies the recorded exclusions and
calls :func:`annotate.study_analysis.results`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from annotate import study_analysis, study_design
from annotate.accounts import check_username, create_user
from db.models import (
    AuditLog,
    Role,
    Study,
    StudyAssignment,
    StudyItem,
    StudyOutput,
    StudyParticipant,
    StudyStatus,
    User,
    Vote,
    utcnow,
)
from db.session import session_scope
from db.store import ImageRejected, ImageStore, StoredImage, register_images, validate_image

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
class Progress:
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


# ----------------------------------------------------------------------------------------------------------
# sessions


@contextmanager
def _scope(db: str | Session, *, write: bool = False) -> Iterator[Session]:
    """The caller's session as is, or a new transaction on the URL ``db``."""
    if isinstance(db, Session):
        yield db
    else:
        with session_scope(db, write=write) as session:
            yield session


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# creating a study from a folder


@dataclass(frozen=True)
class ItemSpec:
    """One line of ``items.jsonl``."""

    id: str
    source_image: str
    instruction: str
    attention_check: str | None
    line: int


def parse_items(path: Path) -> tuple[list[ItemSpec], list[str], list[str]]:
    """Read ``items.jsonl``: ``(items, problems, warnings)``; every problem names the file and line."""
    if not path.is_file():
        return [], [f"{path}: missing (one JSON object per line: id, source_image, instruction[, attention_check])"], []
    items: list[ItemSpec] = []
    problems: list[str] = []
    warnings: list[str] = []
    first_line: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path}: cannot be read as UTF-8 text ({exc})"], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        spec, line_problems = _item_spec(record, number, where)
        unknown = sorted(set(record) - ITEM_FIELDS)
        if unknown:
            warnings.append(f"{where}: ignored unknown field(s) {', '.join(unknown)}")
        if spec is not None and spec.id in first_line:
            line_problems.append(f"{where}: duplicate id {spec.id!r} (first on line {first_line[spec.id]})")
        problems.extend(line_problems)
        if spec is not None:
            first_line.setdefault(spec.id, number)
        if spec is not None and not line_problems:
            items.append(spec)
    if not items and not problems:
        problems.append(f"{path}: has no items")
    return items, problems, warnings


def _item_spec(record: dict[str, Any], number: int, where: str) -> tuple[ItemSpec | None, list[str]]:
    problems = []
    raw_id = record.get("id")
    item_id = str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    if item_id is None or not ITEM_ID_RE.fullmatch(item_id):
        problems.append(
            f"{where}: field 'id' must be a string or number usable as a file name (letters, digits, "
            f"'_', '.', '-'); got {raw_id!r}"
        )
    source = record.get("source_image")
    if not isinstance(source, str) or not source.strip():
        problems.append(f"{where}: field 'source_image' must be a path relative to the study folder")
    elif Path(source).is_absolute() or ".." in Path(source).parts:
        problems.append(f"{where}: field 'source_image' {source!r} must stay inside the study folder")
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        problems.append(f"{where}: field 'instruction' must be a non-empty string")
    attention = record.get("attention_check")
    if attention is not None and (not isinstance(attention, str) or not attention):
        problems.append(f"{where}: field 'attention_check' must be a method name or absent; got {attention!r}")
    if problems or item_id is None:
        return (ItemSpec(item_id, "", "", None, number) if item_id else None), problems
    return ItemSpec(item_id, str(source), str(instruction).strip(), attention, number), []


def _method_folders(folder: Path, items: Sequence[ItemSpec], methods: Sequence[str] | None) -> list[str]:
    if methods is not None:
        return list(methods)
    source_dirs = {Path(item.source_image).parts[0] for item in items if len(Path(item.source_image).parts) > 1}
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and entry.name[0] not in "._" and entry.name not in source_dirs
    )


def _image_problem(path: Path, store: ImageStore) -> str | None:
    """Why the image file at ``path`` cannot enter ``store`` (missing, unreadable, refused), or None."""
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob(f"{path.stem}.*")) if path.parent.is_dir() else []
        hint = f" (found {', '.join(near)}; expected {path.name})" if near else ""
        return f"{path}: missing{hint}"
    try:
        with path.open("rb") as handle:
            data = handle.read(store.max_bytes + 1)
        validate_image(data, str(path), max_pixels=store.max_pixels, max_bytes=store.max_bytes)
    except OSError as exc:
        return f"{path}: cannot be read ({exc})"
    except ImageRejected as exc:
        return str(exc)
    return None


def check_study_folder(
    folder: Path, store: ImageStore, methods: Sequence[str] | None = None
) -> tuple[list[ItemSpec], list[str], list[str], list[str]]:
    """Check a study folder without writing anything: ``(items, methods, problems, warnings)``."""
    if not folder.is_dir():
        return [], [], [f"{folder}: not a folder"], []
    items, problems, warnings = parse_items(folder / ITEMS_FILE)
    found = _method_folders(folder, items, methods)
    for method in found:
        if not METHOD_RE.fullmatch(method):
            problems.append(f"{folder / method}: method name {method!r} must be 1-64 letters, digits, '_.+-'")
        elif not (folder / method).is_dir():
            problems.append(f"{folder / method}: missing method folder")
    if len(found) < 2:
        problems.append(f"{folder}: needs at least two method sub-folders (found {found or 'none'})")
    if len(found) > len(LABELS):
        problems.append(f"{folder}: at most {len(LABELS)} methods can be labelled A-Z (found {len(found)})")
    checked: dict[Path, str | None] = {}
    for item in items:
        if item.attention_check is not None and item.attention_check not in found:
            problems.append(
                f"{folder / ITEMS_FILE}:{item.line}: attention_check {item.attention_check!r} is not one "
                f"of the methods {found}"
            )
        for path in _item_paths(folder, item, found):
            if path not in checked:
                checked[path] = _image_problem(path, store)
                problems.extend([checked[path]] if checked[path] else [])
    known = {f"{item.id}{OUTPUT_SUFFIX}" for item in items}
    for method in found:
        if (folder / method).is_dir():
            extra = sorted(p.name for p in (folder / method).iterdir() if p.is_file() and p.name not in known)
            if extra:
                warnings.append(
                    f"{folder / method}: {len(extra)} file(s) match no item and are ignored: "
                    f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
                )
    return items, found, problems, warnings


def _item_paths(folder: Path, item: ItemSpec, methods: Sequence[str]) -> list[Path]:
    """The source image and every method's output of ``item``."""
    return [folder / item.source_image] + [folder / m / f"{item.id}{OUTPUT_SUFFIX}" for m in methods]


def _check_criteria(criteria: Sequence[str]) -> tuple[str, ...]:
    checked = tuple(criteria)
    bad = [c for c in checked if not isinstance(c, str) or not CRITERION_RE.fullmatch(c)]
    if not checked or bad or len(set(checked)) != len(checked):
        raise StudyError(f"criteria must be distinct lower-case names of up to 32 characters; got {list(checked)}")
    return checked


def create_study_from_folder(
    db: str | Session,
    store: ImageStore,
    folder: str | Path,
    name: str,
    *,
    items_per_participant: int = 100,
    seed: int = 0,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    methods: Sequence[str] | None = None,
    description: str | None = None,
    status: StudyStatus = StudyStatus.open,
    actor_id: int | None = None,
) -> StudyReport:
    """Create a study from ``folder`` (layout in the module docstring); refuses, listing every problem, on any gap."""
    folder = Path(folder)
    criteria = _check_criteria(criteria)
    if not name or not name.strip() or len(name) > 128:
        raise StudyError(f"a study name must have 1-128 characters; got {name!r}")
    items, found, problems, warnings = check_study_folder(folder, store, methods)
    if problems:
        raise StudyFolderError(folder, problems)
    attention = [k for k, item in enumerate(items) if item.attention_check is not None]
    try:  # validates items_per_participant and seed against the folder
        study_design.design(len(items), len(found), 0, items_per_participant, seed, attention)
    except ValueError as exc:
        raise StudyError(f"{folder}: {exc}") from None
    with _scope(db) as session:
        if session.scalar(select(Study.id).where(Study.name == name)) is not None:
            raise StudyError(f"a study named {name!r} already exists")
    stored: dict[Path, StoredImage] = {}  # stored before the write transaction, so it holds no lock meanwhile
    for item in items:
        for path in _item_paths(folder, item, found):
            if path not in stored:
                stored[path] = store.put_file(path)
    with _scope(db, write=True) as session:
        if session.scalar(select(Study.id).where(Study.name == name)) is not None:
            raise StudyError(f"a study named {name!r} already exists")
        register_images(session, stored.values())
        study = Study(
            name=name,
            description=description,
            status=status,
            items_per_participant=items_per_participant,
            criteria=list(criteria),
            seed=seed,
            created_by=actor_id,
        )
        session.add(study)
        session.flush()
        for item in items:
            row = StudyItem(
                study_id=study.id,
                external_id=item.id,
                source_image=stored[folder / item.source_image].sha256,
                instruction=item.instruction,
                is_attention_check=item.attention_check is not None,
                attention_answer=item.attention_check,
            )
            session.add(row)
            session.flush()
            session.add_all(
                StudyOutput(item_id=row.id, method=m, image=stored[folder / m / f"{item.id}{OUTPUT_SUFFIX}"].sha256)
                for m in found
            )
        session.add(
            AuditLog(
                user_id=actor_id,
                action="study.create",
                entity="study",
                entity_id=str(study.id),
                details={"name": name, "folder": str(folder), "items": len(items), "methods": found},
            )
        )
        return StudyReport(
            study.id,
            name,
            str(folder),
            len(items),
            len(attention),
            tuple(found),
            criteria,
            items_per_participant,
            len({s.sha256 for s in stored.values()}),
            tuple(warnings),
        )


def create_study_from_previews(db: str | Session, name: str, sample_ids: Sequence[int], methods: Sequence[str]) -> None:
    """TODO: build a study from accepted samples and the ``previews`` table (one model version per method).

    Not implemented yet: nothing writes ``previews`` so far, and baselines (other methods' outputs) have no table
    of their own; export the outputs into the folder layout and use :func:`create_study_from_folder`.
    """
    raise NotImplementedError(
        "create_study_from_previews is not implemented yet (the previews table is still empty); "
        "lay the outputs out as a folder and use create_study_from_folder"
    )


def set_study_status(
    db: str | Session, study_id: int, status: StudyStatus | str, *, actor_id: int | None = None
) -> None:
    """Open, close or re-draft a study; participants can vote only while it is open."""
    try:
        status = StudyStatus(status)
    except ValueError:
        raise StudyError(f"unknown study status {status!r}: expected one of {[s.value for s in StudyStatus]}") from None
    with _scope(db, write=True) as session:
        _study(session, study_id).status = status
        session.add(
            AuditLog(
                user_id=actor_id,
                action="study.status",
                entity="study",
                entity_id=str(study_id),
                details={"status": status.value},
            )
        )


# ----------------------------------------------------------------------------------------------------------
# participants


def _study(session: Session, study_id: int, *, lock: bool = False) -> Study:
    stmt = select(Study).where(Study.id == study_id)
    study = session.scalar(stmt.with_for_update() if lock else stmt)
    if study is None:
        raise StudyError(f"no study with id {study_id}")
    return study


def _enrolment(session: Session, study_id: int, user_id: int, *, active: bool = True) -> StudyParticipant:
    row = session.scalar(
        select(StudyParticipant).where(StudyParticipant.study_id == study_id, StudyParticipant.user_id == user_id)
    )
    if row is None:
        raise StudyError(f"user {user_id} is not enrolled in study {study_id}")
    if active and row.revoked_at is not None:
        raise StudyError(f"the invitation of user {user_id} to study {study_id} was revoked")
    return row


def _new_username(session: Session, study_id: int) -> str:
    while True:
        username = f"study{study_id}-{secrets.token_hex(4)}"
        if session.scalar(select(User.id).where(User.username == username)) is None:
            return username


def enrol(
    db: str | Session,
    study_id: int,
    username: str | None = None,
    *,
    display_name: str | None = None,
    actor_id: int | None = None,
) -> tuple[User, str]:
    """Enrol a participant and return ``(user, invite_token)``; the token is shown once, only its sha256 is kept.

    Without ``username`` a participant account ``study<id>-<random>`` is created; an unknown username gets a new
    participant account (no password); an existing active account of any role is enrolled as it is. Enrolling an
    enrolled participant again issues a new token (the old link stops working) and lifts a revocation.
    """
    token = secrets.token_urlsafe(32)
    with _scope(db, write=True) as session:
        study = _study(session, study_id)
        if study.status is StudyStatus.closed:
            raise StudyError(f"study {study_id} ({study.name}) is closed")
        name = check_username(username) if username is not None else _new_username(session, study_id)
        user = session.scalar(select(User).where(User.username == name))
        if user is None:
            user = create_user(session, name, Role.participant, None, display_name=display_name, actor_id=actor_id)
        elif not user.active:
            raise StudyError(f"the account {name!r} is disabled")
        row = session.scalar(
            select(StudyParticipant).where(StudyParticipant.study_id == study_id, StudyParticipant.user_id == user.id)
        )
        if row is None:
            session.add(StudyParticipant(study_id=study_id, user_id=user.id, invite_token_hash=_hash_token(token)))
        else:
            row.invite_token_hash, row.revoked_at = _hash_token(token), None
        session.add(
            AuditLog(
                user_id=actor_id,
                action="study.enrol",
                entity="study",
                entity_id=str(study_id),
                details={"user_id": user.id, "username": name, "reissued": row is not None},
            )
        )
        session.flush()
        return user, token


def revoke_invite(db: str | Session, study_id: int, user_id: int, *, actor_id: int | None = None) -> None:
    """Make the participant's invite link stop working (their votes are kept; :func:`enrol` re-invites)."""
    with _scope(db, write=True) as session:
        row = _enrolment(session, study_id, user_id, active=False)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.add(
                AuditLog(
                    user_id=actor_id,
                    action="study.revoke",
                    entity="study",
                    entity_id=str(study_id),
                    details={"user_id": user_id},
                )
            )


def participant_from_token(db: str | Session, token: str) -> tuple[int, int] | None:
    """``(study_id, user_id)`` of an invite token, or None if it is unknown, revoked, the account is disabled or the
    study is not open."""
    if not token:
        return None
    with _scope(db) as session:
        found = session.execute(
            select(StudyParticipant.study_id, StudyParticipant.user_id)
            .join(Study, Study.id == StudyParticipant.study_id)
            .join(User, User.id == StudyParticipant.user_id)
            .where(
                StudyParticipant.invite_token_hash == _hash_token(token),
                StudyParticipant.revoked_at.is_(None),
                Study.status == StudyStatus.open,
                User.active.is_(True),
            )
        ).first()
        return None if found is None else (int(found[0]), int(found[1]))


@dataclass(frozen=True)
class _Layout:
    items: list[StudyItem]
    methods: list[str]
    attention: list[int]


def _layout(session: Session, study_id: int) -> _Layout:
    """The design's view of a study: items in id order, methods sorted, attention item indices."""
    items = list(session.scalars(select(StudyItem).where(StudyItem.study_id == study_id).order_by(StudyItem.id)))
    methods = sorted(
        set(
            session.scalars(
                select(StudyOutput.method)
                .join(StudyItem, StudyItem.id == StudyOutput.item_id)
                .where(StudyItem.study_id == study_id)
            )
        )
    )
    return _Layout(items, methods, [k for k, item in enumerate(items) if item.is_attention_check])


def _assignment_count(session: Session, study_id: int, user_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(StudyAssignment)
            .where(StudyAssignment.study_id == study_id, StudyAssignment.participant_id == user_id)
        )
        or 0
    )


def assign_participant(db: str | Session, study_id: int, user_id: int) -> int:
    """Materialise the participant's sequence into ``study_assignments``; returns its length. Idempotent.

    The n-th participant of the study to be assigned (0-based) takes sequence n of
    ``study_design.design(n_items, n_methods, n + 1, items_per_participant, seed, attention_items)``.
    """
    with _scope(db, write=True) as session:
        study = _study(session, study_id, lock=True)  # serialises assignments (SELECT ... FOR UPDATE on PostgreSQL)
        _enrolment(session, study_id, user_id)
        existing = _assignment_count(session, study_id, user_id)
        if existing:
            return existing
        index = (
            session.scalar(
                select(func.count(func.distinct(StudyAssignment.participant_id))).where(
                    StudyAssignment.study_id == study_id
                )
            )
            or 0
        )
        layout = _layout(session, study_id)
        sequence = study_design.design(
            len(layout.items), len(layout.methods), index + 1, study.items_per_participant, study.seed, layout.attention
        ).sequences[index]
        session.add_all(
            StudyAssignment(
                study_id=study_id,
                participant_id=user_id,
                item_id=layout.items[screen.item].id,
                position=k,
                shown_order=[layout.methods[m] for m in screen.order],
            )
            for k, screen in enumerate(sequence, start=1)
        )
        session.flush()
        return len(sequence)


def participants_status(db: str | Session, study_id: int) -> list[ParticipantStatus]:
    """Every enrolled participant with their progress, in enrolment order."""
    with _scope(db) as session:
        _study(session, study_id)
        counts = {
            row.participant_id: (int(row.assigned), int(row.completed))
            for row in session.execute(
                select(
                    StudyAssignment.participant_id,
                    func.count().label("assigned"),
                    func.count(StudyAssignment.completed_at).label("completed"),
                )
                .where(StudyAssignment.study_id == study_id)
                .group_by(StudyAssignment.participant_id)
            )
        }
        rows = session.execute(
            select(StudyParticipant, User.username)
            .join(User, User.id == StudyParticipant.user_id)
            .where(StudyParticipant.study_id == study_id)
            .order_by(StudyParticipant.id)
        ).all()
        return [
            ParticipantStatus(
                p.user_id,
                username,
                p.invited_at,
                p.revoked_at is not None,
                *counts.get(p.user_id, (0, 0)),
                p.finished_at,
                p.excluded,
                p.exclusion_reason,
            )
            for p, username in rows
        ]


# ----------------------------------------------------------------------------------------------------------
# the participant's flow


def _open_study(session: Session, study_id: int) -> Study:
    study = _study(session, study_id)
    if study.status is not StudyStatus.open:
        raise StudyError(f"study {study_id} ({study.name}) is {study.status.value}, not open")
    return study


def _current(session: Session, study_id: int, user_id: int) -> StudyAssignment | None:
    return session.scalar(
        select(StudyAssignment)
        .where(
            StudyAssignment.study_id == study_id,
            StudyAssignment.participant_id == user_id,
            StudyAssignment.completed_at.is_(None),
        )
        .order_by(StudyAssignment.position)
        .limit(1)
    )


def current_item(db: str | Session, study_id: int, user_id: int) -> ItemScreen | None:
    """The participant's first screen not yet completed (assigning their sequence on first use); None when done."""
    with _scope(db) as session:
        _open_study(session, study_id)
        _enrolment(session, study_id, user_id)
        needs_assignment = _assignment_count(session, study_id, user_id) == 0
    if needs_assignment:
        assign_participant(db, study_id, user_id)
    with _scope(db) as session:
        study = _open_study(session, study_id)
        assignment = _current(session, study_id, user_id)
        if assignment is None:
            return None
        item = session.get(StudyItem, assignment.item_id)
        assert item is not None
        outputs = session.execute(select(StudyOutput.method, StudyOutput.image).where(StudyOutput.item_id == item.id))
        images = {method: image for method, image in outputs}
        votes = session.execute(select(Vote.criterion, Vote.shown_position).where(Vote.assignment_id == assignment.id))
        return ItemScreen(
            study_id=study_id,
            item_id=item.id,
            position=assignment.position,
            total=_assignment_count(session, study_id, user_id),
            instruction=item.instruction,
            source_image=item.source_image,
            outputs=tuple(ScreenOutput(LABELS[k], images[m]) for k, m in enumerate(assignment.shown_order)),
            criteria=tuple(study.criteria),
            choices={c: None if pos is None else LABELS[pos - 1] for c, pos in votes},
        )


def _editable_assignment(session: Session, study_id: int, user_id: int, item_id: int) -> StudyAssignment:
    assignment = session.scalar(
        select(StudyAssignment).where(
            StudyAssignment.study_id == study_id,
            StudyAssignment.participant_id == user_id,
            StudyAssignment.item_id == item_id,
        )
    )
    if assignment is None:
        raise StudyError(f"item {item_id} is not in the sequence of user {user_id} in study {study_id}")
    if assignment.completed_at is not None:
        raise StudyError(f"item {item_id} (screen {assignment.position}) is completed; its votes can no longer change")
    current = _current(session, study_id, user_id)
    if current is None or current.id != assignment.id:
        raise StudyError(
            f"item {item_id} (screen {assignment.position}) is not the current screen "
            f"({current.position if current else 'none'})"
        )
    return assignment


def cast_vote(
    db: str | Session,
    study_id: int,
    user_id: int,
    item_id: int,
    criterion: str,
    choice_label: str | None,
    latency_ms: float | None,
) -> None:
    """Record (or change) the participant's choice on the current screen for one criterion; ``choice_label`` None =
    none is acceptable. Refused once the participant has moved past the screen."""
    if latency_ms is not None and (not math.isfinite(latency_ms) or latency_ms < 0):
        raise StudyError(f"latency_ms must be a non-negative number; got {latency_ms!r}")
    with _scope(db, write=True) as session:
        study = _open_study(session, study_id)
        _enrolment(session, study_id, user_id)
        if criterion not in study.criteria:
            raise StudyError(f"unknown criterion {criterion!r}: study {study_id} asks for {', '.join(study.criteria)}")
        assignment = _editable_assignment(session, study_id, user_id, item_id)
        order = list(assignment.shown_order)
        output_id = position = None
        if choice_label is not None:
            if choice_label not in LABELS[: len(order)]:
                raise StudyError(
                    f"unknown choice {choice_label!r}: expected one of {', '.join(LABELS[: len(order)])} "
                    "or None (none acceptable)"
                )
            position = LABELS.index(choice_label) + 1
            output_id = session.scalar(
                select(StudyOutput.id).where(StudyOutput.item_id == item_id, StudyOutput.method == order[position - 1])
            )
        values = {
            "assignment_id": assignment.id,
            "participant_id": user_id,
            "item_id": item_id,
            "criterion": criterion,
            "chosen_output_id": output_id,
            "shown_position": position,
            "shown_order": order,
            "latency_ms": latency_ms,
        }
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        changes = {k: values[k] for k in ("chosen_output_id", "shown_position", "shown_order", "latency_ms")}
        session.execute(
            insert(Vote)
            .values(**values)
            .on_conflict_do_update(
                index_elements=["participant_id", "item_id", "criterion"], set_={**changes, "updated_at": utcnow()}
            )
        )


def advance(db: str | Session, study_id: int, user_id: int, item_id: int) -> Progress:
    """Complete the current screen (a vote on every criterion is required) and move on; after the last screen the
    participant is marked finished."""
    with _scope(db, write=True) as session:
        study = _open_study(session, study_id)
        enrolment = _enrolment(session, study_id, user_id)
        assignment = _editable_assignment(session, study_id, user_id, item_id)
        voted = set(session.scalars(select(Vote.criterion).where(Vote.assignment_id == assignment.id)))
        missing = [c for c in study.criteria if c not in voted]
        if missing:
            raise StudyError(
                f"item {item_id} (screen {assignment.position}) still needs a vote on: {', '.join(missing)}"
            )
        assignment.completed_at = utcnow()
        session.flush()
        total = _assignment_count(session, study_id, user_id)
        done = (
            session.scalar(
                select(func.count())
                .select_from(StudyAssignment)
                .where(
                    StudyAssignment.study_id == study_id,
                    StudyAssignment.participant_id == user_id,
                    StudyAssignment.completed_at.is_not(None),
                )
            )
            or 0
        )
        if done == total and enrolment.finished_at is None:
            enrolment.finished_at = utcnow()
        return Progress(done, total, done == total)


# ----------------------------------------------------------------------------------------------------------
# votes, exclusions, results


def _vote_rows(session: Session, study_id: int) -> list[dict[str, Any]]:
    stmt = (
        select(
            Vote,
            StudyAssignment.completed_at,
            StudyItem.external_id,
            StudyItem.is_attention_check,
            StudyItem.attention_answer,
            StudyOutput.method,
            User.username,
            StudyParticipant.excluded,
        )
        .join(StudyAssignment, StudyAssignment.id == Vote.assignment_id)
        .join(StudyItem, StudyItem.id == Vote.item_id)
        .outerjoin(StudyOutput, StudyOutput.id == Vote.chosen_output_id)
        .join(User, User.id == Vote.participant_id)
        .outerjoin(
            StudyParticipant,
            (StudyParticipant.study_id == StudyAssignment.study_id) & (StudyParticipant.user_id == Vote.participant_id),
        )
        .where(StudyAssignment.study_id == study_id)
        .order_by(Vote.participant_id, StudyAssignment.position, Vote.criterion)
    )
    return [
        {
            "participant": vote.participant_id,
            "username": username,
            "item": external_id,
            "item_id": vote.item_id,
            "criterion": vote.criterion,
            "chosen_method": method,
            "shown_order": list(vote.shown_order),
            "shown_position": vote.shown_position,
            "latency_ms": vote.latency_ms,
            "is_attention": bool(attention),
            "attention_answer": answer,
            "completed": completed is not None,
            "excluded": bool(excluded),
            "voted_at": vote.updated_at,
        }
        for vote, completed, external_id, attention, answer, method, username, excluded in session.execute(stmt)
    ]


VOTES_FRAME_COLUMNS: tuple[str, ...] = (
    *study_analysis.VOTE_COLUMNS,
    "username",
    "item_id",
    "shown_position",
    "completed",
    "excluded",
    "voted_at",
)


def votes_frame(db: str | Session, study_id: int, *, completed_only: bool = True) -> pd.DataFrame:
    """The study's votes as the analysis input (:data:`annotate.study_analysis.VOTE_COLUMNS`, ``participant`` is the
    user id and ``item`` the item's id from items.jsonl) plus ``username``, ``item_id``, ``shown_position``,
    ``completed``, ``excluded`` and ``voted_at``. By default only the votes of completed screens (final answers)."""
    with _scope(db) as session:
        _study(session, study_id)
        rows = _vote_rows(session, study_id)
    frame = pd.DataFrame(rows, columns=list(VOTES_FRAME_COLUMNS))
    frame["shown_position"] = frame["shown_position"].astype("Int64")
    return frame.loc[frame["completed"].astype(bool)].reset_index(drop=True) if completed_only else frame


def export_votes(db: str | Session, study_id: int, path: str | Path) -> int:
    """Write every stored vote (raw, completed screens or not) to ``path``: CSV (shown order as a JSON list) or
    Parquet (a list column), by the suffix. Returns the number of votes written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise StudyError(f"{path}: expected a .csv or .parquet file name")
    frame = votes_frame(db, study_id, completed_only=False).rename(
        columns={"chosen_method": "method", "shown_position": "position"}
    )[list(EXPORT_COLUMNS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.assign(shown_order=[json.dumps(o) for o in frame["shown_order"]]).to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return len(frame)


def set_excluded(
    db: str | Session,
    study_id: int,
    user_id: int,
    excluded: bool,
    reason: str | None = None,
    *,
    actor_id: int | None = None,
) -> None:
    """Exclude a participant from the results (a reason is required) or include them again."""
    if excluded and not (reason and reason.strip()):
        raise StudyError("excluding a participant needs a reason (e.g. 'failed 2 of 3 attention checks')")
    with _scope(db, write=True) as session:
        row = _enrolment(session, study_id, user_id, active=False)
        row.excluded = excluded
        row.exclusion_reason = reason.strip() if excluded and reason else None
        session.add(
            AuditLog(
                user_id=actor_id,
                action="study.exclude" if excluded else "study.include",
                entity="study",
                entity_id=str(study_id),
                details={"user_id": user_id, "reason": row.exclusion_reason},
            )
        )


def study_results(
    db: str | Session, study_id: int, n_boot: int = 1000, seed: int | None = None, **options: Any
) -> dict[str, Any]:
    """:func:`annotate.study_analysis.results` of the study's final votes with the recorded exclusions applied;
    ``seed`` defaults to the study's seed and ``options`` go to ``results`` (``min_median_latency_ms`` ...).
    Attention checks are scored on the study's first criterion (instruction following, where the obvious answer is
    obvious; an output that ignores the instruction may well preserve the background best) unless
    ``attention_criteria`` says otherwise. Adds ``study`` (id, name, status, criteria) and ``participants``
    (enrolled, finished) to the report."""
    with _scope(db) as session:
        study = _study(session, study_id)
        excluded = set(
            session.scalars(
                select(StudyParticipant.user_id).where(StudyParticipant.study_id == study_id, StudyParticipant.excluded)
            )
        )
        enrolled = (
            session.scalar(
                select(func.count()).select_from(StudyParticipant).where(StudyParticipant.study_id == study_id)
            )
            or 0
        )
        finished = (
            session.scalar(
                select(func.count())
                .select_from(StudyParticipant)
                .where(StudyParticipant.study_id == study_id, StudyParticipant.finished_at.is_not(None))
            )
            or 0
        )
        info = {"id": study.id, "name": study.name, "status": study.status.value, "criteria": list(study.criteria)}
        frame = votes_frame(session, study_id)
    options.setdefault("attention_criteria", info["criteria"][:1])
    report = study_analysis.results(
        frame, exclude=excluded, n_boot=n_boot, seed=study.seed if seed is None else seed, **options
    )
    return {"study": info, "participants": {"enrolled": int(enrolled), "finished": int(finished)}, **report}
