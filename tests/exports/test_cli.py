"""``mcie export`` on the demo pipeline's database: a dataset in each format, bad options, raw reviews."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli import invoke


def test_export_commands(tmp_path: Path) -> None:
    assert invoke("demo", "--instances", "3", "--no-accounts").exit_code == 0
    result = invoke("export", "jsonl", str(tmp_path / "ready"), "--status", "ready", "--json")
    assert result.exit_code == 0, result.stdout
    summary = json.loads(result.stdout)
    assert summary["samples"] > 0 and sum(summary["counts"].values()) == summary["samples"]
    manifest = json.loads((tmp_path / "ready" / "manifest.json").read_text())
    assert manifest["filter"]["statuses"] == ["ready"]
    card = (tmp_path / "ready" / "README.md").read_text()  # the demo's pictures' terms and the actual filter
    assert "license:\n- other\n---" in card and "| seed-data-edit | other |" in card
    assert "with status `ready`, exported by" in card
    for fmt in ("parquet", "webdataset"):
        result = invoke("export", fmt, str(tmp_path / fmt), "--status", "ready")
        assert result.exit_code == 0 and "samples" in result.stdout
    empty = invoke("export", "jsonl", str(tmp_path / "accepted"))
    assert empty.exit_code == 0 and " 0 samples" in empty.stdout  # nothing is accepted before review
    bad = invoke("export", "jsonl", str(tmp_path / "bad"), "--min-quality", "9")
    assert bad.exit_code == 2 and "--min-quality" in bad.stderr
    again = invoke("export", "jsonl", str(tmp_path / "ready"), "--status", "ready")
    assert again.exit_code == 1 and "error" in again.stderr
    reviews = invoke("export", "reviews", str(tmp_path / "reviews.csv"))
    assert reviews.exit_code == 0 and (tmp_path / "reviews-decisions.csv").exists()
