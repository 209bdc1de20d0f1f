"""The web app's server side: health, logins and their rate limit, roles enforced on the server (plain routes, the
mounted Gradio apps and their event handlers), images by content hash only, and escaping of data in the HTML."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import select

from mcie.annotate.web.auth import load_secret_key
from mcie.config import Settings, load_settings
from mcie.db.models import Assignment, AssignmentState, Role
from mcie.db.session import session_scope
from mcie.db.store import ImageStore, register_images
from tests.annotate.factories import add_conflict_judgement, configure, make_sample, make_user
from tests.annotate.tx import read_tx, write_tx
from tests.annotate.web_fixtures import PASSWORD, log_in, named_widgets, open_client, site_settings, user_id

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # from gradio's own queue code

EVIL = '<script>alert("x")</script><img src=x onerror="window.__pwn=1">'


class World:
    """The module's shared app and what the tests need to know about its data."""

    def __init__(self, settings: Settings, app: FastAPI, image: str, missing_blob: str, sample_id: int) -> None:
        self.settings = settings
        self.app = app
        self.image = image
        self.missing_blob = missing_blob
        self.sample_id = sample_id

    @property
    def url(self) -> str:
        return self.settings.database_url


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from mcie.annotate.web.server import create_app
    from mcie.db.migrate import upgrade

    settings = site_settings(tmp_path_factory.mktemp("web"), thumbnail_size=384)
    upgrade(settings.database_url)
    store = ImageStore.from_settings(settings)
    stored = store.put_pil(PILImage.new("RGB", (40, 30), (200, 30, 30)))
    with session_scope(settings.database_url) as session:
        register_images(session, [stored])
        for name, role in (("rater1", Role.rater), ("rater2", Role.rater), ("lead1", Role.lead),
                           ("admin1", Role.admin), ("guest1", Role.participant)):
            make_user(session, name, role, password=PASSWORD)
        make_user(session, "gone1", Role.rater, password=PASSWORD, active=False)
        configure(session, gold_rate=0.0, calibration_share=0.0)
        make_sample(session)  # a plain sample, second in the queue
        sample = make_sample(session, priority=1.0)  # first in the queue; its images have no bytes in the store
        sample.instruction = EVIL
        sample.sub_instructions[0].text = '"><svg onload=alert(1)>'
        add_conflict_judgement(session, sample, "no_conflict", reason="<b>bold</b> reason")
        missing = sample.instance.source_image
        sample_id = sample.id
    return World(settings, create_app(settings), stored.sha256, missing, sample_id)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with open_client(world.app) as c:
        yield c


# ----------------------------------------------------------------------------------------------------------
# health, secret key, headers


def test_healthz_reports_database_and_schema(client: TestClient) -> None:
    from mcie.db import migrate

    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["database"] is True
    assert body["schema_revision"] == migrate.head() and body["schema_current"] is True


def test_healthz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    from mcie.annotate.web.server import create_app

    settings = load_settings(data_dir=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
                             blob_url=str(tmp_path / "blobs"))
    with TestClient(create_app(settings, mount_ui=False)) as c:
        response = c.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"] is False and "nobody" not in response.text


def test_secret_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_secret_key(tmp_path)
    path = tmp_path / "secret_key"
    assert len(first) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret_key(tmp_path) == first
    assert load_secret_key(tmp_path, "configured-key") == "configured-key"


def test_security_headers(client: TestClient) -> None:
    response = client.get("/login")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


# ----------------------------------------------------------------------------------------------------------
# logging in and out


def test_login_sets_a_httponly_lax_session_and_sends_each_role_home(client: TestClient) -> None:
    response = log_in(client, "rater1")
    assert response.status_code == 303 and response.headers["location"] == "/review/"
    cookie = response.headers["set-cookie"].lower()
    assert "mcie_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert client.get("/").headers["location"] == "/review/"
    client.cookies.clear()
    assert log_in(client, "lead1").headers["location"] == "/dashboard/"
    assert client.get("/").headers["location"] == "/dashboard/"


def test_wrong_password_unknown_and_disabled_users_get_one_answer(client: TestClient) -> None:
    for username, password in (("rater1", "wrong-password"), ("nobody", PASSWORD), ("gone1", PASSWORD)):
        response = log_in(client, username, password)
        assert response.status_code == 401
        assert "Wrong username or password." in response.text
    assert client.get("/").headers["location"] == "/login"


