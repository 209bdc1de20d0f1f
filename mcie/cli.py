"""The ``mcie`` console script: one command, subcommands grouped by stage.

Each command is thin glue: it reads the settings, calls the stage's library functions and prints the result. A bad
setting ends the command with exit code 2 and a message naming the setting.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mcie.config import Settings, settings_or_exit

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="mcie: human-validated complex-instruction image editing (pipeline, review app, exports, model).",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations.")
users_app = typer.Typer(no_args_is_help=True, help="Accounts of reviewers, leads, admins and participants.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")


def _register_stage_commands() -> None:
    """Each stage owns its commands in ``<stage>/cli.py``; they are grouped here under one console script."""
    from mcie.annotate.jobs_cli import app as jobs_app
    from mcie.annotate.jobs_cli import worker_command
    from mcie.annotate.study_cli import app as study_app
    from mcie.exports.cli import app as export_app
    from mcie.exports.importer_cli import app as data_app
    from mcie.model.cli import register as register_model_commands
    from mcie.models_cli import app as models_app
    from mcie.pipeline.cli import app as pipeline_app

    app.add_typer(pipeline_app, name="pipeline")
    app.add_typer(export_app, name="export")
    app.add_typer(study_app, name="study")
    app.add_typer(jobs_app, name="jobs")
    app.command("worker")(worker_command)
    register_model_commands(app)  # mcie train / edit / eval
    app.add_typer(models_app, name="models")  # mcie models pull / list (mcie/models_cli.py)
    app.add_typer(data_app, name="data")  # mcie data import (exports/importer_cli.py)


_register_stage_commands()

console = Console()
err = Console(stderr=True)

DEMO_PASSWORD = "mcie-demo"
DEMO_ACCOUNTS = (("lead", "lead"), ("admin", "admin"), ("rater1", "rater"), ("rater2", "rater"), ("rater3", "rater"))


settings = settings_or_exit


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------------------
# config


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Print the effective settings (secrets masked)."""
    shown = settings().shown()
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    table = Table("setting", "value", title="mcie settings")
    for key, value in shown.items():
        table.add_row(key, value)
    console.print(table)


# ---------------------------------------------------------------------------------------------------------
# db


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Upgrade the database schema (creates the SQLite file if needed)."""
    from mcie.db import migrate

    url = settings().database_url
    migrate.upgrade(url, revision)
    console.print(f"database at revision {migrate.current(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base or -1.")]) -> None:
    """Downgrade the database schema to REVISION."""
    from mcie.db import migrate

    url = settings().database_url
    migrate.downgrade(url, revision)
    console.print(f"database at revision {migrate.current(url) or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's schema revision and whether it is the newest."""
    from mcie.db import migrate

    url = settings().database_url
    rev = migrate.current(url)
    state = "up to date" if rev == migrate.head() else f"behind head {migrate.head()}"
    console.print(f"{rev or 'base (empty)'} ({state})")


