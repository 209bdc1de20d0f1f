"""End to end in a real browser (Debian's Chromium driven by Playwright) against a live server on SQLite.

A rater logs in and reviews three samples with the keyboard alone, skips one, revises one from their history and
sees their progress change; a malicious instruction shows as text; the rater is refused the dashboard. A lead opens
the dashboard, computes the agreement figures and adjudicates a sample. Screenshots of every step go to
``test-artifacts/``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from mcie.config import Settings, load_settings
from mcie.db.models import (
    Assignment,
    AssignmentState,
    Decision,
    DecisionSource,
    Review,
    ReviewRevision,
    Role,
    Sample,
    SampleFlag,
    User,
)
from mcie.db.session import session_scope
from mcie.db.store import ImageStore
from tests.annotate.browser import (
    chromium_page,
    live_server,
    login,
    make_image_instance,
    require_chromium,
    shot,
    shown_sample_id,
    wait_for_sample,
    wait_images_loaded,
)
from tests.annotate.factories import add_conflict_judgement, add_reviews, configure, make_sample, make_user

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),  # from gradio's own queue code
]

PASSWORD = "browser-pass-1"
EVIL = 'Add a dog <img src=x onerror="window.__pwn=1"> & <script>window.__pwn=2</script>'
BOXES = ((0.05, 0.1, 0.45, 0.5), (0.5, 0.15, 0.9, 0.55), (0.2, 0.55, 0.7, 0.95))


@dataclass(frozen=True)
class Site:
    settings: Settings
    base: str
    adjudicate_id: int

    @property
    def url(self) -> str:
        return self.settings.database_url


def _seed(settings: Settings) -> int:
    store = ImageStore.from_settings(settings)
    with session_scope(settings.database_url) as session:
        make_user(session, "rita", Role.rater, password=PASSWORD)
        make_user(session, "lena", Role.lead, password=PASSWORD)
        others = [make_user(session, name, Role.rater) for name in ("otto", "olga")]
        configure(session, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=1)
        for k in range(6):
            sample = make_sample(session, make_image_instance(session, store, 3, seed=k + 1), priority=10 - k)
            for sub, box in zip(sample.sub_instructions, BOXES, strict=True):
                sub.box_x0, sub.box_y0, sub.box_x1, sub.box_y1 = box
            if k == 0:
                sample.instruction = EVIL
            add_conflict_judgement(session, sample, "no_conflict" if k % 2 else "conflict", "turns 2 and 3 overlap")
        disputed = make_sample(session, make_image_instance(session, store, 2, seed=99), status="needs_adjudication")
        add_reviews(session, disputed, others, [(True, 4, 4), (False, 2, 4)], comment="the <b>cat</b> is missing")
        return disputed.id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_chromium()
    from mcie.db.migrate import upgrade

    folder: Path = tmp_path_factory.mktemp("browser")
    settings = load_settings(data_dir=folder, database_url=f"sqlite:///{folder}/browser.db",
                             blob_url=str(folder / "blobs"), secret_key=None, thumbnail_size=384)
    upgrade(settings.database_url)
    disputed = _seed(settings)
    with live_server(settings) as base:
        yield Site(settings, base, disputed)


def _answers_of(url: str, username: str) -> dict[int, tuple[bool, int, int, str | None, int]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(Review).join(User, User.id == Review.user_id).where(User.username == username)
        ).scalars()
        return {r.sample_id: (r.consistent, r.quality, r.complexity, r.comment, r.revision) for r in rows}


def test_a_rater_reviews_skips_and_revises_with_the_keyboard(site: Site) -> None:
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        login(page, site.base, "rita", PASSWORD)
        assert page.url.endswith("/review/")
        key = wait_for_sample(page)
        wait_images_loaded(page)
        page.wait_for_selector("#done-today")
        assert page.inner_text("#done-today") == "0"
        page.wait_for_function("document.querySelectorAll('#prefetch img').length > 0")  # the next one is warm
        assert page.inner_text("#mcie-instruction") == EVIL  # shown as text, never run
        assert page.evaluate("window.__pwn") is None
        assert page.locator("#sample-view .mcie-draw rect.mcie-box").count() == 3
        shot(page, "review-01-first-sample")
        page.click("#sample-view .mcie-step img >> nth=-1")  # the target, full size
        page.wait_for_selector("#mcie-lightbox.mcie-open img[src^='/img/']")
        shot(page, "review-01b-full-size")
        page.keyboard.press("Escape")
        page.wait_for_selector("#mcie-lightbox.mcie-open", state="detached")

        # three samples, keyboard only: consistency, quality then complexity, an optional comment, Enter
        plan = [("y", "4", "5", None), ("n", "2", "3", "colours bleed at the seam"), ("y", "5", "4", None)]
        reviewed: dict[int, tuple[bool, int, int, str | None]] = {}
        waits: list[float] = []
        for step, (yes_no, quality, complexity, comment) in enumerate(plan, start=1):
            sample_id = shown_sample_id(page)
            if comment:
                page.keyboard.press("c")
                page.keyboard.type(comment + " y 1 s f")  # typing in the comment box triggers no shortcut
                page.keyboard.press("Escape")
            for key_name in (yes_no, quality, complexity):
                page.keyboard.press(key_name)
            page.wait_for_function("document.body.classList.contains('mcie-active-done')")
            shot(page, f"review-0{step + 1}-answered-{sample_id}")
            started = time.monotonic()
            page.keyboard.press("Enter")
            key = wait_for_sample(page, not_key=key)
            waits.append(time.monotonic() - started)
            text = f"{comment} y 1 s f" if comment else None
            reviewed[sample_id] = (yes_no == "y", int(quality), int(complexity), text)
        assert max(waits) < 5, waits  # committed, then the next sample at once (generous bound: shared CI machines)
        page.wait_for_function("document.querySelector('#done-today').innerText === '3'")
        assert "Saved your review" in page.inner_text("#status")
        assert "MLLM verdict" in page.inner_text("#last-review")  # revealed once submitted
        shot(page, "review-05-progress-after-three")
        saved = _answers_of(site.url, "rita")
        assert {sid: v[:4] for sid, v in saved.items()} == reviewed

        # skip with a reason, keyboard only
        skipped = shown_sample_id(page)
        page.keyboard.press("s")
        page.wait_for_function("document.activeElement && document.activeElement.closest('#reason-box')")
        page.keyboard.type("Not my expertise")
        shot(page, "review-06-skip-reason")
        page.keyboard.press("Enter")
        key = wait_for_sample(page, not_key=key)
        assert shown_sample_id(page) != skipped and f"Skipped sample {skipped}" in page.inner_text("#status")
        with session_scope(site.url) as session:
            assignment = session.scalar(select(Assignment).where(Assignment.sample_id == skipped))
            assert assignment.state == AssignmentState.skipped and assignment.skip_reason == "Not my expertise"

        # flag the sample now on screen for a lead; it stays on screen to be answered or skipped
        flagged = shown_sample_id(page)
        page.keyboard.press("f")
        page.wait_for_function("document.activeElement && document.activeElement.closest('#reason-box')")
        page.keyboard.type("Turn 2 image is cut off")
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('#status').innerText.includes('Flagged sample {flagged}')")
        page.wait_for_function("!document.body.classList.contains('mcie-reason-open')")
        assert shown_sample_id(page) == flagged
        with session_scope(site.url) as session:
            assert session.scalar(select(SampleFlag.reason).where(SampleFlag.sample_id == flagged)) == \
                "Turn 2 image is cut off"
        shot(page, "review-06b-flagged")

        # reopen the newest review from the history and revise it
        page.click("#tab-history-button")
        page.wait_for_selector("#history [data-testid='cell-0-1']")
        shot(page, "review-07-history")
        revised_id = int(page.inner_text("#history [data-testid='cell-0-1']"))
        page.click("#history [data-testid='cell-0-1']")
        page.wait_for_function("document.querySelector('#sample-view .mcie-sample')?.dataset.mode === 'revise'")
        assert shown_sample_id(page) == revised_id
        # an optional box correction, dragged with the mouse on the target, is saved with the revision
        page.click("[data-mcie-redraw='2']")
        frame = page.locator("#sample-view .mcie-draw img").bounding_box()
        assert frame is not None
        page.mouse.move(frame["x"] + frame["width"] * 0.25, frame["y"] + frame["height"] * 0.25)
        page.mouse.down()
        page.mouse.move(frame["x"] + frame["width"] * 0.75, frame["y"] + frame["height"] * 0.5, steps=4)
        page.mouse.up()
        page.wait_for_function("document.querySelector('#box-corrections textarea').value.includes('turn_index')")
        shot(page, "review-08-revising-with-box")
        for key_name in ("n", "1", "2", "Enter"):
            page.keyboard.press(key_name)
        page.wait_for_function("document.querySelector('#status').innerText.includes('revision 2')")
        assert page.get_attribute("#sample-view .mcie-sample", "data-mode") == "review"
        assert _answers_of(site.url, "rita")[revised_id] == (False, 1, 2, None, 2)
        with session_scope(site.url) as session:
            boxes = session.scalar(select(Review.box_corrections).where(Review.sample_id == revised_id))
        assert boxes is not None and boxes[0]["turn_index"] == 2
        assert boxes[0]["box"] == pytest.approx([0.25, 0.25, 0.75, 0.5], abs=0.02)
        with session_scope(site.url) as session:
            revisions = session.scalars(
                select(ReviewRevision.revision).join(Review, Review.id == ReviewRevision.review_id)
                .where(Review.sample_id == revised_id)
            ).all()
        assert sorted(revisions) == [1, 2]
        page.click("#tab-history-button")
        page.wait_for_function("document.querySelector(\"#history [data-testid='cell-0-6']\")?.innerText === '2'")
        shot(page, "review-09-history-revision-2")
        assert page.inner_text("#done-today") == "3"

        # the dashboard is refused to a rater, on the server
        response = page.goto(f"{site.base}/dashboard/")
        assert response is not None and response.status == 403
        assert "Not allowed" in page.inner_text("body")
        shot(page, "review-10-dashboard-refused")
        assert errors == []


def test_a_lead_adjudicates_a_sample_on_the_dashboard(site: Site) -> None:
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        login(page, site.base, "lena", PASSWORD)
        assert page.url.endswith("/dashboard/")
        page.wait_for_selector("#kpi-samples")
        page.wait_for_selector("#plot-status .js-plotly-plot")
        shot(page, "dashboard-01-progress")
        with page.expect_download() as download:
            page.click("#csv-status")
        csv_text = Path(download.value.path()).read_text()
        assert csv_text.splitlines()[0] == "status,samples" and "needs_adjudication,1" in csv_text

        page.click("#tab-agreement-button")
        page.click("#agreement-refresh")
        page.wait_for_selector("#kpi-agreement-reviews", timeout=60_000)
        shot(page, "dashboard-02-agreement")

        page.click("#tab-adjudication-button")
        page.wait_for_selector("#adj-table [data-testid='cell-0-0']")
        assert int(page.inner_text("#adj-table [data-testid='cell-0-0']")) == site.adjudicate_id
        page.click("#adj-table [data-testid='cell-0-0']")
        page.wait_for_function("document.querySelectorAll('#adj-reviews .mcie-adj-review').length === 2")
        assert "the <b>cat</b> is missing" in page.inner_text("#adj-reviews")
        shot(page, "dashboard-03-adjudication")
        page.click("#adj-outcome input[value='accepted']")
        page.fill("#adj-reason textarea", "The cat is there at full size; the second reviewer missed it.")
        page.click("#adj-decide")
        page.wait_for_function("document.querySelector('#adj-status').innerText.includes('accepted by lena')")
        shot(page, "dashboard-04-decided")
        with session_scope(site.url) as session:
            decision = session.scalar(select(Decision).where(Decision.sample_id == site.adjudicate_id))
            assert decision.source == DecisionSource.lead and decision.outcome.value == "accepted"
            assert decision.reason.startswith("The cat is there")
            assert session.get(Sample, site.adjudicate_id).status.value == "accepted"
        assert errors == []


def test_an_empty_queue_shows_its_message_and_nothing_to_answer(tmp_path: Path) -> None:
    require_chromium()
    from mcie.db.migrate import upgrade

    settings = load_settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/empty.db",
                             blob_url=str(tmp_path / "blobs"), secret_key=None)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        make_user(session, "ida", Role.rater, password=PASSWORD)
        configure(session, gold_rate=0.0, calibration_share=0.0)
    with live_server(settings) as base, chromium_page() as page:
        login(page, base, "ida", PASSWORD)
        page.wait_for_selector("#sample-view .mcie-empty:has-text('Your queue is empty')")  # not "Loading..."
        page.wait_for_selector("#submit-btn", state="hidden")
        for hidden in ("#submit-btn", "#skip-btn", "#flag-btn", "#q-quality", "#preview-btn", ".mcie-rubric-box"):
            assert not page.locator(hidden).first.is_visible(), hidden
        assert page.get_by_role("tab", name="My reviews").is_visible()
        shot(page, "review-00-empty-queue")