def test_login_needs_the_form_token(client: TestClient) -> None:
    response = client.post("/login", data={"username": "rater1", "password": PASSWORD, "csrf": "forged"})
    assert response.status_code == 400


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_login_never_redirects_off_site(client: TestClient, target: str) -> None:
    response = log_in(client, "rater1", next_path=target)
    assert response.headers["location"] == "/review/"


def test_login_goes_back_to_the_page_asked_for(client: TestClient) -> None:
    assert log_in(client, "rater1", next_path="/review/?x=1").headers["location"] == "/review/?x=1"


def test_participants_are_not_let_into_the_review_app(client: TestClient) -> None:
    log_in(client, "guest1")
    assert client.get("/").status_code == 403
    assert client.get("/review/", headers={"accept": "text/html"}).status_code == 403


def test_logout_releases_the_users_leases_and_ends_the_session(world: World, client: TestClient) -> None:
    from mcie.annotate.queue import next_sample

    uid = user_id(world.url, "rater2")
    lease = write_tx(world.url, next_sample, uid)
    assert lease is not None
    log_in(client, "rater2")
    assert client.get(f"/img/{world.image}").status_code == 200
    response = client.post("/logout")
    assert response.status_code == 303 and response.headers["location"] == "/login"
    with session_scope(world.url) as session:
        states = session.scalars(select(Assignment.state).where(Assignment.user_id == uid)).all()
    assert states and all(s == AssignmentState.expired for s in states)
    assert client.get(f"/img/{world.image}").status_code == 401


def test_a_password_change_or_disabling_ends_existing_sessions(world: World, client: TestClient) -> None:
    from mcie.annotate.accounts import set_active, set_password

    with session_scope(world.url) as session:
        make_user(session, "temp1", Role.rater, password=PASSWORD)
    log_in(client, "temp1")
    assert client.get(f"/img/{world.image}").status_code == 200
    with session_scope(world.url) as session:
        set_password(session, "temp1", "another-password-1")
    assert client.get(f"/img/{world.image}").status_code == 401
    assert client.get("/review/", headers={"accept": "text/html"}).status_code == 303
    log_in(client, "temp1", "another-password-1")
    assert client.get(f"/img/{world.image}").status_code == 200
    with session_scope(world.url) as session:
        set_active(session, "temp1", False)
    assert client.get(f"/img/{world.image}").status_code == 401


# ----------------------------------------------------------------------------------------------------------
# rate limiting


