"""The JSON review API (``/api/review``): session login and roles, the anti-forgery header, lease / submit / skip /
progress with their status codes and messages, what a sample's JSON shows and hides; and the dashboard's Export tab:
a lead starts an export over HTTP (Gradio's API of the mounted dashboard) that runs in the background and completes,
a rater is refused, and export folders cannot leave ``<data_dir>/exports``."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from mcie.annotate.accounts import hash_password
from mcie.config import Settings
from mcie.db.models import (
    Assignment,
    AssignmentState,
    Export,
    JobStatus,
    Review,
    ReviewRevision,
    Role,
    Sample,
    Turn,
    User,
)
from mcie.db.session import session_scope
from tests.annotate.factories import add_conflict_judgement, add_review, configure, make_sample, make_user
from tests.annotate.tx import write_tx
from tests.annotate.web_fixtures import PASSWORD, log_in, named_widgets, open_client, site_settings
from tests.annotate.web_fixtures import user_id as uid

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # from gradio's own queue code

YES = {"consistent": True, "quality": 4, "complexity": 5}


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)  # argon2 is slow on purpose: hash once, give it to every account


@dataclass
class Site:
    settings: Settings
    samples: list[int]  # queue order: the first is leased first

    @property
    def url(self) -> str:
        return self.settings.database_url


def _accounts(session, password_hash: str) -> None:
    for name, role, active in (("rater1", Role.rater, True), ("rater2", Role.rater, True), ("lead1", Role.lead, True),
                               ("guest1", Role.participant, True), ("gone1", Role.rater, False)):
        make_user(session, name, role, active=active).password_hash = password_hash


@pytest.fixture
def site(migrated_url: str, tmp_path: Path, password_hash: str) -> Site:
    """Three plain samples (one review each, no gold, no calibration) and one account of every kind."""
    with session_scope(migrated_url) as session:
        _accounts(session, password_hash)
        configure(session, gold_rate=0.0, calibration_share=0.0)
        samples = [make_sample(session, n_turns=3, first_turn=2, priority=3.0 - k) for k in range(3)]
        add_conflict_judgement(session, samples[0], "conflict", reason="turn 3 undoes turn 2")
        ids = [s.id for s in samples]
    return Site(site_settings(tmp_path / "site", migrated_url), ids)


@pytest.fixture
def app(site: Site):
    from mcie.annotate.web.server import create_app

    return create_app(site.settings, mount_ui=False)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with open_client(app) as c:
        yield c


def reviewer(client: TestClient, username: str) -> dict[str, str]:
    """Log ``client`` in; returns the headers its POSTs need (the session's token)."""
    response = log_in(client, username)
    assert response.status_code == 303, response.text
    response = client.get("/api/review/csrf")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["header"] == "X-CSRF-Token" and body["username"] == username
    return {"X-CSRF-Token": body["csrf_token"]}


def reviews_of(url: str) -> list[tuple[int, int, int]]:
    with session_scope(url) as session:
        return [tuple(r) for r in session.execute(select(Review.user_id, Review.sample_id, Review.revision))]


# ----------------------------------------------------------------------------------------------------------
# who may call


ROUTES = (("GET", "/api/review/next"), ("GET", "/api/review/progress"), ("GET", "/api/review/csrf"),
          ("POST", "/api/review/1"), ("POST", "/api/review/1/skip"))


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_a_login(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, json=YES)
    assert response.status_code == 401 and response.json() == {"detail": "log in first"}


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_participants_are_refused(site: Site, client: TestClient, method: str, path: str) -> None:
    assert log_in(client, "guest1").status_code == 303
    response = client.request(method, path, json=YES)
    assert response.status_code == 403
    with session_scope(site.url) as session:
        assert session.scalar(select(Assignment.id)) is None  # nothing was leased to them


def test_a_disabled_account_loses_the_api_at_once(site: Site, client: TestClient) -> None:
    reviewer(client, "rater1")
    with session_scope(site.url, write=True) as session:  # the app is running: write at once
        session.scalar(select(User).where(User.username == "rater1")).active = False
    assert client.get("/api/review/next").status_code == 401


def test_leads_may_review_through_the_api(site: Site, client: TestClient) -> None:
    headers = reviewer(client, "lead1")
    sample = client.get("/api/review/next").json()
    assert client.post(f"/api/review/{sample['sample_id']}", json=YES, headers=headers).status_code == 201


# ----------------------------------------------------------------------------------------------------------
# cross-site requests


def test_posts_without_the_session_token_are_refused_and_change_nothing(site: Site, client: TestClient) -> None:
    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    forged = [
        {},  # a cross-site form or fetch cannot add the header
        {"X-CSRF-Token": "forged"},
        {"X-CSRF-Token": ""},
        {"X-Requested-With": "XMLHttpRequest"},  # a generic header is not enough: the token is needed
    ]
    for extra in forged:
        assert client.post(f"/api/review/{sample_id}", json=YES, headers=extra).status_code == 403
        assert client.post(f"/api/review/{sample_id}/skip", json={"reason": "x"}, headers=extra).status_code == 403
    form = client.post(f"/api/review/{sample_id}", data={"consistent": "true", "quality": "4", "complexity": "4"})
    assert form.status_code == 403  # what an HTML form of another site would send
    assert reviews_of(site.url) == []
    assert client.post(f"/api/review/{sample_id}", json=YES, headers=headers).status_code == 201


def test_a_token_only_works_with_its_own_session(site: Site, app) -> None:
    with TestClient(app, follow_redirects=False) as first, TestClient(app, follow_redirects=False) as second:
        token_of_first = reviewer(first, "rater1")
        reviewer(second, "rater2")
        sample_id = second.get("/api/review/next").json()["sample_id"]
        assert second.post(f"/api/review/{sample_id}", json=YES, headers=token_of_first).status_code == 403
    assert reviews_of(site.url) == []


def test_the_token_survives_requests_and_a_new_login_gets_a_new_one(client: TestClient) -> None:
    headers = reviewer(client, "rater1")
    assert client.get("/api/review/csrf").json()["csrf_token"] == headers["X-CSRF-Token"]
    assert reviewer(client, "rater1") != headers  # logging in starts a fresh session


# ----------------------------------------------------------------------------------------------------------
# the queue


def test_next_leases_the_head_of_the_queue_and_a_reload_gets_it_again(site: Site, client: TestClient) -> None:
    reviewer(client, "rater1")
    response = client.get("/api/review/next")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["sample_id"] == site.samples[0]
    assert body["first_turn"] == 2 and body["last_turn"] == 3
    assert body["instruction"] == "edit number 2, then edit number 3"
    assert [s["turn_index"] for s in body["sub_instructions"]] == [2, 3]
    assert body["sub_instructions"][0]["box"] == [0.1, 0.2, 0.5, 0.6]
    assert body["sub_instructions"][0]["box_source"] == "mllm" and body["sub_instructions"][0]["operation"]
    assert [i["label"] for i in body["images"]] == ["source", "after turn 2", "target"]
    for image in body["images"]:
        assert re.fullmatch(r"[0-9a-f]{64}", image["sha256"]) and image["url"] == f"/img/{image['sha256']}"
    assert "mllm" not in body  # hidden before submit by default (the paper's protocol)
    assert "purpose" not in body and "n_reviews" not in body  # nothing that tells a gold sample or anchors
    with session_scope(site.url) as session:
        assignment = session.get(Assignment, body["assignment_id"])
        assert assignment.state == AssignmentState.leased and assignment.sample_id == body["sample_id"]
        assert body["lease_expires_at"].startswith(assignment.lease_expires_at.isoformat()[:19])
    assert client.get("/api/review/next").json()["sample_id"] == site.samples[0]


def test_a_sample_that_cannot_be_shown_keeps_its_lease(site: Site, client: TestClient) -> None:
    """GET /next commits the lease before it reads the sample: broken data answers 500 and the lease stays."""
    with session_scope(site.url, write=True) as session:
        instance_id = session.get(Sample, site.samples[0]).instance_id
        session.execute(delete(Turn).where(Turn.instance_id == instance_id, Turn.index == 3))
    reviewer(client, "rater1")
    response = client.get("/api/review/next")
    assert response.status_code == 500 and "lacks the images for target" in response.json()["detail"]
    with session_scope(site.url) as session:
        states = session.execute(select(Assignment.sample_id, Assignment.state)).all()
    assert [tuple(s) for s in states] == [(site.samples[0], AssignmentState.leased)]


def test_exclude_prefetches_a_second_lease_and_a_third_is_refused(site: Site, client: TestClient) -> None:
    reviewer(client, "rater1")
    first = client.get("/api/review/next").json()["sample_id"]
    second = client.get("/api/review/next", params={"exclude": first}).json()["sample_id"]
    assert second == site.samples[1]
    refused = client.get("/api/review/next", params={"exclude": [first, second]})
    assert refused.status_code == 409 and "already holds 2 leased samples" in refused.json()["detail"]
    assert client.get("/api/review/next", params={"exclude": [1, 2, 3]}).status_code == 422


def test_the_mllm_verdict_is_shown_only_when_the_project_says_so(site: Site, client: TestClient) -> None:
    with session_scope(site.url, write=True) as session:
        configure(session, show_mllm_verdict_before_submit=True)
    reviewer(client, "rater1")
    body = client.get("/api/review/next").json()
    assert body["mllm"] == {"verdict": "conflict", "conflict": True, "reason": "turn 3 undoes turn 2"}


def test_an_empty_queue_is_204(site: Site, client: TestClient) -> None:
    headers = reviewer(client, "rater1")
    for _ in site.samples:
        sample_id = client.get("/api/review/next").json()["sample_id"]
        assert client.post(f"/api/review/{sample_id}", json=YES, headers=headers).status_code == 201
    response = client.get("/api/review/next")
    assert response.status_code == 204 and response.content == b""
    assert client.get("/api/review/progress").json() == {"done_today": 3, "done_total": 3, "queue_left": 0}


# ----------------------------------------------------------------------------------------------------------
# submitting


def test_submit_stores_the_review_and_answers_201(site: Site, client: TestClient) -> None:
    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    answer = {"consistent": False, "quality": 2, "complexity": 5, "comment": "  seam at the left  ",
              "box_corrections": [{"turn_index": 3, "box": [0, 0.1, 0.5, 0.9]}], "time_spent_s": 41.5}
    response = client.post(f"/api/review/{sample_id}", json=answer, headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sample_id"] == sample_id and body["revision"] == 1
    with session_scope(site.url) as session:
        review = session.get(Review, body["review_id"])
        assert (review.user_id, review.sample_id) == (uid(site.url, "rater1"), sample_id)
        assert (review.consistent, review.quality, review.complexity) == (False, 2, 5)
        assert review.comment == "seam at the left" and review.time_spent_s == 41.5
        assert review.box_corrections == [{"turn_index": 3, "box": [0.0, 0.1, 0.5, 0.9]}]
        assert session.scalar(select(ReviewRevision.revision).where(ReviewRevision.review_id == review.id)) == 1
        assert session.get(Sample, sample_id).status.value == "rejected"  # settled in the same transaction
    assert client.get("/api/review/progress").json() == {"done_today": 1, "done_total": 1, "queue_left": 2}
    assert client.get("/api/review/next").json()["sample_id"] == site.samples[1]  # the lease moved on


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"consistent": True, "quality": 7, "complexity": 4}, "quality must be a whole number from 1 to 5; got 7"),
        ({"consistent": True, "quality": "4", "complexity": 4}, "quality must be a whole number from 1 to 5"),
        ({"consistent": True, "quality": True, "complexity": 4}, "quality must be a whole number from 1 to 5"),
        ({"consistent": "yes", "quality": 4, "complexity": 4}, "consistent must be yes (True) or no (False)"),
        ({"consistent": True, "quality": 4}, "missing complexity"),
        ({"consistent": True, "quality": 4, "complexity": 4, "rating": 5}, "unknown rating"),
        ({**YES, "box_corrections": [{"turn_index": 1, "box": [0, 0, 1, 1]}]}, "turn_index must be a turn of this"),
        ({**YES, "box_corrections": [{"turn_index": 2, "box": [0.5, 0, 0.2, 1]}]}, "x0 < x1"),
        ({**YES, "comment": "x" * 5001}, "at most 5000 are kept"),
        ({**YES, "time_spent_s": -1}, "time_spent_s must be a non-negative number"),
    ],
)
def test_invalid_answers_are_422_with_the_reviewers_message(
    site: Site, client: TestClient, answer: dict, message: str
) -> None:
    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    response = client.post(f"/api/review/{sample_id}", json=answer, headers=headers)
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert reviews_of(site.url) == []
    with session_scope(site.url) as session:  # the lease is kept: the reviewer fixes the answer and submits
        assert session.scalar(select(Assignment.state).where(Assignment.sample_id == sample_id)) == "leased"


