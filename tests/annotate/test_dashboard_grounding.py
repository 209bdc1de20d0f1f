"""Reviewers' box corrections as ground truth for the pipeline's grounding: IoU by operation and box source."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd
import pytest

from mcie.annotate import dashboard_data as dd
from mcie.db.models import BoxCandidate, BoxSource, Role, Turn
from mcie.db.session import session_scope
from tests.annotate.factories import add_review, make_instance, make_sample, make_user

TRUTH = (0.2, 0.2, 0.6, 0.6)


def _corr(instance_id: int, turn: int, operation: str, box=TRUTH) -> dict:
    return {"instance_id": instance_id, "turn_index": turn, "operation": operation, "review_id": 1,
            "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]}


def _cand(instance_id: int, turn: int, source: str, rank: int, box, chosen: bool = False) -> dict:
    return {"instance_id": instance_id, "turn_index": turn, "source": source, "rank": rank, "chosen": chosen,
            "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]}


def test_grounding_vs_corrections_by_operation_and_source() -> None:
    half = (0.2, 0.2, 0.4, 0.6)  # IoU 0.5 with TRUTH
    corrections = pd.DataFrame([
        _corr(1, 1, "add"), _corr(1, 1, "add", (0.2, 0.2, 0.6, 0.6)), _corr(1, 1, "add", (0.0, 0.0, 1.0, 1.0)),
        _corr(1, 2, "remove"),
        _corr(2, 1, "change"),  # no candidates: left out
    ])
    candidates = pd.DataFrame([
        _cand(1, 1, "mllm", 1, half), _cand(1, 1, "mllm", 2, TRUTH, chosen=True), _cand(1, 1, "diff", 3, (0, 0, 1, 1)),
        _cand(1, 2, "diff", 1, TRUTH, chosen=True), _cand(1, 2, "mllm", 2, (0.7, 0.7, 0.9, 0.9)),
    ])
    out = dd.grounding_vs_corrections(corrections, candidates)
    rows = {(r.operation, r.source): r for r in out.itertuples()}
    assert list(out.columns) == ["operation", "source", "turns", "mean_iou", "mean_first_iou", "share_iou_50"]
    # turn (1, 1): the median of three corrections is TRUTH; the MLLM's best box is exact, its first answer half
    assert rows[("add", "mllm")].mean_iou == 1.0 and rows[("add", "mllm")].mean_first_iou == 0.5
    assert rows[("add", "diff")].mean_iou == pytest.approx(0.16)
    assert rows[("add", "chosen")].mean_iou == 1.0 and pd.isna(rows[("add", "chosen")].mean_first_iou)
    assert rows[("remove", "mllm")].mean_iou == 0.0 and rows[("remove", "diff")].mean_iou == 1.0
    assert rows[("all", "mllm")].turns == 2 and rows[("all", "mllm")].mean_iou == 0.5
    assert rows[("all", "mllm")].share_iou_50 == 0.5
    assert rows[("all", "chosen")].mean_iou == 1.0
    assert list(out["operation"])[-1] == "all"  # the overall rows come last
    assert "change" not in set(out["operation"])
    assert dd.grounding_vs_corrections(corrections.iloc[:0], candidates).empty
    with pytest.raises(dd.DashboardError):
        dd.grounding_vs_corrections(corrections.drop(columns=["operation"]), candidates)


def test_grounding_frames_read_corrections_and_candidates(migrated_url: str) -> None:
    from mcie.annotate.web.ui_dashboard import grounding_view

    with session_scope(migrated_url) as session:
        instance = make_instance(session, 3)
        sample = make_sample(session, instance, first_turn=1, last_turn=3)
        turns = {t.index: t.id for t in session.query(Turn).filter_by(instance_id=instance.id)}
        for index, (mllm_box, diff_box) in {1: (TRUTH, (0.2, 0.2, 0.4, 0.6)), 2: ((0, 0, 0.1, 0.1), TRUTH)}.items():
            session.add(BoxCandidate(turn_id=turns[index], rank=1, source=BoxSource.mllm, box_x0=mllm_box[0],
                                     box_y0=mllm_box[1], box_x1=mllm_box[2], box_y1=mllm_box[3], chosen=True))
            session.add(BoxCandidate(turn_id=turns[index], rank=2, source=BoxSource.diff, box_x0=diff_box[0],
                                     box_y0=diff_box[1], box_x1=diff_box[2], box_y1=diff_box[3]))
        review = add_review(session, sample, make_user(session, "rater-g"))
        review.box_corrections = [{"turn_index": 1, "box": list(TRUTH)}, {"turn_index": 2, "box": list(TRUTH)}]
        add_review(session, sample, make_user(session, "rater-h"))  # no corrections
        make_user(session, "lead-g", Role.lead)
        make_user(session, "guest-g", Role.participant)
    with session_scope(migrated_url) as session:
        corrections, candidates = dd.grounding_frames(session)
    assert len(corrections) == 2 and len(candidates) == 4
    assert set(corrections["operation"]) == {"add", "remove"}  # the factory's operations of turns 1 and 2
    out = dd.grounding_vs_corrections(corrections, candidates)
    rows = {(r.operation, r.source): r for r in out.itertuples()}
    assert rows[("add", "mllm")].mean_iou == 1.0 and rows[("add", "diff")].mean_iou == 0.5
    assert rows[("remove", "chosen")].mean_iou == 0.0 and rows[("remove", "diff")].mean_iou == 1.0
    figure, frame = grounding_view(migrated_url, SimpleNamespace(username="lead-g"))
    assert len(frame) == len(out) and figure.data
    for who in ("rater-g", "guest-g", None, "nobody"):
        with pytest.raises(gr.Error, match="Only leads and admins"):
            grounding_view(migrated_url, SimpleNamespace(username=who))
