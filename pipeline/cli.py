"""``mcie pipeline ...``: ingest source datasets, run the filtering pipeline, decompose an instruction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="The data pipeline: ingest, expand, MLLM filter, grounding.")
console = Console()
err = Console(stderr=True)


def _settings():
    from mcie.config import settings_or_exit as settings

    return settings()


@app.command("ingest")
def ingest_command(
    path: Annotated[Path, typer.Argument(help="Annotations folder or .jsonl file.")],
    fmt: Annotated[str, typer.Option("--format", help="seed-data-edit or jsonl")] = "seed-data-edit",
    images_root: Annotated[Path | None, typer.Option(help="Folder image paths are relative to.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    allow_outside_root: Annotated[
        bool, typer.Option("--allow-outside-root", help="Accept image paths that resolve outside the images root.")
    ] = False,
    license: Annotated[
        str | None,
        typer.Option("--license", help="The source's licence (SPDX id, e.g. CC-BY-4.0) where a record states none "
                     "(default: CC-BY-NC-4.0 for seed-data-edit, none for jsonl)."),
    ] = None,
) -> None:
    """Ingest multi-turn instances into the database and the image store (re-ingesting adds nothing).

    Exits 0 when the run finished, even with skipped records (listed); non-zero only when nothing could be read.
    """
    from mcie.db import migrate
    from mcie.db.store import ImageStore
    from mcie.pipeline.ingest import ingest, read_source
    from mcie.pipeline.sources import IngestLimits

    cfg = _settings()
    if fmt not in ("seed-data-edit", "jsonl"):
        err.print(f"error: --format: expected seed-data-edit or jsonl, got {fmt!r}")
        raise typer.Exit(2)
    if not path.exists():
        err.print(f"error: {path}: no such file or folder")
        raise typer.Exit(2)
    migrate.upgrade(cfg.database_url)
    try:
        records = read_source(path, fmt, images_root,
                              IngestLimits.from_settings(cfg, allow_outside_root=allow_outside_root), license)
        report = ingest(records, url=cfg.database_url, store=ImageStore.from_settings(cfg))
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(
            f"read {report.read} records: ingested {report.ingested} instances ({report.turns} turns), "
            f"{report.already_present} already present, {len(report.skipped)} skipped"
        )
        for skipped in report.skipped:
            console.print(f"  skipped {skipped}", highlight=False, markup=False)
    if report.read == 0 or (report.ingested == 0 and report.already_present == 0):
        err.print("error: nothing could be read")
        raise typer.Exit(1)


@app.command("run")
def run_command(
    engine: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster).")] = "local",
    mllm: Annotated[str | None, typer.Option(help="none, openai, vllm or transformers (default MCIE_MLLM_BACKEND)")]
    = None,
    scorer: Annotated[str, typer.Option(help="Box scorer: clip, pixel or auto (clip with a checkpoint).")] = "auto",
    k: Annotated[int, typer.Option(min=1, max=10, help="Candidate boxes per source per turn.")] = 3,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    ray_workers: Annotated[int, typer.Option(min=1, help="Ray actors per stage.")] = 2,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed/--no-retry",
        help="Ask the MLLM again where an earlier call failed (or, for grounding, could not be parsed: at most "
        "3 times); --no-retry asks only what was never asked.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Expand, filter with the MLLM, ground and load samples for review (resumable).

    Exits 1 when every MLLM call of a stage failed (the first error and a hint go to stderr); failed calls are kept
    and asked again by the next run.
    """
    from mcie.config import ConfigError
    from mcie.db import migrate
    from mcie.pipeline.run import error_lines, failed_stages, run_pipeline

    cfg = _settings()
    if engine not in ("local", "ray"):
        err.print(f"error: --engine: expected local or ray, got {engine!r}")
        raise typer.Exit(2)
    if mllm is not None and mllm not in ("none", "openai", "vllm", "transformers"):
        err.print(f"error: --mllm: expected none, openai, vllm or transformers, got {mllm!r}")
        raise typer.Exit(2)
    if scorer not in ("clip", "pixel", "auto"):
        err.print(f"error: --scorer: expected clip, pixel or auto, got {scorer!r}")
        raise typer.Exit(2)
    migrate.upgrade(cfg.database_url)
    try:
        summary = run_pipeline(cfg, engine=engine, mllm=mllm, scorer=scorer, k=k, ray_address=ray_address,
                               ray_workers=ray_workers, progress=not as_json, retry=retry_failed)
    except ConfigError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    fatal = failed_stages(summary)
    if as_json:
        print(json.dumps(summary.as_dict() | {"failed_stages": fatal}, indent=2))
    else:
        _print_summary(summary)
        errors = error_lines(summary)
        if errors:
            err.print("MLLM failures (stored in mllm_judgements; "
                      + ("a rerun asks again):" if retry_failed else "--no-retry: not asked again):"),
                      highlight=False)
            for line in errors:
                err.print(f"  {line}", highlight=False, markup=False)
    for message in fatal:
        err.print(f"error: {message}", highlight=False, markup=False)
    if fatal:
        raise typer.Exit(1)


