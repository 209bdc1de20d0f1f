"""The user study in the web app: invite links (valid, unknown, withdrawn, closed study), sessions limited to one
study (refused /review, /dashboard, the leads' JSON, other studies' images), the participants' JSON API (CSRF,
votes stored at once, resume, locked screens), the leads' study API and results page, and the study screen's
HTML (labels only, escaped text, progress, thank-you screen)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from mcie.annotate import study as st
from mcie.config import Settings
from mcie.db.models import Role, StudyAssignment, StudyItem, StudyOutput, Vote
from mcie.db.session import session_scope
from mcie.db.store import ImageStore
from tests.annotate import web_fixtures
from tests.annotate.factories import make_user

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # from gradio's own queue code

METHODS = ("ip2p", "mcie-e1", "smartedit")
PASSWORD = "study-pass-12"  # not web_fixtures.PASSWORD: accounts of this module only
EVIL = 'Make it <b>red</b> <img src=x onerror="window.__pwn=1"> & "quoted"'
HTML = {"accept": "text/html"}


def make_study_folder(
    root: Path, n_items: int = 4, *, methods: tuple[str, ...] = METHODS, tag: int = 0, evil: bool = False
) -> Path:
    """A study folder (items.jsonl, sources/, one sub-folder per method) of tiny PNGs, distinct per ``tag``."""
    lines = []
    for i in range(n_items):
        item_id = f"item-{i:03d}"
        instruction = EVIL if evil and i == 0 else f"make thing {i} blue"
        lines.append(json.dumps({"id": item_id, "source_image": f"sources/{item_id}.png", "instruction": instruction}))
        for folder, colour in (("sources", (i, tag, 0)), *((m, (i, tag, 10 + k)) for k, m in enumerate(methods))):
            path = root / folder / f"{item_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6), colour).save(path, format="PNG")
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root


def site_settings(folder: Path) -> Settings:
    return web_fixtures.site_settings(folder, thumbnail_size=384)


@dataclass
class World:
    settings: Settings
    app: FastAPI
    study_id: int
    other_id: int
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        return self.settings.database_url


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from mcie.annotate.web.server import create_app
    from mcie.db.migrate import upgrade

    root = tmp_path_factory.mktemp("study-web")
    settings = site_settings(root / "site")
    upgrade(settings.database_url)
    store = ImageStore.from_settings(settings)
    main = st.create_study_from_folder(settings.database_url, store, make_study_folder(root / "a", 4, evil=True),
                                       "web-study", items_per_participant=2, seed=1)
    other = st.create_study_from_folder(settings.database_url, store, make_study_folder(root / "b", 3, tag=50),
                                        "other-study", items_per_participant=3)
    with session_scope(settings.database_url) as session:
        make_user(session, "lead1", Role.lead, password=PASSWORD)
        make_user(session, "rater1", Role.rater, password=PASSWORD)
        make_user(session, "pat", Role.participant, password=PASSWORD)
        make_user(session, "lonely", Role.participant, password=PASSWORD)
    tokens = {}
    for name in ("ann", "bob", "cy", "dee", "rater1", "pat"):
        with session_scope(settings.database_url, write=True) as session:
            tokens[name] = st.enrol(session, main.study_id, name)[1]
    with session_scope(settings.database_url, write=True) as session:
        tokens["olga"] = st.enrol(session, other.study_id, "olga")[1]
    return World(settings, create_app(settings), main.study_id, other.study_id, tokens)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with web_fixtures.open_client(world.app) as c:
        yield c


def join(client: TestClient, world: World, name: str) -> str:
    """Open ``name``'s invite link; returns the session's CSRF token (read from the study screen's renderer)."""
    response = client.get(f"/study/join/{world.tokens[name]}")
    assert response.status_code == 303 and response.headers["location"] == "/study/"
    assert "mcie_session=" in response.headers["set-cookie"]
    return session_of(client)["csrf"]


def session_of(client: TestClient) -> dict[str, Any]:
    """The data of the client's server-side session (the cookie holds only a random id; the table its hash)."""
    from mcie.annotate.sessions import hash_id
    from mcie.db.models import WebSession

    raw = client.cookies.get("mcie_session") or ""
    app = client.app
    with session_scope(app.state.settings.database_url) as session:  # type: ignore[attr-defined]
        row = session.get(WebSession, hash_id(raw))
        assert row is not None and row.revoked_at is None, "no live session for the cookie"
        return dict(row.data)


def log_in(client: TestClient, username: str) -> Any:
    return web_fixtures.log_in(client, username, PASSWORD)


def current(url: str, study_id: int, uid: int) -> st.ItemScreen | None:
    """:func:`annotate.study.current_item` in a transaction of its own (a write one: it may assign the sequence)."""
    with session_scope(url, write=True) as session:
        return st.current_item(session, study_id, uid)


def user_id(world: World, username: str) -> int:
    return web_fixtures.user_id(world.url, username)


def item_images(world: World, study_id: int, item_ids: list[int] | None = None) -> set[str]:
    with session_scope(world.url) as session:
        items = select(StudyItem.id).where(StudyItem.study_id == study_id)
        if item_ids is not None:
            items = items.where(StudyItem.id.in_(item_ids))
        sources = set(session.scalars(select(StudyItem.source_image).where(StudyItem.id.in_(items))))
        outputs = set(session.scalars(select(StudyOutput.image).where(StudyOutput.item_id.in_(items))))
    return sources | outputs


def set_status(world: World, study_id: int, status: str) -> None:
    with session_scope(world.url, write=True) as session:
        st.set_study_status(session, study_id, status)


def vote(client: TestClient, study_id: int, csrf: str, item_id: int, criterion: str, choice: str | None) -> Any:
    body = {"item_id": item_id, "criterion": criterion, "choice": choice, "latency_ms": 1234.5}
    return client.post(f"/api/study/{study_id}/vote", json=body, headers={"x-csrf-token": csrf})


# ----------------------------------------------------------------------------------------------------------
# invite links


def test_an_invite_link_opens_a_session_limited_to_its_study(world: World, client: TestClient) -> None:
    join(client, world, "ann")
    assert session_of(client)["study"] == world.study_id
    assert client.get("/study/", headers=HTML).status_code == 200
    current = client.get(f"/api/study/{world.study_id}/current")
    assert current.status_code == 200 and current.headers["cache-control"] == "no-store"
    body = current.json()
    assert body["progress"] == "1 of 2" and [o["label"] for o in body["outputs"]] == ["A", "B", "C"]
    assert not any(m in current.text for m in METHODS)  # never a method name
    assert client.get("/", headers=HTML).headers["location"] == "/study/"


def test_unknown_withdrawn_and_closed_links_are_refused_with_a_page(world: World, client: TestClient) -> None:
    unknown = client.get("/study/join/not-a-real-token", headers=HTML)
    assert (
        unknown.status_code == 404
        and "not valid" in unknown.text
        and "mcie_session" not in unknown.headers.get("set-cookie", "")
    )
    with session_scope(world.url, write=True) as session:
        st.revoke_invite(session, world.study_id, user_id(world, "dee"))
    withdrawn = client.get(f"/study/join/{world.tokens['dee']}", headers=HTML)
    assert withdrawn.status_code == 403 and "withdrawn" in withdrawn.text
    assert client.get(f"/api/study/{world.study_id}/current").status_code == 401  # no session was started
    set_status(world, world.other_id, "closed")
    try:
        closed = client.get(f"/study/join/{world.tokens['olga']}", headers=HTML)
        assert closed.status_code == 403 and "closed" in closed.text
    finally:
        set_status(world, world.other_id, "open")


def test_a_withdrawn_invitation_stops_a_running_session(world: World, client: TestClient) -> None:
    csrf = join(client, world, "cy")
    screen = client.get(f"/api/study/{world.study_id}/current").json()
    with session_scope(world.url, write=True) as session:
        st.revoke_invite(session, world.study_id, user_id(world, "cy"))
    try:
        refused = vote(client, world.study_id, csrf, screen["item_id"], "instruction", "A")
        assert refused.status_code == 401  # the invite's session ended with the invitation, server-side
        assert client.get(f"/img/{screen['source_image']}").status_code == 401
    finally:
        with session_scope(world.url, write=True) as session:
            st.enrol(session, world.study_id, "cy")


def test_guessing_invite_tokens_is_rate_limited(tmp_path: Path) -> None:
    from mcie.annotate.web.server import create_app
    from mcie.db.migrate import upgrade

    settings = site_settings(tmp_path)
    upgrade(settings.database_url)
    with TestClient(create_app(settings, mount_ui=False), follow_redirects=False) as c:
        codes = [c.get(f"/study/join/guess-{k}").status_code for k in range(7)]
    assert codes[:5] == [404] * 5 and codes[5:] == [429, 429]


# ----------------------------------------------------------------------------------------------------------
# what a participant may reach


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/review/"),
        ("GET", "/review/config"),
        ("POST", "/review/gradio_api/queue/join"),
        ("GET", "/dashboard/"),
        ("POST", "/dashboard/gradio_api/queue/join"),
        ("GET", "/api/status"),
        ("GET", "/api/agreement"),
        ("GET", "/api/study"),
        ("GET", "/api/study/web-study/results"),
        ("GET", "/api/study/1/participants"),
        ("GET", "/api/study/1/votes.csv"),
        ("GET", "/studies/"),
        ("GET", "/studies/config"),
        ("GET", "/some/new/route"),
    ],
)
def test_an_invited_participant_is_refused_everything_else(
    world: World, client: TestClient, method: str, path: str
) -> None:
    join(client, world, "bob")
    response = client.request(method, path, headers=HTML, json={} if method == "POST" else None)
    assert response.status_code == 403


