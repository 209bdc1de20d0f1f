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

A study can also be made from review samples and the model's finished ``previews`` rows
(:func:`create_study_from_previews`: the window source and the sample's instruction per item, one model version per
method, optionally the ground truth as ``reference``), checked as thoroughly as a folder. For the web app
(:mod:`annotate.web`): :func:`invite_problem` says why a link does not work, :func:`participant_study` finds
the study of a participant who logs in with a password, :func:`may_see_image` limits a participant to the images of
their own items, :func:`upcoming_images` lets the screen warm the browser's cache, and :func:`list_studies`,
:func:`resolve_study` and :func:`resolve_participant` serve the CLI and the leads' pages. A vote on the current screen
takes one read (:func:`_open_screen`) and locks the screen's row on PostgreSQL, so it cannot cross an
:func:`advance` of the same screen.

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
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased

from annotate import study_analysis, study_design
from annotate.accounts import check_username, create_user
from db.models import (
    AuditLog,
    Instance,
    JobStatus,
    Preview,
    Role,
    Sample,
    Study,
    StudyAssignment,
    StudyItem,
    StudyOutput,
    StudyParticipant,
    StudyStatus,
    Turn,
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


@dataclass(frozen=True)
class _PreviewPick:
    image: str | None
    problem: str | None
    n_candidates: int


def _window_images(session: Session, samples: Sequence[Sample]) -> dict[int, tuple[str | None, str | None]]:
    """``sample id -> (window source, ground-truth target)``: the image before the window's first turn (the
    instance's source for turn 1) and the result of its last turn."""
    instance_ids = {s.instance_id for s in samples}
    sources = dict(
        session.execute(select(Instance.id, Instance.source_image).where(Instance.id.in_(instance_ids))).all()
    )
    results = {
        (instance_id, index): image
        for instance_id, index, image in session.execute(
            select(Turn.instance_id, Turn.index, Turn.result_image).where(Turn.instance_id.in_(instance_ids))
        )
    }
    return {
        s.id: (
            sources.get(s.instance_id) if s.first_turn == 1 else results.get((s.instance_id, s.first_turn - 1)),
            results.get((s.instance_id, s.last_turn)),
        )
        for s in samples
    }


def _pick_preview(rows: Sequence[Preview], sample_id: int, method: str, version: str) -> _PreviewPick:
    """The newest finished preview among ``rows`` (one sample and model version), or why there is none."""
    done = [r for r in rows if r.status is JobStatus.done and r.image is not None]
    if done:
        best = max(done, key=lambda r: (r.finished_at or r.created_at, r.id))
        return _PreviewPick(best.image, None, len(done))
    what = f"sample {sample_id}: no finished preview for method {method!r} (model version {version!r})"
    if not rows:
        return _PreviewPick(None, f"{what}: none was requested", 0)
    states = Counter(r.status.value for r in rows)
    found = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    errors = sorted({r.error.strip().splitlines()[0][:120] for r in rows if r.error and r.error.strip()})
    detail = f"; last errors: {'; '.join(errors[:3])}" if errors else ""
    return _PreviewPick(None, f"{what}: found {found}{detail}", 0)


def _method_versions(methods: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(methods, Mapping):
        return {str(k): str(v) for k, v in methods.items()}
    if isinstance(methods, str):
        raise StudyError("methods must be a list of model versions or a mapping method name -> model version")
    return {str(m): str(m) for m in methods}


def create_study_from_previews(
    db: str | Session,
    name: str,
    sample_ids: Sequence[int],
    methods: Sequence[str] | Mapping[str, str],
    *,
    reference: bool = False,
    reference_name: str = "reference",
    preview_seed: int | None = None,
    attention_checks: Mapping[int, str] | None = None,
    items_per_participant: int = 100,
    seed: int = 0,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    description: str | None = None,
    status: StudyStatus = StudyStatus.open,
    actor_id: int | None = None,
) -> StudyReport:
    """Create a study whose items are review samples and whose outputs are the model's finished previews.

    Each sample becomes an item (``external_id`` ``sample-<id>``, linked by ``sample_id``): its source image is the
    sample's window source (the image before its first turn) and its instruction the sample's complex instruction.
    ``methods`` names the model versions (``previews.model_version``) to compare - a list (the versions are the
    method names) or a mapping ``method name -> model version``; each item takes, per method, the newest finished
    preview of that sample and version (of ``preview_seed`` only, when given; a warning says when several were
    finished). ``reference=True`` adds the sample's ground-truth target (its last turn's result) as the method
    ``reference_name``. ``attention_checks`` maps a sample id to the method that is its obvious answer.

    Everything is checked before anything is written: every sample that does not exist or lacks an image, and every
    (sample, method) without a finished preview (with what was found instead: queued, running, failed and the
    error), are reported together in one :class:`StudyPreviewsError`, and no study is created.
    """
    criteria = _check_criteria(criteria)
    if not name or not name.strip() or len(name) > 128:
        raise StudyError(f"a study name must have 1-128 characters; got {name!r}")
    versions = _method_versions(methods)
    problems: list[str] = []
    warnings: list[str] = []
    names = [*versions, *([reference_name] if reference else [])]
    for method in names:
        if not METHOD_RE.fullmatch(method):
            problems.append(
                f"method name {method!r} must be 1-64 letters, digits, '_.+-' (name a model version with "
                "methods={name: model_version})"
            )
    if reference and reference_name in versions:
        problems.append(f"method name {reference_name!r} is taken by the ground-truth reference; pick another")
    duplicated = sorted(v for v, n in Counter(versions.values()).items() if n > 1)
    if duplicated:
        problems.append(f"model version(s) {', '.join(map(repr, duplicated))} given under more than one method name")
    if len(set(names)) < 2:
        problems.append(f"a study needs at least two methods (got {names or 'none'}; reference=True adds one)")
    if len(set(names)) > len(LABELS):
        problems.append(f"at most {len(LABELS)} methods can be labelled A-Z (got {len(set(names))})")
    ids = [int(i) for i in sample_ids]
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if not ids:
        problems.append("no sample ids given")
    if repeated:
        problems.append(f"sample id(s) given more than once: {', '.join(map(str, repeated))}")
    attention = {int(k): str(v) for k, v in (attention_checks or {}).items()}
    for sample_id, answer in sorted(attention.items()):
        if sample_id not in ids:
            problems.append(f"attention check on sample {sample_id}, which is not among the study's samples")
        if answer not in names:
            problems.append(f"attention check of sample {sample_id}: {answer!r} is not one of the methods {names}")
    order = list(dict.fromkeys(ids))
    with _scope(db, write=True) as session:
        samples = {s.id: s for s in session.scalars(select(Sample).where(Sample.id.in_(order)))}
        problems.extend(f"sample {i}: no such sample" for i in order if i not in samples)
        windows = _window_images(session, list(samples.values()))
        stmt = select(Preview).where(Preview.sample_id.in_(order), Preview.model_version.in_(set(versions.values())))
        if preview_seed is not None:
            stmt = stmt.where(Preview.seed == preview_seed)
        found: dict[tuple[int, str], list[Preview]] = {}
        for row in session.scalars(stmt):
            found.setdefault((row.sample_id, row.model_version), []).append(row)
        outputs: dict[int, dict[str, str]] = {}
        for sample_id in order:
            if sample_id not in samples:
                continue
            source, target = windows[sample_id]
            if source is None:
                problems.append(
                    f"sample {sample_id}: its window source image (before turn "
                    f"{samples[sample_id].first_turn}) is missing"
                )
            picked: dict[str, str] = {}
            for method, version in versions.items():
                pick = _pick_preview(found.get((sample_id, version), []), sample_id, method, version)
                if pick.problem:
                    problems.append(pick.problem)
                elif pick.image is not None:
                    picked[method] = pick.image
                    if pick.n_candidates > 1:
                        warnings.append(
                            f"sample {sample_id}: {pick.n_candidates} finished previews of {method!r}; "
                            "took the newest (pass preview_seed to choose)"
                        )
            if reference:
                if target is None:
                    problems.append(
                        f"sample {sample_id}: its ground-truth target (turn {samples[sample_id].last_turn}) is missing"
                    )
                else:
                    picked[reference_name] = target
            outputs[sample_id] = picked
        attention_index = [k for k, sample_id in enumerate(order) if sample_id in attention]
        if not problems:
            try:  # validates items_per_participant and seed against the items
                study_design.design(len(order), len(names), 0, items_per_participant, seed, attention_index)
            except ValueError as exc:
                problems.append(str(exc))
        if session.scalar(select(Study.id).where(Study.name == name)) is not None:
            problems.append(f"a study named {name!r} already exists")
        if problems:
            raise StudyPreviewsError(problems)
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
        images: set[str] = set()
        for sample_id in order:
            sample = samples[sample_id]
            source = windows[sample_id][0]
            assert source is not None
            row = StudyItem(
                study_id=study.id,
                external_id=f"sample-{sample_id}",
                source_image=source,
                instruction=sample.instruction,
                sample_id=sample_id,
                is_attention_check=sample_id in attention,
                attention_answer=attention.get(sample_id),
            )
            session.add(row)
            session.flush()
            session.add_all(StudyOutput(item_id=row.id, method=m, image=img) for m, img in outputs[sample_id].items())
            images |= {source, *outputs[sample_id].values()}
        session.add(
            AuditLog(
                user_id=actor_id,
                action="study.create",
                entity="study",
                entity_id=str(study.id),
                details={
                    "name": name,
                    "from": "previews",
                    "samples": order,
                    "methods": versions,
                    "reference": reference_name if reference else None,
                },
            )
        )
        return StudyReport(
            study.id,
            name,
            "previews",
            len(order),
            len(attention_index),
            tuple(sorted(names)),
            criteria,
            items_per_participant,
            len(images),
            tuple(warnings),
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
        raise StudyAccessError(f"user {user_id} is not enrolled in study {study_id}")
    if active and row.revoked_at is not None:
        raise StudyAccessError(f"the invitation of user {user_id} to study {study_id} was revoked")
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
            from annotate.web.sessions import revoke_user

            revoke_user(session, user_id, "invitation revoked", study_id=study_id)  # the link's session ends now
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


INVITE_UNKNOWN = (
    "This invitation link is not valid. Please check that you opened the whole link, or ask the study's organisers "
    "for a new one."
)
INVITE_REVOKED = "This invitation link was withdrawn by the study's organisers, so it no longer opens the study."
INVITE_DISABLED = "The account of this invitation is disabled. Please contact the study's organisers."
INVITE_DRAFT = "This study has not started yet. Please open your link again later."
INVITE_CLOSED = "This study is closed. Thank you for your interest!"


def invite_problem(db: str | Session, token: str) -> str | None:
    """Why an invite token does not open its study, as a sentence for the participant (unknown, withdrawn, account
    disabled, study not started or closed); None when it works (:func:`participant_from_token` returns its ids)."""
    if not token:
        return INVITE_UNKNOWN
    with _scope(db) as session:
        found = session.execute(
            select(StudyParticipant.revoked_at, Study.status, User.active)
            .join(Study, Study.id == StudyParticipant.study_id)
            .join(User, User.id == StudyParticipant.user_id)
            .where(StudyParticipant.invite_token_hash == _hash_token(token))
        ).first()
    if found is None:
        return INVITE_UNKNOWN
    revoked_at, status, active = found
    if revoked_at is not None:
        return INVITE_REVOKED
    if not active:
        return INVITE_DISABLED
    if status is StudyStatus.draft:
        return INVITE_DRAFT
    if status is StudyStatus.closed:
        return INVITE_CLOSED
    return None


def participant_study(db: str | Session, user_id: int) -> int | None:
    """The open study the user takes part in (invitation not revoked), the first unfinished one by enrolment, else
    the first finished one; None when there is none (for a participant who logs in with a password)."""
    with _scope(db) as session:
        rows = session.execute(
            select(StudyParticipant.study_id, StudyParticipant.finished_at)
            .join(Study, Study.id == StudyParticipant.study_id)
            .where(
                StudyParticipant.user_id == user_id,
                StudyParticipant.revoked_at.is_(None),
                Study.status == StudyStatus.open,
            )
            .order_by(StudyParticipant.id)
        ).all()
    unfinished = [study_id for study_id, finished in rows if finished is None]
    return (unfinished or [study_id for study_id, _ in rows] or [None])[0]


def may_see_image(db: str | Session, user_id: int, sha256: str, study_id: int | None = None) -> bool:
    """Whether ``sha256`` is the source image or an output of an item in the user's own sequence (of ``study_id``
    only, when given) while their invitation stands: what a participant may load."""
    with _scope(db) as session:
        items = (
            select(StudyAssignment.item_id)
            .join(
                StudyParticipant,
                (StudyParticipant.study_id == StudyAssignment.study_id)
                & (StudyParticipant.user_id == StudyAssignment.participant_id),
            )
            .where(StudyAssignment.participant_id == user_id, StudyParticipant.revoked_at.is_(None))
        )
        if study_id is not None:
            items = items.where(StudyAssignment.study_id == study_id)
        source = select(StudyItem.id).where(StudyItem.id.in_(items), StudyItem.source_image == sha256)
        output = select(StudyOutput.id).where(StudyOutput.item_id.in_(items), StudyOutput.image == sha256)
        return bool(session.scalar(select(exists(source) | exists(output))))


def upcoming_images(db: str | Session, study_id: int, user_id: int, after_position: int, n: int = 1) -> list[str]:
    """The images of the participant's next ``n`` screens after ``after_position`` (to warm the browser's cache);
    never method names."""
    with _scope(db) as session:
        item_ids = list(
            session.scalars(
                select(StudyAssignment.item_id)
                .where(
                    StudyAssignment.study_id == study_id,
                    StudyAssignment.participant_id == user_id,
                    StudyAssignment.position > after_position,
                    StudyAssignment.completed_at.is_(None),
                )
                .order_by(StudyAssignment.position)
                .limit(n)
            )
        )
        if not item_ids:
            return []
        sources = list(session.scalars(select(StudyItem.source_image).where(StudyItem.id.in_(item_ids))))
        outputs = list(session.scalars(select(StudyOutput.image).where(StudyOutput.item_id.in_(item_ids))))
    return list(dict.fromkeys([*sources, *outputs]))


@dataclass(frozen=True)
class StudySummary:
    id: int
    name: str
    status: str
    n_items: int
    methods: tuple[str, ...]
    criteria: tuple[str, ...]
    items_per_participant: int
    enrolled: int
    finished: int
    created_at: datetime


def list_studies(db: str | Session) -> list[StudySummary]:
    """Every study, newest first, with its item count, methods and how many participants enrolled and finished."""
    with _scope(db) as session:
        studies = list(session.scalars(select(Study).order_by(Study.id.desc())))
        n_items = dict(session.execute(select(StudyItem.study_id, func.count()).group_by(StudyItem.study_id)).all())
        methods: dict[int, set[str]] = {}
        pairs = select(StudyItem.study_id, StudyOutput.method).join(StudyItem, StudyItem.id == StudyOutput.item_id)
        for study_id, method in session.execute(pairs.distinct()):
            methods.setdefault(study_id, set()).add(method)
        enrolled = dict(
            session.execute(select(StudyParticipant.study_id, func.count()).group_by(StudyParticipant.study_id)).all()
        )
        finished = dict(
            session.execute(
                select(StudyParticipant.study_id, func.count())
                .where(StudyParticipant.finished_at.is_not(None))
                .group_by(StudyParticipant.study_id)
            ).all()
        )
        return [
            StudySummary(
                s.id,
                s.name,
                s.status.value,
                int(n_items.get(s.id, 0)),
                tuple(sorted(methods.get(s.id, ()))),
                tuple(s.criteria),
                s.items_per_participant,
                int(enrolled.get(s.id, 0)),
                int(finished.get(s.id, 0)),
                s.created_at,
            )
            for s in studies
        ]


def resolve_study(db: str | Session, key: str | int) -> int:
    """The id of the study named ``key``, or with the id ``key`` (a number); StudyError when there is none."""
    with _scope(db) as session:
        text = str(key).strip()
        found = session.scalar(select(Study.id).where(Study.name == text))
        if found is None and text.isdigit():
            found = session.scalar(select(Study.id).where(Study.id == int(text)))
        if found is None:
            raise StudyError(f"no study named or numbered {text!r}")
        return int(found)


def resolve_participant(db: str | Session, study_id: int, key: str | int) -> int:
    """The user id of the study's participant with the username ``key``, or the user id ``key`` (a number)."""
    with _scope(db) as session:
        text = str(key).strip()
        enrolled = select(StudyParticipant.user_id).where(StudyParticipant.study_id == study_id)
        found = session.scalar(select(User.id).where(User.username == text.lower(), User.id.in_(enrolled)))
        if found is None and text.isdigit():
            found = session.scalar(select(User.id).where(User.id == int(text), User.id.in_(enrolled)))
        if found is None:
            raise StudyAccessError(f"no participant {text!r} in study {study_id}")
        return int(found)


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
        raise StudyNotOpenError(f"study {study_id} ({study.name}) is {study.status.value}, not open", study.status)
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
        screen = quick_current_item(session, study_id, user_id)
        if screen is not None:  # the usual case: three reads
            return screen
        study = _open_study(session, study_id)
        _enrolment(session, study_id, user_id)
        total = _assignment_count(session, study_id, user_id)
        if total:  # the usual case: one transaction
            return _screen(session, study, user_id, total)
    assign_participant(db, study_id, user_id)
    with _scope(db) as session:
        study = _open_study(session, study_id)
        return _screen(session, study, user_id, _assignment_count(session, study_id, user_id))


def quick_current_item(session: Session, study_id: int, user_id: int) -> ItemScreen | None:
    """The current screen in three reads when the study is open, the invitation stands and a screen is left; None
    otherwise (:func:`current_item` then assigns the sequence, says the participant is done, or why they cannot go
    on)."""
    total = (
        select(func.count())
        .select_from(StudyAssignment)
        .where(StudyAssignment.study_id == study_id, StudyAssignment.participant_id == user_id)
        .scalar_subquery()
    )
    row = session.execute(
        select(
            StudyAssignment.id,
            StudyAssignment.position,
            StudyAssignment.shown_order,
            StudyItem.id.label("item_id"),
            StudyItem.instruction,
            StudyItem.source_image,
            Study.criteria,
            total.label("total"),
        )
        .join(StudyItem, StudyItem.id == StudyAssignment.item_id)
        .join(Study, Study.id == StudyAssignment.study_id)
        .join(
            StudyParticipant,
            (StudyParticipant.study_id == StudyAssignment.study_id)
            & (StudyParticipant.user_id == StudyAssignment.participant_id),
        )
        .where(
            StudyAssignment.study_id == study_id,
            StudyAssignment.participant_id == user_id,
            StudyAssignment.completed_at.is_(None),
            Study.status == StudyStatus.open,
            StudyParticipant.revoked_at.is_(None),
        )
        .order_by(StudyAssignment.position)
        .limit(1)
    ).first()
    if row is None:
        return None
    images = dict(
        session.execute(select(StudyOutput.method, StudyOutput.image).where(StudyOutput.item_id == row.item_id)).all()
    )
    votes = session.execute(select(Vote.criterion, Vote.shown_position).where(Vote.assignment_id == row.id))
    return ItemScreen(
        study_id=study_id,
        item_id=row.item_id,
        position=row.position,
        total=int(row.total),
        instruction=row.instruction,
        source_image=row.source_image,
        outputs=tuple(ScreenOutput(LABELS[k], images[m]) for k, m in enumerate(row.shown_order)),
        criteria=tuple(row.criteria),
        choices={c: None if pos is None else LABELS[pos - 1] for c, pos in votes},
    )


def _screen(session: Session, study: Study, user_id: int, total: int) -> ItemScreen | None:
    assignment = _current(session, study.id, user_id)
    if assignment is None:
        return None
    item = session.get(StudyItem, assignment.item_id)
    assert item is not None
    outputs = session.execute(select(StudyOutput.method, StudyOutput.image).where(StudyOutput.item_id == item.id))
    images = {method: image for method, image in outputs}
    votes = session.execute(select(Vote.criterion, Vote.shown_position).where(Vote.assignment_id == assignment.id))
    return ItemScreen(
        study_id=study.id,
        item_id=item.id,
        position=assignment.position,
        total=total,
        instruction=item.instruction,
        source_image=item.source_image,
        outputs=tuple(ScreenOutput(LABELS[k], images[m]) for k, m in enumerate(assignment.shown_order)),
        criteria=tuple(study.criteria),
        choices={c: None if pos is None else LABELS[pos - 1] for c, pos in votes},
    )


def participant_progress(db: str | Session, study_id: int, user_id: int) -> Progress:
    """How far the participant is: screens completed, screens in their sequence, and whether they finished."""
    with _scope(db) as session:
        enrolment = _enrolment(session, study_id, user_id, active=False)
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
        return Progress(int(done), int(total), enrolment.finished_at is not None)


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


@dataclass(frozen=True)
class _OpenScreen:
    assignment_id: int
    position: int
    order: list[str]
    criteria: list[str]


def _open_screen(session: Session, study_id: int, user_id: int, item_id: int) -> _OpenScreen | None:
    """The participant's current screen when it shows ``item_id`` and everything allows a change to it - the study is
    open, the invitation stands, the screen is not completed and none before it is open - in one read (the vote
    path's hot spot); None when any check fails (the callers then find out which with the detailed checks).

    On PostgreSQL the assignment row stays locked until the transaction ends, so a vote and the :func:`advance` of
    the same screen never cross: whichever comes second waits, and reads the row again after the lock (a vote that
    waited for an advance finds the screen completed and is refused)."""
    earlier = aliased(StudyAssignment)
    open_before = (
        select(earlier.id)
        .where(
            earlier.study_id == study_id,
            earlier.participant_id == user_id,
            earlier.completed_at.is_(None),
            earlier.position < StudyAssignment.position,
        )
        .exists()
    )
    row = session.execute(
        select(StudyAssignment.id, StudyAssignment.position, StudyAssignment.shown_order, Study.criteria)
        .join(Study, Study.id == StudyAssignment.study_id)
        .join(
            StudyParticipant,
            (StudyParticipant.study_id == StudyAssignment.study_id)
            & (StudyParticipant.user_id == StudyAssignment.participant_id),
        )
        .where(
            StudyAssignment.study_id == study_id,
            StudyAssignment.participant_id == user_id,
            StudyAssignment.item_id == item_id,
            StudyAssignment.completed_at.is_(None),
            Study.status == StudyStatus.open,
            StudyParticipant.revoked_at.is_(None),
            ~open_before,
        )
        .with_for_update(of=StudyAssignment)
    ).first()
    if row is None:
        return None
    return _OpenScreen(int(row.id), int(row.position), list(row.shown_order), list(row.criteria))


def _checked_screen(session: Session, study_id: int, user_id: int, item_id: int) -> _OpenScreen:
    """:func:`_open_screen`, or the StudyError that says why the screen cannot change."""
    screen = _open_screen(session, study_id, user_id, item_id)
    if screen is not None:
        return screen
    study = _open_study(session, study_id)
    _enrolment(session, study_id, user_id)
    assignment = _editable_assignment(session, study_id, user_id, item_id)
    return _OpenScreen(assignment.id, assignment.position, list(assignment.shown_order), list(study.criteria))


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
        screen = _checked_screen(session, study_id, user_id, item_id)
        if criterion not in screen.criteria:
            raise StudyError(f"unknown criterion {criterion!r}: study {study_id} asks for {', '.join(screen.criteria)}")
        order = screen.order
        output_id: Any = None
        position = None
        if choice_label is not None:
            if choice_label not in LABELS[: len(order)]:
                raise StudyError(
                    f"unknown choice {choice_label!r}: expected one of {', '.join(LABELS[: len(order)])} "
                    "or None (none acceptable)"
                )
            position = LABELS.index(choice_label) + 1
            output_id = (  # looked up by the insert itself: one statement less on the vote path
                select(StudyOutput.id)
                .where(StudyOutput.item_id == item_id, StudyOutput.method == order[position - 1])
                .scalar_subquery()
            )
        insert = (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(Vote).values(
            assignment_id=screen.assignment_id,
            participant_id=user_id,
            item_id=item_id,
            criterion=criterion,
            chosen_output_id=output_id,
            shown_position=position,
            shown_order=order,
            latency_ms=latency_ms,
        )
        changed = ("chosen_output_id", "shown_position", "shown_order", "latency_ms")
        session.execute(
            insert.on_conflict_do_update(
                index_elements=["participant_id", "item_id", "criterion"],
                set_={**{k: insert.excluded[k] for k in changed}, "updated_at": utcnow()},
            )
        )


def advance(db: str | Session, study_id: int, user_id: int, item_id: int) -> Progress:
    """Complete the current screen (a vote on every criterion is required) and move on; after the last screen the
    participant is marked finished."""
    with _scope(db, write=True) as session:
        screen = _checked_screen(session, study_id, user_id, item_id)
        voted = set(session.scalars(select(Vote.criterion).where(Vote.assignment_id == screen.assignment_id)))
        missing = [c for c in screen.criteria if c not in voted]
        if missing:
            raise StudyError(f"item {item_id} (screen {screen.position}) still needs a vote on: {', '.join(missing)}")
        session.execute(
            update(StudyAssignment)
            .where(StudyAssignment.id == screen.assignment_id)
            .values(completed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        total, done = session.execute(
            select(func.count(), func.count(StudyAssignment.completed_at)).where(
                StudyAssignment.study_id == study_id, StudyAssignment.participant_id == user_id
            )
        ).one()
        if done == total:
            session.execute(
                update(StudyParticipant)
                .where(
                    StudyParticipant.study_id == study_id,
                    StudyParticipant.user_id == user_id,
                    StudyParticipant.finished_at.is_(None),
                )
                .values(finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        return Progress(int(done), int(total), done == total)


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
