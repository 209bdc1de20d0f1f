"""Put files into a real Hugging Face hub cache layout, for offline tests that load models by Hub id.

The layout is huggingface_hub's own: ``<HF_HOME>/hub/models--owner--name/`` with ``blobs/<sha256>`` holding the
bytes, ``snapshots/<commit>/<path>`` relative symlinks to them, and ``refs/<branch>`` naming the commit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_cache(hf_home: Path, repo_id: str, source: Path, ref: str = "main", commit: str | None = None) -> Path:
    """Copy ``source`` (a folder, or one file) into the cache as ``repo_id`` at ``ref``; returns the snapshot folder."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    base = source if source.is_dir() else source.parent
    if commit is None:
        digest = hashlib.sha1(repo_id.encode() + ref.encode())
        for file in files:
            digest.update(str(file.relative_to(base)).encode() + file.read_bytes())
        commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(base)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
