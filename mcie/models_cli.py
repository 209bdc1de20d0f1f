"""``mcie models``: fetch the paper's models (or any Hub id) into the Hugging Face cache and show what is cached.

The resolution rules (local path or Hub id, ``@revision``, ``HF_HOME`` / ``HF_HUB_OFFLINE``) live in :mod:`mcie.hub`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="Model weights in the Hugging Face cache (presets of the paper's set).")
console = Console()
err = Console(stderr=True)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@app.command("pull")
def pull_command(
    names: Annotated[list[str], typer.Argument(help="Preset names (see `mcie models list`), `paper` for the "
                                                    "paper's whole set, or Hub ids owner/name[@revision].")],
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show download progress bars.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Download models into the Hugging Face cache ($HF_HOME); a model already there is only checked."""
    from mcie.hub import expand_names, hub_cache_dir, pull

    rows, failed = [], []
    for name in expand_names(names):
        try:
            got = pull(name, progress=progress and not as_json)
        except (FileNotFoundError, ValueError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            failed.append(name)
            continue
        rows.append({"name": got.name, "repo_id": got.repo_id, "revision": got.revision or "main",
                     "path": str(got.path), "files": got.files, "bytes": got.bytes,
                     "setting": got.setting})
    if as_json:
        print(json.dumps({"cache": str(hub_cache_dir()), "pulled": rows, "failed": failed}, indent=2))
    elif rows:
        table = Table("name", "repository", "files", "size", "use as", "path", title=f"cache {hub_cache_dir()}")
        for row in rows:
            setting = f"{row['setting']}={row['repo_id']}" if row["setting"] else row["repo_id"]
            table.add_row(row["name"], row["repo_id"], str(row["files"]), _size(int(row["bytes"])), setting,
                          row["path"])
        console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command("list")
def list_command(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """The presets (and whether each is cached) and every repository in the Hugging Face cache, with sizes."""
    from mcie.hub import PAPER_SET, PRESETS, cached_models, hub_cache_dir

    cached = cached_models()
    by_repo = {row["repo_id"]: row for row in cached}
    presets = [{"name": name, "repo_id": p.repo_id, "setting": p.setting, "use": p.use, "paper": name in PAPER_SET,
                "cached": p.repo_id in by_repo} for name, p in PRESETS.items()]
    if as_json:
        print(json.dumps({"cache": str(hub_cache_dir()), "presets": presets, "cached": cached}, indent=2))
        return
    table = Table("preset", "repository", "cached", "setting", "used for", title="presets (`paper` = the starred)")
    for row in presets:
        table.add_row(row["name"] + (" *" if row["paper"] else ""), row["repo_id"], "yes" if row["cached"] else "no",
                      row["setting"], row["use"])
    console.print(table)
    table = Table("repository", "type", "files", "size", "revisions", title=f"cache {hub_cache_dir()}")
    for row in cached:
        table.add_row(str(row["repo_id"]), str(row["type"]), str(row["files"]), _size(int(row["bytes"])),  # type: ignore[call-overload]
                      ", ".join(row["revisions"]))  # type: ignore[arg-type]
    console.print(table)
    total = sum(int(row["bytes"]) for row in cached)  # type: ignore[call-overload]
    console.print(f"{len(cached)} repositories, {_size(total)} in all")
