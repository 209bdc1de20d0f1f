"""Failures never leave a complete-looking export: injected errors, killed processes, bad images, bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mcie.db.migrate import upgrade
from mcie.db.models import Export, ExportItem, JobStatus, Sample, Turn
from mcie.db.session import session_scope
from mcie.db.store import ImageStore
from mcie.exports.api import ExportError, run_export
from tests.exports.builder import build_small_db

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_sqlite(sqlite_url, store):
    upgrade(sqlite_url)
    return build_small_db(sqlite_url, store)


def _row(url: str, export_id: int) -> Export:
    with session_scope(url) as session:
        return session.get_one(Export, export_id)


def _target_of(url: str, sample_id: int) -> str:
    with session_scope(url) as session:
        sample = session.get_one(Sample, sample_id)
        return session.scalar(
            select(Turn.result_image).where(Turn.instance_id == sample.instance_id, Turn.index == sample.last_turn)
        )


def _blob(store: ImageStore, sha: str) -> Path:
    return Path(store.root) / "images" / sha[:2] / sha[2:4] / sha


class FailingStore:
    """A store whose ``get`` raises after ``after`` calls, noting which files the export had written by then."""

    def __init__(self, store: ImageStore, after: int, parent: Path) -> None:
        self.store, self.after, self.parent, self.calls = store, after, parent, 0
        self.written_before_failure: list[str] = []

    def get(self, sha: str) -> bytes:
        self.calls += 1
        if self.calls > self.after:
            self.written_before_failure = sorted(p.name for p in self.parent.glob(".*.partial/*"))
            raise RuntimeError("disk on fire")
        return self.store.get(sha)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "webdataset"])
def test_error_after_some_shards_leaves_nothing_and_marks_the_run_failed(sqlite_url, store, small_sqlite, tmp_path,
                                                                         fmt) -> None:
    parent = tmp_path / "exports"
    failing = FailingStore(store, after=9, parent=parent)
    with pytest.raises(ExportError, match="disk on fire") as info:
        run_export(sqlite_url, failing, parent / "out", fmt, shard_size=1, val_fraction=0)
    assert len(failing.written_before_failure) >= 2  # shards (or images) were already written
    assert list(parent.iterdir()) == []  # neither the destination nor the temporary folder is left
    row = _row(sqlite_url, info.value.export_id)
    assert row.status == JobStatus.failed and "disk on fire" in row.error and row.finished_at is not None
    with session_scope(sqlite_url) as session:
        assert session.scalar(select(func.count()).select_from(ExportItem)) == 0


KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from mcie.db.store import ImageStore
    from mcie.exports.api import run_export

    store = ImageStore({blobs!r})
    calls = 0

    class KillingStore:
        def get(self, sha):
            global calls
            calls += 1
            if calls > 7:
                os.kill(os.getpid(), signal.SIGKILL)
            return store.get(sha)

    run_export({url!r}, KillingStore(), {out!r}, "parquet", shard_size=1, val_fraction=0)
    """
)


def test_killed_export_leaves_no_complete_looking_output(sqlite_url, store, small_sqlite, tmp_path) -> None:
    out = tmp_path / "exports" / "killed"
    script = KILLED_EXPORT.format(root=str(ROOT), blobs=str(store.url), url=sqlite_url, out=str(out))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCIE_")} | {"MCIE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert not out.exists()
    partial = list(out.parent.glob(".killed.export-*.partial"))
    assert len(partial) == 1 and any(p.suffix == ".partial" for p in partial[0].iterdir())  # it was mid-write
    assert not list(out.parent.rglob("manifest.json"))
    with session_scope(sqlite_url) as session:
        rows = session.scalars(select(Export)).all()
    assert [r.status for r in rows] == [JobStatus.running]  # never marked done


def test_missing_image_is_named_with_its_sample(migrated_url, store, tmp_path) -> None:
    small = build_small_db(migrated_url, store)
    victim = small.by_name["c12"]
    sha = _target_of(migrated_url, victim)
    _blob(store, sha).unlink()
    with pytest.raises(ExportError) as info:
        run_export(migrated_url, store, tmp_path / "exports" / "out", "jsonl")
    message = str(info.value)
    assert f"sample {victim}: image {sha}: not in the image store" in message
    row = _row(migrated_url, info.value.export_id)
    assert row.status == JobStatus.failed and f"sample {victim}" in row.error and sha in row.error
    assert list((tmp_path / "exports").iterdir()) == []


def test_corrupt_blob_is_refused(sqlite_url, store, small_sqlite, tmp_path) -> None:
    victim = small_sqlite.by_name["a23"]
    sha = _target_of(sqlite_url, victim)
    _blob(store, sha).write_bytes(b"not the image you stored")
    with pytest.raises(ExportError, match=f"sample {victim}: image {sha}: the stored bytes do not match"):
        run_export(sqlite_url, store, tmp_path / "out", "webdataset")


def test_bad_settings_fail_before_anything_is_written(sqlite_url, store, small_sqlite, tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(ExportError, match="already exists and is not an empty folder"):
        run_export(sqlite_url, store, taken, "jsonl")
    with pytest.raises(ExportError, match="unknown export format 'csv'"):
        run_export(sqlite_url, store, tmp_path / "a", "csv")
    with pytest.raises(ExportError, match="val_fraction"):
        run_export(sqlite_url, store, tmp_path / "a", "jsonl", val_fraction=2)
    with pytest.raises(ExportError, match="min_quality"):
        run_export(sqlite_url, store, tmp_path / "a", "jsonl", {"min_quality": 9})
    with pytest.raises(ExportError, match="--since 41: there is no export"):
        run_export(sqlite_url, store, tmp_path / "a", "jsonl", since=41)
    with session_scope(sqlite_url) as session:
        assert session.scalar(select(func.count()).select_from(Export)) == 0
        running = Export(format="jsonl", status=JobStatus.running)
        session.add(running)
        session.flush()
        running_id = running.id
    with pytest.raises(ExportError, match=f"--since {running_id}: that export is running, not done"):
        run_export(sqlite_url, store, tmp_path / "a", "jsonl", since=running_id)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_export(sqlite_url, store, empty, "jsonl").n_samples == len(small_sqlite.accepted)