def test_an_invite_link_for_a_raters_account_opens_only_the_study(world: World, client: TestClient) -> None:
    join(client, world, "rater1")
    assert client.get("/review/", headers=HTML).status_code == 403
    assert client.get("/api/status").status_code == 403
    assert client.get("/", headers=HTML).headers["location"] == "/study/"
    client.cookies.clear()
    log_in(client, "rater1")  # the same account with its password is a rater again
    assert client.get("/review/", headers=HTML).status_code == 200


def test_participants_see_only_the_images_of_their_own_items(world: World, client: TestClient) -> None:
    join(client, world, "ann")
    client.get(f"/api/study/{world.study_id}/current")
    with session_scope(world.url) as session:
        mine = list(session.scalars(select(StudyAssignment.item_id).where(
            StudyAssignment.participant_id == user_id(world, "ann"))))
    own = item_images(world, world.study_id, mine)
    assert len(mine) == 2 and len(own) == 2 * 4
    for sha in own:
        assert client.get(f"/img/{sha}").status_code == 200
        assert client.get(f"/thumb/{sha}?size=128").status_code == 200
    not_mine = item_images(world, world.study_id) - own
    other_study = item_images(world, world.other_id)
    assert not_mine and other_study
    for sha in [*not_mine, *other_study]:
        assert client.get(f"/img/{sha}").status_code == 403
        assert client.get(f"/thumb/{sha}").status_code == 403
    assert client.get(f"/api/study/{world.other_id}/current").status_code == 403  # another study's API
    client.cookies.clear()
    log_in(client, "rater1")
    assert client.get(f"/img/{sorted(other_study)[0]}").status_code == 200  # reviewers are not limited


