"""``mcie data import``: a public edit dataset (Hub id or local files) as an export folder ``mcie train`` reads.

The work is done by :mod:`exports.importer`; this is the command-line glue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mcie.exports.writers import FORMATS

app = typer.Typer(no_args_is_help=True, help="Bring outside datasets into mcie's record format.")
console = Console()
err = Console(stderr=True)


@app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(help="Hub dataset id (owner/name) or a local Parquet / Arrow / JSONL file "
                                               "or folder, or an image folder with metadata.jsonl.")],
    out: Annotated[Path, typer.Argument(help="Export folder to create (must not exist or be empty).")],
    preset: Annotated[str | None, typer.Option(help="Column layout: magicbrush or omniedit.")] = None,
    columns: Annotated[str | None, typer.Option(help="ROLE=COLUMN,...: source, target, instruction (required), "
                                                     "mask, boxes, id, group, turn, operation.")] = None,
    split: Annotated[str, typer.Option(help="Split of the source to read.")] = "train",
    fmt: Annotated[str, typer.Option("--format", help=f"Output format: {', '.join(FORMATS)}.")] = "jsonl",
    val_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of instances put in val.")] = 0.0,
    limit: Annotated[int | None, typer.Option(min=1, help="Read at most this many rows.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Import SOURCE into OUT in the record format of `mcie export`, boxes from masks, one named error per bad row."""
    from mcie.exports.importer import DataImportError, import_dataset, parse_columns

    def show(problem: dict) -> None:
        ident = f" (id {problem['id']})" if problem.get("id") else ""
        err.print(f"row {problem['row']}{ident}: {problem['error']}", highlight=False, markup=False)

    try:
        mapping = parse_columns(columns) if columns else None
        report = import_dataset(source, out, preset=preset, columns=mapping, split=split, fmt=fmt,
                                val_fraction=val_fraction, limit=limit, progress=progress and not as_json,
                                on_error=show)
    except DataImportError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(f"imported {report.written} of {report.rows} rows into {out} ({fmt}; "
                      f"train {report.counts.get('train', 0)}, val {report.counts.get('val', 0)}); "
                      f"{report.n_errors} bad rows listed in {out}/import_errors.jsonl", highlight=False)
