"""The user study end to end in a real browser (Debian's Chromium driven by Playwright) against a live server.

A participant opens their invite link, answers three items with the keyboard alone (a digit and a letter for the
first question, 0 = none acceptable for the second, a changed mind with the Up key, Enter to go on), closes the
browser, opens the link again in a fresh browser and continues from item 4. Every vote is in the database with its
screen position and a browser-measured latency. The lead's results page and ``mcie study results --json`` show the
votes. Screenshots of every step go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from mcie.annotate import study as st
from mcie.cli import app as cli_app
from mcie.config import Settings, get_settings
from mcie.db.models import Role, StudyAssignment, Vote
from mcie.db.session import session_scope
from mcie.db.store import ImageStore
from tests.annotate.browser import chromium_page, live_server, login, require_chromium, scene_image, shot
from tests.annotate.factories import make_user

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),  # from gradio's own queue code
]

METHODS = ("ip2p", "mcie-e1", "smartedit")
PASSWORD = "browser-pass-1"
N_ITEMS = 5
SCREEN = "#study-screen .mcie-study"
# (keys pressed on the screen, expected choice per criterion): item 2 changes its first answer with the Up key
ANSWERS = (
    (["2", "0"], {"instruction": "B", "background": None}),
    (["a", "1", "ArrowUp", "c"], {"instruction": "C", "background": "A"}),
    (["3", "b"], {"instruction": "C", "background": "B"}),
)
RESUMED = (  # after the browser was closed: item 4 had "1" for question 1 already
    (["0"], {"instruction": "A", "background": None}),
    (["c", "a"], {"instruction": "C", "background": "A"}),
)
EVIL = 'add a hat <img src=x onerror="window.__pwn=1"> & <b>bold</b>'


def _folder(root: Path) -> Path:
    """A study folder of small synthetic photos: each method's output is the source with more edits."""
    lines = []
    for i in range(N_ITEMS):
        item_id = f"scene-{i}"
        instruction = EVIL if i == 2 else f"add a red ball and remove object {i}"
        lines.append(json.dumps({"id": item_id, "source_image": f"sources/{item_id}.png", "instruction": instruction}))
        for folder, step in (("sources", 0), *((m, k + 1) for k, m in enumerate(METHODS))):
            path = root / folder / f"{item_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            scene_image(i + 1, step).save(path, format="PNG")
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _wait_screen(page, not_key: str = "") -> str:
    page.wait_for_function(
        """(old) => { const el = document.querySelector('#study-screen .mcie-study');
                      return el && el.dataset.state === 'screen' && el.dataset.screenKey !== old; }""",
        arg=not_key,
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('.mcie-study-outputs img, .mcie-study-source img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    return str(page.get_attribute(SCREEN, "data-screen-key"))


def _wait_saved(page) -> None:
    page.wait_for_function(
        "() => [...document.querySelectorAll('.mcie-study-saved')].every(s => s.dataset.status === 'saved')"
    )


def test_participant_votes_with_the_keyboard_leaves_and_resumes(tmp_path: Path) -> None:
    require_chromium()
    settings: Settings = get_settings()  # this test's own SQLite database and data folder (tests/conftest.py)
    from mcie.db.migrate import upgrade

    upgrade(settings.database_url)
    store = ImageStore.from_settings(settings)
    created = st.create_study_from_folder(settings.database_url, store, _folder(tmp_path / "study"), "browser-study",
                                          items_per_participant=N_ITEMS, seed=2)
    study_id = created.study_id
    with session_scope(settings.database_url) as session:
        make_user(session, "lena", Role.lead, password=PASSWORD)
    with session_scope(settings.database_url, write=True) as session:
        participant, token = st.enrol(session, study_id, "pia")

    with live_server(settings) as base:
        link = f"{base}/study/join/{token}"
        with chromium_page() as page:
            page.goto(link)
            assert page.url == f"{base}/study/"
            key = _wait_screen(page)
            assert "Item 1 of 5" in page.inner_text("#study-progress")
            assert not any(m in page.inner_text("#study-screen") for m in METHODS)
            shot(page, "study-01-first-item")
            seen = [page.inner_text("#study-instruction")]
            for number, (keys, _) in enumerate(ANSWERS, start=1):
                for pressed in keys:
                    page.keyboard.press(pressed)
                _wait_saved(page)
                shot(page, f"study-{number + 1:02d}-item-{number}-answered")
                page.keyboard.press("Enter")
                key = _wait_screen(page, key)
                assert f"Item {number + 1} of 5" in page.inner_text("#study-progress")
                seen.append(page.inner_text("#study-instruction"))
            assert page.evaluate("window.__pwn") is None
            page.keyboard.press("Enter")  # nothing answered yet: a hint, and the screen stays
            page.wait_for_function("() => document.querySelector('#study-hint').textContent.includes('question 1')")
            assert page.get_attribute(SCREEN, "data-screen-key") == key
            page.keyboard.press("1")  # one answer on item 4, stored at once, then the browser is closed
            page.wait_for_function(
                "() => document.querySelector('.mcie-study-saved[data-criterion=instruction]').dataset.status "
                "=== 'saved'"
            )
            shot(page, "study-05-item-4-before-closing")

        with chromium_page() as page:  # a new browser: no cookies; the same link
            page.goto(link)
            _wait_screen(page)
            assert "Item 4 of 5" in page.inner_text("#study-progress")
            assert page.get_attribute(".mcie-study-question[data-criterion=instruction]", "data-choice") == "A"
            assert page.get_attribute(".mcie-study-question[data-criterion=background]", "data-choice") == ""
            shot(page, "study-06-resumed-at-item-4")
            key = _wait_screen(page)
            seen.append(page.inner_text("#study-instruction"))
            for number, (keys, _) in enumerate(RESUMED, start=4):  # question 1 of item 4 is answered already
                for pressed in keys:
                    page.keyboard.press(pressed)
                _wait_saved(page)
                page.keyboard.press("Enter")
                if number < N_ITEMS:
                    key = _wait_screen(page, key)
                    seen.append(page.inner_text("#study-instruction"))
            page.wait_for_selector("#study-thanks")
            assert "all 5 items" in page.inner_text("#study-screen")
            assert page.evaluate("window.__pwn") is None and EVIL in seen  # the markup stayed text
            shot(page, "study-07-thank-you")

        with session_scope(settings.database_url) as session:
            order = {a.item_id: (a.position, a.shown_order, a.completed_at) for a in session.scalars(
                select(StudyAssignment).where(StudyAssignment.participant_id == participant.id))}
            votes = session.scalars(select(Vote).where(Vote.participant_id == participant.id)).all()
        by_position = {order[v.item_id][0]: {} for v in votes}
        for v in votes:
            by_position[order[v.item_id][0]][v.criterion] = v
        for position, (_, expected) in enumerate((*ANSWERS, *RESUMED), start=1):
            stored = by_position[position]
            for criterion, label in expected.items():
                vote = stored[criterion]
                want = None if label is None else "ABC".index(label) + 1
                assert vote.shown_position == want, (position, criterion)
                assert vote.latency_ms is not None and vote.latency_ms > 0
        assert sum(completed is not None for *_, completed in order.values()) == N_ITEMS

        with chromium_page() as page:  # the lead's results page shows the votes
            login(page, base, "lena", PASSWORD, next_path="/studies/")
            page.wait_for_selector("#study-pick")
            page.click("#study-compute")
            page.wait_for_function(
                "() => (document.querySelector('#study-participants') || {}).innerText?.includes('5/5')"
            )
            page.wait_for_function(
                "() => (document.querySelector('#study-summary') || {}).innerText?.includes('mcie-e1')"
            )
            assert page.inner_text("#study-kpi-votes b") == "10"  # 5 screens x 2 questions
            assert page.inner_text("#study-kpi-finished b") == "1"
            page.wait_for_function("() => document.querySelectorAll('#study-results-tab-plots .js-plotly-plot, "
                                   "[id^=study-plot] .js-plotly-plot').length === 5")
            shot(page, "study-08-lead-results")

    result = CliRunner().invoke(cli_app, ["study", "results", "browser-study", "--json", "--n-boot", "0"])
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)
    assert res["n_votes"] == 10 and res["participants"] == {"enrolled": 1, "finished": 1}
    chosen = {c: sum(s["n_chosen"] for s in block["shares"].values()) for c, block in res["by_criterion"].items()}
    assert chosen == {"instruction": 5, "background": 3}  # two "none acceptable"
