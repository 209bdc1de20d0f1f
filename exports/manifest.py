"""The export's ``manifest.json``: what was exported, how, from which database revision, and every file's sha256.

The manifest is written last, into the temporary folder, just before the folder is renamed into place; a folder
without ``manifest.json`` is therefore never a complete export. It holds no timestamp and no export id (those live in
the ``exports`` row), so the same database state and options give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mcie.exports.writers import FileEntry, sha256_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def resolve_hashes(root: Path, entries: Iterable[FileEntry]) -> list[FileEntry]:
    """The entries sorted by path, with the missing hashes computed from the files under ``root``."""
    out = [e if e.sha256 is not None else FileEntry(e.path, sha256_file(root / e.path), e.size) for e in entries]
    return sorted(out, key=lambda e: e.path)


def build_manifest(
    *,
    fmt: str,
    schema_version: int,
    filter_json: Mapping[str, Any],
    options: Mapping[str, Any],
    counts: Mapping[str, int],
    split_files: Mapping[str, list[str]],
    files: Iterable[FileEntry],
    db_revision: str | None,
) -> dict[str, Any]:
    """The manifest as data (``files`` must carry their hashes; see :func:`resolve_hashes`)."""
    listed = sorted(files, key=lambda e: e.path)
    if any(e.sha256 is None for e in listed):
        raise ValueError("every file of the manifest needs its sha256 (call resolve_hashes first)")
    return {
        "manifest_version": MANIFEST_VERSION,
        "record_schema_version": schema_version,
        "format": fmt,
        "db_revision": db_revision,
        "filter": dict(filter_json),
        "options": dict(options),
        "counts": {"total": sum(counts.values()), **{k: counts[k] for k in sorted(counts)}},
        "split_files": {k: sorted(v) for k, v in sorted(split_files.items())},
        "n_files": len(listed),
        "total_bytes": sum(e.size for e in listed),
        "files": {e.path: {"sha256": e.sha256, "bytes": e.size} for e in listed},
    }


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> str:
    """Write ``manifest.json`` under ``root``; returns its sha256."""
    data = manifest_bytes(manifest)
    (root / MANIFEST).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def verify_export(root: Path) -> list[str]:
    """Problems found checking the files of an export against its manifest (empty when it is intact)."""
    path = root / MANIFEST
    if not path.is_file():
        return [f"{path}: no manifest.json (not a complete export)"]
    manifest = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for rel, meta in manifest["files"].items():
        file = root / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
            problems.append(f"{rel}: content differs from the manifest")
    return problems
