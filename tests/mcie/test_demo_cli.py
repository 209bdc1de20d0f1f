"""``mcie demo``: its help says it runs the pipeline itself; it prints only the accounts it created."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from mcie.cli import DEMO_PASSWORD, app
from mcie.config import get_settings

runner = CliRunner()


def _flat(text: str) -> str:
    return re.sub(r"[\s│]+", " ", text)


def test_demo_help_says_it_runs_the_pipeline() -> None:
    result = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    text = _flat(result.stdout)
    assert "run the pipeline itself" in text and "--no-pipeline" in text


def test_demo_prints_only_the_accounts_it_created(tmp_path: Path, migrated_url: str, monkeypatch) -> None:
    monkeypatch.setenv("MCIE_DATABASE_URL", migrated_url)
    get_settings.cache_clear()
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--out", str(out), "--instances", "2", "--no-pipeline"])
    assert first.exit_code == 0, first.stdout
    assert "demo accounts created" in first.stdout and DEMO_PASSWORD in first.stdout
    assert "mcie pipeline ingest" in first.stdout and "pipeline: " not in first.stdout  # nothing was ingested
    second = runner.invoke(app, ["demo", "--out", str(out), "--instances", "2", "--no-pipeline"])
    assert second.exit_code == 0, second.stdout
    assert DEMO_PASSWORD not in second.stdout  # no password printed for accounts it did not create
    assert "kept as they were" in second.stdout and "rater1" in second.stdout
    third = runner.invoke(app, ["demo", "--out", str(out), "--instances", "2", "--no-accounts"])
    assert third.exit_code == 0, third.stdout
    assert "demo accounts" not in third.stdout and DEMO_PASSWORD not in third.stdout
    assert "samples loaded for review" in third.stdout