def test_a_body_that_is_not_a_json_object_is_422(client: TestClient) -> None:
    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    for body in ("[1, 2]", "not json", '"text"'):
        response = client.post(f"/api/review/{sample_id}", content=body,
                               headers={**headers, "content-type": "application/json"})
        assert response.status_code == 422


def test_an_oversized_body_is_413_and_not_stored(site: Site, client: TestClient) -> None:
    from mcie.annotate.web.api_review import MAX_BODY_BYTES

    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    huge = {**YES, "comment": "x" * MAX_BODY_BYTES}
    response = client.post(f"/api/review/{sample_id}", json=huge, headers=headers)
    assert response.status_code == 413 and str(MAX_BODY_BYTES) in response.json()["detail"]
    assert reviews_of(site.url) == []


def test_conflicting_submits_are_409_and_unknown_samples_404(site: Site, client: TestClient) -> None:
    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    assert client.post(f"/api/review/{sample_id}", json=YES, headers=headers).status_code == 201
    again = client.post(f"/api/review/{sample_id}", json=YES, headers=headers)
    assert again.status_code == 409 and "you already reviewed sample" in again.json()["detail"]
    never = client.post(f"/api/review/{site.samples[2]}", json=YES, headers=headers)
    assert never.status_code == 409 and "was not assigned to you" in never.json()["detail"]
    missing = client.post("/api/review/999999", json=YES, headers=headers)
    assert missing.status_code == 404 and missing.json() == {"detail": "no sample with id 999999"}
    assert len(reviews_of(site.url)) == 1


