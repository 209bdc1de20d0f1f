"""Grounding and the conflict filter recover from MLLM failures, reuse cached answers, and say when a run went wrong.

The MLLM is the local OpenAI-compatible test server (tests/mcie/mllm/chat_server.py) answering from the demo's ground
truth; a mode switch makes it fail (HTTP 503), answer prose, or vanish. Database (SQLite and PostgreSQL), image store,
scorers, stages and the ``mcie`` CLI are real.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from mcie.cli import app
from mcie.config import get_settings
from mcie.db.models import BoxCandidate, MllmJudgement, MllmStage, Sample, SampleStatus, SubInstruction, Turn
from mcie.db.session import session_scope
from mcie.db.store import ImageStore
from mcie.demo import build_demo
from mcie.pipeline.ingest import ingest, read_source
from tests.cli import cli
from tests.mcie.mllm.chat_server import Reply, chat_server

runner = CliRunner()


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    build_demo(out, instances=4, seed=3)
    return out


@pytest.fixture
def db(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MCIE_DATABASE_URL", migrated_url)
    monkeypatch.setenv("MCIE_MLLM_BACKEND", "openai")
    monkeypatch.setenv("MCIE_MLLM_MODEL", "test-model")
    monkeypatch.setenv("MCIE_MLLM_MAX_RETRIES", "0")
    monkeypatch.setenv("MCIE_MLLM_CONCURRENCY", "4")
    get_settings.cache_clear()
    return migrated_url


def _truth(demo: Path) -> dict[str, list[float]]:
    boxes = {}
    for line in (demo / "demo_truth.jsonl").read_text().splitlines():
        for turn in json.loads(line)["turns"]:
            boxes[turn["instruction"].rstrip(".").lower()] = turn["box"]
    return boxes


class Mllm:
    """Answers like a good MLLM (no conflicts; the true box) unless told to fail one stage."""

    def __init__(self, demo: Path) -> None:
        self.boxes = _truth(demo)
        self.grounding = "ok"  # ok | 503 | prose | empty
        self.conflict = "ok"

    def __call__(self, request):
        task = request.body.get("response_format", {}).get("json_schema", {}).get("name")
        mode = self.grounding if task == "grounding" else self.conflict
        if mode == "503":
            return Reply(status=503, body={"error": {"message": "model is loading"}})
        if mode == "prose":
            return "I think the edit is somewhere in the middle."
        if mode == "empty":
            return "[]"
        if task == "conflict":
            return json.dumps({"reason": "different objects", "conflict": False, "turns": []})
        text = "\n".join(request.texts())
        width, height = map(int, re.findall(r"Both images are (\d+)x(\d+) pixels", text)[-1])
        x0, y0, x1, y1 = self.boxes[re.findall(r'Instruction: "(.*?)"\n', text)[-1].rstrip(".").lower()]
        return json.dumps([{"bbox_2d": [x0 * width, y0 * height, x1 * width, y1 * height], "label": "edit"}])


def _candidates(url: str) -> list[tuple[int, int, str]]:
    with session_scope(url) as session:
        rows = session.execute(select(BoxCandidate.turn_id, BoxCandidate.rank, BoxCandidate.source))
        return sorted((t, r, str(s)) for t, r, s in rows)


def _judgements(url: str, stage: MllmStage) -> list[MllmJudgement]:
    with session_scope(url) as session:
        rows = list(
            session.scalars(select(MllmJudgement).where(MllmJudgement.stage == stage).order_by(MllmJudgement.id))
        )
        session.expunge_all()
        return rows


def _free_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # closed again: nothing listens there


def test_server_down_then_back_retries_every_failed_call(demo: Path, db: str, monkeypatch) -> None:
    assert cli("pipeline", "ingest", str(demo))[0] == 0
    monkeypatch.setenv("MCIE_MLLM_BASE_URL", _free_port_url())
    get_settings.cache_clear()
    code, out, err = cli("pipeline", "run")
    assert code == 1, out + err
    assert "all " in err and "MLLM calls of the conflict stage failed" in err
    assert "connection" in err and "hint: is the MLLM server at MCIE_MLLM_BASE_URL running" in err
    assert "MLLM calls of the grounding stage failed" in err
    assert "MLLM failures" in err and "conflict:" in err and "grounding:" in err
    with session_scope(db) as session:
        n_turns = session.scalar(select(func.count()).select_from(Turn))
        n_samples = session.scalar(select(func.count()).select_from(Sample))
        assert set(session.scalars(select(Sample.status))) == {SampleStatus.filtering}  # awaiting the conflict check
    diff_only = _candidates(db)
    assert {source for _, _, source in diff_only} == {"diff"}
    code, out, _ = cli("pipeline", "status", "--json")
    status = json.loads(out)
    assert status["mllm_failures"]["conflict"]["connection"]["count"] == n_samples
    assert status["mllm_failures"]["grounding"]["connection"]["count"] == n_turns
    assert status["rerun"]["would_ask"]["conflict_retries"] == n_samples
    assert status["rerun"]["would_ask"]["grounding_retries"] == n_turns
    code, out, _ = cli("pipeline", "status")
    assert "MLLM calls that failed" in out and "grounding_retries" in out

    mllm = Mllm(demo)
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        code, out, err = cli("pipeline", "run", "--no-retry", "--json")
        assert code == 0 and server.requests == []  # --no-retry: the failed calls are not asked again
        assert all(s.get("pending", 0) == 0 for s in json.loads(out)["stages"] if s["name"] != "load")
        code, out, err = cli("pipeline", "run", "--json")
        assert code == 0, out + err
        summary = json.loads(out)
        grounding = next(s for s in summary["stages"] if s["name"] == "grounding")
        assert grounding["counts"]["retried"] == n_turns and grounding["calls"] == n_turns
        assert summary["failed_stages"] == []
        after = _candidates(db)
        # the diff candidates are kept as they were (same ranks), the MLLM's come after them, nothing twice
        assert set(diff_only) <= set(after)
        for turn_id in {t for t, _, _ in after}:
            ranks = [(r, s) for t, r, s in after if t == turn_id]
            assert [r for r, _ in ranks] == list(range(1, len(ranks) + 1))
            assert [s for _, s in ranks][-1] == "mllm"
        with session_scope(db) as session:
            assert session.scalar(select(func.count()).where(Sample.status == SampleStatus.ready)) == n_samples
            chosen = session.scalar(select(func.count()).select_from(BoxCandidate).where(BoxCandidate.chosen))
            assert chosen == n_turns
        calls = len(server.requests)
        code, out, _ = cli("pipeline", "run", "--json")
        assert code == 0 and len(server.requests) == calls  # nothing left to retry
        assert _candidates(db) == after
        status = json.loads(cli("pipeline", "status", "--json")[1])
        assert status["mllm_failures"] == {}
        assert status["rerun"]["would_ask"]["grounding_turns"] == 0


def test_failed_and_unparseable_grounding_is_retried_for_ready_samples_unless_no_retry(demo, db, monkeypatch) -> None:
    assert cli("pipeline", "ingest", str(demo))[0] == 0
    mllm = Mllm(demo)
    mllm.grounding = "prose"
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        code, _out, err = cli("pipeline", "run")
        assert code == 1  # every grounding answer was unparseable
        assert "grounding stage failed" in err and "unparseable" in err and "grounding-capable" in err
        grounding = _judgements(db, MllmStage.grounding)
        assert grounding and all(j.verdict == "unparseable" and j.parse_error and j.parsed is None
                                 for j in grounding)
        assert all(j.rationale is None for j in grounding)
        with session_scope(db) as session:  # the conflict check passed: samples are ready with diff boxes
            assert set(session.scalars(select(Sample.status))) == {SampleStatus.ready}
            sources = set(session.scalars(select(SubInstruction.box_source).where(SubInstruction.box_x0.is_not(None))))
            assert sources == {"diff"}
        mllm.grounding = "503"
        calls = len(server.requests)
        code, _, err = cli("pipeline", "run", "--no-retry", "--json")
        assert code == 0 and len(server.requests) == calls  # --no-retry: nothing asked again
        assert "not asked again" not in err  # no failures in this run
        code, _, err = cli("pipeline", "run")
        assert code == 1 and "HTTP 503" in err and "server failed" in err
        assert len(server.requests) == calls + len(grounding)
        mllm.grounding = "ok"
        code, _, err = cli("pipeline", "run", "--json")
        assert code == 0, err
        assert len(server.requests) == calls + 2 * len(grounding)
    with session_scope(db) as session:
        verdicts = [j.verdict for j in _judgements(db, MllmStage.grounding)]
        assert verdicts.count("boxes") == len(grounding) and verdicts.count("error") == len(grounding)
        sources = set(session.scalars(select(SubInstruction.box_source).where(SubInstruction.box_x0.is_not(None))))
        assert "mllm" in sources  # the ready samples got the MLLM's boxes where they won
        per_turn = session.execute(
            select(BoxCandidate.turn_id, BoxCandidate.source, func.count()).group_by(BoxCandidate.turn_id,
                                                                                  BoxCandidate.source)
        ).all()
        assert all(n == 1 for _, source, n in per_turn if source == "mllm")  # one box asked once: one row


def test_conflict_parse_failure_is_stored_in_parse_error_and_no_retry_skips_errors(demo, db, monkeypatch) -> None:
    assert cli("pipeline", "ingest", str(demo))[0] == 0
    mllm = Mllm(demo)
    mllm.conflict = "prose"
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        code, _, err = cli("pipeline", "run", "--mllm", "openai")
        assert code == 1 and "conflict stage failed" in err
        conflict = _judgements(db, MllmStage.conflict)
        assert all(j.verdict == "unparseable" and j.parse_error and j.rationale is None for j in conflict)
        with session_scope(db) as session:
            reasons = set(session.scalars(select(Sample.flag_reason).where(Sample.flagged)))
            assert reasons and all("could not be parsed" in r and "None" not in r for r in reasons)
        status = json.loads(cli("pipeline", "status", "--json")[1])
        assert status["flagged"]["count"] == len(conflict)
        assert status["flagged"]["reasons"] == {"the MLLM's conflict answer could not be parsed": len(conflict)}
        assert status["mllm_failures"]["conflict"]["unparseable"]["count"] == len(conflict)


def test_grounding_cache_serves_the_same_images_and_instructions_ingested_again(demo, db, monkeypatch) -> None:
    settings_store = lambda: ImageStore.from_settings(get_settings())  # noqa: E731
    mllm = Mllm(demo)
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        ingest(read_source(demo, "seed-data-edit", None), url=db, store=settings_store())
        assert cli("pipeline", "run")[0] == 0
        calls = len(server.requests)
        copy = [replace(r, dataset="copy") if hasattr(r, "dataset") else r
                for r in read_source(demo, "seed-data-edit", None)]
        report = ingest(copy, url=db, store=settings_store())
        assert report.ingested == 4
        code, out, _ = cli("pipeline", "run", "--json")
        assert code == 0
        assert len(server.requests) == calls  # neither stage asks again
        stages = {s["name"]: s for s in json.loads(out)["stages"]}
        assert stages["grounding"]["cached"] == stages["grounding"]["pending"] > 0
        assert stages["grounding"]["calls"] == 0 and stages["conflict"]["calls"] == 0
    grounding = _judgements(db, MllmStage.grounding)
    copies = [j for j in grounding if (j.parsed or {}).get("cached")]
    assert len(copies) == stages["grounding"]["cached"] and all(j.latency_ms == 0 for j in copies)
    with session_scope(db) as session:
        # every turn of the copy got the same MLLM boxes as its original
        rows = session.execute(
            select(Turn.instruction, BoxCandidate.box_x0, BoxCandidate.box_y1)
            .join(BoxCandidate, BoxCandidate.turn_id == Turn.id)
            .where(BoxCandidate.source == "mllm")
        ).all()
        by_text: dict[str, set] = {}
        for text, x0, y1 in rows:
            by_text.setdefault(text, set()).add((x0, y1))
        assert all(len(v) == 1 for v in by_text.values())


def test_run_summary_fits_80_columns_with_whole_stage_names(demo: Path, db: str, monkeypatch) -> None:
    assert cli("pipeline", "ingest", str(demo))[0] == 0
    monkeypatch.setenv("MCIE_MLLM_BASE_URL", _free_port_url())
    get_settings.cache_clear()
    result = runner.invoke(app, ["pipeline", "run"], env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, result.stdout
    for name in ("expand", "conflict", "grounding", "load"):
        assert any(line.split() and line.split()[0] == name for line in lines), (name, result.stdout)
    assert "…" not in result.stdout


def test_retry_clears_the_no_box_flag_and_recomputes_the_priority_of_ready_samples(demo, db, monkeypatch) -> None:
    # turn 1 of the first instance changes nothing (its result is the source image): no diff box, so while the
    # grounding server fails its samples are loaded flagged "no box was found for turn(s) 1"
    first = json.loads((demo / "annotations" / "split_0001.jsonl").read_text().splitlines()[0])
    shutil.copyfile(demo / "images" / "data" / first["source_image"], demo / "images" / "data" / first["edit_image_1"])
    assert cli("pipeline", "ingest", str(demo))[0] == 0
    mllm = Mllm(demo)
    mllm.grounding = "503"
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        assert cli("pipeline", "run")[0] == 1  # every grounding call failed
        with session_scope(db) as session:
            assert set(session.scalars(select(Sample.status))) == {SampleStatus.ready}
            flagged = {s.id: (s.flag_reason, s.priority) for s in session.scalars(select(Sample).where(Sample.flagged))}
            assert flagged and all(r == "no box was found for turn(s) 1" for r, _ in flagged.values())
            other = min(flagged)  # a reason of its own stays when the box is found
            session.execute(update(Sample).where(Sample.id == other)
                            .values(flag_reason="image looks broken; no box was found for turn(s) 1"))
            before = {s.id: s.priority for s in session.scalars(select(Sample))}
        mllm.grounding = "ok"
        code, out, err = cli("pipeline", "run", "--json")
        assert code == 0, out + err
        grounding = next(s for s in json.loads(out)["stages"] if s["name"] == "grounding")
        assert grounding["counts"]["retried"] > 0 and grounding["counts"]["ready_refreshed"] >= len(flagged)
    with session_scope(db) as session:
        samples = {s.id: s for s in session.scalars(select(Sample))}
        no_box = select(func.count()).select_from(SubInstruction).where(SubInstruction.box_x0.is_(None))
        assert session.scalar(no_box) == 0
        for sample_id in flagged:
            sample = samples[sample_id]
            if sample_id == other:
                assert sample.flagged and sample.flag_reason == "image looks broken"
            else:
                assert not sample.flagged and sample.flag_reason is None
                assert sample.priority <= before[sample_id] - 0.2 + 1e-9  # the flag's 0.2 is gone
        # every ready sample's priority is what the load stage would give it now (conflict answered: no MLLM doubt)
        from mcie.pipeline.load_stage import box_doubt, priority

        scores: dict[int, dict[int, list[float]]] = {}
        for instance_id, index, score in session.execute(
            select(Turn.instance_id, Turn.index, BoxCandidate.score).join(BoxCandidate, BoxCandidate.turn_id == Turn.id)
        ):
            scores.setdefault(instance_id, {}).setdefault(index, []).append(score)
        for sample in samples.values():
            doubt = box_doubt(scores[sample.instance_id], range(sample.first_turn, sample.last_turn + 1))
            assert sample.priority == priority(0.0, doubt, sample.flagged)


def test_an_empty_grounding_answer_is_a_valid_answer_cached_and_not_asked_again(demo, db, monkeypatch) -> None:
    settings_store = lambda: ImageStore.from_settings(get_settings())  # noqa: E731
    mllm = Mllm(demo)
    mllm.grounding = "empty"
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        ingest(read_source(demo, "seed-data-edit", None), url=db, store=settings_store())
        code, out, err = cli("pipeline", "run", "--json")
        assert code == 0, out + err  # "nothing to ground" is an answer, not a failure
        summary = json.loads(out)
        grounding = next(s for s in summary["stages"] if s["name"] == "grounding")
        assert grounding["counts"]["mllm_empty"] == grounding["calls"] > 0 and not grounding.get("errors")
        judgements = _judgements(db, MllmStage.grounding)
        assert {j.verdict for j in judgements} == {"empty"}
        assert all(j.parse_error is None and j.error is None and j.parsed["boxes"] == [] for j in judgements)
        assert {s for _, _, s in _candidates(db)} == {"diff"}  # the turns keep their pixel-difference boxes
        status = json.loads(cli("pipeline", "status", "--json")[1])
        assert status["mllm_failures"] == {} and status["rerun"]["would_ask"]["grounding_turns"] == 0
        calls = len(server.requests)
        assert cli("pipeline", "run")[0] == 0 and len(server.requests) == calls  # not asked again
        copy = [replace(r, dataset="copy") if hasattr(r, "dataset") else r
                for r in read_source(demo, "seed-data-edit", None)]
        ingest(copy, url=db, store=settings_store())
        code, out, _ = cli("pipeline", "run", "--json")
        assert code == 0 and len(server.requests) == calls  # the copy's turns: served from the cache
        stages = {s["name"]: s for s in json.loads(out)["stages"]}
        assert stages["grounding"]["cached"] == stages["grounding"]["pending"] == grounding["calls"]
    copies = [j for j in _judgements(db, MllmStage.grounding) if (j.parsed or {}).get("cached")]
    assert len(copies) == grounding["calls"] and {j.verdict for j in copies} == {"empty"}


def test_unparseable_grounding_is_asked_at_most_three_times_failed_requests_always(demo, db, monkeypatch) -> None:
    from mcie.pipeline.grounding_stage import MAX_UNPARSEABLE

    assert cli("pipeline", "ingest", str(demo))[0] == 0
    mllm = Mllm(demo)
    with chat_server(mllm) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        mllm.grounding = "503"  # failed requests do not count toward the bound
        assert cli("pipeline", "run")[0] == 1
        n_turns = len(_judgements(db, MllmStage.grounding))
        mllm.grounding = "prose"
        for _ in range(MAX_UNPARSEABLE):
            calls = len(server.requests)
            assert cli("pipeline", "run")[0] == 1
            assert len(server.requests) == calls + n_turns  # asked again (grounding only: the conflict check passed)
        status = json.loads(cli("pipeline", "status", "--json")[1])
        assert status["rerun"]["would_ask"]["grounding_retries"] == 0
        calls = len(server.requests)
        assert cli("pipeline", "run")[0] == 0 and len(server.requests) == calls  # given up: diff boxes stay
    verdicts = [j.verdict for j in _judgements(db, MllmStage.grounding)]
    assert verdicts.count("error") == n_turns and verdicts.count("unparseable") == MAX_UNPARSEABLE * n_turns
