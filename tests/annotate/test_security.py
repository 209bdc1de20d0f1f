"""Every finding of issue 10 replayed as a regression test (a copied cookie, big bodies, bad passwords, foreign
origins, hostile ingest paths), plus the server-side sessions' lifetimes and their commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from mcie.annotate.sessions import hash_id
from mcie.config import Settings
from mcie.db.models import AuditLog, Role, User, WebSession, utcnow
from mcie.db.session import session_scope
from tests.annotate.factories import configure, make_sample, make_user
from tests.annotate.web_fixtures import PASSWORD, log_in, open_client, site_settings

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

MB = 1024 * 1024


def _settings(folder: Path, **extra) -> Settings:
    return site_settings(folder, f"sqlite:///{folder}/sec.db", **extra)


def _site(folder: Path, **extra) -> Settings:
    from mcie.db.migrate import upgrade

    settings = _settings(folder, **extra)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        for name, role in (("rater1", Role.rater), ("rater2", Role.rater), ("lead", Role.lead),
                           ("guest1", Role.participant)):
            make_user(session, name, role, password=PASSWORD)
        configure(session, gold_rate=0.0, calibration_share=0.0)
        make_sample(session)
    return settings


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    from mcie.annotate.web.server import create_app

    return create_app(_site(tmp_path_factory.mktemp("security")))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with open_client(app) as c:
        yield c


def url_of(client: TestClient) -> str:
    return client.app.state.settings.database_url  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------
# finding 1: logout only cleared the browser's cookie


def test_a_cookie_replayed_after_logout_is_refused(client: TestClient) -> None:
    assert log_in(client, "rater1").status_code == 303
    stolen = client.cookies.get("mcie_session")
    assert stolen and "." not in stolen  # an opaque id, not signed data
    assert client.get("/api/whoami").status_code == 200
    assert client.get("/api/review/next").status_code == 200
    assert client.post("/logout").status_code == 303
    client.cookies.clear()
    client.cookies.set("mcie_session", stolen)
    assert client.get("/api/whoami").status_code == 401
    assert client.get("/api/review/next").status_code == 401
    with session_scope(url_of(client)) as session:
        row = session.get(WebSession, hash_id(stolen))
        assert row is not None and row.revoked_at is not None and row.revoked_reason == "logout"


def test_only_the_hash_of_the_session_id_is_stored(client: TestClient) -> None:
    log_in(client, "rater2")
    token = client.cookies.get("mcie_session")
    with session_scope(url_of(client)) as session:
        rows = session.scalars(select(WebSession)).all()
        assert all(token not in json.dumps({"id": r.id_hash, "data": r.data}) for r in rows)
        mine = session.get(WebSession, hash_id(token))
        assert mine is not None and mine.ip == "testclient" and mine.user_agent


def test_login_rotates_the_session_id(client: TestClient) -> None:
    log_in(client, "rater1")
    first = client.cookies.get("mcie_session")
    log_in(client, "rater2")
    second = client.cookies.get("mcie_session")
    assert first != second
    with session_scope(url_of(client)) as session:
        assert session.get(WebSession, hash_id(first)).revoked_reason == "rotated"


def test_idle_and_absolute_lifetimes_end_a_session(client: TestClient) -> None:
    log_in(client, "rater1")
    token = client.cookies.get("mcie_session")
    url = url_of(client)
    assert client.get("/api/whoami").status_code == 200
    with session_scope(url) as session:  # 5 hours without a request: past the 4 h idle timeout
        session.execute(update(WebSession).where(WebSession.id_hash == hash_id(token))
                        .values(last_seen_at=utcnow() - timedelta(hours=5)))
    assert client.get("/api/whoami").status_code == 401
    log_in(client, "rater1")
    token = client.cookies.get("mcie_session")
    with session_scope(url) as session:  # active all along, but logged in longer than the absolute lifetime
        session.execute(update(WebSession).where(WebSession.id_hash == hash_id(token))
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/api/whoami").status_code == 401


def test_last_seen_is_not_written_on_every_request(client: TestClient) -> None:
    log_in(client, "rater1")
    token = client.cookies.get("mcie_session")
    url = url_of(client)
    old = utcnow() - timedelta(seconds=30)  # within the 60 s touch interval
    with session_scope(url) as session:
        session.execute(update(WebSession).where(WebSession.id_hash == hash_id(token)).values(last_seen_at=old))
    for _ in range(3):
        assert client.get("/api/whoami").status_code == 200
    with session_scope(url) as session:
        seen = session.get(WebSession, hash_id(token)).last_seen_at
    assert abs((seen.replace(tzinfo=None) - old.replace(tzinfo=None)).total_seconds()) < 1
    with session_scope(url) as session:  # past the interval: the next request writes it
        session.execute(update(WebSession).where(WebSession.id_hash == hash_id(token))
                        .values(last_seen_at=utcnow() - timedelta(seconds=90)))
    client.get("/api/whoami")
    with session_scope(url) as session:
        seen = session.get(WebSession, hash_id(token)).last_seen_at
    assert (utcnow().replace(tzinfo=None) - seen.replace(tzinfo=None)).total_seconds() < 5


def test_users_sessions_lists_and_revokes_and_disable_ends_them(
    client: TestClient, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcie.cli import app as cli
    from mcie.config import get_settings

    settings = app.state.settings
    monkeypatch.setenv("MCIE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MCIE_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    with session_scope(settings.database_url) as session:
        make_user(session, "temp2", Role.rater, password=PASSWORD)
    log_in(client, "temp2", headers={"user-agent": "pytest-browser/1"})
    runner = CliRunner()
    listed = runner.invoke(cli, ["users", "sessions", "temp2", "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert row["active"] and row["user_agent"] == "pytest-browser/1" and row["ip"] == "testclient"
    ended = runner.invoke(cli, ["users", "sessions", "temp2", "--revoke-all"])
    assert ended.exit_code == 0 and "ended 1 session" in ended.output
    assert client.get("/api/whoami").status_code == 401
    log_in(client, "temp2")
    assert client.get("/api/whoami").status_code == 200
    disabled = runner.invoke(cli, ["users", "disable", "temp2"])
    assert disabled.exit_code == 0 and "1 session(s) ended" in disabled.output
    assert client.get("/api/whoami").status_code == 401
    assert runner.invoke(cli, ["users", "sessions", "nobody"]).exit_code == 1
    get_settings.cache_clear()


def test_a_tampered_anonymous_cookie_is_ignored(client: TestClient) -> None:
    client.get("/login")
    value = client.cookies.get("mcie_session")
    assert value.startswith("a.")
    client.cookies.set("mcie_session", value[:-3] + "AAA")
    assert client.get("/api/whoami").status_code == 401
    forged = client.post("/login", data={"username": "rater1", "password": PASSWORD, "csrf": "x"})
    assert forged.status_code == 400


# ----------------------------------------------------------------------------------------------------------
# finding 2: bodies read before any check, without a size limit, echoed back


def test_a_big_unauthenticated_body_gets_413_before_it_is_read(client: TestClient) -> None:
    big = b'{"item_id": 1, "criterion": "' + b"x" * (10 * MB) + b'"}'
    response = client.post("/api/study/1/vote", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and len(response.content) < 200  # the length alone decides: never read
    assert response.json()["detail"].startswith("the request body is larger than")


def test_a_big_body_without_a_length_is_cut_off(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    response = client.post("/login", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413 and len(response.content) < 200


def test_gradio_queue_bodies_are_limited_and_uploads_are_off(client: TestClient) -> None:
    log_in(client, "rater1")
    huge = client.post("/review/gradio_api/queue/join", content=b"{" + b" " * (20 * MB) + b"}",
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413
    upload = client.post("/review/gradio_api/upload", files={"files": ("a.txt", b"x" * 1000)})
    assert upload.status_code == 403 and "uploads are off" in upload.text
    for path in ("/dashboard/gradio_api/upload", "/study/gradio_api/upload", "/studies/gradio_api/upload"):
        assert client.post(path, files={"files": ("a.txt", b"x")}).status_code == 403


def test_validation_errors_do_not_echo_the_body(client: TestClient) -> None:
    secret = "s3cr3t-" + "y" * 5000
    log_in(client, "rater1")
    response = client.post("/api/review/1", json={"nonsense": secret}, headers={"x-csrf-token": "x"})
    assert response.status_code in (403, 422)  # the CSRF check or the body's validation; never an echo
    assert secret not in response.text and "input" not in response.json().get("detail", [{}])[0]


def test_an_anonymous_vote_is_refused_before_its_body_is_read(client: TestClient) -> None:
    for path in ("/api/study/1/vote", "/api/study/1/advance"):
        response = client.post(path, json={"item_id": "not-a-number" * 100, "criterion": "x"})
        assert response.status_code == 401 and "not-a-number" not in response.text


# ----------------------------------------------------------------------------------------------------------
# finding 3: anyone could lock a lead out; proxies' headers trusted from anywhere local


def test_failed_passwords_elsewhere_never_lock_the_right_user_out(app: FastAPI) -> None:
    with TestClient(app, follow_redirects=False, client=("203.0.113.7", 1)) as attacker:
        codes = [log_in(attacker, "lead", "wrong-wrong").status_code for _ in range(6)]
        assert codes[-1] == 429  # the attacker's (username, IP) pair waits
    with TestClient(app, follow_redirects=False, client=("198.51.100.2", 1)) as real_lead:
        assert log_in(real_lead, "lead").status_code == 303  # never refused for someone else's failures
    with TestClient(app, follow_redirects=False, client=("203.0.113.7", 1)) as same_office:
        assert log_in(same_office, "rater2").status_code == 303  # another user behind the attacker's address
    with session_scope(app.state.settings.database_url) as session:
        blocks = session.scalars(select(AuditLog).where(AuditLog.action == "login.block")).all()
    assert any(b.details.get("username") == "lead" and b.details.get("ip") == "203.0.113.7" for b in blocks)


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(tmp_path: Path) -> None:
    from mcie.annotate.web.server import create_app

    untrusted = create_app(_site(tmp_path / "a"), mount_ui=False)
    with TestClient(untrusted, follow_redirects=False, client=("127.0.0.1", 1)) as c:
        codes = [log_in(c, "rater1", "wrong-wrong", headers={"x-forwarded-for": f"10.9.9.{k}"}).status_code
                 for k in range(6)]
        assert codes[-1] == 429  # rotating "IPs" in the header does not help: the peer is what counts
    trusted = create_app(_site(tmp_path / "b", trusted_proxies="127.0.0.1/32"), mount_ui=False)
    with TestClient(trusted, follow_redirects=False, client=("127.0.0.1", 1)) as c:
        codes = [log_in(c, "rater1", "wrong-wrong", headers={"x-forwarded-for": "10.0.0.5"}).status_code
                 for _ in range(6)]
        assert codes[-1] == 429
        ok = log_in(c, "rater1", headers={"x-forwarded-for": "10.0.0.6"})  # another client behind the proxy
        assert ok.status_code == 303
    with session_scope(trusted.state.settings.database_url) as session:
        ips = {b.details["ip"] for b in session.scalars(select(AuditLog).where(AuditLog.action == "login.block"))}
    assert ips == {"10.0.0.5"}


def test_an_expired_block_is_audited_as_an_unblock(tmp_path: Path) -> None:
    from mcie.annotate.web.throttle import LoginThrottle, ThrottlePolicy

    settings = _site(tmp_path)
    clock = [1000.0]
    throttle = LoginThrottle(settings.database_url, ThrottlePolicy(free_failures=1, delay_base_s=5),
                             clock=lambda: clock[0])
    assert throttle.record_failure("10.1.1.1", "lead") == 5
    assert throttle.retry_after("10.1.1.1", "lead") == pytest.approx(5)
    assert throttle.retry_after("10.1.1.2", "lead") is None
    clock[0] += 6
    assert throttle.retry_after("10.1.1.1", "lead") is None
    with session_scope(settings.database_url) as session:
        actions = [a.action for a in session.scalars(select(AuditLog).order_by(AuditLog.id))]
    assert actions.count("login.block") == 1 and actions.count("login.unblock") == 1


# ----------------------------------------------------------------------------------------------------------
# finding 4: reflected CORS origins, cookies not Secure


def test_no_foreign_origin_is_reflected(client: TestClient) -> None:
    log_in(client, "rater1")
    for path in ("/review/config", "/api/whoami", "/review/gradio_api/info"):
        response = client.get(path, headers={"origin": "https://evil.example", "host": "review.example.org"})
        assert "access-control-allow-origin" not in response.headers, path
    preflight = client.options("/review/gradio_api/queue/join",
                               headers={"origin": "https://evil.example", "access-control-request-method": "POST"})
    assert preflight.headers.get("access-control-allow-origin") is None


def test_an_allow_listed_origin_is_allowed(tmp_path: Path) -> None:
    from mcie.annotate.web.server import create_app

    app = create_app(_site(tmp_path, cors_origins="https://tools.example.org"), mount_ui=False)
    with TestClient(app) as c:
        ok = c.get("/healthz", headers={"origin": "https://tools.example.org"})
        assert ok.headers["access-control-allow-origin"] == "https://tools.example.org"
        assert ok.headers["access-control-allow-credentials"] == "true"
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"origin": "https://x.example"}).headers


def test_cookies_are_secure_by_default_except_on_loopback_or_an_http_public_url(tmp_path: Path) -> None:
    from mcie.annotate.web.edges import secure_cookies_for
    from mcie.annotate.web.server import create_app

    assert secure_cookies_for(None, "0.0.0.0") is True
    assert secure_cookies_for(None, "review.example.org") is True
    assert secure_cookies_for(None, "127.0.0.1") is False and secure_cookies_for(None, "::1") is False
    assert secure_cookies_for("http://10.0.0.3:7860", "0.0.0.0") is False
    assert secure_cookies_for("https://review.example.org", "127.0.0.1") is True
    assert secure_cookies_for(None, "0.0.0.0", override=False) is False
    app = create_app(_site(tmp_path), mount_ui=False, secure_cookies=True)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        response = log_in(c, "rater1")
        assert response.status_code == 303 and "secure" in response.headers["set-cookie"].lower()


def test_the_docker_image_serves_with_secure_cookies_behind_its_proxy() -> None:
    root = Path(__file__).resolve().parents[2]
    compose = (root / "docker" / "compose.yaml").read_text()
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    assert "--insecure-cookies" not in dockerfile and "--insecure-cookies" not in compose
    assert "MCIE_TRUSTED_PROXIES" in compose and "MCIE_PUBLIC_URL" in compose
    assert "0.0.0.0" in dockerfile  # not loopback: Secure by default (secure_cookies_for)


# ----------------------------------------------------------------------------------------------------------
# finding 5: ingest outside the images root, instructions and meta of any size


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)


def test_ingest_refuses_paths_outside_the_root_and_oversized_text(tmp_path: Path) -> None:
    from mcie.pipeline.sources import IngestLimits, read_jsonl_manifest

    root = tmp_path / "data"
    _png(root / "a.png")
    _png(root / "a1.png")
    _png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    base = {"source_image": "a.png", "turns": [{"instruction": "add a cat", "image": "a1.png"}]}
    lines = [
        {**base, "id": "ok"},
        {**base, "id": "abs", "source_image": str(tmp_path / "secret.png")},
        {**base, "id": "dots", "source_image": "../secret.png"},
        {**base, "id": "link", "source_image": "link.png"},
        {**base, "id": "long", "turns": [{"instruction": "x" * 5000, "image": "a1.png"}]},
        {**base, "id": "meta", "meta": {"blob": "m" * 70000}},
    ]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = list(read_jsonl_manifest(manifest))
    good = [r.external_id for r in out if not hasattr(r, "reason")]
    bad = {r.line: r.reason for r in out if hasattr(r, "reason")}
    assert good == ["ok"]
    assert all("outside the images root" in bad[n] for n in (2, 3, 4))
    assert "turns[1].instruction has 5000 characters (at most 4000" in bad[5]
    assert "meta is" in bad[6] and "MCIE_MAX_META_BYTES" in bad[6]
    opted = list(read_jsonl_manifest(manifest, limits=IngestLimits(allow_outside_root=True)))
    assert [r.external_id for r in opted if not hasattr(r, "reason")] == ["ok", "abs", "dots", "link"]


def test_the_ingest_command_names_each_refused_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mcie.cli import app as cli
    from mcie.config import get_settings

    root = tmp_path / "data"
    _png(root / "a.png")
    _png(root / "a1.png")
    _png(tmp_path / "outside.png")
    lines = [{"id": "in", "source_image": "a.png", "turns": [{"instruction": "add a cat", "image": "a1.png"}]},
             {"id": "out", "source_image": "../outside.png", "turns": [{"instruction": "y", "image": "a1.png"}]}]
    (root / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    monkeypatch.setenv("MCIE_DATA_DIR", str(tmp_path / "site"))
    monkeypatch.setenv("MCIE_MAX_INSTRUCTION_CHARS", "5")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["pipeline", "ingest", str(root / "m.jsonl"), "--format", "jsonl", "--json"])
    get_settings.cache_clear()
    assert result.exit_code == 1, result.output  # nothing could be ingested
    report = json.loads(result.output[result.output.index("{"):])
    reasons = " ".join(s["reason"] for s in report["skipped_records"])
    assert "turns[1].instruction has 9 characters (at most 5" in reasons and "outside the images root" in reasons
    assert report["ingested"] == 0 and report["read"] == 2


def test_ended_sessions_and_old_failure_counts_are_purged(tmp_path: Path) -> None:
    from mcie.annotate import sessions
    from mcie.annotate.web.throttle import LoginThrottle, ThrottlePolicy
    from mcie.db.models import LoginThrottleKey

    settings = _site(tmp_path)
    url = settings.database_url
    policy = sessions.SessionPolicy()
    with session_scope(url) as session:
        uid = session.scalar(select(User.id).where(User.username == "rater1"))
        live = sessions.create(session, uid, {"uid": uid}, policy)
        old = sessions.create(session, uid, {"uid": uid}, policy, now=utcnow() - timedelta(days=40))
    with session_scope(url) as session:
        assert sessions.purge(session) == 1
        assert session.get(WebSession, hash_id(live)) is not None and session.get(WebSession, hash_id(old)) is None
    clock = [1000.0]
    throttle = LoginThrottle(url, ThrottlePolicy(window_s=60), clock=lambda: clock[0])
    throttle.record_failure("10.0.0.1", "x")
    clock[0] += 61
    assert throttle.purge() == 2  # the pair and the IP, both past the window and not blocked
    with session_scope(url) as session:
        assert session.scalar(select(LoginThrottleKey.id)) is None


def test_the_preview_routes_refuse_anonymous_clients_participants_and_forged_posts(client: TestClient) -> None:
    with session_scope(url_of(client)) as session:
        from mcie.db.models import Sample

        sample_id = session.scalar(select(Sample.id))
    ask = f"/api/review/{sample_id}/preview"
    assert client.post(ask, json={}).status_code == 401
    assert client.get("/api/review/previews/1").status_code == 401
    log_in(client, "guest1")  # a participant
    assert client.post(ask, json={}, headers={"x-csrf-token": "x"}).status_code == 403
    assert client.get("/api/review/previews/1").status_code == 403
    client.cookies.clear()
    log_in(client, "rater1")
    assert client.post(ask, json={}).status_code == 403  # no CSRF header
    csrf = client.get("/api/review/csrf").json()["csrf_token"]
    off = client.post(ask, json={"seed": 1}, headers={"x-csrf-token": csrf})
    assert off.status_code == 503 and "MCIE_EDITING_BASE_MODEL_PATH" in off.json()["detail"]  # no model here
    bad = client.post(ask, json={"seed": 1, "oops": 2}, headers={"x-csrf-token": csrf})
    assert bad.status_code == 422
    big = client.post(ask, content=b"{" + b" " * (70 * 1024) + b"}", headers={"x-csrf-token": csrf,
                                                                             "content-type": "application/json"})
    assert big.status_code == 413
    assert client.get("/api/review/previews/999999").status_code == 404