def test_a_late_submit_on_a_sample_others_finished_is_409(site: Site, app) -> None:
    from mcie.annotate.queue import release

    with TestClient(app, follow_redirects=False) as first, TestClient(app, follow_redirects=False) as second:
        h1, h2 = reviewer(first, "rater1"), reviewer(second, "rater2")
        sample_id = first.get("/api/review/next").json()["sample_id"]
        # e.g. logged out elsewhere: the slot is free again
        write_tx(site.url, release, uid(site.url, "rater1"), sample_id)
        assert second.get("/api/review/next").json()["sample_id"] == sample_id
        assert second.post(f"/api/review/{sample_id}", json=YES, headers=h2).status_code == 201
        late = first.post(f"/api/review/{sample_id}", json=YES, headers=h1)
    assert late.status_code == 409 and "already has all its reviews" in late.json()["detail"]
    assert [r[:2] for r in reviews_of(site.url)] == [(uid(site.url, "rater2"), sample_id)]


# ----------------------------------------------------------------------------------------------------------
# skipping


def test_skip_needs_a_reason_and_frees_the_sample_for_others(site: Site, app) -> None:
    with TestClient(app, follow_redirects=False) as first, TestClient(app, follow_redirects=False) as second:
        headers = reviewer(first, "rater1")
        sample_id = first.get("/api/review/next").json()["sample_id"]
        for body in ({}, {"reason": "   "}, {"reason": 3}, {"reason": "x", "other": 1}):
            response = first.post(f"/api/review/{sample_id}/skip", json=body, headers=headers)
            assert response.status_code == 422 and "reason" in response.json()["detail"]
        response = first.post(f"/api/review/{sample_id}/skip", json={"reason": "cannot judge"}, headers=headers)
        assert response.status_code == 200 and response.json() == {"sample_id": sample_id, "skipped": True}
        again = first.post(f"/api/review/{sample_id}/skip", json={"reason": "again"}, headers=headers)
        assert again.status_code == 409 and "already skipped" in again.json()["detail"]
        refused = first.post(f"/api/review/{sample_id}", json=YES, headers=headers)
        assert refused.status_code == 409 and "skipped" in refused.json()["detail"]
        assert first.get("/api/review/next").json()["sample_id"] != sample_id  # never again for this reviewer
        reviewer(second, "rater2")
        assert second.get("/api/review/next").json()["sample_id"] == sample_id  # the slot went to someone else
        missing = first.post("/api/review/999999/skip", json={"reason": "x"}, headers=headers)
        assert missing.status_code == 404
    with session_scope(site.url) as session:
        assignment = session.scalar(
            select(Assignment).where(Assignment.sample_id == sample_id, Assignment.user_id == uid(site.url, "rater1"))
        )
        assert assignment.state == AssignmentState.skipped and assignment.skip_reason == "cannot judge"


