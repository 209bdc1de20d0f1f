"""The job queue and its workers: claims, leases that lapse and are taken over, retries up to max attempts, cancel and
retry, progress, a clean stop that gives the job back, and concurrent claims that never hand one job to two workers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from mcie.annotate import jobs
from mcie.annotate.worker import JobContext, Worker
from mcie.config import load_settings
from mcie.db.models import AuditLog, Job
from mcie.db.session import session_scope
from tests.annotate.tx import write_tx


def _settings(url: str, tmp_path, **extra: Any):
    return load_settings(data_dir=tmp_path, database_url=url, blob_url=str(tmp_path / "blobs"), **extra)



def test_claim_finish_fail_and_retry(migrated_url: str) -> None:
    first = write_tx(migrated_url, jobs.submit, "export", {"n": 1}, max_attempts=2)
    second = write_tx(migrated_url, jobs.submit, "preview", {"n": 2})
    assert write_tx(migrated_url, jobs.claim, "w1", ["preview"], 30).id == second.id  # only the kinds asked for
    claimed = write_tx(migrated_url, jobs.claim, "w1", ["export", "preview"], 30)
    assert claimed is not None and claimed.id == first.id and claimed.attempts == 1 and claimed.worker_id == "w1"
    assert write_tx(migrated_url, jobs.claim, "w2", ["export", "preview"], 30) is None  # both are leased

    assert write_tx(migrated_url, jobs.renew, first.id, "w1", 30, progress=0.5, note="half") is True
    assert write_tx(migrated_url, jobs.renew, first.id, "w2", 30) is False  # not w2's job
    shown = write_tx(migrated_url, jobs.get, first.id)
    assert (shown.progress, shown.progress_note) == (0.5, "half")

    assert write_tx(migrated_url, jobs.fail, first.id, "w1", "disk full") == "queued"  # one try left
    again = write_tx(migrated_url, jobs.claim, "w2", ["export"], 30)
    assert again is not None and again.attempts == 2 and again.error == "disk full"
    assert write_tx(migrated_url, jobs.fail, first.id, "w2", "disk still full") == "failed"
    failed = write_tx(migrated_url, jobs.get, first.id)
    assert failed.status == "failed" and failed.error == "disk still full" and failed.finished_at is not None

    with pytest.raises(jobs.JobError, match="only queued or running"):
        write_tx(migrated_url, jobs.cancel, first.id)
    assert write_tx(migrated_url, jobs.retry, first.id).status == "queued"
    with pytest.raises(jobs.JobError, match="only failed or cancelled"):
        write_tx(migrated_url, jobs.retry, first.id)
    claimed = write_tx(migrated_url, jobs.claim, "w3", ["export"], 30)
    assert claimed is not None and claimed.attempts == 1
    assert write_tx(migrated_url, jobs.finish, first.id, "w3", {"ok": True})
    done = write_tx(migrated_url, jobs.get, first.id)
    assert done.status == "done" and done.result == {"ok": True} and done.progress == 1.0 and done.error is None
    with pytest.raises(jobs.JobError, match="unknown job kind"):
        write_tx(migrated_url, jobs.submit, "mine-bitcoin", {})
    with pytest.raises(jobs.JobError, match="no job with id"):
        write_tx(migrated_url, jobs.get, 10**9)


def test_read_then_write_services_want_a_write_session(migrated_url: str) -> None:
    job = write_tx(migrated_url, jobs.submit, "export", {})
    with session_scope(migrated_url) as session:
        for call, what in ((lambda: jobs.claim(session, "w1", ["export"], 30), "claiming a job"),
                           (lambda: jobs.fail(session, job.id, "w1", "x"), "failing a job"),
                           (lambda: jobs.retry(session, job.id), "retrying a job"),
                           (lambda: jobs.cancel(session, job.id), "cancelling a job")):
            with pytest.raises(RuntimeError, match=f"{what} reads then writes"):
                call()
    assert write_tx(migrated_url, jobs.get, job.id).status == "queued"  # nothing was done


def test_a_dashboard_export_wants_a_write_session(migrated_url: str, tmp_path) -> None:
    from types import SimpleNamespace

    from mcie.annotate.export_jobs import ExportJobs

    exports = ExportJobs(_settings(migrated_url, tmp_path))
    lead = SimpleNamespace(id=None, username="lead", is_lead=True)
    with session_scope(migrated_url) as session, pytest.raises(RuntimeError, match="starting an export"):
        exports.start(session, lead, "jsonl", "out", None, {})
    with session_scope(migrated_url, write=True) as session:
        started = exports.start(session, lead, "jsonl", "out", None, {})
    assert [j.id for j in write_tx(migrated_url, jobs.list_jobs)] == [started.job_id]
    assert not exports.wait(timeout=0.2)  # queued: no worker runs here


def test_a_lapsed_lease_is_taken_over_and_fails_after_max_attempts(migrated_url: str) -> None:
    job = write_tx(migrated_url, jobs.submit, "export", {}, max_attempts=2)
    assert write_tx(migrated_url, jobs.claim, "dead-1", ["export"], 0.2) is not None
    assert write_tx(migrated_url, jobs.claim, "w2", ["export"], 30) is None
    time.sleep(0.3)  # dead-1 never renews (kill -9)
    taken = write_tx(migrated_url, jobs.claim, "dead-2", ["export"], 0.2)
    assert taken is not None and taken.id == job.id and taken.attempts == 2 and taken.error == jobs.LOST
    assert write_tx(migrated_url, jobs.finish, job.id, "dead-1") is False  # the first worker lost it for good
    time.sleep(0.3)
    assert write_tx(migrated_url, jobs.claim, "w3", ["export"], 30) is None  # no tries left: failed, not claimed
    final = write_tx(migrated_url, jobs.get, job.id)
    assert final.status == "failed" and final.error == jobs.LOST
    with session_scope(migrated_url) as session:
        actions = [a.action for a in session.query(AuditLog).filter(AuditLog.entity == "job")]
    assert "job.failed" in actions


def test_cancel_stops_a_running_job_at_its_next_renewal(migrated_url: str, tmp_path) -> None:
    started, seen_stop = threading.Event(), threading.Event()

    def slow(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
        started.set()
        while not ctx.should_stop():
            time.sleep(0.05)
        seen_stop.set()
        return {"finished": True}

    job = write_tx(migrated_url, jobs.submit, "export", {})
    worker = Worker(_settings(migrated_url, tmp_path), kinds=["export"], handlers={"export": slow}, poll_s=0.05,
                    lease_s=1.5).start()
    try:
        assert started.wait(10)
        write_tx(migrated_url, jobs.cancel, job.id)
        assert seen_stop.wait(10)
    finally:
        worker.stop(5)
    final = write_tx(migrated_url, jobs.get, job.id)
    assert final.status == "cancelled" and final.result is None  # the late result was dropped


def test_a_worker_renews_its_lease_reports_progress_and_gives_the_job_back_when_stopped(
    migrated_url: str, tmp_path
) -> None:
    progress_seen = threading.Event()

    def long(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
        ctx.progress(0.25, "a quarter")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ctx.check()  # raises JobStopped once the worker stops
            if write_tx(migrated_url, jobs.get, ctx.job.id).progress == 0.25:
                progress_seen.set()
            time.sleep(0.05)
        return {}

    job = write_tx(migrated_url, jobs.submit, "export", {})
    worker = Worker(_settings(migrated_url, tmp_path), kinds=["export"], handlers={"export": long}, poll_s=0.05,
                    lease_s=1.2).start()
    try:
        assert progress_seen.wait(10)
        time.sleep(1.5)  # longer than one lease: the heartbeat kept it
        assert write_tx(migrated_url, jobs.claim, "thief", ["export"], 30) is None
        running = write_tx(migrated_url, jobs.get, job.id)
        assert running.status == "running" and running.progress_note == "a quarter"
    finally:
        worker.stop(10)
    back = write_tx(migrated_url, jobs.get, job.id)
    assert back.status == "queued" and back.attempts == 0 and back.worker_id is None  # released, try not counted


def test_a_handler_error_is_retried_then_recorded(migrated_url: str, tmp_path) -> None:
    calls: list[int] = []

    def flaky(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(ctx.job.attempts)
        if len(calls) < 2:
            raise OSError("the disk hiccupped")
        return {"tries": len(calls)}

    ok = write_tx(migrated_url, jobs.submit, "export", {}, max_attempts=3)
    worker = Worker(_settings(migrated_url, tmp_path), kinds=["export"], handlers={"export": flaky},
                    poll_s=0.05).start()
    try:
        deadline = time.monotonic() + 20
        while write_tx(migrated_url, jobs.get, ok.id).status != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        worker.stop(5)
    assert calls == [1, 2] and write_tx(migrated_url, jobs.get, ok.id).result == {"tries": 2}


@pytest.mark.postgres
def test_concurrent_claims_on_postgres_never_share_a_job(postgres_url: str) -> None:
    from mcie.db import migrate

    migrate.upgrade(postgres_url)
    with session_scope(postgres_url) as session:
        for _ in range(40):
            jobs.enqueue(session, "export", {})
    taken: list[int] = []
    lock = threading.Lock()

    def take(name: str) -> None:
        while (job := write_tx(postgres_url, jobs.claim, name, ["export"], 60)) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(taken) == 40 and len(set(taken)) == 40
    with session_scope(postgres_url) as session:
        assert {j.attempts for j in session.query(Job)} == {1}


def test_a_worker_refuses_unknown_kinds(sqlite_url: str, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        Worker(_settings(sqlite_url, tmp_path), kinds=["gpu-mining"])


def test_jobs_commands_and_background_exports(sqlite_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json as json_module

    from typer.testing import CliRunner

    from mcie.cli import app as cli
    from mcie.config import get_settings
    from mcie.db.migrate import upgrade

    upgrade(sqlite_url)
    monkeypatch.setenv("MCIE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("MCIE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        queued = runner.invoke(cli, ["export", "jsonl", str(tmp_path / "out"), "--background", "--json"])
        assert queued.exit_code == 0, queued.output
        job_id = json_module.loads(queued.output)["job_id"]
        assert not (tmp_path / "out").exists()  # nothing ran in the command itself
        listed = json_module.loads(runner.invoke(cli, ["jobs", "list", "--json"]).output)
        assert [(j["id"], j["kind"], j["status"]) for j in listed] == [(job_id, "export", "queued")]
        assert listed[0]["payload"]["out"] == str((tmp_path / "out").absolute())
        shown = runner.invoke(cli, ["jobs", "show", str(job_id)])
        assert shown.exit_code == 0 and json_module.loads(shown.output)["payload"]["format"] == "jsonl"
        assert runner.invoke(cli, ["jobs", "retry", str(job_id)]).exit_code == 1  # queued: nothing to retry
        assert "cancelled" in runner.invoke(cli, ["jobs", "cancel", str(job_id)]).output
        assert "queued again" in runner.invoke(cli, ["jobs", "retry", str(job_id)]).output
        assert runner.invoke(cli, ["jobs", "show", "999"]).exit_code == 1
        assert runner.invoke(cli, ["jobs", "list", "--status", "bogus"]).exit_code == 2

        worker = Worker(get_settings(), kinds=["export"], poll_s=0.05).start()  # what `mcie worker` runs
        try:
            deadline = time.monotonic() + 120
            while write_tx(sqlite_url, jobs.get, job_id).status != "done":
                assert time.monotonic() < deadline, write_tx(sqlite_url, jobs.get, job_id)
                time.sleep(0.1)
        finally:
            worker.stop()
        result = write_tx(sqlite_url, jobs.get, job_id).result
        assert result is not None and result["n_samples"] == 0 and (tmp_path / "out" / "manifest.json").is_file()
        bad = runner.invoke(cli, ["worker", "--kinds", "mining"])
        assert bad.exit_code == 2 and "unknown kind" in bad.output
    finally:
        get_settings.cache_clear()
