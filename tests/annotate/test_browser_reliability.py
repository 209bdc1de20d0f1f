"""In a real browser (Debian's Chromium under Playwright) against a live server: a lead sees each rater's reliability
with a careless rater flagged, previews and applies the weighted decision rule, and switches the review policy to
adaptive from the Review budget tab. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcie.config import Settings, load_settings
from mcie.db.models import Role
from mcie.db.session import session_scope
from tests.annotate.browser import chromium_page, live_server, login, require_chromium, shot
from tests.annotate.factories import add_reviews, configure, make_sample, make_user
from tests.annotate.tx import write_tx

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),  # from gradio's own queue code
]

PASSWORD = "browser-pass-1"


def _seed(settings: Settings) -> None:
    """80 samples, each reviewed by three of four raters; "rex" answers at random."""
    from mcie.annotate.acceptance import settle_complete

    rng = random.Random(7)
    with session_scope(settings.database_url) as session:
        make_user(session, "lena", Role.lead, password=PASSWORD)
        raters = [make_user(session, name, Role.rater) for name in ("ann", "bob", "cyd", "rex")]
        configure(session, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=3)
        for _ in range(80):
            truth = (rng.random() < 0.7, rng.choice([2, 3, 4, 4, 5]), rng.choice([2, 3, 4, 4, 5]))
            answers = [truth, truth, truth if rng.random() < 0.8 else (not truth[0], truth[1], truth[2]),
                       (rng.random() < 0.5, rng.randint(1, 5), rng.randint(1, 5))]
            chosen = [*rng.sample(range(3), 2), 3]
            add_reviews(session, make_sample(session), [raters[k] for k in chosen], [answers[k] for k in chosen])
    write_tx(settings.database_url, settle_complete)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    require_chromium()
    from mcie.db.migrate import upgrade

    folder: Path = tmp_path_factory.mktemp("browser-reliability")
    settings = load_settings(data_dir=folder, database_url=f"sqlite:///{folder}/browser.db",
                             blob_url=str(folder / "blobs"), secret_key=None)
    upgrade(settings.database_url)
    _seed(settings)
    with live_server(settings) as base:
        yield settings, base


def test_a_lead_sees_reliability_applies_the_weighted_rule_and_the_adaptive_policy(site) -> None:
    from mcie.annotate.project import get_project_config

    settings, base = site
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        login(page, base, "lena", PASSWORD)
        page.click("#tab-agreement-button")
        page.click("#agreement-refresh")
        page.wait_for_selector("#plot-reliability .js-plotly-plot", timeout=90_000)
        flags = page.inner_text("#reliability-flags")
        assert "rex - careless" in flags and "95% interval" in flags and "rex - biased" not in flags
        shot(page, "reliability-01-agreement")

        page.click("#tab-rule-button")
        page.click("#decision-rule input[value='weighted']")
        page.click("#decision-apply-btn")
        page.wait_for_function("document.querySelector('#decision-status').innerText.includes('Preview this')")
        page.click("#decision-preview-btn")
        page.wait_for_function("document.querySelector('#decision-preview').innerText.includes('With the weighted')")
        page.click("#decision-apply-btn")
        page.wait_for_function("document.querySelector('#decision-status').innerText.includes('applied by lena')")
        shot(page, "reliability-02-decision-rule")

        page.click("#tab-budget-button")
        page.click("#budget-refresh")
        page.wait_for_selector("#kpi-budget-wrong")
        page.wait_for_selector("#plot-budget-decided .js-plotly-plot")
        page.click("#review-policy input[value='adaptive']")
        page.click("#policy-save")
        page.wait_for_function("document.querySelector('#policy-status').innerText.includes('Saved by lena')")
        shot(page, "reliability-03-budget")
        assert errors == []
    with session_scope(settings.database_url) as session:
        config = get_project_config(session)
    assert (config.decision_rule, config.review_policy) == ("weighted", "adaptive")
