"""``mcie study ...``: create a user study, invite participants, follow them, exclude, export the votes, results.

Each command is one call into :mod:`annotate.study` (see ``docs/user-study.md``) in a transaction the command opens
(``session_scope``; a write one for the commands that change something); STUDY is a study's name or id and USER a
participant's username or user id. A refused request (a folder with gaps, an unknown study, a closed study)
ends with exit code 1 and the reason on stderr.

    mcie study create FOLDER --name NAME [--items-per-participant 100] [--seed 0] [--criteria instruction,background]
    mcie study from-previews --name NAME --samples 1,2,3 --method mcie-e1=<model version> ... [--reference]
    mcie study list
    mcie study invite STUDY [--count N | --username NAME ...] [--base-url URL]   # one "username<TAB>link" a line
    mcie study revoke STUDY USER
    mcie study status STUDY
    mcie study open|close STUDY
    mcie study exclude STUDY USER --reason TEXT | --include
    mcie study export STUDY OUT.csv|OUT.parquet
    mcie study results STUDY [--n-boot 1000] [--json]
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(no_args_is_help=True, help="User studies: create, invite participants, follow, export, results.")
console = Console()
err = Console(stderr=True)

DEFAULT_BASE_URL = "http://127.0.0.1:7860"
StudyArg = Annotated[str, typer.Argument(help="The study's name or id.", show_default=False)]
UserArg = Annotated[str, typer.Argument(help="The participant's username or user id.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _url() -> str:
    from mcie.config import settings_or_exit as settings

    return settings().database_url


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _scope(*, write: bool = False) -> AbstractContextManager[Session]:
    """A transaction on the configured database (``write=True`` for the commands that change something)."""
    from mcie.db.session import session_scope

    return session_scope(_url(), write=write)


def _study_id(session: Session, key: str) -> int:
    from mcie.annotate.study import StudyError, resolve_study

    try:
        return resolve_study(session, key)
    except StudyError as exc:
        _fail(str(exc))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, allow_nan=False, default=str))


def _criteria(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _report(report: Any, as_json: bool) -> None:
    from dataclasses import asdict

    if as_json:
        _print_json(asdict(report))
        return
    console.print(
        f"study {report.study_id} [bold]{report.name}[/bold]: {report.n_items} items "
        f"({report.n_attention_items} attention checks), methods {', '.join(report.methods)}, "
        f"{report.items_per_participant} items per participant, criteria {', '.join(report.criteria)}",
        highlight=False,
    )
    for warning in report.warnings:
        err.print(f"warning: {warning}", highlight=False, markup=False)
    console.print(f"next: mcie study invite {report.study_id} --count 50", highlight=False)


# ----------------------------------------------------------------------------------------------------------
# creating


@app.command("create")
def create(
    folder: Annotated[Path, typer.Argument(help="Study folder: items.jsonl, sources, one folder per method.")],
    name: Annotated[str, typer.Option("--name", help="The study's name (unique).")],
    items_per_participant: Annotated[int, typer.Option(min=1, help="Regular items each participant judges.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the design (who sees what, in which order).")] = 0,
    criteria: Annotated[str, typer.Option(help="Comma-separated questions asked per item.")] = "instruction,background",
    draft: Annotated[bool, typer.Option("--draft", help="Create it as a draft (open it later).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a study from a folder; every problem in the folder is listed and nothing is written if there is any."""
    from mcie.annotate.study import StudyError, create_study_from_folder
    from mcie.config import settings_or_exit as settings
    from mcie.db.models import StudyStatus
    from mcie.db.store import ImageStore

    cfg = settings()
    try:
        report = create_study_from_folder(
            cfg.database_url, ImageStore.from_settings(cfg), folder, name,
            items_per_participant=items_per_participant, seed=seed, criteria=_criteria(criteria),
            status=StudyStatus.draft if draft else StudyStatus.open,
        )
    except StudyError as exc:
        _fail(str(exc))
    _report(report, as_json)


def _method_option(values: list[str]) -> dict[str, str]:
    methods: dict[str, str] = {}
    for value in values:
        name, sep, version = value.partition("=")
        name, version = name.strip(), (version.strip() if sep else name.strip())
        if not name or not version:
            _fail(f"--method {value!r}: expected NAME=MODEL_VERSION or MODEL_VERSION")
        if name in methods:
            _fail(f"--method {name!r} given twice")
        methods[name] = version
    return methods


def _sample_ids(samples: str | None, samples_file: Path | None) -> list[int]:
    text = samples or ""
    if samples_file is not None:
        try:
            text += "," + samples_file.read_text(encoding="utf-8").replace("\n", ",")
        except OSError as exc:
            _fail(f"{samples_file}: cannot be read ({exc})")
    ids = []
    for part in text.split(","):
        if part.strip():
            if not part.strip().isdigit():
                _fail(f"sample ids must be whole numbers; got {part.strip()!r}")
            ids.append(int(part.strip()))
    return ids


