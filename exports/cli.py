"""``mcie export ...``: write accepted samples as a training-ready dataset, or every raw review for analysis."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Export accepted samples (jsonl | parquet | webdataset) or raw reviews.")
console = Console()
err = Console(stderr=True)


def _export(
    fmt: str,
    out: Path,
    status: list[str] | None,
    min_quality: float | None,
    min_complexity: float | None,
    reviewer: list[str] | None,
    decided_after: datetime | None,
    decided_before: datetime | None,
    dataset: list[str] | None,
    since: int | None,
    val_fraction: float,
    shard_size: int,
    include_reviewers: bool,
    as_json: bool,
    background: bool = False,
) -> None:
    from pydantic import ValidationError

    from mcie.config import settings_or_exit as settings
    from mcie.db.store import ImageStore
    from mcie.exports.api import ExportError, run_export
    from mcie.exports.select import ExportFilter

    cfg = settings()
    raw = {"statuses": status, "min_quality": min_quality, "min_complexity": min_complexity, "reviewers": reviewer,
           "decided_after": decided_after, "decided_before": decided_before, "datasets": dataset}
    try:
        flt = ExportFilter.model_validate({k: v for k, v in raw.items() if v not in (None, [])})
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        err.print(f"error: {problems}", highlight=False)
        raise typer.Exit(2) from None
    if background:
        from mcie.annotate import jobs
        from mcie.db.session import session_scope

        payload = {"format": fmt, "out": str(out.absolute()), "filter": flt.model_dump(mode="json"), "since": since,
                   "val_fraction": val_fraction, "shard_size": shard_size, "include_reviewers": include_reviewers}
        with session_scope(cfg.database_url) as session:
            job = jobs.submit(session, "export", payload, max_attempts=cfg.job_max_attempts)
        if as_json:
            print(json.dumps({"job_id": job.id, "status": job.status}, indent=2))
        else:
            console.print(f"export queued as job {job.id}: `mcie jobs show {job.id}` follows it (a `mcie worker` "
                          "or `mcie serve` runs it)")
        return
    try:
        result = run_export(cfg.database_url, ImageStore.from_settings(cfg), out, fmt, flt, since=since,
                            val_fraction=val_fraction, shard_size=shard_size,
                            include_reviewers=include_reviewers)
    except ExportError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    summary = {"export_id": result.export_id, "path": str(result.path), "format": result.format,
               "samples": result.n_samples, "counts": dict(result.counts), "files": result.files,
               "manifest_sha256": result.manifest_sha256, "db_revision": result.db_revision}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        splits = ", ".join(f"{k} {v}" for k, v in result.counts.items())
        console.print(f"export {result.export_id}: {result.n_samples} samples ({splits}) in {result.path}")
        console.print(f"manifest sha256 {result.manifest_sha256}")


def _format_command(fmt: str, doc: str):
    def command(
        out: Annotated[Path, typer.Argument(help="Destination folder (must not exist, or be empty).")],
        status: Annotated[list[str] | None, typer.Option(help="Sample status to take (repeatable).")] = None,
        min_quality: Annotated[float | None, typer.Option(help="Median quality at least this.")] = None,
        min_complexity: Annotated[float | None, typer.Option(help="Median complexity at least this.")] = None,
        reviewer: Annotated[list[str] | None, typer.Option(help="Reviewed by this user (repeatable).")] = None,
        decided_after: Annotated[datetime | None, typer.Option(help="Decision at or after (ISO 8601, UTC).")] = None,
        decided_before: Annotated[datetime | None, typer.Option(help="Decision before (ISO 8601, UTC).")] = None,
        dataset: Annotated[list[str] | None, typer.Option(help="Source dataset (repeatable).")] = None,
        since: Annotated[int | None, typer.Option(help="Only what was accepted after export ID.")] = None,
        val_fraction: Annotated[float, typer.Option(min=0, max=0.5, help="Share of instances in val.")] = 0.05,
        shard_size: Annotated[int, typer.Option(min=1, help="Samples per Parquet / WebDataset shard.")] = 1000,
        include_reviewers: Annotated[bool, typer.Option(help="Name the reviewers in the records.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
        background: Annotated[
            bool, typer.Option("--background", help="Queue the export as a job for `mcie worker` and return.")
        ] = False,
    ) -> None:
        _export(fmt, out, status, min_quality, min_complexity, reviewer, decided_after, decided_before, dataset,
                since, val_fraction, shard_size, include_reviewers, as_json, background)

    command.__doc__ = doc
    return command


app.command("jsonl")(_format_command("jsonl", "train.jsonl / val.jsonl and images under content-hash names."))
app.command("parquet")(_format_command("parquet", "Parquet shards with embedded images (datasets-loadable)."))
app.command("webdataset")(_format_command("webdataset", "WebDataset tar shards for streaming training."))


@app.command("reviews")
def reviews_command(
    path: Annotated[Path, typer.Argument(help="Output file: .csv or .parquet (decisions go beside it).")],
) -> None:
    """Every raw review and decision, for analysis (includes usernames and comments)."""
    from mcie.config import settings_or_exit as settings
    from mcie.db.session import session_scope
    from mcie.exports.reviews import export_reviews

    try:
        with session_scope(settings().database_url) as session:
            result = export_reviews(session, path)
    except ValueError as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"wrote {result.n_reviews} reviews to {result.reviews_path} and {result.n_decisions} decisions "
                  f"to {result.decisions_path}")
