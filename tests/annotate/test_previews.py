"""Preview edits (annotate.previews): the worker runs the tiny MCIE-E1 saved to a folder and named by the settings,
results are stored and cached, failures are recorded, no model means a clear refusal, the review screen's handlers
show the preview, jobs survive a restart, and the server starts and stops the worker with the app."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from mcie.annotate import previews
from mcie.annotate.previews import PreviewError, PreviewStatus, PreviewUnavailable, PreviewWorker
from mcie.config import Settings, load_settings
from mcie.db.models import Image, JobStatus, Preview, Role
from mcie.db.session import session_scope
from mcie.db.store import ImageStore, register_images
from tests.annotate.factories import configure, make_instance, make_sample, make_user
from tests.annotate.tx import read_tx, write_tx
from tests.annotate.web_fixtures import named_widgets
from tests.model.tiny import TinyFiles, load_tiny_model, make_tiny_files, randomize_trained, tiny_config

# diffusers' Euler schedulers call np.array(tensor, copy=False) internally (numpy 2 deprecation, not ours)
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]

FAST = {"num_inference_steps": 2, "max_side": 64}  # tiny model, 64 x 64: a job takes a fraction of a second
WAIT_S = 60.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models on one torch thread (see tests/conftest.py)."""


@dataclass(frozen=True)
class Model:
    base: Path
    weights: Path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The tiny base folder and trained-looking MCIE-E1 weights whose config names the tiny vision checkpoint."""
    from mcie.model.weights import save_weights

    root = tmp_path_factory.mktemp("tiny-model")
    files: TinyFiles = make_tiny_files(root)
    net = load_tiny_model(files, tiny_config(clip_vision_checkpoint=str(files.vision)))
    randomize_trained(net)
    return Model(files.base, save_weights(net, root / "weights"))


@dataclass
class Site:
    settings: Settings
    store: ImageStore
    sample_id: int
    source: str
    target: str
    rater: int
    guest: int

    @property
    def url(self) -> str:
        return self.settings.database_url


def _site(monkeypatch: pytest.MonkeyPatch, base: Path | None, weights: Path | None, folder: Path | None = None) -> Site:
    """A migrated database with one ready sample of real 64 x 64 images, and settings read from the environment
    (the data folder of tests/conftest.py, or ``folder``)."""
    from mcie.db.migrate import upgrade

    if base is not None:
        monkeypatch.setenv("MCIE_EDITING_BASE_MODEL_PATH", str(base))
    if weights is not None:
        monkeypatch.setenv("MCIE_EDITING_WEIGHTS_PATH", str(weights))
    where = {} if folder is None else {"data_dir": folder, "database_url": f"sqlite:///{folder}/mcie.db",
                                       "blob_url": str(folder / "blobs")}
    settings = load_settings(device="cpu", **where)
    upgrade(settings.database_url)
    store = ImageStore.from_settings(settings)
    shades = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    stored = [store.put_pil(PILImage.new("RGB", (64, 64), shade)) for shade in shades]
    with session_scope(settings.database_url) as session:
        register_images(session, stored)
        configure(session, gold_rate=0.0, calibration_share=0.0)
        rater = make_user(session, "rater1", Role.rater)
        guest = make_user(session, "guest1", Role.participant)
        instance = make_instance(session, dataset="t", external_id="i1", images=[s.sha256 for s in stored[:3]])
        sample = make_sample(session, instance)  # two sub-instructions with boxes
        ids = (sample.id, rater.id, guest.id)
    return Site(settings, store, ids[0], stored[0].sha256, stored[2].sha256, ids[1], ids[2])


@pytest.fixture
def site(model: Model, monkeypatch: pytest.MonkeyPatch) -> Site:
    return _site(monkeypatch, model.base, model.weights)


class Counted:
    """The real pipeline (set by the worker's loader, on the first job), with its runs counted. ``fail``: errors
    raised by the next runs, in order."""

    def __init__(self, fail: list[Exception] | None = None) -> None:
        self.pipe: Any = None
        self.fail = list(fail or [])
        self.calls: list[dict[str, Any]] = []

    def load(self, settings: Settings) -> Counted:
        self.pipe = previews.load_preview_pipeline(settings)
        return self

    def __call__(self, image: Any, instruction: str, **kwargs: Any) -> Any:
        self.calls.append({"size": image.size, "instruction": instruction, **kwargs})
        if self.fail:
            raise self.fail.pop(0)
        return self.pipe(image, instruction, **kwargs)


@pytest.fixture
def worker_of() -> Iterator[Callable[..., tuple[PreviewWorker, Counted]]]:
    """Starts workers whose loader is the real one wrapped by :class:`Counted`; stops every one after the test."""
    started: list[PreviewWorker] = []

    def start(settings: Settings, fail: list[Exception] | None = None) -> tuple[PreviewWorker, Counted]:
        pipe = Counted(fail)
        worker = PreviewWorker(settings, loader=pipe.load, poll_s=0.2)
        started.append(worker)
        return worker.start(), pipe

    yield start
    for worker in started:
        worker.stop()
        assert not worker.running



def wait_done(url: str, preview_id: int) -> PreviewStatus:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = write_tx(url, previews.preview_status, preview_id)
        if not status.pending:
            return status
        time.sleep(0.05)
    raise AssertionError(f"preview {preview_id} did not finish in {WAIT_S} s")


def count_previews(url: str) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(Preview)) or 0)


# ----------------------------------------------------------------------------------------------------------
# the worker and the cache


def test_a_request_runs_in_the_worker_and_identical_ones_come_from_the_cache(site: Site, worker_of) -> None:
    worker, pipe = worker_of(site.settings)
    assert worker.running and worker.loads == 0  # loaded lazily, on the first job
    version = previews.model_version(site.settings)
    assert version.startswith("ip2p:") and len(version.split(":")[1]) == 12

    first = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params=FAST)
    assert first.status == "queued" and not first.cached and first.image is None  # answered before the model ran
    done = wait_done(site.url, first.id)
    assert done.status == "done" and done.error is None and done.finished_at is not None
    assert done.requested_by == site.rater and done.model_version == version
    stored = site.store.open(done.image)
    assert stored.size == (64, 64) and site.store.exists(done.image)
    with session_scope(site.url) as session:
        assert session.get(Image, done.image) is not None  # registered: /img and /thumb can serve it
    # the sample went to the model as it is: source = first step, the instruction, sub-instructions with boxes
    call = pipe.calls[0]
    assert call["instruction"] == "edit number 1, then edit number 2" and call["seed"] == 0
    assert call["sub_instructions"] == [("edit number 1", "add", (0.1, 0.2, 0.5, 0.6)),
                                        ("edit number 2", "remove", (0.1, 0.2, 0.5, 0.6))]
    assert call["num_inference_steps"] == 2 and call["size"] == (64, 64)

    again = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params=dict(FAST))
    assert again.cached and again.id == first.id and again.image == done.image
    time.sleep(0.3)
    assert len(pipe.calls) == 1 and worker.loads == 1 and count_previews(site.url) == 1

    other = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, seed=7, params=FAST)
    assert other.id != first.id and wait_done(site.url, other.id).status == "done"
    assert len(pipe.calls) == 2 and worker.loads == 1  # one model, loaded once
    assert [p.id for p in write_tx(site.url, previews.previews_for, site.sample_id)] == [other.id, first.id]


def test_bad_requests_are_refused_without_queueing(site: Site) -> None:
    with pytest.raises(PreviewError, match="no sample with id"):
        write_tx(site.url, previews.request_preview, 999, site.rater, settings=site.settings)
    with pytest.raises(PreviewError, match="unknown preview parameter 'steps'"):
        write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params={"steps": 3},
              settings=site.settings)
    with pytest.raises(PreviewError, match="seed"):
        write_tx(site.url, previews.request_preview, site.sample_id, site.rater, seed=-1, settings=site.settings)
    with pytest.raises(PermissionError, match="participant"):
        write_tx(site.url, previews.request_preview, site.sample_id, site.guest, settings=site.settings)
    assert count_previews(site.url) == 0
    assert previews.params_hash({}) == previews.params_hash({"num_inference_steps": 20, "guidance_scale": 7.5})


def test_read_then_write_services_want_a_write_session(site: Site) -> None:
    with session_scope(site.url) as session:
        with pytest.raises(RuntimeError, match="asking for a preview reads then writes"):
            previews.request_preview(session, site.sample_id, site.rater, settings=site.settings)
        with pytest.raises(RuntimeError, match="reads then writes"):
            previews.enqueue_orphans(session)
    assert count_previews(site.url) == 0


def test_a_failing_model_marks_the_row_failed_and_a_new_request_retries(site: Site, worker_of) -> None:
    worker, pipe = worker_of(site.settings, fail=[RuntimeError("CUDA out of memory (test)")])
    first = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params=FAST)
    failed = wait_done(site.url, first.id)
    assert failed.status == "failed" and failed.image is None and failed.finished_at is not None
    assert failed.error == "RuntimeError: CUDA out of memory (test)"

    retry = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params=FAST)
    assert retry.id == first.id and retry.status == "queued" and retry.error is None
    assert wait_done(site.url, retry.id).status == "done" and len(pipe.calls) == 2
    assert worker.loads == 1  # a failed run keeps the loaded model


def test_a_model_that_cannot_load_fails_the_job_with_the_error(model: Model, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    site = _site(monkeypatch, broken, None)
    worker = PreviewWorker(site.settings, poll_s=0.2).start()  # the real loader
    try:
        asked = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params=FAST)
        status = wait_done(site.url, asked.id)
    finally:
        worker.stop()
    assert status.status == "failed" and status.model_version == "not-a-model:baseline"
    assert "FileNotFoundError" in status.error and "not-a-model" in status.error


def test_no_model_configured_is_a_clear_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mcie.annotate.web.ui_review import ReviewApp, Widgets, build

    site = _site(monkeypatch, None, None)
    reason = previews.unavailable_reason(site.settings)
    assert reason is not None and "MCIE_EDITING_BASE_MODEL_PATH" in reason
    with pytest.raises(PreviewUnavailable, match="MCIE_EDITING_BASE_MODEL_PATH"):
        write_tx(site.url, previews.request_preview, site.sample_id, site.rater)
    with pytest.raises(PreviewUnavailable):
        previews.model_version(site.settings)
    worker = PreviewWorker(site.settings).start()
    assert not worker.running  # nothing to run
    worker.stop()

    app = ReviewApp(site.settings)
    app.w = named_widgets(Widgets)
    out = app.on_preview(_screen(site), _request("rater1"))
    assert "MCIE_EDITING_BASE_MODEL_PATH" in out["preview"] and out["preview_job"] is None
    assert count_previews(site.url) == 0
    demo = build(site.settings)
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "preview-btn")
    assert button.interactive is False and "no model" in button.value

    # configured, but the folder is not there
    missing = _site(monkeypatch, tmp_path / "gone", None, tmp_path / "second")
    with pytest.raises(PreviewUnavailable, match="not found"):
        write_tx(missing.url, previews.request_preview, missing.sample_id, missing.rater, settings=missing.settings)


@pytest.mark.postgres
def test_identical_requests_racing_on_postgres_share_one_row(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second insert waits on the first transaction's unique key, fails when it commits, and its savepoint lets
    the request read the winner's row in the same transaction (no second row, no second job)."""
    import threading

    from mcie.annotate import jobs
    from mcie.db.migrate import upgrade

    upgrade(postgres_url)
    with session_scope(postgres_url) as session:
        rater, sample = make_user(session, "rater1", Role.rater).id, make_sample(session).id
    monkeypatch.setattr(previews, "_current_version", lambda settings, worker: "race:v1")
    settings = load_settings(database_url=postgres_url)
    answers: list[PreviewStatus] = []

    def second() -> None:
        answers.append(write_tx(postgres_url, previews.request_preview, sample, rater, params=FAST, settings=settings))

    with session_scope(postgres_url, write=True) as session:
        first = previews.request_preview(session, sample, rater, params=FAST, settings=settings)
        racer = threading.Thread(target=second)
        racer.start()
        racer.join(1.0)
        assert racer.is_alive()  # waiting on the first transaction's row
    racer.join(30)
    assert [a.id for a in answers] == [first.id] and answers[0].status == "queued"
    assert count_previews(postgres_url) == 1 and len(write_tx(postgres_url, jobs.list_jobs, kind="preview")) == 1


# ----------------------------------------------------------------------------------------------------------
# the review screen


def _request(username: str | None) -> Any:
    return SimpleNamespace(username=username)


def _screen(site: Site) -> dict[str, Any]:
    return {"current": {"sample_id": site.sample_id, "images": [site.source, site.target]}, "next": None,
            "revise": None}


def test_the_review_handlers_show_the_preview_beside_the_target(site: Site, worker_of) -> None:
    from mcie.annotate.web.ui_review import ReviewApp, Widgets

    worker, pipe = worker_of(site.settings)
    app = ReviewApp(site.settings)
    app.w = named_widgets(Widgets)
    app.preview_params = FAST
    screen = _screen(site)
    with pytest.raises(gr.Error):
        app.on_preview(screen, _request("guest1"))

    out = app.on_preview(screen, _request("rater1"))
    job = out["preview_job"]
    assert job is not None and job["sample_id"] == site.sample_id and out["preview_timer"].active
    assert 'data-state="queued"' in out["preview"] and f"/thumb/{site.target}" in out["preview"]
    wait_done(site.url, job["preview_id"])
    out = app.on_preview_tick(screen, job, _request("rater1"))
    done = write_tx(site.url, previews.preview_status, job["preview_id"])
    assert f"/thumb/{done.image}?size=" in out["preview"] and f"/thumb/{site.target}" in out["preview"]
    assert out["preview_job"] is None and not out["preview_timer"].active  # polling stops

    # the sample changed meanwhile: the timer stops and nothing is written over the new sample's panel
    moved = app.on_preview_tick({"current": None, "revise": None}, job, _request("rater1"))
    assert "preview" not in moved and not moved["preview_timer"].active

    # showing the sample again (page load) shows the cached preview at once; pressing p again runs nothing
    loaded = app.on_load(_request("rater1"))
    assert f"/thumb/{done.image}?size=" in loaded["preview"] and "from the cache" in loaded["preview"]
    again = app.on_preview(screen, _request("rater1"))
    assert f"/thumb/{done.image}?size=" in again["preview"] and again["preview_job"] is None
    assert len(pipe.calls) == 1 and worker.calls == 1


# ----------------------------------------------------------------------------------------------------------
# restarts and the server


def test_a_restart_requeues_jobs_left_queued_or_running(site: Site, worker_of) -> None:
    version = previews.model_version(site.settings)
    full = previews.normalize_params(FAST)
    with session_scope(site.url) as session:
        rows = [
            Preview(sample_id=site.sample_id, model_version=version, seed=seed, params=full,
                    params_hash=previews.params_hash(full), status=state)
            for seed, state in ((1, JobStatus.running), (2, JobStatus.queued))
        ]
        rows.append(Preview(sample_id=site.sample_id, model_version="other:abc", seed=3, params=full,
                            params_hash=previews.params_hash(full), status=JobStatus.queued))
        session.add_all(rows)
        session.flush()
        ids = [row.id for row in rows]
    worker, pipe = worker_of(site.settings)
    assert [wait_done(site.url, i).status for i in ids[:2]] == ["done", "done"]
    assert len(pipe.calls) == 2 and worker.loads == 1
    assert read_tx(site.url, previews.preview_status, ids[2]).status == "queued"  # another model's job: not ours


def test_the_server_runs_the_worker_while_the_app_runs(site: Site) -> None:
    from fastapi.testclient import TestClient

    from mcie.annotate import jobs
    from mcie.annotate.web.server import create_app
    from mcie.annotate.worker import Worker

    app = create_app(site.settings, mount_ui=False)
    worker: Worker = app.state.job_worker
    assert not worker.running
    with TestClient(app):
        assert worker.running and previews._running_worker(site.url) is None  # no thread of its own: a job
        # no settings: the app's
        status = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, params=FAST)
        assert wait_done(site.url, status.id).status == "done"
        [job] = write_tx(site.url, jobs.list_jobs, kind="preview")
        assert job.payload == {"preview_id": status.id} and job.requested_by == site.rater
    assert not worker.running
    deadline = time.monotonic() + 10
    while write_tx(site.url, jobs.get, job.id).status != "done":  # finish() follows the preview row's update
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # the web tier alone (--no-worker) only queues; a separate worker process runs the job
    web = create_app(site.settings, mount_ui=False, worker=False)
    assert web.state.job_worker is None
    with TestClient(web):
        queued = write_tx(site.url, previews.request_preview, site.sample_id, site.rater, seed=5, params=FAST)
        time.sleep(0.5)
        assert write_tx(site.url, previews.preview_status, queued.id).status == "queued"
    apart = Worker(site.settings, kinds=["preview"], poll_s=0.1).start()
    try:
        assert wait_done(site.url, queued.id).status == "done"
    finally:
        apart.stop()


@pytest.mark.browser
@pytest.mark.slow
def test_pressing_p_in_the_browser_shows_the_preview_beside_the_target(model: Model, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.annotate.browser import chromium_page, live_server, login, require_chromium, shot, wait_for_sample

    require_chromium()
    site = _site(monkeypatch, model.base, model.weights, tmp_path)
    with session_scope(site.url) as session:
        make_user(session, "rita", Role.rater, password="browser-pass-1")
    with live_server(site.settings) as base, chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        login(page, base, "rita", "browser-pass-1")
        wait_for_sample(page)
        assert page.is_enabled("#preview-btn") and "p" in page.inner_text("#preview-btn")
        page.wait_for_selector("#preview-panel .mcie-preview[data-state='none']")
        page.keyboard.press("p")
        page.wait_for_selector("#preview-panel .mcie-preview[data-state='done'] img[alt='model preview']",
                               timeout=int(WAIT_S * 1000))
        page.wait_for_function("[...document.querySelectorAll('#preview-panel img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        shot(page, "review-preview-done")
        assert not errors
    [row] = write_tx(site.url, previews.previews_for, site.sample_id)
    assert row.status == "done" and row.requested_by is not None
