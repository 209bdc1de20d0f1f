"""Input readers of the ingest stage: SEED-Data-Edit multi-turn JSONL and a generic JSONL manifest.

Both readers are generators that yield, line by line, either a parsed :class:`RawInstance` or a
:class:`RecordError` naming the file, the 1-based line and what is wrong; one bad line never stops a run.
They check what can be checked without decoding images: JSON validity, required keys, turn numbering, empty
instructions, that every image file exists, and that external ids are unique within the run. Whether an image
file really decodes is the image store's job. The formats are described in ``docs/input-formats.md``.

:class:`IngestLimits` guards the edge: an image path (absolute, ``../``, or a symlink) must resolve inside the images
root unless ``allow_outside_root``, and instructions (and SEED's inverse instructions) and ``meta`` have size limits
(``MCIE_MAX_INSTRUCTION_CHARS``, ``MCIE_MAX_META_BYTES``); a record over them is reported by name, and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mcie.pipeline import seed_format as sf


@dataclass(frozen=True)
class RawTurn:
    """One edit turn: 1-based index, its instruction, and the image after the edit."""

    index: int
    instruction: str
    image: Path


@dataclass(frozen=True)
class RawInstance:
    """One multi-turn editing instance as read from an input file, before any image is decoded."""

    dataset: str
    external_id: str
    source_image: Path
    turns: tuple[RawTurn, ...]
    source_file: Path
    line: int
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    license: str | None = None  # the source dataset's licence (SPDX id), None when nobody stated one


@dataclass(frozen=True)
class RecordError:
    """A line that could not be read: file, 1-based line number and a human-readable reason."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class IngestLimits:
    """What one record may hold (see the module docstring); :meth:`from_settings` reads the ``MCIE_*`` values."""

    max_instruction_chars: int = 4000
    max_meta_bytes: int = 65536
    allow_outside_root: bool = False

    @classmethod
    def from_settings(cls, settings: Any, *, allow_outside_root: bool = False) -> IngestLimits:
        return cls(settings.max_instruction_chars, settings.max_meta_bytes, allow_outside_root)


def _size_problems(instructions: list[tuple[str, str]], meta: Mapping[str, Any], limits: IngestLimits) -> list[str]:
    """One problem per (label, text) longer than the limit, and for a ``meta`` larger than its limit as JSON."""
    problems = [
        f"{label} has {len(text)} characters (at most {limits.max_instruction_chars}, MCIE_MAX_INSTRUCTION_CHARS)"
        for label, text in instructions
        if len(text) > limits.max_instruction_chars
    ]
    size = len(json.dumps(meta, ensure_ascii=False, default=str).encode())
    if size > limits.max_meta_bytes:
        problems.append(f"meta is {size} bytes as JSON (at most {limits.max_meta_bytes}, MCIE_MAX_META_BYTES)")
    return problems


MANIFEST_KEYS = frozenset({"id", "dataset", "license", "source_image", "turns", "meta"})
MANIFEST_TURN_KEYS = frozenset({"instruction", "image"})


# --- shared line handling ------------------------------------------------------------------------------


