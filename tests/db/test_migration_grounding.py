"""Migration 0004 (grounding) moves the parser's failure reasons into ``parse_error`` (and back on downgrade)."""

from __future__ import annotations

import sqlalchemy as sa

from mcie.db import migrate
from mcie.db.session import engine_for

KEY = "a" * 64


def _insert(url: str, stage: str, verdict: str, rationale: str | None, parsed: str | None) -> None:
    with engine_for(url).begin() as conn:
        conn.execute(
            sa.text("INSERT INTO mllm_judgements (stage, model, prompt_version, cache_key, verdict, rationale, parsed, "
                    "created_at) VALUES (:stage, 'm', 'v1', :key, :verdict, :rationale, :parsed, CURRENT_TIMESTAMP)"),
            {"stage": stage, "key": KEY, "verdict": verdict, "rationale": rationale, "parsed": parsed},
        )


def _rows(url: str, columns: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT {columns} FROM mllm_judgements ORDER BY id"))]


def test_parse_failures_move_to_parse_error_and_back(any_db_url: str) -> None:
    migrate.upgrade(any_db_url, "0003")
    _insert(any_db_url, "conflict", "unparseable", "no JSON object found", None)
    _insert(any_db_url, "grounding", "unparseable", None, '{"reason": "no box found"}')
    _insert(any_db_url, "conflict", "no_conflict", "different objects", '{"conflict": false}')
    migrate.upgrade(any_db_url, "0004")
    rows = _rows(any_db_url, "stage, rationale, parsed, parse_error")
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("conflict", None, "no JSON object found"),
        ("grounding", None, "no box found"),
        ("conflict", "different objects", None),  # the MLLM's own reason stays where it was
    ]
    assert rows[1][2] is None and rows[2][2] is not None
    migrate.downgrade(any_db_url, "0003")
    rows = _rows(any_db_url, "rationale, parsed")
    assert rows[0][0] == "no JSON object found"
    assert "no box found" in str(rows[1][1])
    assert rows[2][0] == "different objects"
    migrate.upgrade(any_db_url)
    assert migrate.current(any_db_url) == migrate.head()
