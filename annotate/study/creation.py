"""Creating a user study: from a folder of items and method outputs, or from review samples and model previews;
opening and closing it (:func:`set_study_status`). See :mod:`annotate.study` for the folder layout."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.annotate import study_design
from mcie.annotate.study.common import (
    CRITERION_RE,
    DEFAULT_CRITERIA,
    ITEM_FIELDS,
    ITEM_ID_RE,
    ITEMS_FILE,
    LABELS,
    METHOD_RE,
    OUTPUT_SUFFIX,
    StudyError,
    StudyFolderError,
    StudyPreviewsError,
    StudyReport,
    get_study,
)
from mcie.db.models import (
    AuditLog,
    Instance,
    JobStatus,
    Preview,
    Sample,
    Study,
    StudyItem,
    StudyOutput,
    StudyStatus,
    Turn,
)
from mcie.db.session import require_write, session_scope
from mcie.db.store import ImageRejected, ImageStore, StoredImage, register_images, validate_image
from mcie.db.windows import window_images


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
    url: str,
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
    """Create a study from ``folder`` (layout in the module docstring); refuses, listing every problem, on any gap.

    Runs its own transactions on the database ``url``: a read that the name is free, then - outside any transaction,
    so no database lock is held while the files are copied - the images are stored, then one write transaction
    inserts the study (checking the name again)."""
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
    with session_scope(url) as session:
        if session.scalar(select(Study.id).where(Study.name == name)) is not None:
            raise StudyError(f"a study named {name!r} already exists")
    stored: dict[Path, StoredImage] = {}  # stored before the write transaction, so it holds no lock meanwhile
    for item in items:
        for path in _item_paths(folder, item, found):
            if path not in stored:
                stored[path] = store.put_file(path)
    with session_scope(url, write=True) as session:
        if session.scalar(select(Study.id).where(Study.name == name)) is not None:
            raise StudyError(f"a study named {name!r} already exists")
        register_images(session, stored.values())
        study = _insert_study(session, name, description, status, items_per_participant, criteria, seed, actor_id)
        for item in items:
            _insert_item(
                session,
                StudyItem(
                    study_id=study.id,
                    external_id=item.id,
                    source_image=stored[folder / item.source_image].sha256,
                    instruction=item.instruction,
                    is_attention_check=item.attention_check is not None,
                    attention_answer=item.attention_check,
                ),
                {m: stored[folder / m / f"{item.id}{OUTPUT_SUFFIX}"].sha256 for m in found},
            )
        details = {"name": name, "folder": str(folder), "items": len(items), "methods": found}
        _audit_create(session, actor_id, study.id, details)
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


def _insert_study(
    session: Session,
    name: str,
    description: str | None,
    status: StudyStatus,
    items_per_participant: int,
    criteria: Sequence[str],
    seed: int,
    actor_id: int | None,
) -> Study:
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
    return study


def _insert_item(session: Session, item: StudyItem, outputs: Mapping[str, str]) -> None:
    """Add ``item`` and its outputs (method -> image sha256)."""
    session.add(item)
    session.flush()
    session.add_all(StudyOutput(item_id=item.id, method=m, image=image) for m, image in outputs.items())


def _audit_create(session: Session, actor_id: int | None, study_id: int, details: dict[str, Any]) -> None:
    audit = AuditLog(user_id=actor_id, action="study.create", entity="study", entity_id=str(study_id), details=details)
    session.add(audit)


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
    by_instance: dict[int, dict[int, str]] = {}
    for instance_id, index, image in session.execute(
        select(Turn.instance_id, Turn.index, Turn.result_image).where(Turn.instance_id.in_(instance_ids))
    ):
        by_instance.setdefault(instance_id, {})[index] = image
    windows = {
        s.id: window_images(sources.get(s.instance_id), by_instance.get(s.instance_id, {}), s.first_turn, s.last_turn)
        for s in samples
    }
    return {sample_id: (w.source[1], w.target[1]) for sample_id, w in windows.items()}


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
    session: Session,
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
    require_write(session, "create_study_from_previews")
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
    study = _insert_study(session, name, description, status, items_per_participant, criteria, seed, actor_id)
    images: set[str] = set()
    for sample_id in order:
        sample = samples[sample_id]
        source = windows[sample_id][0]
        assert source is not None
        item = StudyItem(
            study_id=study.id,
            external_id=f"sample-{sample_id}",
            source_image=source,
            instruction=sample.instruction,
            sample_id=sample_id,
            is_attention_check=sample_id in attention,
            attention_answer=attention.get(sample_id),
        )
        _insert_item(session, item, outputs[sample_id])
        images |= {source, *outputs[sample_id].values()}
    details = {
        "name": name,
        "from": "previews",
        "samples": order,
        "methods": versions,
        "reference": reference_name if reference else None,
    }
    _audit_create(session, actor_id, study.id, details)
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
    session: Session, study_id: int, status: StudyStatus | str, *, actor_id: int | None = None
) -> None:
    """Open, close or re-draft a study; participants can vote only while it is open."""
    require_write(session, "set_study_status")
    try:
        status = StudyStatus(status)
    except ValueError:
        raise StudyError(f"unknown study status {status!r}: expected one of {[s.value for s in StudyStatus]}") from None
    get_study(session, study_id).status = status
    session.add(
        AuditLog(
            user_id=actor_id,
            action="study.status",
            entity="study",
            entity_id=str(study_id),
            details={"status": status.value},
        )
    )
