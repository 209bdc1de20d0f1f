"""``mcie worker`` and ``mcie jobs list|show|retry|cancel``: run and manage the job queue (:mod:`annotate.jobs`).

The CLI talks to the database directly, so whoever runs it has the database's rights (an operator, a lead or an
admin on the server); the web app shows the same jobs to leads and admins on the dashboard.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="The job queue: exports and model previews run by `mcie worker`.")
console = Console()
err = Console(stderr=True)


def _settings():
    from mcie.config import settings_or_exit as settings

    return settings()


def _fail(message: str, code: int = 1) -> None:
    err.print(f"error: {message}", highlight=False, markup=False)
    raise typer.Exit(code)


def worker_command(
    kinds: Annotated[
        str, typer.Option("--kinds", help="Comma-separated job kinds to run: export, preview, reliability.")
    ] = "export,preview,reliability",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=64, help="Jobs run at once.")] = 1,
    grace_s: Annotated[float, typer.Option("--grace", min=0, help="Seconds running jobs get after SIGTERM.")] = 60.0,
) -> None:
    """Run jobs from the queue until SIGTERM/SIGINT (the running ones finish, or go back to the queue)."""
    import logging

    from mcie.annotate.worker import run_worker
    from mcie.db import migrate

    cfg = _settings()
    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    migrate.upgrade(cfg.database_url)
    try:
        run_worker(cfg, kinds=wanted, concurrency=concurrency, grace_s=grace_s)
    except ValueError as exc:
        _fail(str(exc), 2)


@app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The newest jobs first."""
    from mcie.annotate import jobs
    from mcie.db.session import session_scope

    try:
        with session_scope(_settings().database_url) as session:
            rows = jobs.list_jobs(session, status=status, kind=kind, limit=limit)
    except jobs.JobError as exc:
        _fail(str(exc), 2)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    table = Table("id", "kind", "status", "progress", "tries", "worker", "created", "error")
    for r in rows:
        table.add_row(str(r.id), r.kind, r.status, f"{r.progress:.0%}", f"{r.attempts}/{r.max_attempts}",
                      r.worker_id or "-", r.created_at.isoformat()[:19], (r.error or "")[:60])
    console.print(table)


@app.command("show")
def jobs_show(job_id: int) -> None:
    """Every field of one job, as JSON."""
    from mcie.annotate import jobs
    from mcie.db.session import session_scope

    try:
        with session_scope(_settings().database_url) as session:
            job = jobs.get(session, job_id)
        print(json.dumps(job.as_dict(), indent=2))
    except jobs.JobError as exc:
        _fail(str(exc))


@app.command("retry")
def jobs_retry(job_id: int) -> None:
    """Queue a failed or cancelled job again, with fresh tries."""
    from mcie.annotate import jobs
    from mcie.db.session import session_scope

    try:
        with session_scope(_settings().database_url, write=True) as session:
            job = jobs.retry(session, job_id)
    except jobs.JobError as exc:
        _fail(str(exc))
    console.print(f"job {job.id} ({job.kind}) queued again")


@app.command("cancel")
def jobs_cancel(job_id: int) -> None:
    """Cancel a queued or running job (a running one stops at its worker's next lease renewal)."""
    from mcie.annotate import jobs
    from mcie.db.session import session_scope

    try:
        with session_scope(_settings().database_url, write=True) as session:
            job = jobs.cancel(session, job_id)
    except jobs.JobError as exc:
        _fail(str(exc))
    console.print(f"job {job.id} ({job.kind}) cancelled")