def test_a_participant_with_a_password_goes_to_the_study_and_nowhere_else(world: World, client: TestClient) -> None:
    response = log_in(client, "pat")
    assert response.status_code == 303
    assert client.get("/", headers=HTML).headers["location"] == "/study/"
    assert client.get("/study/", headers=HTML).status_code == 200
    screen = client.get(f"/api/study/{world.study_id}/current").json()
    assert client.get(f"/img/{screen['source_image']}").status_code == 200
    assert client.get(f"/img/{sorted(item_images(world, world.other_id))[0]}").status_code == 403
    for path in ("/review/", "/dashboard/", "/api/status", "/api/study", "/studies/"):
        assert client.get(path, headers=HTML).status_code == 403
    csrf = session_of(client)["csrf"]  # set when the study page was opened
    assert vote(client, world.study_id, csrf, screen["item_id"], "instruction", "B").status_code == 200
    client.cookies.clear()
    log_in(client, "lonely")  # enrolled nowhere: the start page says participants need their link
    assert client.get("/", headers=HTML).status_code == 403


def test_anonymous_visitors_are_told_to_open_their_link(client: TestClient) -> None:
    page = client.get("/study/", headers=HTML)
    assert page.status_code == 401 and "invitation link" in page.text
    assert client.post("/study/gradio_api/queue/join", json={}).status_code == 401
    assert client.get("/api/study/1/current").status_code == 401
    assert client.get("/studies/", headers=HTML).headers["location"] == "/login?next=/studies/"


