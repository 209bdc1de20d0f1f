"""``mcie study ...`` end to end on a folder of tiny PNGs (create, invite, status, open/close, revoke, exclude,
results, export), and :func:`annotate.study.create_study_from_previews` (items from samples, outputs from finished
previews, every gap reported) with its ``mcie study from-previews`` command."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from mcie.annotate import study as st
from mcie.cli import app
from mcie.db.models import JobStatus, Preview, Study, StudyItem, StudyOutput, Turn, utcnow
from mcie.db.session import session_scope
from tests.annotate.factories import make_image, make_instance, make_sample
from tests.annotate.test_study_web import METHODS, make_study_folder

runner = CliRunner()
LINK_RE = re.compile(r"^(\S+)\t(https://study\.example/study/join/([A-Za-z0-9_-]{40,}))$")


@pytest.fixture
def url() -> str:
    from mcie.config import get_settings
    from mcie.db.migrate import upgrade

    database_url = get_settings().database_url  # tests/conftest.py points it at this test's own SQLite file
    upgrade(database_url)
    return database_url


def mcie(*args: str, code: int = 0) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def finish(url: str, study_id: int, user_id: int, label: str) -> int:
    """Answer every screen of the participant with ``label`` on every question."""
    n = 0
    while True:
        with session_scope(url, write=True) as session:  # current_item may assign the sequence: a write
            screen = st.current_item(session, study_id, user_id)
        if screen is None:
            return n
        for criterion in screen.criteria:
            with session_scope(url, write=True) as session:
                st.cast_vote(session, study_id, user_id, screen.item_id, criterion, label, 2500.0)
        with session_scope(url, write=True) as session:
            st.advance(session, study_id, user_id, screen.item_id)
        n += 1


def from_previews(url: str, *args: Any, **kwargs: Any) -> st.StudyReport:
    """:func:`annotate.study.create_study_from_previews` in a write transaction of its own (as the CLI calls it)."""
    with session_scope(url, write=True) as session:
        return st.create_study_from_previews(session, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# mcie study ... on a folder


def test_create_invite_status_results_and_export(url: str, tmp_path: Path) -> None:
    folder = make_study_folder(tmp_path / "pilot", 4)
    created = json.loads(mcie("study", "create", folder, "--name", "pilot", "--items-per-participant", "2",
                              "--seed", "1", "--json").stdout)
    assert (created["name"], created["n_items"], tuple(created["methods"])) == ("pilot", 4, METHODS)
    study_id = created["study_id"]

    lines = mcie("study", "invite", "pilot", "--count", "3", "--base-url", "https://study.example/").stdout
    links = [LINK_RE.match(line) for line in lines.splitlines()]
    assert len(links) == 3 and all(links), lines
    with session_scope(url) as session:
        people = [(m.group(1), st.participant_from_token(session, m.group(3))) for m in links if m]
    assert all(found is not None and found[0] == study_id for _, found in people)
    named = json.loads(mcie("study", "invite", str(study_id), "--username", "alice", "--json").stdout)
    assert named[0]["username"] == "alice" and named[0]["link"].startswith("http://127.0.0.1:7860/study/join/")

    (first, (_, first_id)), (second, (_, second_id)) = people[0], people[1]
    assert finish(url, study_id, first_id, "A") == 2
    assert finish(url, study_id, second_id, "B") == 2
    status = {r["username"]: r for r in json.loads(mcie("study", "status", "pilot", "--json").stdout)}
    assert status[first]["completed"] == 2 and status[first]["finished_at"] is not None
    assert status["alice"]["assigned"] == 0 and status["alice"]["finished_at"] is None
    table = mcie("study", "status", "pilot").stdout
    assert "4 enrolled, 2 finished" in table

    res = json.loads(mcie("study", "results", "pilot", "--json", "--n-boot", "20").stdout)
    assert res["study"]["id"] == study_id and res["n_votes"] == 8 and res["n_participants"] == 2
    assert res["participants"] == {"enrolled": 4, "finished": 2}
    shares = res["by_criterion"]["instruction"]["shares"]
    assert sum(s["n_chosen"] for s in shares.values()) == 4
    shown = mcie("study", "results", "pilot", "--n-boot", "0").stdout
    assert "instruction: none acceptable 0.0%" in shown and "strength" in shown and "mcie-e1" in shown

    mcie("study", "exclude", "pilot", second, code=1)  # a reason is required
    mcie("study", "exclude", "pilot", second, "--reason", "clicked A-B-A-B")
    excluded = json.loads(mcie("study", "results", "pilot", "--json", "--n-boot", "0").stdout)
    assert excluded["excluded"] == [second_id] and excluded["n_participants"] == 1
    mcie("study", "exclude", "pilot", str(second_id), "--include")
    assert json.loads(mcie("study", "results", "pilot", "--json", "--n-boot", "0").stdout)["excluded"] == []

    csv, parquet = tmp_path / "votes.csv", tmp_path / "votes.parquet"
    assert "8 votes written" in mcie("study", "export", "pilot", csv).stdout
    mcie("study", "export", "pilot", parquet)
    frame = pd.read_csv(csv)
    assert len(frame) == 8 and set(frame["username"]) == {first, second}
    assert len(pd.read_parquet(parquet)) == 8
    mcie("study", "export", "pilot", tmp_path / "votes.txt", code=1)

    token = links[2].group(3) if links[2] else ""
    mcie("study", "revoke", "pilot", people[2][0])
    with session_scope(url) as session:
        assert st.participant_from_token(session, token) is None
    mcie("study", "close", "pilot")
    assert json.loads(mcie("study", "list", "--json").stdout)[0]["status"] == "closed"
    mcie("study", "invite", "pilot", code=1)  # a closed study takes nobody new
    mcie("study", "open", "pilot")
    assert "pilot" in mcie("study", "list").stdout


def test_create_lists_every_problem_and_writes_nothing(url: str, tmp_path: Path) -> None:
    folder = make_study_folder(tmp_path / "broken", 3)
    (folder / "mcie-e1" / "item-001.png").unlink()
    (folder / "smartedit" / "item-002.png").write_bytes(b"not a png")
    result = mcie("study", "create", folder, "--name", "broken", code=1)
    assert "2 problem(s)" in result.stderr
    assert "item-001.png: missing" in result.stderr and "item-002.png" in result.stderr
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 0


def test_unknown_study_and_bad_options_are_refused(url: str, tmp_path: Path) -> None:
    assert "no study named or numbered 'nope'" in mcie("study", "status", "nope", code=1).stderr
    mcie("study", "create", make_study_folder(tmp_path / "s", 3), "--name", "s1", "--items-per-participant", "2")
    assert "either --count or --username" in mcie("study", "invite", "s1", "--count", "2", "--username", "x",
                                                  code=1).stderr
    assert "no participant 'ghost'" in mcie("study", "revoke", "s1", "ghost", code=1).stderr
    assert "invalid username" in mcie("study", "invite", "s1", "--username", "Bad Name!", code=1).stderr


# ----------------------------------------------------------------------------------------------------------
# a study from previews


def _preview(session: Any, sample_id: int, version: str, status: JobStatus, *, seed: int = 0,
             image: str | None = None, error: str | None = None, age_s: float = 0.0) -> None:
    finished = utcnow() - timedelta(seconds=age_s) if status in (JobStatus.done, JobStatus.failed) else None
    session.add(Preview(sample_id=sample_id, model_version=version, seed=seed, params={},
                        params_hash=f"{seed:064d}"[-64:], status=status, image=image, error=error,
                        finished_at=finished))
    session.flush()


def _samples_with_previews(url: str) -> tuple[list[int], dict[str, Any]]:
    """Three samples (the second a window [2, 3] of a 3-turn instance) with finished previews of two versions."""
    with session_scope(url) as session:
        a = make_sample(session, n_turns=2)
        b = make_sample(session, make_instance(session, 3), first_turn=2, last_turn=3)
        c = make_sample(session, n_turns=2)
        ids = [a.id, b.id, c.id]
        expected: dict[str, Any] = {"source": {}, "target": {}, "v1": {}, "v2": {}}
        for sample in (a, b, c):
            turns = {t.index: t.result_image for t in session.scalars(select(Turn).where(
                Turn.instance_id == sample.instance_id))}
            expected["source"][sample.id] = (sample.instance.source_image if sample.first_turn == 1
                                             else turns[sample.first_turn - 1])
            expected["target"][sample.id] = turns[sample.last_turn]
            for version in ("v1", "v2"):
                image = make_image(session, f"preview-{sample.id}-{version}")
                _preview(session, sample.id, version, JobStatus.done, image=image)
                expected[version][sample.id] = image
        # an older finished preview of v1 for sample a (another seed): the newest one is taken
        _preview(session, a.id, "v1", JobStatus.done, seed=7, image=make_image(session, "old"), age_s=3600)
    return ids, expected


def test_create_study_from_previews(migrated_url: str) -> None:
    ids, expected = _samples_with_previews(migrated_url)
    report = from_previews(migrated_url, "from-previews", ids, {"mcie-e1": "v1", "base": "v2"},
                           reference=True, attention_checks={ids[2]: "reference"}, items_per_participant=2, seed=3)
    assert (report.n_items, report.n_attention_items, report.methods) == (3, 1, ("base", "mcie-e1", "reference"))
    assert any(f"sample {ids[0]}: 2 finished previews of 'mcie-e1'" in w for w in report.warnings)
    with session_scope(migrated_url) as session:
        items = session.scalars(select(StudyItem).where(StudyItem.study_id == report.study_id)
                                .order_by(StudyItem.id)).all()
        outputs = {(o.item_id, o.method): o.image for o in session.scalars(select(StudyOutput))}
        instructions = {i.sample_id: i.instruction for i in items}
    assert [i.sample_id for i in items] == ids and [i.external_id for i in items] == [f"sample-{i}" for i in ids]
    assert instructions[ids[1]] == "edit number 2, then edit number 3"
    for item in items:
        assert item.source_image == expected["source"][item.sample_id]  # the window's source, not the instance's
        assert outputs[(item.id, "mcie-e1")] == expected["v1"][item.sample_id]
        assert outputs[(item.id, "base")] == expected["v2"][item.sample_id]
        assert outputs[(item.id, "reference")] == expected["target"][item.sample_id]
    assert [(i.is_attention_check, i.attention_answer) for i in items][2] == (True, "reference")
    seeded = from_previews(migrated_url, "seed-7", [ids[0]], {"mcie-e1": "v1"}, reference=True, preview_seed=7,
                           items_per_participant=1)
    with session_scope(migrated_url) as session:
        image = session.scalar(select(StudyOutput.image).join(StudyItem, StudyItem.id == StudyOutput.item_id).where(
            StudyItem.study_id == seeded.study_id, StudyOutput.method == "mcie-e1"))
    assert image == make_image_sha("old") and not seeded.warnings


def make_image_sha(label: str) -> str:
    from tests.annotate.factories import sha

    return sha(label)


def test_previews_gaps_are_all_reported_and_nothing_is_written(migrated_url: str) -> None:
    ids, _ = _samples_with_previews(migrated_url)
    with session_scope(migrated_url) as session:
        lonely = make_sample(session, n_turns=2).id
        _preview(session, lonely, "v1", JobStatus.queued)
        _preview(session, lonely, "v1", JobStatus.failed, seed=1, error="CUDA out of memory\ntraceback ...")
        before = session.scalar(select(func.count()).select_from(Study))
    with pytest.raises(st.StudyPreviewsError) as caught:
        from_previews(migrated_url, "gaps", [*ids, lonely, 999_999, ids[0]], ["v1", "v3"],
                      attention_checks={ids[0]: "nobody"})
    text = "\n".join(caught.value.problems)
    assert f"sample {lonely}: no finished preview for method 'v1' (model version 'v1'): found 1 failed, 1 queued; " \
           "last errors: CUDA out of memory" in text
    assert all(f"sample {i}: no finished preview for method 'v3' (model version 'v3'): none was requested" in text
               for i in [*ids, lonely])
    assert "sample 999999: no such sample" in text and f"sample id(s) given more than once: {ids[0]}" in text
    assert "'nobody' is not one of the methods" in text
    with session_scope(migrated_url) as session:
        assert session.scalar(select(func.count()).select_from(Study)) == before
    with pytest.raises(st.StudyPreviewsError, match="at least two methods"):
        from_previews(migrated_url, "one", ids, ["v1"])
    with pytest.raises(st.StudyPreviewsError, match="must be 1-64 letters"):
        from_previews(migrated_url, "bad-name", ids, ["weights/v1.safetensors", "v2"])


def test_from_previews_command(url: str, tmp_path: Path) -> None:
    ids, _ = _samples_with_previews(url)
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids[1:])) + "\n")
    out = json.loads(mcie("study", "from-previews", "--name", "cmp", "--samples", str(ids[0]), "--samples-file",
                          tmp_path / "ids.txt", "--method", "mcie-e1=v1", "--method", "v2", "--reference",
                          "--items-per-participant", "3", "--json").stdout)
    assert out["n_items"] == 3 and out["methods"] == ["mcie-e1", "reference", "v2"] and out["folder"] == "previews"
    result = mcie("study", "from-previews", "--name", "cmp2", "--samples", ",".join(map(str, ids)), "--method", "v1",
                  "--method", "v9", code=1)
    assert "no finished preview for method 'v9'" in result.stderr