# ----------------------------------------------------------------------------------------------------------
# the dashboard's Export tab


def _export_site(tmp_path: Path, password_hash: str) -> Settings:
    """An SQLite site with two accepted samples whose images are real files in the store."""
    from mcie.db.migrate import upgrade
    from mcie.db.store import ImageStore
    from tests.annotate.browser import make_image_instance

    settings = site_settings(tmp_path / "exporting", f"sqlite:///{tmp_path}/exporting.db")
    upgrade(settings.database_url)
    store = ImageStore.from_settings(settings)
    with session_scope(settings.database_url) as session:
        _accounts(session, password_hash)
        rater = session.scalar(select(User).where(User.username == "rater1"))
        for seed in (1, 2):
            sample = make_sample(session, make_image_instance(session, store, 2, seed), status="accepted")
            add_review(session, sample, rater)
    return settings


def _gradio_call(client: TestClient, api_name: str, data: list) -> tuple[int, list | str]:
    """Call a named event of the dashboard over HTTP (Gradio's API); returns the status and the output data."""
    response = client.post(f"/dashboard/gradio_api/call/{api_name}", json={"data": data})
    if response.status_code != 200:
        return response.status_code, response.text
    stream = client.get(f"/dashboard/gradio_api/call/{api_name}/{response.json()['event_id']}").text
    event = re.search(r"event: (\w+)\ndata: (.*)", stream)
    assert event, stream
    payload = json.loads(event.group(2))
    return (200 if event.group(1) == "complete" else 500), payload