# ----------------------------------------------------------------------------------------------------------
# the participants' JSON API


def test_votes_are_stored_at_once_and_the_flow_resumes(world: World, client: TestClient) -> None:
    csrf = join(client, world, "bob")
    sid = world.study_id
    first = client.get(f"/api/study/{sid}/current").json()
    assert vote(client, sid, "forged", first["item_id"], "instruction", "A").status_code == 403
    no_header = client.post(f"/api/study/{sid}/vote", json={"item_id": first["item_id"], "criterion": "instruction"})
    assert no_header.status_code == 403
    assert vote(client, sid, csrf, first["item_id"], "instruction", "A").json()["ok"] is True
    assert vote(client, sid, csrf, first["item_id"], "instruction", "C").status_code == 200  # changed its mind
    with session_scope(world.url) as session:
        stored = session.scalar(select(Vote).where(Vote.item_id == first["item_id"], Vote.criterion == "instruction",
                                                   Vote.participant_id == user_id(world, "bob")))
        assert stored is not None and (stored.shown_position, stored.latency_ms) == (3, 1234.5)
    needs = client.post(f"/api/study/{sid}/advance", json={"item_id": first["item_id"]}, headers={"x-csrf-token": csrf})
    assert needs.status_code == 409 and "background" in needs.json()["detail"]
    assert vote(client, sid, csrf, first["item_id"], "background", None).status_code == 200  # none acceptable
    assert vote(client, sid, csrf, first["item_id"], "background", "Z").status_code == 409
    bad = client.post(
        f"/api/study/{sid}/vote",
        json={"item_id": first["item_id"], "criterion": "background", "choice": "A", "extra": 1},
        headers={"x-csrf-token": csrf},
    )
    assert bad.status_code == 422

    client.cookies.clear()  # the browser was closed; the link is opened again
    csrf = join(client, world, "bob")
    resumed = client.get(f"/api/study/{sid}/current").json()
    assert resumed["item_id"] == first["item_id"] and resumed["choices"] == {"instruction": "C", "background": None}
    step = client.post(f"/api/study/{sid}/advance", json={"item_id": first["item_id"], "render": True},
                       headers={"x-csrf-token": csrf})
    assert step.status_code == 200
    body = step.json()
    assert (body["completed"], body["total"], body["finished"]) == (1, 2, False)
    assert body["next"]["progress"] == "2 of 2" and 'data-state="screen"' in body["next"]["html"]
    late = vote(client, sid, csrf, first["item_id"], "instruction", "B")
    assert late.status_code == 409 and "completed" in late.json()["detail"]
    second = body["next"]["item_id"]
    for criterion in ("instruction", "background"):
        assert vote(client, sid, csrf, second, criterion, "B").status_code == 200
    done = client.post(f"/api/study/{sid}/advance", json={"item_id": second, "render": True},
                       headers={"x-csrf-token": csrf}).json()
    assert done["finished"] is True and done["next"]["finished"] is True and "Thank you" in done["next"]["html"]
    assert client.get(f"/api/study/{sid}/current").json() == {"finished": True, "study_id": sid, "completed": 2,
                                                              "total": 2, "csrf": csrf}


