"""Several replicas on one PostgreSQL, as real processes: two ``mcie serve --no-worker`` on two ports and ``mcie
worker`` processes. Nothing a request needs lives in one process: a login made on A works on B, a logout on B is
refused on A at once, failed logins spread over A and B are throttled as one, a preview asked for through A is made by
the worker, a worker stopped with SIGTERM gives its job back, and a job whose worker is killed -9 is finished by
another worker once its lease lapses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage

from mcie.annotate import jobs
from mcie.config import load_settings
from mcie.db.models import Role
from mcie.db.session import session_scope
from mcie.db.store import ImageStore, register_images
from tests.annotate.factories import configure, make_instance, make_sample, make_user
from tests.annotate.tx import read_tx
from tests.model.tiny import load_tiny_model, make_tiny_files, randomize_trained, tiny_config

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    # diffusers' Euler schedulers call np.array(tensor, copy=False) internally (numpy 2 deprecation, not ours)
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]

PASSWORD = "replica-pass-1"
FAST = {"num_inference_steps": 2, "max_side": 64}
LEASE_S = 3



def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Site:
    def __init__(self, folder: Path, url: str, env: dict[str, str], sample_id: int) -> None:
        self.folder, self.url, self.env, self.sample_id = folder, url, env, sample_id
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        mcie = Path(sys.executable).with_name("mcie")
        command = [str(mcie)] if mcie.exists() else [sys.executable, "-m", "mcie.cli"]
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - the process writes to it until it ends
        process = subprocess.Popen([*command, *args], cwd=self.folder, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def serve(self, name: str) -> str:
        port = _free_port()
        process = self.start("serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker", name=name)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (self.folder / f"{name}.log").read_text()
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{name} did not become healthy")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, _postgres_admin) -> Iterator[Site]:
    from mcie.db.migrate import upgrade
    from mcie.model.weights import save_weights
    from tests.conftest import _new_postgres_database

    folder = tmp_path_factory.mktemp("replicas")
    files = make_tiny_files(folder / "model")
    net = load_tiny_model(files, tiny_config(clip_vision_checkpoint=str(files.vision)))
    randomize_trained(net)
    weights = save_weights(net, folder / "model" / "weights")
    databases = _new_postgres_database(_postgres_admin)
    url = next(databases)
    (folder / "empty.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCIE_")}
    env |= {"MCIE_DATABASE_URL": url, "MCIE_DATA_DIR": str(folder), "MCIE_BLOB_URL": str(folder / "blobs"),
            "MCIE_CONFIG": str(folder / "empty.toml"), "MCIE_EDITING_BASE_MODEL_PATH": str(files.base),
            "MCIE_EDITING_WEIGHTS_PATH": str(weights), "MCIE_DEVICE": "cpu", "MCIE_JOB_LEASE_S": str(LEASE_S),
            "MCIE_LOGIN_DELAY_BASE_S": "60", "MCIE_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    upgrade(url)
    settings = load_settings(database_url=url, data_dir=folder, blob_url=str(folder / "blobs"))
    store = ImageStore.from_settings(settings)
    stored = [store.put_pil(PILImage.new("RGB", (64, 64), c)) for c in ((200, 40, 40), (40, 200, 40), (40, 40, 200))]
    with session_scope(url) as session:
        register_images(session, stored)
        configure(session, gold_rate=0.0, calibration_share=0.0)
        for name in ("rater1", "rater2"):
            make_user(session, name, Role.rater, password=PASSWORD)
        instance = make_instance(session, dataset="t", external_id="i1", images=[s.sha256 for s in stored[:3]])
        sample_id = make_sample(session, instance).id
    result = Site(folder, url, env, sample_id)
    try:
        yield result
    finally:
        for process in result.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        next(databases, None)  # drops the database


def _log_in(base: str, username: str, password: str = PASSWORD) -> httpx.Client:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=30)
    page = client.get("/login")
    csrf = re.search(r"name=csrf value='([^']+)'", page.text)
    assert csrf
    response = client.post("/login", data={"username": username, "password": password, "csrf": csrf.group(1)})
    client.last_login = response  # type: ignore[attr-defined]
    return client


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_two_web_replicas_and_workers_share_everything(site: Site) -> None:
    a, b = site.serve("app-a"), site.serve("app-b")

    # a login made on A works on B; a logout on B is refused on A at once
    on_a = _log_in(a, "rater1")
    assert on_a.last_login.status_code == 303  # type: ignore[attr-defined]
    cookie = on_a.cookies.get("mcie_session")
    on_b = httpx.Client(base_url=b, cookies={"mcie_session": cookie}, follow_redirects=False, timeout=30)
    assert on_b.get("/api/whoami").json()["username"] == "rater1"
    assert on_b.post("/logout").status_code == 303
    assert on_a.get("/api/whoami").status_code == 401

    # failed logins spread over A and B are counted as one: the third blocks the pair on both
    codes = [_log_in(base, "rater2", "wrong-wrong").last_login.status_code for base in (a, b, a)]  # type: ignore
    assert codes == [401, 401, 401]
    assert _log_in(b, "rater2").last_login.status_code == 429  # type: ignore[attr-defined]
    assert _log_in(a, "rater2").last_login.status_code == 429  # type: ignore[attr-defined]

    # a preview asked for through A is made by a worker process (the web tier runs no job)
    reviewer = _log_in(a, "rater1")
    csrf = reviewer.get("/api/review/csrf").json()["csrf_token"]
    asked = reviewer.post(f"/api/review/{site.sample_id}/preview", json={"seed": 1, "params": FAST},
                          headers={"x-csrf-token": csrf})
    assert asked.status_code == 202, asked.text
    preview_id = asked.json()["preview_id"]
    time.sleep(1.0)
    assert reviewer.get(f"/api/review/previews/{preview_id}").json()["status"] == "queued"  # nobody runs it yet
    worker = site.start("worker", "--kinds", "preview", name="worker-1")
    on_b = _log_in(b, "rater1")

    def done(pid: int) -> bool:
        return on_b.get(f"/api/review/previews/{pid}").json()["status"] == "done"

    _wait(lambda: done(preview_id), 180, "the worker did not make the preview")
    _wait(lambda: read_tx(site.url, jobs.list_jobs, kind="preview")[0].status == "done", 60, "the job was not settled")
    [job] = read_tx(site.url, jobs.list_jobs, kind="preview")
    assert job.payload == {"preview_id": preview_id} and f":{worker.pid}:" in (job.worker_id or "")

    # SIGTERM: the worker stops cleanly (nothing was running)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0

    # kill -9 during a job: a second worker finishes it after the lease lapses
    asked = reviewer.post(f"/api/review/{site.sample_id}/preview", json={"seed": 2, "params": FAST},
                          headers={"x-csrf-token": csrf})
    second = asked.json()["preview_id"]
    [job2] = [j for j in read_tx(site.url, jobs.list_jobs, kind="preview") if j.payload == {"preview_id": second}]
    doomed = site.start("worker", "--kinds", "preview", name="worker-2")
    _wait(lambda: read_tx(site.url, jobs.get, job2.id).status == "running", 120, "worker-2 did not claim the job")
    assert f":{doomed.pid}:" in (read_tx(site.url, jobs.get, job2.id).worker_id or "")
    doomed.send_signal(signal.SIGKILL)  # while it loads the model (a fresh process): mid-job
    doomed.wait(10)
    assert read_tx(site.url, jobs.get, job2.id).status == "running"  # nobody knows yet
    rescuer = site.start("worker", "--kinds", "preview", name="worker-3")
    _wait(lambda: done(second), 180, "the second worker did not finish the killed worker's job")
    # the preview row is committed before the job row is settled (two transactions): wait for the job too
    _wait(lambda: read_tx(site.url, jobs.get, job2.id).status == "done", 60, "job not settled after its preview")
    final = read_tx(site.url, jobs.get, job2.id)
    assert final.status == "done" and final.attempts == 2 and f":{rescuer.pid}:" in (final.worker_id or "")
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(60) == 0