def _wait_for_export(url: str, deadline_s: float = 120.0) -> Export:
    end = time.monotonic() + deadline_s
    while True:
        with session_scope(url) as session:
            row = session.scalar(select(Export).order_by(Export.id.desc()))
        if row is not None and row.status != JobStatus.running:
            return row
        assert time.monotonic() < end, "the export did not finish"
        time.sleep(0.1)


def test_a_lead_starts_an_export_over_http_and_it_completes(tmp_path: Path, password_hash: str) -> None:
    from mcie.annotate.web.server import create_app

    settings = _export_site(tmp_path, password_hash)
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert log_in(client, "lead1").status_code == 303
        code, outputs = _gradio_call(client, "export_start", ["jsonl", "first", 0.0, ["accepted"], 0, 0])
        assert code == 200, outputs
        assert "started into" in outputs[3] and "first" in outputs[3]  # the status line
        row = _wait_for_export(settings.database_url)
        assert row.status == JobStatus.done, row.error
        destination = (settings.data_dir / "exports" / "first").resolve()
        assert row.path == str(destination) and row.n_samples == 2 and row.format == "jsonl"
        assert row.created_by == uid(settings.database_url, "lead1")
        manifest = json.loads((destination / "manifest.json").read_text())
        assert manifest["counts"]["train"] == 2 and len(row.manifest_sha256) == 64
        assert (destination / "README.md").is_file()

        # the table shows it; the same folder again is refused with a message, not a second export
        code, outputs = _gradio_call(client, "export_start", ["parquet", "first", 0.0, ["accepted"], 0, 0])
        assert code == 200 and "already exists" in outputs[3]
        table = outputs[0]
        assert table["data"][0][:5] == [row.id, "jsonl", "done", 2, str(destination)]
        assert table["data"][0][5] == row.manifest_sha256

        # a rater cannot reach the dashboard's API at all (the role gate), let alone start an export
        client.cookies.clear()
        assert log_in(client, "rater1").status_code == 303
        code, _ = _gradio_call(client, "export_start", ["jsonl", "second", 0.0, ["accepted"], 0, 0])
        assert code == 403
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(Export.id).order_by(Export.id.desc())) == row.id  # no second export
    assert not (settings.data_dir / "exports" / "second").exists()