class FakeClock:
    """Starts at the real time: the app's periodic sweep purges failure counts older than the window by the real
    clock, and would forget counts dated 1970 whenever it happened to run during a test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_pair_delays_grow_from_the_free_failures_and_are_capped() -> None:
    from mcie.annotate.web.throttle import ThrottlePolicy, pair_delay

    policy = ThrottlePolicy(free_failures=3, delay_base_s=2, max_delay_s=60)
    assert [pair_delay(n, policy) for n in range(1, 9)] == [0, 0, 2, 4, 8, 16, 32, 60]


def _limited_app(tmp_path: Path, clock: FakeClock) -> FastAPI:
    from mcie.annotate.web.server import create_app
    from mcie.annotate.web.throttle import LoginThrottle, ThrottlePolicy
    from mcie.db.migrate import upgrade

    settings = site_settings(tmp_path, thumbnail_size=384)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        make_user(session, "victim", Role.rater, password=PASSWORD)
        make_user(session, "neighbour", Role.rater, password=PASSWORD)
    policy = ThrottlePolicy(free_failures=3, delay_base_s=10, max_delay_s=300, window_s=3600, ip_max_failures=8)
    return create_app(settings, throttle=LoginThrottle(settings.database_url, policy, clock=clock), mount_ui=False)


def test_login_is_throttled_per_username_and_ip_with_growing_delays(tmp_path: Path) -> None:
    clock = FakeClock()
    app = _limited_app(tmp_path, clock)
    with TestClient(app, follow_redirects=False, client=("10.0.0.1", 1)) as attacker:
        assert [log_in(attacker, "victim", "guess-guess").status_code for _ in range(2)] == [401, 401]
        third = log_in(attacker, "victim", "guess-guess")
        assert third.status_code == 401 and third.headers["retry-after"] == "10"
        blocked = log_in(attacker, "victim", PASSWORD)  # the pair waits, even with the right password
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) == 10
        clock.now += 11
        fourth = log_in(attacker, "victim", "guess-guess")
        assert fourth.status_code == 401 and fourth.headers["retry-after"] == "20"  # the delay doubled
        # another user behind the same address is not blocked by the attacker's failures
        assert log_in(attacker, "neighbour", PASSWORD).status_code == 303
    with TestClient(app, follow_redirects=False, client=("10.0.0.2", 1)) as victim:
        # the victim, from an address that did not fail, is never refused
        assert log_in(victim, "victim", PASSWORD).status_code == 303
    with session_scope(app.state.settings.database_url) as session:
        from mcie.db.models import AuditLog

        actions = [a.action for a in session.scalars(select(AuditLog).where(AuditLog.entity == "login_throttle"))]
    assert actions.count("login.block") >= 1


def test_one_ip_trying_many_usernames_is_blocked(tmp_path: Path) -> None:
    clock = FakeClock()
    app = _limited_app(tmp_path, clock)
    with TestClient(app, follow_redirects=False, client=("10.0.0.9", 1)) as sprayer:
        codes = [log_in(sprayer, f"user{k}", "guess-guess").status_code for k in range(8)]
        assert codes == [401] * 8
        assert log_in(sprayer, "user99", "guess-guess").status_code == 429
        assert log_in(sprayer, "victim", PASSWORD).status_code == 429  # this address failed: it waits
        clock.now += 301
        assert log_in(sprayer, "victim", PASSWORD).status_code == 303


# ----------------------------------------------------------------------------------------------------------
# roles on the server


def test_anonymous_users_are_sent_to_log_in(client: TestClient) -> None:
    for path in ("/review/", "/dashboard/"):
        response = client.get(path, headers={"accept": "text/html"})
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
    assert client.get("/review/config").status_code == 401
    assert client.post("/review/gradio_api/queue/join", json={}).status_code == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/dashboard/"),
        ("GET", "/dashboard/config"),
        ("GET", "/dashboard/gradio_api/info"),
        ("POST", "/dashboard/gradio_api/queue/join"),
        ("POST", "/dashboard/gradio_api/run/predict"),
        ("GET", "/dashboard/gradio_api/file=/etc/passwd"),
    ],
)
def test_a_rater_gets_403_on_every_dashboard_route(client: TestClient, method: str, path: str) -> None:
    log_in(client, "rater1")
    response = client.request(method, path, headers={"accept": "text/html"}, json={} if method == "POST" else None)
    assert response.status_code == 403


def test_leads_and_admins_open_the_dashboard_and_raters_the_review_app(client: TestClient) -> None:
    log_in(client, "rater1")
    assert client.get("/review/", headers={"accept": "text/html"}).status_code == 200
    for lead in ("lead1", "admin1"):
        client.cookies.clear()
        log_in(client, lead)
        assert client.get("/dashboard/", headers={"accept": "text/html"}).status_code == 200
        assert client.get("/dashboard/config").status_code == 200


def test_whoami_answers_only_with_a_session(client: TestClient) -> None:
    assert client.get("/api/whoami").status_code == 401
    log_in(client, "rater1")
    assert client.get("/api/whoami").json() == {"username": "rater1", "role": "rater", "name": "rater1"}


def test_lead_json_routes_are_refused_to_raters(client: TestClient) -> None:
    assert client.get("/api/status").status_code == 401
    log_in(client, "rater1")
    assert client.get("/api/status").status_code == 403
    assert client.get("/api/agreement").status_code == 403
    client.cookies.clear()
    log_in(client, "lead1")
    status = client.get("/api/status")
    assert status.status_code == 200 and status.json()["samples"]["ready"] >= 1
    assert client.get("/api/agreement?n_boot=0").json()["n_reviews"] >= 0


def _request(username: str | None) -> Any:
    return SimpleNamespace(username=username)


def test_lead_only_gradio_handlers_refuse_a_rater(world: World) -> None:
    from mcie.annotate.web.ui_dashboard import Dashboard

    dashboard = Dashboard(world.settings)
    calls = [
        lambda r: dashboard.on_progress(r),
        lambda r: dashboard.on_agreement("quality", r),
        lambda r: dashboard.on_adjudication(r),
        lambda r: dashboard.on_decide(world.sample_id, "accepted", "looks fine", r),
        lambda r: dashboard.on_rule_load(r),
        lambda r: dashboard.on_preview(True, 3, 3, 2, r),
        lambda r: dashboard.on_apply(True, 0, 0, 4, {"require_consistent": True}, r),
        lambda r: dashboard.on_show_mllm(True, r),
        lambda r: dashboard.on_topbar(r),
    ]
    for who in ("rater1", "guest1", "gone1", None, "nobody"):
        for call in calls:
            with pytest.raises(gr.Error, match="Only leads and admins"):
                call(_request(who))
    with session_scope(world.url) as session:
        from mcie.annotate.project import get_project_config

        assert get_project_config(session).show_mllm_verdict_before_submit is False


def test_a_lead_changes_the_mllm_setting_through_the_handler(world: World) -> None:
    from mcie.annotate.project import get_project_config
    from mcie.annotate.web.ui_dashboard import Dashboard, DashboardWidgets

    dashboard = Dashboard(world.settings)
    dashboard.w = named_widgets(DashboardWidgets)
    try:
        out = dashboard.on_show_mllm(True, _request("lead1"))
        assert "Saved" in out["settings_status"]
        with session_scope(world.url) as session:
            assert get_project_config(session).show_mllm_verdict_before_submit is True
    finally:
        dashboard.on_show_mllm(False, _request("lead1"))


def test_review_handlers_refuse_users_who_may_not_review(world: World) -> None:
    from mcie.annotate.web.ui_review import ReviewApp

    app = ReviewApp(world.settings)
    for who in ("guest1", "gone1", None):
        with pytest.raises(gr.Error):
            app.on_load(_request(who))
        with pytest.raises(gr.Error):
            app.on_submit({"current": None}, "yes", 4, 4, "", "", _request(who))
        with pytest.raises(gr.Error):
            app.on_history({"offset": 0, "ids": []}, _request(who))


# ----------------------------------------------------------------------------------------------------------
# images by content hash


def test_images_by_hash_with_cache_headers(world: World, client: TestClient) -> None:
    log_in(client, "rater1")
    full = client.get(f"/img/{world.image}")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert full.headers["etag"] == f'"{world.image}"' and "max-age" in full.headers["cache-control"]
    assert client.get(f"/img/{world.image}", headers={"if-none-match": f'"{world.image}"'}).status_code == 304
    thumb = client.get(f"/thumb/{world.image}?size=128")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert thumb.headers["etag"] == f'"{world.image}"'
    assert PILImage.open(__import__("io").BytesIO(thumb.content)).size[0] <= 128


@pytest.mark.parametrize(
    ("path", "codes"),
    [
        ("/img/" + "0" * 63, {400}),
        ("/img/" + "g" * 64, {400}),
        ("/img/" + "A" * 64, {400}),
        ("/img/..%2F..%2F..%2Fetc%2Fpasswd", {400, 404}),
        ("/img/../../etc/passwd", {404}),
        ("/img/%2e%2e%2fsecret_key", {400, 404}),
        ("/thumb/" + "1" * 64 + "/../../secret_key", {404}),
        ("/thumb/..%2Fsecret_key", {400, 404}),
        ("/img/" + "ab" * 32, {404}),  # well-formed but not in the images table
        ("/thumb/" + "ab" * 32, {404}),
    ],
)
def test_images_refuse_anything_but_a_known_hash(client: TestClient, path: str, codes: set[int]) -> None:
    log_in(client, "rater1")
    response = client.get(path)
    assert response.status_code in codes
    assert b"PNG" not in response.content[:8] and b"root:" not in response.content


def test_image_bytes_missing_from_the_store_is_a_404(world: World, client: TestClient) -> None:
    log_in(client, "rater1")
    assert client.get(f"/img/{world.missing_blob}").status_code == 404


def test_thumbnail_sizes_are_limited(world: World, client: TestClient) -> None:
    log_in(client, "rater1")
    assert client.get(f"/thumb/{world.image}?size=5000").status_code == 400


def test_images_need_a_login(world: World, client: TestClient) -> None:
    assert client.get(f"/img/{world.image}").status_code == 401
    assert client.get(f"/thumb/{world.image}").status_code == 401


# ----------------------------------------------------------------------------------------------------------
# escaping of data in the HTML


def test_the_review_screen_escapes_a_malicious_instruction(world: World) -> None:
    from mcie.annotate.web.ui_review import ReviewApp, Widgets

    app = ReviewApp(world.settings)
    app.w = named_widgets(Widgets)
    page = app.on_load(_request("rater1"))["sample"]
    assert f'data-sample-id="{world.sample_id}"' in page
    assert "<script" not in page and "<svg onload" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;svg onload=alert(1)&gt;" in page


def test_dashboard_and_history_renderers_escape_data() -> None:
    from datetime import UTC, datetime

    from mcie.annotate.acceptance import AdjudicationItem, ReviewSide
    from mcie.annotate.web.auth import WebUser
    from mcie.annotate.web.common import render_topbar
    from mcie.annotate.web.dashboard_views import render_reviews
    from mcie.annotate.web.ui_review import render_last

    side = ReviewSide(1, "<i>rater</i>", False, 2, 3, EVIL, [{"turn_index": 1, "box": "<b>"}], 1, datetime.now(UTC))
    item = AdjudicationItem(5, EVIL, 0.0, [side], "<u>conflict</u>", EVIL, "<why>")
    for html_text in (
        render_reviews(item),
        render_topbar(WebUser(1, "x1", Role.lead, display_name=EVIL)),
        render_last(5, SimpleNamespace(consistent=True, quality=4, complexity=4), (EVIL, EVIL), 2),
    ):
        assert "<script" not in html_text and "<img" not in html_text and "<i>" not in html_text
        assert "&lt;" in html_text


def test_the_login_page_escapes_what_was_typed(client: TestClient) -> None:
    response = log_in(client, "<script>x</script>", "wrong-password")
    assert "<script>x</script>" not in response.text


# ----------------------------------------------------------------------------------------------------------
# answers from the review form


def test_answers_are_built_from_the_form_with_clear_errors() -> None:
    from mcie.annotate.web.ui_review import build_answer, parse_corrections

    answer = build_answer("no", 4, "3", "  fine  ", '[{"turn_index": 2, "box": [0.1, 0.2, 0.3, 0.4]}]')
    assert (answer.consistent, answer.quality, answer.complexity, answer.comment) == (False, 4, 3, "fine")
    assert answer.box_corrections == [{"turn_index": 2, "box": [0.1, 0.2, 0.3, 0.4]}]
    with pytest.raises(ValueError, match=r"quality \(1-5\)"):
        build_answer("yes", None, 3, "", "")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_corrections("[{")
    with pytest.raises(ValueError, match="JSON list"):
        parse_corrections('{"turn_index": 1}')
    assert parse_corrections("  ") is None and parse_corrections("[]") is None


def test_a_refused_submit_keeps_the_answers_and_says_why(world: World) -> None:
    from mcie.annotate.web.ui_review import ReviewApp, Widgets

    app = ReviewApp(world.settings)
    app.w = named_widgets(Widgets)
    screen = {"current": {"sample_id": world.sample_id, "shown_at": 0.0, "mllm": [None, None]}, "next": None,
              "revise": None}
    for answers in (("yes", None, 3, "", ""), ("yes", 4, 3, "", '[{"turn_index": 99, "box": [0, 0, 1, 1]}]')):
        out = app.on_submit(dict(screen), *answers, _request("rater1"))
        assert "mcie-error" in out["status"]
        assert not {"consistent", "quality", "complexity", "comment", "boxes", "sample"} & set(out)


# ----------------------------------------------------------------------------------------------------------
# what the screens show


def test_mllm_verdict_is_hidden_until_submit_unless_the_project_says_so(world: World) -> None:
    from mcie.annotate.project import set_project_config
    from mcie.annotate.reviews import sample_view
    from mcie.annotate.web.sample_html import render_sample

    view = read_tx(world.url, sample_view, world.sample_id)
    hidden = render_sample(view, show_mllm=False)
    assert "no_conflict" not in hidden and "shown after you submit" in hidden
    shown = render_sample(view, show_mllm=True)
    assert "MLLM verdict: <b>no_conflict</b>" in shown and "&lt;b&gt;bold&lt;/b&gt; reason" in shown
    with session_scope(world.url) as session:
        set_project_config(session, {"show_mllm_verdict_before_submit": True}, actor_id=None)
    try:
        from mcie.annotate.web.ui_review import _show_mllm

        assert _show_mllm(world.url) is True
    finally:
        with session_scope(world.url) as session:
            set_project_config(session, {"show_mllm_verdict_before_submit": False}, actor_id=None)


def test_each_sub_instruction_box_has_the_colour_of_its_legend_entry(world: World) -> None:
    from mcie.annotate.reviews import sample_view
    from mcie.annotate.web.sample_html import PALETTE, render_sample

    view = read_tx(world.url, sample_view, world.sample_id)
    page = render_sample(view, show_mllm=False)
    for k, sub in enumerate(view.sub_instructions):
        assert f'data-turn="{sub.turn_index}" data-color="{PALETTE[k]}"' in page
        assert f'data-turn="{sub.turn_index}" vector-effect="non-scaling-stroke" style="stroke:{PALETTE[k]}"' in page
    assert page.count("/thumb/") == len(view.steps) + 3 and "/img/" in page  # strip, slider (2), target


def test_the_acceptance_rule_is_applied_only_after_a_preview(world: World) -> None:
    from mcie.annotate.project import get_project_config
    from mcie.annotate.web.ui_dashboard import Dashboard, DashboardWidgets

    dashboard = Dashboard(world.settings)
    dashboard.w = named_widgets(DashboardWidgets)
    lead = _request("lead1")
    refused = dashboard.on_apply(True, 2, 2, 2, None, lead)
    assert "Preview these thresholds first" in refused["rule_status"]
    preview = dashboard.on_preview(True, 2, 2, 2, lead)
    assert "would be accepted" in preview["rule_preview"]
    changed = dashboard.on_preview(True, 2.5, 2, 2, lead)["rule_previewed"]
    assert "Preview these thresholds first" in dashboard.on_apply(True, 2, 2, 2, changed, lead)["rule_status"]
    applied = dashboard.on_apply(True, 2, 2, 2, preview["rule_previewed"], lead)
    assert "Rule applied by lead1" in applied["rule_status"]
    with session_scope(world.url) as session:
        assert get_project_config(session).acceptance.quality_above == 2
    dashboard.on_apply(True, 3, 3, 2, dashboard.on_preview(True, 3, 3, 2, lead)["rule_previewed"], lead)


def test_serve_migrates_the_database_then_serves(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    import httpx

    from tests.annotate.browser import free_port

    port = free_port()
    env = {**os.environ, "MCIE_DATA_DIR": str(tmp_path), "MCIE_DATABASE_URL": f"sqlite:///{tmp_path}/served.db",
           "MCIE_CONFIG": str(tmp_path / "absent.toml")}
    (tmp_path / "absent.toml").write_text("")
    code = f"from mcie.annotate.web.server import serve; serve('127.0.0.1', {port})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.25)
        assert body["ok"] is True and body["schema_current"] is True
        assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600
    finally:
        process.terminate()
        process.wait(timeout=20)


# ----------------------------------------------------------------------------------------------------------
# the review screen without work, the dashboard's throughput axis


def test_an_empty_queue_shows_only_its_message_and_the_form_returns_with_a_sample(world: World) -> None:
    from mcie.annotate.web.ui_review import ReviewApp, Widgets

    app = ReviewApp(world.settings)
    app.w = named_widgets(Widgets)
    empty = app._show({"current": None, "next": None, "revise": None}, None)
    assert "Your queue is empty" in empty["sample"]
    assert empty["form"]["visible"] is False and empty["preview_box"]["visible"] is False
    with session_scope(world.url) as session:  # earlier tests used up the shared samples: a new one, a new rater
        make_user(session, "fresh1", Role.rater, password=PASSWORD)
        make_sample(session, priority=100.0)
    shown = app.on_load(_request("fresh1"))
    assert 'data-sample-id="' in shown["sample"]
    assert shown["form"]["visible"] is True and shown["preview_box"]["visible"] is True


def test_the_throughput_axis_of_a_first_day_is_labelled_in_hours() -> None:
    import pandas as pd

    from mcie.annotate.dashboard_data import throughput, throughput_freq
    from mcie.annotate.web.dashboard_views import throughput_figure

    start = pd.Timestamp("2025-03-03 09:10", tz="UTC")
    frame = pd.DataFrame({"created_at": [start, start + pd.Timedelta(minutes=5), start + pd.Timedelta(hours=2)]})
    freq = throughput_freq(frame)
    fig = throughput_figure(throughput(frame, freq=freq), freq)
    assert freq == "h"
    assert fig.layout.xaxis.type == "category" and fig.layout.xaxis.title.text == "hour (UTC)"
    assert list(fig.data[0].x) == ["2025-03-03 09:00", "2025-03-03 10:00", "2025-03-03 11:00"]
    assert list(fig.data[0].y) == [2, 0, 1]
    one_bar = throughput_figure(throughput(frame.iloc[:1]), "D")  # one day: one labelled bar, no time ticks
    assert list(one_bar.data[0].x) == ["2025-03-03"] and one_bar.layout.xaxis.type == "category"
