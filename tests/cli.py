"""The ``mcie`` console script run in-process for tests: typer's runner, with exceptions left to fail the test."""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from mcie.cli import app

runner = CliRunner()


def invoke(*args: str, stdin: str | None = None) -> Result:
    """Run ``mcie ARGS...``; the result keeps the exit code, stdout and stderr apart."""
    return runner.invoke(app, list(args), input=stdin, catch_exceptions=False)


def cli(*args: str) -> tuple[int, str, str]:
    """``mcie ARGS...`` as (exit code, stdout, stderr)."""
    result = invoke(*args)
    return result.exit_code, result.stdout, result.stderr