# ----------------------------------------------------------------------------------------------------------
# leads


def test_leads_get_the_study_list_participants_results_and_votes(world: World, client: TestClient) -> None:
    log_in(client, "rater1")
    assert client.get("/api/study").status_code == 403
    assert client.get("/studies/", headers=HTML).status_code == 403
    client.cookies.clear()
    log_in(client, "lead1")
    studies = client.get("/api/study").json()
    assert {s["name"] for s in studies} == {"web-study", "other-study"}
    assert client.get("/studies/", headers=HTML).status_code == 200
    people = client.get(f"/api/study/{world.study_id}/participants").json()
    assert {p["username"] for p in people} >= {"ann", "bob", "cy", "dee", "rater1", "pat"}
    results = client.get("/api/study/web-study/results?n_boot=0")
    assert results.status_code == 200
    body = results.json()
    assert body["study"]["name"] == "web-study" and set(body["methods"]) <= set(METHODS)
    votes = client.get(f"/api/study/{world.study_id}/votes.csv")
    assert votes.status_code == 200 and votes.headers["content-type"].startswith("text/csv")
    assert votes.text.splitlines()[0].startswith("participant,username,item,criterion,method")
    assert client.get("/api/study/no-such-study/results").status_code == 404


def test_the_results_tab_handlers_check_the_role_and_fill_everything(world: World) -> None:
    from mcie.annotate.web.ui_study import PLOTS, ResultsWidgets, StudyResultsTab

    tab = StudyResultsTab(world.url)
    tab.w = web_fixtures.named_widgets(ResultsWidgets)
    tab.plots = [f"plot-{p}" for p in PLOTS]
    with pytest.raises(gr.Error):
        tab.compute(world.study_id, 0, SimpleNamespace(username="rater1"))
    lead = SimpleNamespace(username="lead1")
    picker = tab.refresh_list(None, lead)
    assert picker.value in (world.study_id, world.other_id)
    out = tab.compute(world.study_id, 0, lead)
    assert out["data"]["study"]["id"] == world.study_id and "mcie-error" not in out["status"]
    assert list(out["participants"].columns)[:3] == ["username", "user id", "done"]
    if out["data"]["by_criterion"]:
        assert all(out[f"plot-{p}"] is not None for p in PLOTS) and out["criterion"].value == "background"
    refused = tab.exclude(world.study_id, "ann", "", 0, lead)
    assert "needs a reason" in refused["status"]
    out = tab.exclude(world.study_id, "ann", "failed the attention checks", 0, lead)
    assert "Excluded ann" in out["status"]
    row = out["participants"].set_index("username").loc["ann"]
    assert (row["excluded"], row["reason"]) == ("yes", "failed the attention checks")
    out = tab.include(world.study_id, "ann", "", 0, lead)
    assert out["participants"].set_index("username").loc["ann"]["excluded"] == ""


# ----------------------------------------------------------------------------------------------------------
# the screen's HTML


def _gradio_request(username: str, session: dict[str, Any]) -> Any:
    return SimpleNamespace(username=username, request=SimpleNamespace(scope={"session": session}))