@app.command("from-previews")
def from_previews(
    name: Annotated[str, typer.Option("--name", help="The study's name (unique).")],
    method: Annotated[
        list[str], typer.Option("--method", help="NAME=MODEL_VERSION (or MODEL_VERSION) of previews; repeatable.")
    ],
    samples: Annotated[str | None, typer.Option(help="Comma-separated sample ids.")] = None,
    samples_file: Annotated[Path | None, typer.Option(help="File of sample ids, one a line.")] = None,
    reference: Annotated[bool, typer.Option("--reference", help="Add each sample's ground-truth target.")] = False,
    reference_name: Annotated[str, typer.Option(help="Method name of the ground truth.")] = "reference",
    preview_seed: Annotated[int | None, typer.Option(help="Only previews made with this seed.")] = None,
    items_per_participant: Annotated[int, typer.Option(min=1, help="Regular items each participant judges.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the design.")] = 0,
    criteria: Annotated[str, typer.Option(help="Comma-separated questions asked per item.")] = "instruction,background",
    draft: Annotated[bool, typer.Option("--draft", help="Create it as a draft (open it later).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a study from review samples and the model's finished previews (one model version per method)."""
    from mcie.annotate.study import StudyError, create_study_from_previews
    from mcie.db.models import StudyStatus

    ids = _sample_ids(samples, samples_file)
    try:
        with _scope(write=True) as session:
            report = create_study_from_previews(
                session, name, ids, _method_option(method), reference=reference, reference_name=reference_name,
                preview_seed=preview_seed, items_per_participant=items_per_participant, seed=seed,
                criteria=_criteria(criteria), status=StudyStatus.draft if draft else StudyStatus.open,
            )
    except StudyError as exc:
        _fail(str(exc))
    _report(report, as_json)


# ----------------------------------------------------------------------------------------------------------
# participants


@app.command("list")
def list_command(as_json: JsonOpt = False) -> None:
    """Every study with its status and how many participants enrolled and finished."""
    from dataclasses import asdict

    from mcie.annotate.study import list_studies

    with _scope() as session:
        rows = list_studies(session)
    if as_json:
        _print_json([asdict(s) for s in rows])
        return
    table = Table("id", "name", "status", "items", "methods", "enrolled", "finished", title="user studies")
    for s in rows:
        table.add_row(str(s.id), s.name, s.status, str(s.n_items), ", ".join(s.methods), str(s.enrolled),
                      str(s.finished))
    console.print(table)


@app.command("invite")
def invite(
    study: StudyArg,
    count: Annotated[int | None, typer.Option(min=1, max=10_000, help="Participants with generated names.")] = None,
    username: Annotated[
        list[str] | None, typer.Option("--username", help="Invite this account (created if new); repeatable.")
    ] = None,
    base_url: Annotated[str, typer.Option(help="Public address of the app (`mcie serve`).")] = DEFAULT_BASE_URL,
    as_json: JsonOpt = False,
) -> None:
    """Enrol participants and print one invitation link each ("username<TAB>link"); a link is shown only once, and
    inviting someone again replaces their link."""
    from mcie.annotate.accounts import AccountError
    from mcie.annotate.study import StudyError, enrol

    if count is not None and username:
        _fail("use either --count or --username")
    with _scope() as session:
        study_id = _study_id(session, study)
    names: list[str | None] = list(username) if username else [None] * (count or 1)
    base = base_url.rstrip("/")
    links = []
    for name in names:
        try:
            with _scope(write=True) as session:  # one transaction per participant, as each link is made
                user, token = enrol(session, study_id, name)
        except (StudyError, AccountError) as exc:
            _fail(str(exc))
        links.append({"username": user.username, "user_id": user.id, "link": f"{base}/study/join/{token}"})
    if as_json:
        _print_json(links)
        return
    for row in links:
        typer.echo(f"{row['username']}\t{row['link']}")


@app.command("revoke")
def revoke(study: StudyArg, user: UserArg) -> None:
    """Make a participant's link stop working (their votes are kept; `invite --username` issues a new one)."""
    from mcie.annotate.study import StudyError, resolve_participant, revoke_invite

    try:
        with _scope(write=True) as session:
            study_id = _study_id(session, study)
            revoke_invite(session, study_id, resolve_participant(session, study_id, user))
    except StudyError as exc:
        _fail(str(exc))
    console.print(f"revoked the invitation of {user} to study {study_id}", highlight=False)


@app.command("status")
def status_command(study: StudyArg, as_json: JsonOpt = False) -> None:
    """Every participant's progress: screens completed, finished, revoked, excluded."""
    from mcie.annotate.web.study_routes import participants_json

    with _scope() as session:
        study_id = _study_id(session, study)
        rows = [row.model_dump() for row in participants_json(session, study_id)]
    if as_json:
        _print_json(rows)
        return
    table = Table("user", "username", "done", "finished (UTC)", "revoked", "excluded", title=f"study {study_id}")
    for r in rows:
        table.add_row(str(r["user_id"]), r["username"], f"{r['completed']}/{r['assigned']}",
                      (r["finished_at"] or "")[:16].replace("T", " "), "yes" if r["revoked"] else "",
                      f"yes: {r['exclusion_reason']}" if r["excluded"] else "")
    console.print(table)
    finished = sum(r["finished_at"] is not None for r in rows)
    console.print(f"{len(rows)} enrolled, {finished} finished", highlight=False)


def _set_status(study: str, value: str) -> None:
    from mcie.annotate.study import StudyError, set_study_status

    try:
        with _scope(write=True) as session:
            study_id = _study_id(session, study)
            set_study_status(session, study_id, value)
    except StudyError as exc:
        _fail(str(exc))
    console.print(f"study {study_id} is {value}", highlight=False)


@app.command("open")
def open_command(study: StudyArg) -> None:
    """Open the study: participants can see screens and vote."""
    _set_status(study, "open")


@app.command("close")
def close_command(study: StudyArg) -> None:
    """Close the study: no more screens or votes (the votes are kept)."""
    _set_status(study, "closed")


@app.command("exclude")
def exclude(
    study: StudyArg,
    user: UserArg,
    reason: Annotated[str | None, typer.Option(help="Why (required to exclude; audited).")] = None,
    include: Annotated[bool, typer.Option("--include", help="Include the participant again.")] = False,
) -> None:
    """Exclude a participant from the results (with a reason), or include them again."""
    from mcie.annotate.study import StudyError, resolve_participant, set_excluded

    if include == bool(reason):
        _fail("give either --reason TEXT (to exclude) or --include")
    try:
        with _scope(write=True) as session:
            study_id = _study_id(session, study)
            set_excluded(session, study_id, resolve_participant(session, study_id, user), not include, reason)
    except StudyError as exc:
        _fail(str(exc))
    console.print(f"{'included' if include else 'excluded'} {user} in study {study_id}", highlight=False)


@app.command("export")
def export(
    study: StudyArg,
    out: Annotated[Path, typer.Argument(help="OUT.csv or OUT.parquet")],
) -> None:
    """Write every stored vote (one row per participant, item and question) to CSV or Parquet."""
    from mcie.annotate.study import StudyError, export_votes

    try:
        with _scope() as session:
            study_id = _study_id(session, study)
            n = export_votes(session, study_id, out)
    except StudyError as exc:
        _fail(str(exc))
    console.print(f"{n} votes written to {out}", highlight=False)


# ----------------------------------------------------------------------------------------------------------
# results


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ci(ci: list[float] | None, percent: bool = True) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if percent else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


@app.command("results")
def results(
    study: StudyArg,
    n_boot: Annotated[int, typer.Option(min=0, max=100_000, help="Bootstrap resamples for the intervals.")] = 1000,
    seed: Annotated[int | None, typer.Option(min=0, help="Bootstrap seed (default: the study's seed).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Shares of first choices, preferred-method shares and Bradley-Terry strengths per question, with bootstrap
    intervals, after the recorded exclusions; and the quality checks."""
    from mcie.annotate.study import study_results

    with _scope() as session:
        res = study_results(session, _study_id(session, study), n_boot=n_boot, seed=seed)
    if as_json:
        _print_json(res)
        return
    info, people = res["study"], res["participants"]
    console.print(
        f"study {info['id']} {info['name']} ({info['status']}): {people['enrolled']} enrolled, {people['finished']} "
        f"finished; {res['n_votes']} final votes, {res['n_votes_analysed']} analysed from {res['n_participants']} "
        f"participants ({len(res['excluded'])} excluded); {res['n_boot']} bootstrap resamples",
        highlight=False,
    )
    for criterion, block in res["by_criterion"].items():
        title = f"{criterion}: none acceptable {_pct(block['none_share'])}"
        level = f"{res['ci_level']:.0%} CI"
        table = Table("method", "chosen", "share", level, "preferred", level, "BT strength", level, title=title)
        strengths = block["bradley_terry"]["strengths"]
        for method, share in block["shares"].items():
            pref, bt = block["preferred"][method], strengths[method]
            table.add_row(method, str(share["n_chosen"]), _pct(share["share"]), _ci(share["ci"]), _pct(pref["share"]),
                          _ci(pref["ci"]), "-" if bt["strength"] is None else f"{bt['strength']:.2f}",
                          _ci(bt["ci"], percent=False))
        console.print(table)
        bias = block["position_bias"]
        if bias.get("p_value") is not None:
            console.print(f"position bias: chi-square p = {bias['p_value']:.3g}", highlight=False)
    quality = res["quality"]
    if quality["fast"] or quality["failed_attention"]:
        console.print(f"quality checks: fast {quality['fast']}, failed attention {quality['failed_attention']} "
                      "(user ids; `mcie study exclude` records a decision)", highlight=False)
    console.print("`mcie study results --json` prints every figure: win matrices, intervals, quality checks.")
