"""In a real browser (Debian's Chromium under Playwright): a lead opens the dashboard's Grounding tab and sees the
pipeline's boxes measured against the reviewers' corrections; the CSV download holds the same table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mcie.config import Settings, load_settings
from mcie.db.models import BoxCandidate, BoxSource, Role, Turn
from mcie.db.session import session_scope
from tests.annotate.browser import chromium_page, live_server, login, require_chromium, shot
from tests.annotate.factories import add_review, make_instance, make_sample, make_user

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),  # from gradio's own queue code
]

PASSWORD = "browser-pass-1"
TRUTH = (0.2, 0.2, 0.6, 0.6)


def _seed(settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        make_user(session, "lena", Role.lead, password=PASSWORD)
        rater = make_user(session, "rita", Role.rater)
        instance = make_instance(session, 2)
        sample = make_sample(session, instance)
        turns = {t.index: t.id for t in session.query(Turn).filter_by(instance_id=instance.id)}
        for index in (1, 2):
            session.add(BoxCandidate(turn_id=turns[index], rank=1, source=BoxSource.mllm, box_x0=0.2, box_y0=0.2,
                                     box_x1=0.6, box_y1=0.6, chosen=True))
            session.add(BoxCandidate(turn_id=turns[index], rank=2, source=BoxSource.diff, box_x0=0.2, box_y0=0.2,
                                     box_x1=0.4, box_y1=0.6))
        review = add_review(session, sample, rater)
        review.box_corrections = [{"turn_index": 1, "box": list(TRUTH)}, {"turn_index": 2, "box": list(TRUTH)}]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    from mcie.db.migrate import upgrade

    folder: Path = tmp_path_factory.mktemp("browser-grounding")
    settings = load_settings(data_dir=folder, database_url=f"sqlite:///{folder}/browser.db",
                             blob_url=str(folder / "blobs"), secret_key=None)
    upgrade(settings.database_url)
    _seed(settings)
    with live_server(settings) as url:
        yield url


def test_a_lead_sees_grounding_against_corrections(base: str) -> None:
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        login(page, base, "lena", PASSWORD)
        assert page.url.endswith("/dashboard/")
        page.click("#tab-grounding-button")
        page.click("#grounding-refresh")
        page.wait_for_selector("#plot-grounding .js-plotly-plot", timeout=60_000)
        shot(page, "dashboard-grounding")
        with page.expect_download() as download:
            page.click("#csv-grounding")
        lines = Path(download.value.path()).read_text().splitlines()
        assert lines[0] == "operation,source,turns,mean_iou,mean_first_iou,share_iou_50"
        rows = {tuple(line.split(",")[:3]): line.split(",")[3] for line in lines[1:]}
        assert float(rows[("all", "mllm", "2")]) == 1.0 and float(rows[("all", "diff", "2")]) == 0.5
        assert float(rows[("all", "chosen", "2")]) == 1.0
        assert errors == []