def _print_summary(summary) -> None:
    """The run's table (fits 80 columns) and each stage's counts below it."""
    for note in summary.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"pipeline run: engine {summary.engine}, mllm {summary.mllm}, scorer {summary.scorer}",
                  highlight=False)
    table = Table(box=None, pad_edge=False)
    table.add_column("stage", no_wrap=True)
    for name in ("pending", "calls", "cached", "failed", "unparsed", "tokens", "seconds"):
        table.add_column(name, justify="right", no_wrap=True)
    for stage in summary.stages:
        if stage.get("skipped_reason"):
            table.add_row(stage["name"], *["-"] * 7)
            continue
        tokens = stage.get("prompt_tokens", 0) + stage.get("completion_tokens", 0)
        table.add_row(stage["name"], *(str(stage.get(key, "-")) for key in ("pending", "calls", "cached", "failures",
                                                                           "unparseable")),
                      str(tokens), str(stage.get("seconds", "-")))
    console.print(table)
    for stage in summary.stages:
        if stage.get("skipped_reason"):
            console.print(f"  {stage['name']}: skipped ({stage['skipped_reason']})", highlight=False)
            continue
        counts = stage.get("counts", {})
        shown = ", ".join(f"{k} {v}" for k, v in counts.items() if not k.startswith("scorer:")) or "-"
        console.print(f"  {stage['name']}: {shown}", highlight=False, markup=False)


@app.command("status")
def status_command(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Samples by status, flagged samples, unrecovered MLLM failures by stage and kind, and what a rerun retries."""
    from mcie.pipeline.status import pipeline_status

    out = pipeline_status(_settings())
    if as_json:
        print(json.dumps(out, indent=2))
        return
    samples = ", ".join(f"{k} {v}" for k, v in out["samples"].items()) or "none"
    console.print(f"instances {out['instances']}; samples: {samples}", highlight=False)
    flagged = out["flagged"]
    console.print(f"flagged samples {flagged['count']}" + (":" if flagged["count"] else ""), highlight=False)
    for reason, n in flagged["reasons"].items():
        console.print(f"  {n} x {reason}", highlight=False, markup=False)
    failures = out["mllm_failures"]
    if failures:
        console.print("MLLM calls that failed and have not been answered since:", highlight=False)
        for stage, kinds in failures.items():
            for kind, entry in kinds.items():
                console.print(f"  {stage}: {entry['count']} x {kind}: {entry['first']}", highlight=False,
                              markup=False)
    else:
        console.print("MLLM calls that failed and have not been answered since: none", highlight=False)
    rerun = out["rerun"]
    console.print(f"a rerun (mcie pipeline run, mllm {rerun['mllm']}) would ask: " + ", ".join(
        f"{k} {v}" for k, v in rerun["would_ask"].items()), highlight=False)


@app.command("decompose")
def decompose_command(
    image: Annotated[Path, typer.Option(help="The source image.")],
    instruction: Annotated[str, typer.Option(help="The complex instruction.")],
    mllm: Annotated[str | None, typer.Option(help="openai, vllm or transformers (default MCIE_MLLM_BACKEND)")] = None,
) -> None:
    """Split a complex instruction into (sub-instruction, operation, box) triples; prints JSON."""
    from PIL import Image, UnidentifiedImageError

    from mcie.config import ConfigError
    from mcie.mllm.base import make_backend
    from mcie.mllm.decompose import DecompositionError, decompose

    cfg = _settings()
    try:
        picture = Image.open(image).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        err.print(f"error: --image {image}: cannot be read as an image ({exc})")
        raise typer.Exit(2) from None
    try:
        with make_backend(mllm, cfg) as backend:
            result = decompose(picture, instruction, backend)
    except ConfigError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    except DecompositionError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(1) from None
    print(json.dumps(result.as_dict(), indent=2))
