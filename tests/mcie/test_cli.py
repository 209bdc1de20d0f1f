"""The mcie console script: config, db and users commands against a real SQLite database."""

from __future__ import annotations

import json

from tests.cli import invoke


def test_config_show_json_and_bad_setting(monkeypatch) -> None:
    result = invoke("config", "show", "--json")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["MCIE_DATABASE_URL"].startswith("sqlite:///")
    from mcie.config import get_settings

    monkeypatch.setenv("MCIE_MLLM_TIMEOUT_S", "-3")
    get_settings.cache_clear()
    result = invoke("config", "show")
    assert result.exit_code == 2
    assert "MCIE_MLLM_TIMEOUT_S" in result.stderr


def test_db_upgrade_current_downgrade() -> None:
    assert "up to date" not in invoke("db", "current").stdout
    assert invoke("db", "upgrade").exit_code == 0
    assert "up to date" in invoke("db", "current").stdout
    assert invoke("db", "downgrade", "base").exit_code == 0
    assert "base" in invoke("db", "current").stdout


def test_users_lifecycle() -> None:
    invoke("db", "upgrade")
    result = invoke("users", "add", "alice", "--role", "lead", "--password-stdin", stdin="correct horse\n")
    assert result.exit_code == 0, result.stdout
    again = invoke("users", "add", "alice", "--role", "rater", "--password-stdin", stdin="correct horse\n")
    assert again.exit_code == 1 and "already exists" in again.stderr
    short = invoke("users", "add", "bob", "--role", "rater", "--password-stdin", stdin="short\n")
    assert short.exit_code == 1 and "at least 8" in short.stderr
    role = invoke("users", "add", "bob", "--role", "boss", "--password-stdin", stdin="long enough\n")
    assert role.exit_code == 1 and "unknown role" in role.stderr
    assert invoke("users", "disable", "alice").exit_code == 0
    listed = json.loads(invoke("users", "list", "--json").stdout)
    assert listed == [{"username": "alice", "role": "lead", "active": False, "last_login_at": None}]
    assert invoke("users", "set-password", "alice", "--password-stdin", stdin="another secret\n").exit_code == 0
    assert invoke("users", "enable", "alice").exit_code == 0

    from mcie.annotate.accounts import authenticate
    from mcie.db.session import session_scope

    with session_scope() as session:
        assert authenticate(session, "alice", "correct horse") is None
        user = authenticate(session, "alice", "another secret")
        assert user is not None and user.password_hash.startswith("$argon2")
        assert authenticate(session, "nobody", "another secret") is None


def test_agreement_command_prints_the_figures() -> None:
    from mcie.db.session import session_scope
    from tests.annotate.factories import agreement_project

    invoke("db", "upgrade")
    with session_scope() as session:
        agreement_project(session)
    result = invoke("agreement", "--json", "--n-boot", "50")
    assert result.exit_code == 0, result.stdout
    figures = json.loads(result.stdout)
    assert figures["n_reviews"] == 18 and figures["n_reviewers"] == 3
    quality = figures["overlapping"]["questions"]["quality"]
    assert quality["n_units"] == 6 and -1 <= quality["alpha"] <= 1
    table = invoke("agreement", "--n-boot", "50")
    assert table.exit_code == 0 and "overlap" in table.stdout and "quality" in table.stdout, table.stdout