def test_export_handlers_refuse_non_leads_and_paths_outside_the_exports_folder(
    tmp_path: Path, password_hash: str
) -> None:
    from mcie.annotate.web.ui_dashboard import Dashboard, DashboardWidgets

    settings = _export_site(tmp_path, password_hash)
    dashboard = Dashboard(settings)
    dashboard.w = named_widgets(DashboardWidgets)
    for who in ("rater1", "guest1", "gone1", None):
        with pytest.raises(gr.Error, match="Only leads and admins"):
            dashboard.on_export_start("jsonl", "x", 0.05, ["accepted"], None, None, SimpleNamespace(username=who))
        with pytest.raises(gr.Error, match="Only leads and admins"):
            dashboard.on_exports(SimpleNamespace(username=who))
    lead = SimpleNamespace(username="lead1")
    outside = tmp_path / "outside"
    (settings.data_dir / "exports").mkdir(parents=True)
    (settings.data_dir / "exports" / "link").symlink_to(outside, target_is_directory=True)
    for name in ("../escape", "/tmp/evil", "a/b", "..", ".hidden", "link", "link/x", "x" * 101):
        out = dashboard.on_export_start("jsonl", name, 0.05, ["accepted"], None, None, lead)
        assert "mcie-error" in out["export_status"], name
    for fmt, val, minq in (("csv", 0.05, None), ("jsonl", 2.0, None), ("jsonl", 0.05, 9.0)):
        out = dashboard.on_export_start(fmt, "fine", val, ["accepted"], minq, None, lead)
        assert "mcie-error" in out["export_status"], (fmt, val, minq)
    assert dashboard.exports.jobs == [] and not outside.exists()
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(Export.id)) is None

    # a threshold filter that keeps nothing still completes (an empty export), through the handler directly; the
    # handler only queues a job, a worker (here in this process, as `mcie worker --kinds export`) runs it
    from mcie.annotate import jobs
    from mcie.annotate.worker import Worker, _export_size

    assert _export_size(settings.database_url, {}, None) == 2  # the job's progress counts against this
    assert _export_size(settings.database_url, {"statuses": ["rejected"]}, None) == 0
    out = dashboard.on_export_start("parquet", "", 0.05, ["accepted", "rejected"], 5.0, None, lead)
    assert "started into" in out["export_status"]
    with session_scope(settings.database_url) as session:
        [queued] = jobs.list_jobs(session, kind="export")
    assert queued.status == "queued" and "jobs-table" in dashboard.on_exports(lead)["export_info"]
    worker = Worker(settings, kinds=["export"], poll_s=0.1).start()
    try:
        assert dashboard.exports.wait(timeout=120)
    finally:
        worker.stop()
    with session_scope(settings.database_url) as session:
        assert jobs.get(session, queued.id).status == "done"
    row = _wait_for_export(settings.database_url)
    assert row.status == JobStatus.done and row.n_samples == 0 and row.format == "parquet"
    assert Path(row.path).parent == (settings.data_dir / "exports").resolve()
    listed = dashboard.on_exports(lead)
    assert listed["export_table"]["status"].tolist() == ["done"]


def test_the_server_times_reviews_the_client_does_not(site: Site, client: TestClient) -> None:
    from mcie.annotate.dashboard_data import median_seconds_per_review, reviews_frame

    headers = reviewer(client, "rater1")
    sample_id = client.get("/api/review/next").json()["sample_id"]
    time.sleep(0.2)
    assert client.post(f"/api/review/{sample_id}", json=YES, headers=headers).status_code == 201  # no time_spent_s
    with session_scope(site.url) as session:
        frame = reviews_frame(session)
    assert frame["time_spent_s"].isna().all() and median_seconds_per_review(frame) is None
    assert 0.2 <= frame["server_s"].iloc[0] < 60
    assert median_seconds_per_review(frame, "server_s") == frame["server_s"].iloc[0]