def test_the_study_screen_renders_each_screen_then_thanks(world: World) -> None:
    from mcie.annotate.web.ui_study import StudyScreen

    uid = user_id(world, "dee")
    with session_scope(world.url, write=True) as session:  # a fresh invitation (another test withdraws the first one)
        st.enrol(session, world.study_id, "dee")
    screen_app = StudyScreen(world.settings)
    request = _gradio_request("dee", {"study": world.study_id, "csrf": "tok"})
    while (screen := current(world.url, world.study_id, uid)) is not None:
        topbar, page = screen_app.on_load(request)
        assert 'data-csrf="tok"' in page and "Log out" not in topbar  # an invited participant cannot log out
        assert f'data-item="{screen.item_id}"' in page
        assert f"Item <b>{screen.position}</b> of <b>{screen.total}</b>" in page
        assert not any(m in page for m in METHODS) and "<img src=x" not in page
        assert all(f'data-label="{label}"' in page for label in "ABC")
        for criterion in screen.criteria:
            with session_scope(world.url, write=True) as session:
                st.cast_vote(session, world.study_id, uid, screen.item_id, criterion, "A", 2000.0)
        with session_scope(world.url, write=True) as session:
            st.advance(session, world.study_id, uid, screen.item_id)
    _, page = screen_app.on_load(request)
    assert 'data-state="finished"' in page and "all 2 items" in page
    topbar, page = screen_app.on_load(_gradio_request("lonely", {}))
    assert "not taking part in an open study" in page and "Log out" in topbar
    set_status(world, world.other_id, "closed")
    try:
        _, page = screen_app.on_load(_gradio_request("olga", {"study": world.other_id}))
        assert "The study is not open" in page and "closed" in page
    finally:
        set_status(world, world.other_id, "open")


def test_render_screen_marks_the_choices_already_made() -> None:
    from mcie.annotate.web.ui_study import render_screen

    screen = st.ItemScreen(
        study_id=1,
        item_id=7,
        position=3,
        total=10,
        instruction=EVIL,
        source_image="a" * 64,
        outputs=(st.ScreenOutput("A", "b" * 64), st.ScreenOutput("B", "c" * 64)),
        criteria=("instruction", "background"),
        choices={"instruction": "B", "background": None},
    )
    page = render_screen(screen, csrf="t", prefetch=["d" * 64])
    assert 'data-criterion="instruction" data-choice="B"' in page
    assert 'data-criterion="background" data-choice="none"' in page
    assert page.count('aria-pressed="true"') == 2 and f"/thumb/{'d' * 64}" in page
    assert "<kbd>1-2</kbd> or <kbd>A-B</kbd>" in page and "Item <b>3</b> of <b>10</b>" in page
    assert "Make it &lt;b&gt;red&lt;/b&gt; &lt;img src=x onerror=&quot;window.__pwn=1&quot;&gt; &amp;" in page
    assert "<img src=x" not in page


def test_a_vote_racing_an_advance_never_changes_a_completed_screen(migrated_url: str, tmp_path: Path) -> None:
    """The advance of a screen holds its row until it commits; a vote sent meanwhile waits, then finds the screen
    completed and is refused (on SQLite the write lock does the same)."""
    import threading

    store = ImageStore(str(tmp_path / "blobs"), max_pixels=10_000, max_bytes=100_000)
    created = st.create_study_from_folder(migrated_url, store, make_study_folder(tmp_path / "s", 3), "race",
                                          items_per_participant=2)
    with session_scope(migrated_url, write=True) as session:
        user, _ = st.enrol(session, created.study_id, "racer")
    screen = current(migrated_url, created.study_id, user.id)
    assert screen is not None
    for criterion in screen.criteria:
        with session_scope(migrated_url, write=True) as session:
            st.cast_vote(session, created.study_id, user.id, screen.item_id, criterion, "A", 100.0)
    outcome: dict[str, str] = {}

    def late_vote() -> None:
        try:
            with session_scope(migrated_url, write=True) as session:  # one transaction, as the vote route's
                st.cast_vote(session, created.study_id, user.id, screen.item_id, "instruction", "B", 200.0)
            outcome["result"] = "stored"
        except st.StudyError as exc:
            outcome["result"] = str(exc)

    with session_scope(migrated_url, write=True) as session:
        st.advance(session, created.study_id, user.id, screen.item_id)
        racer = threading.Thread(target=late_vote)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive()  # it waits for the advance to commit
    racer.join(30)
    assert "completed" in outcome["result"]
    with session_scope(migrated_url) as session:
        kept = session.scalar(select(Vote.shown_position).where(Vote.participant_id == user.id,
                                                                Vote.criterion == "instruction"))
    assert kept == 1