def _decoded_lines(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | RecordError]]:
    """Yield (line number, JSON object or error) for each non-blank line of a JSONL file."""
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RecordError(path, number, f"not valid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(value, dict):
                yield number, RecordError(path, number, f"expected an object, got {type(value).__name__}")
                continue
            yield number, value


def _find_image(images_root: Path, relative: str, *, seed_layout: bool) -> Path | None:
    # Path("/abs") joined onto a root stays "/abs"; _locate then refuses it unless it lies inside the root.
    candidates = sf.image_candidates(images_root, relative) if seed_layout else (images_root / relative,)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _locate(
    images_root: Path, paths: list[tuple[str, str]], *, seed_layout: bool, allow_outside_root: bool = False
) -> tuple[dict[str, Path], list[str]]:
    """Resolve (key, relative path) pairs; return the found paths by key and one problem per missing file or per
    file outside ``images_root`` (unless ``allow_outside_root``)."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    root = images_root.resolve()
    for key, relative in paths:
        path = _find_image(images_root, relative, seed_layout=seed_layout)
        if path is None:
            problems.append(f"image not found: {relative} ({key}, looked under {images_root})")
        elif not allow_outside_root and not path.resolve().is_relative_to(root):
            problems.append(f"image outside the images root: {relative} ({key} resolves to {path.resolve()}, not "
                            f"under {root}; pass --allow-outside-root to accept it)")
        else:
            found[key] = path
    return found, problems


class _IdRegistry:
    """Remembers where each external id was first seen in this run."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[Path, int]] = {}

    def claim(self, dataset: str, external_id: str, path: Path, line: int) -> str | None:
        first = self._seen.get((dataset, external_id))
        if first is not None:
            return f"duplicate external id {external_id!r} (first seen at {first[0].name}:{first[1]})"
        self._seen[(dataset, external_id)] = (path, line)
        return None


# --- SEED-Data-Edit multi-turn ----------------------------------------------------------------------------


def seed_annotation_files(annotations: Path) -> tuple[list[Path], Path]:
    """The JSONL files to read and the layout root (the folder holding ``annotations/`` and ``images/``).

    ``annotations`` may be the layout root (``<root>/annotations/*.jsonl``), the annotations folder itself, or
    one ``.jsonl`` file.
    """
    if not annotations.exists():
        raise FileNotFoundError(f"SEED annotations not found: {annotations}")
    if annotations.is_file():
        root = (
            annotations.parent.parent if annotations.parent.name == sf.ANNOTATIONS_DIR else annotations.parent
        )
        return [annotations], root
    nested = annotations / sf.ANNOTATIONS_DIR
    if nested.is_dir():
        files, root = sorted(nested.glob(sf.ANNOTATION_GLOB)), annotations
    else:
        files, root = sorted(annotations.glob(sf.ANNOTATION_GLOB)), annotations.parent
    if not files:
        raise FileNotFoundError(
            f"no {sf.ANNOTATION_GLOB} files in {annotations} (expected annotations/split_0001.jsonl ...)"
        )
    return files, root


def read_seed_data_edit(
    annotations: Path, images_root: Path | None = None, limits: IngestLimits | None = None,
    license: str | None = sf.DATASET_LICENSE,
) -> Iterator[RawInstance | RecordError]:
    """Read SEED-Data-Edit Part-3 (multi-turn) annotation lines.

    ``annotations``: the ``multi_turn_editing`` folder, its ``annotations`` folder, or one ``.jsonl`` file.
    ``images_root``: folder the image paths are relative to; by default ``<root>/images/data`` when the
    archive has been extracted there, else ``<root>/images``. Files are read in name order. ``license``: recorded
    on every instance (SEED-Data-Edit's own by default; data in its layout but under other terms, like the demo's,
    states theirs).
    """
    files, layout_root = seed_annotation_files(Path(annotations))
    root = Path(images_root) if images_root is not None else sf.default_images_root(layout_root)
    registry = _IdRegistry()
    for path in files:
        for number, value in _decoded_lines(path):
            if isinstance(value, RecordError):
                yield value
                continue
            item = _seed_instance(value, path, number, root, registry, limits or IngestLimits())
            yield replace(item, license=license) if isinstance(item, RawInstance) else item


def _seed_instance(
    obj: Mapping[str, Any], path: Path, line: int, images_root: Path, registry: _IdRegistry, limits: IngestLimits
) -> RawInstance | RecordError:
    try:
        record = sf.parse_record(obj)
    except sf.SeedRecordError as exc:
        return RecordError(path, line, str(exc))
    wanted = [(sf.SOURCE_KEY, record.source_image)]
    wanted += [(sf.edit_image_key(turn.index), turn.edit_image) for turn in record.turns]
    texts = [(f"turn {t.index} instruction", t.instruction) for t in record.turns]
    texts += [(f"turn {t.index} inverse instruction", t.inverse_instruction) for t in record.turns
              if t.inverse_instruction]
    problems = _size_problems(texts, record.extra, limits)
    if problems:
        return RecordError(path, line, "; ".join(problems))
    found, problems = _locate(images_root, wanted, seed_layout=True, allow_outside_root=limits.allow_outside_root)
    if problems:
        return RecordError(path, line, "; ".join(problems))
    external_id = record.record_id or sf.external_id_from_source(record.source_image)
    duplicate = registry.claim(sf.DATASET_NAME, external_id, path, line)
    if duplicate is not None:
        return RecordError(path, line, duplicate)
    meta: dict[str, Any] = dict(record.extra)
    inverse = {str(t.index): t.inverse_instruction for t in record.turns if t.inverse_instruction}
    if inverse:
        meta["inverse_instructions"] = inverse
    meta["source_image_path"] = record.source_image
    return RawInstance(
        dataset=sf.DATASET_NAME,
        external_id=external_id,
        source_image=found[sf.SOURCE_KEY],
        turns=tuple(RawTurn(t.index, t.instruction, found[sf.edit_image_key(t.index)]) for t in record.turns),
        source_file=path,
        line=line,
        meta=meta,
    )


# --- generic manifest ------------------------------------------------------------------------------------


def read_jsonl_manifest(
    path: Path, images_root: Path | None = None, limits: IngestLimits | None = None, license: str | None = None
) -> Iterator[RawInstance | RecordError]:
    """Read a generic JSONL manifest (one instance per line, see ``docs/input-formats.md``).

    Relative image paths are resolved against ``images_root``, by default the manifest's folder. The dataset
    name defaults to the manifest's file name without extension, the licence to ``license`` (a line's own
    ``license`` wins).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = Path(images_root) if images_root is not None else path.parent
    registry = _IdRegistry()
    for number, value in _decoded_lines(path):
        if isinstance(value, RecordError):
            yield value
            continue
        item = _manifest_instance(value, path, number, root, registry, limits or IngestLimits())
        if isinstance(item, RawInstance) and item.license is None:
            item = replace(item, license=license)
        yield item


def _manifest_text(
    obj: Mapping[str, Any], key: str, problems: list[str], where: str = "", *, allow_int: bool = False
) -> str | None:
    value = obj.get(key)
    label = f"{where}{key}"
    if value is None:
        problems.append(f"{label} is missing")
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        expected = "a string or an integer" if allow_int else "a string"
        problems.append(f"{label} must be {expected}, got {type(value).__name__}")
        return None
    text = str(value).strip()
    if not text:
        problems.append(f"{label} is empty")
        return None
    return text


def _manifest_instance(
    obj: Mapping[str, Any], path: Path, line: int, images_root: Path, registry: _IdRegistry, limits: IngestLimits
) -> RawInstance | RecordError:
    problems: list[str] = []
    unknown = sorted(set(obj) - MANIFEST_KEYS)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (expected {', '.join(sorted(MANIFEST_KEYS))})")
    external_id = _manifest_text(obj, "id", problems, allow_int=True)
    source = _manifest_text(obj, "source_image", problems)
    dataset = path.stem
    if obj.get("dataset") is not None:
        dataset = _manifest_text(obj, "dataset", problems) or dataset
    stated_license = _manifest_text(obj, "license", problems) if obj.get("license") is not None else None
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        problems.append(f"meta must be an object, got {type(meta).__name__}")
        meta = {}

    turns_raw = obj.get("turns")
    turn_texts: list[tuple[int, str, str]] = []
    if turns_raw is None:
        problems.append("turns is missing")
    elif not isinstance(turns_raw, list):
        problems.append(f"turns must be a list, got {type(turns_raw).__name__}")
    elif not turns_raw:
        problems.append("turns is empty: expected at least 1 turn")
    else:
        for index, turn in enumerate(turns_raw, start=1):
            where = f"turns[{index}]."
            if not isinstance(turn, dict):
                problems.append(f"turns[{index}] must be an object, got {type(turn).__name__}")
                continue
            extra = sorted(set(turn) - MANIFEST_TURN_KEYS)
            if extra:
                problems.append(
                    f"turns[{index}] has unknown key(s) {', '.join(extra)} (expected instruction, image)"
                )
            instruction = _manifest_text(turn, "instruction", problems, where)
            image = _manifest_text(turn, "image", problems, where)
            if instruction is not None and image is not None:
                turn_texts.append((index, instruction, image))
    problems += _size_problems([(f"turns[{i}].instruction", text) for i, text, _ in turn_texts], meta, limits)
    if problems:
        return RecordError(path, line, "; ".join(problems))
    assert source is not None and external_id is not None

    wanted = [("source_image", source)] + [(f"turns[{i}].image", image) for i, _, image in turn_texts]
    found, missing = _locate(images_root, wanted, seed_layout=False, allow_outside_root=limits.allow_outside_root)
    if missing:
        return RecordError(path, line, "; ".join(missing))
    duplicate = registry.claim(dataset, external_id, path, line)
    if duplicate is not None:
        return RecordError(path, line, duplicate)
    return RawInstance(
        dataset=dataset,
        external_id=external_id,
        source_image=found["source_image"],
        turns=tuple(RawTurn(i, text, found[f"turns[{i}].image"]) for i, text, _ in turn_texts),
        source_file=path,
        line=line,
        meta=dict(meta),
        license=stated_license,
    )