# ---------------------------------------------------------------------------------------------------------
# users


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            fail("--password-stdin given but standard input is empty")
        return line.rstrip("\r\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


@users_app.command("add")
def users_add(
    username: str,
    role: Annotated[str, typer.Option(help="rater, lead, admin or participant")] = "rater",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    display_name: Annotated[str | None, typer.Option(help="Name shown in the app.")] = None,
) -> None:
    """Add an account."""
    from mcie.annotate.accounts import AccountError, create_user
    from mcie.db.session import session_scope

    url = settings().database_url
    password = None if role == "participant" and not password_stdin else _read_password(password_stdin)
    try:
        with session_scope(url) as session:
            create_user(session, username, role, password, display_name=display_name)
    except AccountError as exc:
        fail(str(exc))
    console.print(f"added {role} {username}")


@users_app.command("list")
def users_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List accounts."""
    from mcie.annotate.accounts import list_users
    from mcie.db.session import session_scope

    with session_scope(settings().database_url) as session:
        rows = [
            {"username": u.username, "role": u.role.value, "active": u.active,
             "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
            for u in list_users(session)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("username", "role", "active", "last login")
    for row in rows:
        table.add_row(row["username"], row["role"], "yes" if row["active"] else "no", row["last_login_at"] or "-")
    console.print(table)


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Disable an account (it can no longer log in; its reviews stay)."""
    _set_active(username, False)


@users_app.command("enable")
def users_enable(username: str) -> None:
    """Enable a disabled account."""
    _set_active(username, True)


def _set_active(username: str, active: bool) -> None:
    from mcie.annotate.accounts import AccountError, set_active
    from mcie.db.session import session_scope

    try:
        with session_scope(settings().database_url) as session:
            ended = set_active(session, username, active)
    except AccountError as exc:
        fail(str(exc))
    suffix = f" ({ended} session(s) ended)" if ended else ""
    console.print(f"{'enabled' if active else 'disabled'} {username}{suffix}")


@users_app.command("set-password")
def users_set_password(
    username: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
) -> None:
    """Set an account's password."""
    from mcie.annotate.accounts import AccountError, set_password
    from mcie.db.session import session_scope

    password = _read_password(password_stdin)
    try:
        with session_scope(settings().database_url) as session:
            ended = set_password(session, username, password)
    except AccountError as exc:
        fail(str(exc))
    console.print(f"password of {username} changed" + (f" ({ended} session(s) ended)" if ended else ""))


@users_app.command("sessions")
def users_sessions(
    username: str,
    revoke_all: Annotated[bool, typer.Option("--revoke-all", help="End every live session of the account.")] = False,
    include_ended: Annotated[bool, typer.Option("--all", help="Also list ended sessions.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List an account's web sessions (where and when), or end them all with --revoke-all."""
    from mcie.annotate import sessions
    from mcie.annotate.accounts import AccountError, get_user, revoke_sessions
    from mcie.db.session import session_scope

    cfg = settings()
    try:
        with session_scope(cfg.database_url) as session:
            if revoke_all:
                ended = revoke_sessions(session, username, reason="revoked by an admin")
            else:
                rows = sessions.sessions_of(session, get_user(session, username).id,
                                            sessions.SessionPolicy.from_settings(cfg), include_ended=include_ended)
    except AccountError as exc:
        fail(str(exc))
    if revoke_all:
        console.print(f"ended {ended} session(s) of {username}")
        return
    out = [{"ref": r.ref, "created_at": r.created_at.isoformat(), "last_seen_at": r.last_seen_at.isoformat(),
            "expires_at": r.expires_at.isoformat(), "ip": r.ip, "user_agent": r.user_agent, "study_id": r.study_id,
            "active": r.active, "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            "revoked_reason": r.revoked_reason} for r in rows]
    if as_json:
        print(json.dumps(out, indent=2))
        return
    table = Table("ref", "created", "last seen", "ip", "user agent", "state")
    for r in out:
        state = "active" if r["active"] else (f"revoked ({r['revoked_reason']})" if r["revoked_at"] else "expired")
        table.add_row(r["ref"], r["created_at"][:19], r["last_seen_at"][:19], r["ip"] or "-",
                      (r["user_agent"] or "-")[:40], state)
    console.print(table)


# ---------------------------------------------------------------------------------------------------------
# review app


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    secure_cookies: Annotated[
        bool | None,
        typer.Option("--secure-cookies/--insecure-cookies",
                     help="Send the session cookie over HTTPS only. Default: on, unless served on a loopback address "
                     "or MCIE_PUBLIC_URL is http://."),
    ] = None,
    worker: Annotated[
        bool,
        typer.Option("--worker/--no-worker",
                     help="Run a job worker (exports, previews) inside the server. --no-worker: the web tier alone; "
                     "run `mcie worker` elsewhere."),
    ] = True,
) -> None:
    """Upgrade the database, then serve the review app (/review) and the leads' dashboard (/dashboard)."""
    from mcie.annotate.web.server import serve

    serve(host, port, settings(), secure_cookies=secure_cookies, worker=worker)


@app.command("agreement")
def agreement_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the confidence intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    refit: Annotated[
        bool, typer.Option("--refit", help="Fit rater reliability now and store it (the weighted rule uses it).")
    ] = False,
) -> None:
    """Inter-rater agreement: Krippendorff's alpha with CIs, Fleiss' and Cohen's kappa, rater reliability, MLLM."""
    from mcie.annotate.dashboard_data import agreement_figures, reliability_figures
    from mcie.db.session import session_scope

    url = settings().database_url
    if refit:
        with session_scope(url, write=True) as session:
            reliability_figures(session, refit=True)
    with session_scope(url) as session:
        figures = agreement_figures(session, n_boot=n_boot, seed=seed)
    if as_json:
        print(json.dumps(figures, indent=2, allow_nan=False))
        return
    _print_agreement(figures)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_agreement(figures: dict) -> None:
    console.print(f"{figures['n_reviews']} reviews by {figures['n_reviewers']} reviewers "
                  f"({figures['n_gold_reviews']} on gold samples)")
    table = Table("samples", "question", "level", "units", "raters", "alpha", "95% CI", "Fleiss' kappa",
                  title="inter-rater agreement")
    for scope in ("calibration", "overlapping"):
        for name, q in ((figures.get(scope) or {}).get("questions") or {}).items():
            low, high = q.get("alpha_ci") or (None, None)
            table.add_row(scope, name, str(q.get("level")), str(q.get("n_units")), str(q.get("n_raters")),
                          _fmt(q.get("alpha")), f"[{_fmt(low)}, {_fmt(high)}]", _fmt(q.get("fleiss_kappa")))
    console.print(table)
    reliability = figures.get("reliability") or {}
    raters = Table("rank", "rater", "skill", "95% CI (consistency)", "samples checked", "flags",
                   title="rater reliability (skill: 1 perfect, 0 random)")
    for r in reliability.get("raters", []):
        low, high = r["questions"]["consistency"]["skill_ci"]
        flags = "; ".join(f"{f['flag']} ({f['question']}): {f['evidence']}" for f in r["flags"]) or "-"
        raters.add_row(str(r["rank"]), str(r["rater"]), _fmt(r["skill"]), f"[{_fmt(low)}, {_fmt(high)}]",
                       str(r["n_samples"]), flags)
    console.print(raters)
    console.print("`mcie agreement --json` prints every figure: pairwise kappas, leave-one-out, gold, MLLM vs humans, "
                  "each rater's reliability per question.")


# ---------------------------------------------------------------------------------------------------------
# demo


@app.command("demo")
def demo(
    out: Annotated[Path | None, typer.Option(help="Where to write the demo data (default <data_dir>/demo).")] = None,
    instances: Annotated[int, typer.Option(min=1, help="Number of multi-turn instances.")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    accounts: Annotated[bool, typer.Option(help="Create the demo accounts (those missing; existing ones are kept).")]
    = True,
    pipeline: Annotated[bool, typer.Option(help="Ingest the demo data and run the pipeline on it (no MLLM); "
                                           "--no-pipeline only writes the data.")] = True,
) -> None:
    """Build demo data in the SEED-Data-Edit layout, the database and demo accounts, then ingest the data and run
    the pipeline itself (``mcie pipeline ingest`` + ``mcie pipeline run --mllm none``: pixel-difference boxes, no
    conflict filter), so samples are ready for review.

    Prints the password only of the accounts it created now; ``--no-pipeline`` stops after writing the data and
    prints the commands that ingest and process it.
    """
    from mcie.annotate.accounts import create_user
    from mcie.db import migrate
    from mcie.db.models import User
    from mcie.db.session import session_scope
    from mcie.demo import build_demo

    cfg = settings()
    out = out or cfg.data_dir / "demo"
    summary = build_demo(out, instances=instances, seed=seed, overwrite=True)
    console.print(
        f"demo data: {summary.n_instances} instances, {summary.n_turns} turns, {summary.n_conflicts} with a "
        f"deliberate conflict, in {out} (SEED-Data-Edit multi-turn layout)"
    )
    migrate.upgrade(cfg.database_url)
    console.print(f"database: {cfg.database_url} at revision {migrate.current(cfg.database_url)}")
    created: list[tuple[str, str]] = []
    if accounts:
        with session_scope(cfg.database_url) as session:
            for username, role in DEMO_ACCOUNTS:
                if session.query(User.id).filter_by(username=username).first() is None:
                    create_user(session, username, role, DEMO_PASSWORD)
                    created.append((username, role))
        if created:
            table = Table("username", "role", "password", title="demo accounts created")
            for username, role in created:
                table.add_row(username, role, DEMO_PASSWORD)
            console.print(table)
        kept = [name for name, _ in DEMO_ACCOUNTS if name not in {n for n, _ in created}]
        if kept:
            console.print(f"demo accounts kept as they were (passwords unchanged): {', '.join(kept)}")
    if pipeline:
        _demo_pipeline(cfg, out)
    _demo_next_steps(out, pipeline=pipeline, created=[name for name, _ in created])


def _demo_pipeline(cfg: Settings, out: Path) -> None:
    from mcie.db.store import ImageStore
    from mcie.demo import DEMO_LICENSE
    from mcie.pipeline.ingest import ingest, read_source
    from mcie.pipeline.run import run_pipeline

    records = read_source(out, "seed-data-edit", None, license=DEMO_LICENSE)
    report = ingest(records, url=cfg.database_url, store=ImageStore.from_settings(cfg))
    console.print(f"ingested {report.ingested} instances ({report.already_present} already present, "
                  f"{len(report.skipped)} skipped)")
    summary = run_pipeline(cfg, engine="local", mllm="none", scorer="auto", progress=False)
    load = summary.stages[-1]
    for note in summary.notes:
        console.print(f"note: {note}")
    console.print(f"pipeline: {load.get('counts', {}).get('ready', 0)} samples loaded for review "
                  f"(box scorer {summary.scorer})")


def _demo_next_steps(out: Path, *, pipeline: bool = True, created: list[str] | None = None) -> None:
    console.print("next:")
    if not pipeline:
        console.print(f"  mcie pipeline ingest {out} --license other   # read the demo data into the database",
                      highlight=False)
        console.print("  mcie pipeline run --mllm none   # expand, ground and load samples for review")
    login = [name for name in ("rater1", "lead") if name in (created or [])]
    who = f" ({' / '.join(login)}, {DEMO_PASSWORD})" if login else ""
    console.print(f"  mcie serve                  # the review app on http://127.0.0.1:7860{who}", highlight=False)
    console.print("  mcie pipeline status        # samples, flags, MLLM failures, what a rerun would do")
    console.print("  mcie agreement              # inter-rater agreement once reviews come in")
    console.print(f"  ls {out}/annotations        # the demo data (SEED-Data-Edit layout)")


def run() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
