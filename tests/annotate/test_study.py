"""The user study service on SQLite and PostgreSQL: a study from a folder (and the report of its gaps), invites,
the participant's flow with resume and locked votes, stored votes, exports, exclusions and results."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import func, select

from mcie.annotate.study import (
    EXPORT_COLUMNS,
    LABELS,
    ItemScreen,
    StudyError,
    StudyFolderError,
    advance,
    assign_participant,
    cast_vote,
    create_study_from_folder,
    current_item,
    enrol,
    export_votes,
    list_studies,
    participant_from_token,
    participants_status,
    revoke_invite,
    set_excluded,
    set_study_status,
    study_results,
    votes_frame,
)
from mcie.annotate.study_analysis import VOTE_COLUMNS
from mcie.annotate.study_design import design
from mcie.db.models import (
    AuditLog,
    StudyAssignment,
    StudyItem,
    StudyOutput,
    StudyParticipant,
    StudyStatus,
    User,
    Vote,
)
from mcie.db.models import Image as ImageRow
from mcie.db.session import session_scope
from mcie.db.store import ImageStore

METHODS = ("ip2p", "mcie-e1", "smartedit")


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format="PNG")


def make_folder(root: Path, n_items: int = 6, attention: dict[int, str] | None = None) -> Path:
    """A study folder: items.jsonl, sources/<id>.png and <method>/<id>.png with a colour per (item, method)."""
    attention = attention or {}
    lines = []
    for i in range(n_items):
        item_id = f"item-{i:03d}"
        record = {"id": item_id, "source_image": f"sources/{item_id}.png", "instruction": f"make thing {i} blue"}
        if i in attention:
            record["attention_check"] = attention[i]
        lines.append(json.dumps(record))
        _png(root / "sources" / f"{item_id}.png", (i, 0, 0))
        for k, method in enumerate(METHODS):
            _png(root / method / f"{item_id}.png", (i, k + 1, 200))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _output_images(url: str, study_id: int) -> dict[tuple[int, str], str]:
    with session_scope(url) as session:
        rows = session.execute(
            select(StudyOutput.item_id, StudyOutput.method, StudyOutput.image)
            .join(StudyItem, StudyItem.id == StudyOutput.item_id)
            .where(StudyItem.study_id == study_id)
        )
        return {(item, method): image for item, method, image in rows}


def _finish(url: str, study_id: int, user_id: int, choose) -> int:
    """Answer every screen: ``choose(methods_in_screen_order, criterion)`` returns a label or None."""
    screens = 0
    while (screen := _current(url, study_id, user_id)) is not None:
        with session_scope(url) as session:
            order = session.scalar(
                select(StudyAssignment.shown_order).where(
                    StudyAssignment.participant_id == user_id, StudyAssignment.item_id == screen.item_id
                )
            )
        for criterion in screen.criteria:
            label = choose(order, criterion)
            with session_scope(url, write=True) as session:
                cast_vote(session, study_id, user_id, screen.item_id, criterion, label, 2500.0 + screens)
        with session_scope(url, write=True) as session:
            advance(session, study_id, user_id, screen.item_id)
        screens += 1
    return screens


def _current(url: str, study_id: int, user_id: int) -> ItemScreen | None:
    """:func:`current_item` in a transaction of its own (it may assign the sequence: a write one)."""
    with session_scope(url, write=True) as session:
        return current_item(session, study_id, user_id)


def _enrol(url: str, study_id: int, username: str | None = None) -> tuple[User, str]:
    with session_scope(url, write=True) as session:
        return enrol(session, study_id, username)


def _vote(url: str, study_id: int, user_id: int, item_id: int, criterion: str, label: str | None, ms: float) -> None:
    with session_scope(url, write=True) as session:
        cast_vote(session, study_id, user_id, item_id, criterion, label, ms)


# ----------------------------------------------------------------------------------------------------------
# creating a study


def test_create_study_from_folder(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "study", n_items=6, attention={5: "mcie-e1"})
    (folder / "smartedit" / "stray.png").write_bytes(b"not used")
    report = create_study_from_folder(migrated_url, store, folder, "pilot", items_per_participant=4, seed=3)
    assert (report.n_items, report.n_attention_items, report.methods) == (6, 1, METHODS)
    assert report.criteria == ("instruction", "background") and report.n_images == 6 * 4
    assert any("stray.png" in w for w in report.warnings)
    with session_scope(migrated_url) as session:
        items = session.scalars(select(StudyItem).where(StudyItem.study_id == report.study_id)).all()
        assert [i.external_id for i in items] == [f"item-{i:03d}" for i in range(6)]
        assert [(i.is_attention_check, i.attention_answer) for i in items][-1] == (True, "mcie-e1")
        assert session.scalar(select(func.count()).select_from(StudyOutput)) == 18
        assert session.scalar(select(func.count()).select_from(ImageRow)) == 24
        assert session.scalar(select(AuditLog.action).where(AuditLog.action == "study.create")) == "study.create"
    images = _output_images(migrated_url, report.study_id)
    assert all(store.exists(sha) for sha in images.values())
    with pytest.raises(StudyError, match="already exists"):
        create_study_from_folder(migrated_url, store, folder, "pilot", items_per_participant=4)
    with pytest.raises(StudyError, match="more than the 5 regular items"):
        create_study_from_folder(migrated_url, store, folder, "too-many", items_per_participant=6)


def test_every_gap_in_the_folder_is_reported_and_nothing_is_written(
    migrated_url: str, store: ImageStore, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "study", n_items=5, attention={4: "dall-e"})
    (folder / "mcie-e1" / "item-001.png").unlink()
    (folder / "smartedit" / "item-002.png").unlink()
    (folder / "smartedit" / "item-002.jpg").write_bytes(b"")
    (folder / "ip2p" / "item-003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "sources" / "item-000.png").unlink()
    with (folder / "items.jsonl").open("a") as handle:
        handle.write('{"id": "item-000", "source_image": "sources/item-000.png", "instruction": "again"}\n')
        handle.write("{not json\n")
        handle.write('{"id": "bad/id", "source_image": "../outside.png", "instruction": ""}\n')
    with pytest.raises(StudyFolderError) as caught:
        create_study_from_folder(migrated_url, store, folder, "gappy", items_per_participant=2)
    problems = "\n".join(caught.value.problems)
    expected = [
        f"{folder / 'mcie-e1' / 'item-001.png'}: missing",
        f"{folder / 'smartedit' / 'item-002.png'}: missing (found item-002.jpg",
        f"{folder / 'ip2p' / 'item-003.png'}: ",
        f"{folder / 'sources' / 'item-000.png'}: missing",
        "items.jsonl:5: attention_check 'dall-e' is not one of the methods",
        "items.jsonl:6: duplicate id 'item-000' (first on line 1)",
        "items.jsonl:7: not valid JSON",
        "items.jsonl:8: field 'id'",
        "items.jsonl:8: field 'source_image' '../outside.png' must stay inside",
        "items.jsonl:8: field 'instruction'",
    ]
    for fragment in expected:
        assert fragment in problems, fragment
    assert len(caught.value.problems) == len(expected)
    assert str(caught.value).count("\n  - ") == len(expected)
    with session_scope(migrated_url) as session:
        assert session.scalar(select(func.count()).select_from(StudyItem)) == 0
        assert session.scalar(select(func.count()).select_from(ImageRow)) == 0
    assert not store.fs.exists(f"{store.root}/images")


# ----------------------------------------------------------------------------------------------------------
# invites


def test_enrol_invite_tokens_and_revoke(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    study = create_study_from_folder(
        migrated_url, store, make_folder(tmp_path / "s"), "invites", items_per_participant=3
    )
    anonymous, token_a = _enrol(migrated_url, study.study_id)
    alice, token_b = _enrol(migrated_url, study.study_id, "alice")
    assert anonymous.username.startswith(f"study{study.study_id}-") and alice.role.value == "participant"
    assert anonymous.password_hash is None and token_a != token_b and len(token_a) >= 40
    with session_scope(migrated_url) as session:
        hashes = set(session.scalars(select(StudyParticipant.invite_token_hash)))
    assert hashes == {hashlib.sha256(t.encode()).hexdigest() for t in (token_a, token_b)}
    with session_scope(migrated_url) as session:
        assert participant_from_token(session, token_a) == (study.study_id, anonymous.id)
        assert participant_from_token(session, token_b) == (study.study_id, alice.id)
        assert participant_from_token(session, token_b + "x") is None
        assert participant_from_token(session, "") is None

    with session_scope(migrated_url, write=True) as session:
        revoke_invite(session, study.study_id, alice.id)
    with session_scope(migrated_url) as session:
        assert participant_from_token(session, token_b) is None
    with pytest.raises(StudyError, match="revoked"):
        _current(migrated_url, study.study_id, alice.id)
    again, token_c = _enrol(migrated_url, study.study_id, "alice")  # a new link; the old one stays dead
    assert again.id == alice.id
    with session_scope(migrated_url) as session:
        assert participant_from_token(session, token_c) == (study.study_id, alice.id)
        assert participant_from_token(session, token_b) is None

    with session_scope(migrated_url, write=True) as session:
        set_study_status(session, study.study_id, "closed")
    with session_scope(migrated_url) as session:
        assert participant_from_token(session, token_c) is None
    with pytest.raises(StudyError, match="closed"):
        _enrol(migrated_url, study.study_id, "bob")
    with pytest.raises(StudyError, match="unknown study status"), session_scope(migrated_url, write=True) as session:
        set_study_status(session, study.study_id, "paused")
    with session_scope(migrated_url) as session:
        statuses = participants_status(session, study.study_id)
    assert [(s.username, s.revoked, s.n_assigned) for s in statuses] == [
        (anonymous.username, False, 0),
        ("alice", False, 0),
    ]


def test_write_services_refuse_a_read_session(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    """Every read-then-write service (one per module here) needs a session from session_scope(write=True)."""
    folder = make_folder(tmp_path / "s")
    study = create_study_from_folder(migrated_url, store, folder, "writes", items_per_participant=2)
    user, _ = _enrol(migrated_url, study.study_id, "wendy")
    calls = [
        lambda s: set_study_status(s, study.study_id, "closed"),  # creation
        lambda s: enrol(s, study.study_id, "walt"),  # participants
        lambda s: current_item(s, study.study_id, user.id),  # flow (it assigns the sequence)
        lambda s: set_excluded(s, study.study_id, user.id, True, "test"),  # results
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"session_scope\(url, write=True\)"), session_scope(migrated_url) as s:
            call(s)
    with session_scope(migrated_url) as session:  # nothing was written
        (status,) = participants_status(session, study.study_id)
        (summary,) = list_studies(session)
    assert (status.username, status.n_assigned, status.excluded) == ("wendy", 0, False)
    assert summary.status == "open"


# ----------------------------------------------------------------------------------------------------------
# the participant's flow


def test_participant_flow_resume_and_locked_votes(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "s", n_items=6, attention={0: "mcie-e1"})
    study = create_study_from_folder(migrated_url, store, folder, "flow", items_per_participant=3, seed=1)
    user, _ = _enrol(migrated_url, study.study_id, "carol")
    first = _current(migrated_url, study.study_id, user.id)
    assert first is not None and first.progress == "1 of 4" and first.choices == {}
    assert [o.label for o in first.outputs] == ["A", "B", "C"]
    assert not any(m in json.dumps(dataclasses.asdict(first)) for m in METHODS)  # method names never shown
    with session_scope(migrated_url) as session:
        assignments = session.scalars(
            select(StudyAssignment).where(StudyAssignment.participant_id == user.id).order_by(StudyAssignment.position)
        ).all()
    images = _output_images(migrated_url, study.study_id)
    order = assignments[0].shown_order
    assert [o.image for o in first.outputs] == [images[(first.item_id, m)] for m in order]

    _vote(migrated_url, study.study_id, user.id, first.item_id, "instruction", "A", 1200.0)
    _vote(migrated_url, study.study_id, user.id, first.item_id, "instruction", "C", 3400.0)  # changed its mind
    resumed = _current(migrated_url, study.study_id, user.id)  # the browser was closed and opened again
    assert resumed is not None and resumed.item_id == first.item_id and resumed.choices == {"instruction": "C"}
    with pytest.raises(StudyError, match="still needs a vote on: background"), session_scope(
        migrated_url, write=True
    ) as session:
        advance(session, study.study_id, user.id, first.item_id)
    with pytest.raises(StudyError, match="not the current screen"):
        _vote(migrated_url, study.study_id, user.id, assignments[1].item_id, "instruction", "A", 10.0)
    with pytest.raises(StudyError, match="unknown choice 'D'"):
        _vote(migrated_url, study.study_id, user.id, first.item_id, "background", "D", 10.0)
    with pytest.raises(StudyError, match="unknown criterion 'style'"):
        _vote(migrated_url, study.study_id, user.id, first.item_id, "style", "A", 10.0)
    with pytest.raises(StudyError, match="latency_ms"):
        _vote(migrated_url, study.study_id, user.id, first.item_id, "background", "A", -5.0)
    _vote(migrated_url, study.study_id, user.id, first.item_id, "background", None, 800.0)  # none acceptable
    with session_scope(migrated_url, write=True) as session:
        progress = advance(session, study.study_id, user.id, first.item_id)
    assert (progress.completed, progress.total, progress.finished) == (1, 4, False)
    with pytest.raises(StudyError, match="completed; its votes can no longer change"):
        _vote(migrated_url, study.study_id, user.id, first.item_id, "instruction", "B", 10.0)

    with session_scope(migrated_url) as session:
        votes = {v.criterion: v for v in session.scalars(select(Vote).where(Vote.item_id == first.item_id))}
        chosen = session.get(StudyOutput, votes["instruction"].chosen_output_id)
    assert chosen is not None and chosen.method == order[2]
    assert (votes["instruction"].shown_position, votes["instruction"].latency_ms) == (3, 3400.0)
    assert votes["instruction"].shown_order == order and votes["background"].shown_order == order
    assert (votes["background"].chosen_output_id, votes["background"].shown_position) == (None, None)

    second = _current(migrated_url, study.study_id, user.id)
    assert second is not None and second.progress == "2 of 4" and second.item_id == assignments[1].item_id
    with session_scope(migrated_url, write=True) as session:
        assert assign_participant(session, study.study_id, user.id) == 4  # idempotent
    assert _finish(migrated_url, study.study_id, user.id, lambda order, c: "B") == 3
    assert _current(migrated_url, study.study_id, user.id) is None
    with session_scope(migrated_url) as session:
        (status,) = participants_status(session, study.study_id)
    assert (status.n_assigned, status.n_completed) == (4, 4) and status.finished_at is not None
    with session_scope(migrated_url, write=True) as session:
        set_study_status(session, study.study_id, StudyStatus.closed)
    with pytest.raises(StudyError, match="closed, not open"):
        _current(migrated_url, study.study_id, user.id)


def test_assignments_follow_the_design_and_stay_balanced(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    """8 participants x 6 of 12 items with 3 methods: the stored sequences are the design's, per-item counts differ
    by at most 1 and per-(method, position) counts by at most 1."""
    study = create_study_from_folder(migrated_url, store, make_folder(tmp_path / "s", n_items=12), "balance",
                                     items_per_participant=6, seed=9)
    users = [_enrol(migrated_url, study.study_id, f"user-{k}")[0] for k in range(8)]
    for user in users:
        with session_scope(migrated_url, write=True) as session:
            assert assign_participant(session, study.study_id, user.id) == 6
    with session_scope(migrated_url) as session:
        rows = session.execute(
            select(StudyAssignment.participant_id, StudyAssignment.position, StudyItem.external_id,
                   StudyAssignment.shown_order)
            .join(StudyItem, StudyItem.id == StudyAssignment.item_id)
            .order_by(StudyAssignment.participant_id, StudyAssignment.position)
        ).all()
    expected = design(12, 3, 8, 6, seed=9)
    by_user = {u.id: k for k, u in enumerate(users)}
    for participant, position, external_id, order in rows:
        screen = expected.sequences[by_user[participant]][position - 1]
        assert external_id == f"item-{screen.item:03d}" and order == [METHODS[m] for m in screen.order]
    items = Counter(external_id for _, _, external_id, _ in rows)
    assert len(items) == 12 and max(items.values()) - min(items.values()) <= 1
    cells = Counter((m, p) for *_, order in rows for p, m in enumerate(order))
    assert len(cells) == 9 and max(cells.values()) - min(cells.values()) <= 1


# ----------------------------------------------------------------------------------------------------------
# votes, exports, exclusions, results


def test_votes_export_exclusion_and_results(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "s", n_items=8, attention={7: "mcie-e1"})
    study = create_study_from_folder(migrated_url, store, folder, "results", items_per_participant=4, seed=2)
    fans = [_enrol(migrated_url, study.study_id, f"fan-{k}")[0] for k in range(3)]
    rogue, _ = _enrol(migrated_url, study.study_id, "rogue")

    def favour(method: str):
        return lambda order, criterion: LABELS[order.index(method)] if criterion == "instruction" else None

    for user in fans:
        assert _finish(migrated_url, study.study_id, user.id, favour("mcie-e1")) == 5
    assert _finish(migrated_url, study.study_id, rogue.id, favour("ip2p")) == 5

    with session_scope(migrated_url) as session:
        frame = votes_frame(session, study.study_id)
    assert set(VOTE_COLUMNS) <= set(frame.columns) and len(frame) == 4 * 5 * 2
    assert frame["latency_ms"].between(2500, 2505).all() and frame["completed"].all()
    instruction = frame[frame["criterion"] == "instruction"]
    for row in instruction.itertuples():
        assert row.shown_order[row.shown_position - 1] == row.chosen_method
    assert frame.loc[frame["criterion"] == "background", "chosen_method"].isna().all()
    attention = frame[frame["is_attention"]]
    assert len(attention) == 8 and set(attention["attention_answer"]) == {"mcie-e1"}

    for suffix in ("csv", "parquet"):
        path = tmp_path / f"votes.{suffix}"
        with session_scope(migrated_url) as session:
            assert export_votes(session, study.study_id, path) == 40
        back = pd.read_csv(path) if suffix == "csv" else pd.read_parquet(path)
        assert list(back.columns) == list(EXPORT_COLUMNS)
        orders = [json.loads(o) if suffix == "csv" else list(o) for o in back["shown_order"]]
        assert sorted(orders[0]) == list(METHODS) and back["position"].notna().sum() == 20
    with pytest.raises(StudyError, match=r"expected a \.csv or \.parquet"), session_scope(migrated_url) as session:
        export_votes(session, study.study_id, tmp_path / "votes.xlsx")

    with session_scope(migrated_url) as session:
        before = study_results(session, study.study_id, n_boot=50)
    block = before["by_criterion"]["instruction"]
    assert before["participants"] == {"enrolled": 4, "finished": 4} and before["n_participants"] == 4
    assert block["shares"]["mcie-e1"]["share"] == pytest.approx(0.75)
    assert block["preferred"]["ip2p"]["share"] == pytest.approx(0.25)
    assert before["quality"]["failed_attention"] == [rogue.id]

    with pytest.raises(StudyError, match="needs a reason"), session_scope(migrated_url, write=True) as session:
        set_excluded(session, study.study_id, rogue.id, True, "")
    with session_scope(migrated_url, write=True) as session:
        set_excluded(session, study.study_id, rogue.id, True, "failed the attention check")
    with session_scope(migrated_url) as session:
        after = study_results(session, study.study_id, n_boot=50)
    assert after["excluded"] == [rogue.id] and after["n_participants"] == 3
    assert after["by_criterion"]["instruction"]["shares"]["mcie-e1"]["share"] == 1.0
    assert after["by_criterion"]["instruction"]["preferred"]["mcie-e1"]["share"] == 1.0
    with session_scope(migrated_url) as session:
        (status,) = [s for s in participants_status(session, study.study_id) if s.user_id == rogue.id]
    assert status.excluded and status.exclusion_reason == "failed the attention check"
    with session_scope(migrated_url, write=True) as session:
        set_excluded(session, study.study_id, rogue.id, False)
    with session_scope(migrated_url) as session:
        assert study_results(session, study.study_id, n_boot=0)["n_participants"] == 4
    assert after["by_criterion"]["instruction"]["bradley_terry"]["exists"] is False  # only one method ever won
    assert before["by_criterion"]["instruction"]["bradley_terry"]["exists"] is False  # smartedit never won


def test_results_of_a_study_without_votes(migrated_url: str, store: ImageStore, tmp_path: Path) -> None:
    study = create_study_from_folder(migrated_url, store, make_folder(tmp_path / "s"), "empty", items_per_participant=2)
    user, _ = _enrol(migrated_url, study.study_id)
    screen = _current(migrated_url, study.study_id, user.id)
    assert screen is not None
    _vote(migrated_url, study.study_id, user.id, screen.item_id, "instruction", "A", 100.0)  # not completed
    with session_scope(migrated_url) as session:
        assert votes_frame(session, study.study_id).empty
        assert len(votes_frame(session, study.study_id, completed_only=False)) == 1
        report = study_results(session, study.study_id, n_boot=10)
    assert report["n_votes"] == 0 and report["by_criterion"] == {} and report["participants"]["enrolled"] == 1
