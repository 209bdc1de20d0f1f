"""The user study in the browser: the participant's screen (Gradio, mounted at ``/study``) and the leads' results tab.

**Participant screen.** One item at a time: the source image and the instruction, then the outputs labelled A, B,
C ... in the participant's recorded screen order (never a method name; attention checks look like any other item),
and the study's questions - "which output follows the instruction best?" and "which output best keeps what should
not change?" - each with "none is acceptable". Progress reads "Item 37 of 100". Keys (shown on the screen): 1-9 or
the letters pick an output for the highlighted question (then the next question is highlighted), 0 = none is
acceptable, Up/Backspace and Down move between questions, Enter goes to the next item; the buttons do the same with
the mouse. Every choice is stored at once through the JSON API of :mod:`annotate.study_routes`
(``POST /api/study/{id}/vote``, with the milliseconds since the screen was shown, measured in the browser), so
nothing is lost when the browser closes; a choice can be changed until Enter (``.../advance``, which returns the
next screen's HTML, rendered here). Requests leave the page one at a time, in order, so the stored choice is always
the last one made. A participant who comes back lands on the first screen they have not completed, with the choices
they already made; after the last one they see a thank-you screen. Gradio renders the first screen on page load
(:meth:`StudyScreen.on_load`); the page script (:data:`STUDY_JS`) does the rest.

**Leads.** :func:`study_results_tab` builds a "User study" tab for any Blocks (the dashboard can include it: call it
inside its ``gr.Tabs()``): pick a study, compute :func:`annotate.study.study_results`, and see the results table
(shares, preferred-method shares and Bradley-Terry strengths with bootstrap intervals), the plotly plots of
:mod:`annotate.study_analysis` per criterion, every participant's progress and quality checks, exclusions (with a
reason) and the votes and results as downloads. :func:`build_results` serves the tab on its own at ``/studies``.
Every handler checks the user's role again. All data text is escaped.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from annotate import study, study_analysis
from annotate.study_routes import session_study
from annotate.web_auth import WebUser, user_for_username
from db.models import StudyStatus
from mcie.config import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
IMAGE_SIZE = 768
DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "mcie-study-downloads"
DOWNLOAD_MAX_AGE_S = 3600
QUESTIONS: dict[str, tuple[str, str]] = {
    "instruction": ("Instruction following", "Which output follows the instruction best?"),
    "background": (
        "Background consistency",
        "Which output best keeps everything the instruction does not ask to change?",
    ),
}


def esc(value: Any) -> str:
    """Text from data, safe inside HTML text and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def question_for(criterion: str) -> tuple[str, str]:
    """The short name and the question asked for a criterion."""
    fallback = (criterion.replace("_", " ").capitalize(), f"Which output is best for {criterion}?")
    return QUESTIONS.get(criterion, fallback)


# ----------------------------------------------------------------------------------------------------------
# rendering the participant's screen (pure: data in, HTML out)


def _key_range(labels: Sequence[str]) -> tuple[str, str]:
    """How the keys of ``labels`` are written on screen: ("1-3", "A-C")."""
    n = len(labels)
    digits = "1" if n == 1 else f"1-{min(n, 9)}"
    letters = labels[0] if n == 1 else f"{labels[0]}-{labels[-1]}"
    return digits, letters


def _choice_button(criterion: str, choice: str, text: str, key: str, chosen: bool) -> str:
    return (
        f'<button type="button" class="mcie-choice" data-mcie-criterion="{esc(criterion)}" '
        f'data-mcie-choice="{esc(choice)}" aria-pressed="{"true" if chosen else "false"}">'
        f"{esc(text)} <kbd>{esc(key)}</kbd></button>"
    )


def render_screen(screen: study.ItemScreen, *, csrf: str, prefetch: Sequence[str] = ()) -> str:
    """The participant's screen for one item (``prefetch``: images of the next screen, loaded hidden)."""
    labels = [o.label for o in screen.outputs]
    digits, letters = _key_range(labels)
    key = f"{int(screen.study_id)}-{int(screen.item_id)}-{int(screen.position)}-{secrets.token_hex(4)}"
    outputs = "".join(
        f'<figure class="mcie-study-output" data-label="{esc(o.label)}">'
        f'<figcaption class="mcie-study-label">{esc(o.label)}</figcaption>'
        f'<a href="/img/{esc(o.image)}" target="_blank" rel="noopener" title="open at full size">'
        f'<img src="/thumb/{esc(o.image)}?size={IMAGE_SIZE}" alt="output {esc(o.label)}" draggable="false"></a>'
        "</figure>"
        for o in screen.outputs
    )
    questions = []
    for number, criterion in enumerate(screen.criteria, start=1):
        name, text = question_for(criterion)
        chosen = (screen.choices[criterion] or "none") if criterion in screen.choices else ""
        buttons = "".join(
            _choice_button(criterion, label, label, str(k) if k <= 9 else label, chosen == label)
            for k, label in enumerate(labels, start=1)
        )
        buttons += _choice_button(criterion, "none", "None is acceptable", "0", chosen == "none")
        questions.append(
            f'<fieldset class="mcie-study-question" data-criterion="{esc(criterion)}" data-choice="{esc(chosen)}" '
            f'data-number="{number}"><legend><span class="mcie-q-number">{number}</span> {esc(text)} '
            f'<span class="mcie-q-name">({esc(name)})</span></legend>'
            f'<div class="mcie-study-choices">{buttons}</div>'
            f'<span class="mcie-study-saved" data-criterion="{esc(criterion)}" '
            f'data-status="{"saved" if chosen else ""}" aria-live="polite">{"saved" if chosen else ""}</span>'
            "</fieldset>"
        )
    hidden = "".join(f'<img src="/thumb/{esc(sha)}?size={IMAGE_SIZE}" alt="" loading="eager">' for sha in prefetch)
    done = max(int(screen.position) - 1, 0)
    return (
        f'<div class="mcie-study" data-state="screen" data-screen-key="{esc(key)}" '
        f'data-study="{int(screen.study_id)}" data-item="{int(screen.item_id)}" data-csrf="{esc(csrf)}" '
        f"data-criteria='{esc(json.dumps(list(screen.criteria)))}' data-labels=\"{esc(''.join(labels))}\">"
        f'<div class="mcie-study-progress" id="study-progress"><span>Item <b>{int(screen.position)}</b> of '
        f'<b>{int(screen.total)}</b></span><progress max="{int(screen.total)}" value="{done}" '
        'aria-label="items completed"></progress></div>'
        '<section class="mcie-study-task">'
        f'<figure class="mcie-study-source"><a href="/img/{esc(screen.source_image)}" target="_blank" '
        f'rel="noopener"><img src="/thumb/{esc(screen.source_image)}?size={IMAGE_SIZE}" alt="source image" '
        'draggable="false"></a><figcaption>Source image</figcaption></figure>'
        '<div class="mcie-study-instruction"><h2>Instruction</h2>'
        f'<p id="study-instruction">{esc(screen.instruction)}</p>'
        f'<p class="mcie-study-help">Compare the {len(labels)} edited images below with the source image and answer '
        "both questions. Click an image to see it at full size.</p></div></section>"
        f'<section class="mcie-study-outputs" style="--n:{len(labels)}">{outputs}</section>'
        f'<section class="mcie-study-questions">{"".join(questions)}</section>'
        '<div class="mcie-study-actions"><button type="button" id="study-next" class="mcie-study-next">'
        'Next item <kbd>Enter</kbd></button><span id="study-hint" role="status" aria-live="polite"></span></div>'
        f'<div class="mcie-study-keys" id="study-keys">Keys: <kbd>{esc(digits)}</kbd> or <kbd>{esc(letters)}</kbd> '
        "choose an output for the highlighted question · <kbd>0</kbd> none is acceptable · <kbd>↑</kbd> / "
        "<kbd>Backspace</kbd> previous question · <kbd>↓</kbd> next question · <kbd>Enter</kbd> next item. "
        "Each choice is saved at once; you can change it until you go to the next item.</div>"
        f'<div class="mcie-study-prefetch" hidden aria-hidden="true">{hidden}</div></div>'
    )


def render_finished(total: int) -> str:
    """The thank-you screen."""
    items = f"all {int(total)} items" if total else "every item"
    return (
        '<div class="mcie-study mcie-study-message" data-state="finished" '
        f'data-screen-key="done-{secrets.token_hex(4)}"><h2 id="study-thanks">Thank you!</h2>'
        f"<p>You have answered {esc(items)}. Your answers are saved; you can close this window now.</p></div>"
    )


def render_message(title: str, message: str) -> str:
    """A screen that explains why there is nothing to answer (no study, link withdrawn, study closed)."""
    return (
        '<div class="mcie-study mcie-study-message" data-state="message" '
        f'data-screen-key="msg-{secrets.token_hex(4)}"><h2>{esc(title)}</h2><p>{esc(message)}</p></div>'
    )


def render_topbar(user: WebUser | None, *, invited: bool) -> str:
    """The study's top bar; password users get their name and a log-out button, invited participants neither."""
    who = ""
    if user is not None and not invited:
        who = (
            f'<span class="mcie-user">{esc(user.shown_name)}</span>'
            '<form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form>'
        )
    return f'<div class="mcie-topbar"><span class="mcie-brand">Image editing study</span>{who}</div>'


# ----------------------------------------------------------------------------------------------------------
# the participant's Gradio app


class StudyScreen:
    """The page's one event: render the participant's current screen from the session."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url

    def on_load(self, request: gr.Request) -> tuple[str, str]:
        user = user_for_username(self.url, getattr(request, "username", None))
        limited = session_study(request)
        topbar = render_topbar(user, invited=limited is not None)
        if user is None:
            return topbar, render_message("Your session has ended", "Open your invitation link again to continue.")
        study_id = limited if limited is not None else study.participant_study(self.url, user.id)
        if study_id is None:
            return topbar, render_message(
                "No study to take part in",
                "You are not taking part in an open study. Open the invitation link you were sent.",
            )
        scope = getattr(getattr(request, "request", None), "scope", None) or {}
        csrf = str((scope.get("session") or {}).get("csrf", ""))
        return topbar, self.screen_html(study_id, user.id, csrf)

    def screen_html(self, study_id: int, user_id: int, csrf: str) -> str:
        """The current screen, the thank-you screen, or why there is none."""
        try:
            screen = study.current_item(self.url, study_id, user_id)
            if screen is None:
                return render_finished(study.participant_progress(self.url, study_id, user_id).total)
            upcoming = study.upcoming_images(self.url, study_id, user_id, screen.position)
        except study.StudyAccessError:
            return render_message("Invitation withdrawn", study.INVITE_REVOKED)
        except study.StudyNotOpenError as exc:
            message = study.INVITE_CLOSED if exc.status is StudyStatus.closed else study.INVITE_DRAFT
            return render_message("The study is not open", message)
        return render_screen(screen, csrf=csrf, prefetch=upcoming)


def build(settings: Settings) -> gr.Blocks:
    """The participant's Blocks (mount it with :func:`page_assets`)."""
    app = StudyScreen(settings)
    with gr.Blocks(title="Image editing study", analytics_enabled=False, fill_width=True) as demo:
        topbar = gr.HTML(elem_id="study-topbar", js_on_load=None)
        screen = gr.HTML(render_message("Loading...", "One moment, please."), elem_id="study-screen", js_on_load=None)
        demo.load(app.on_load, inputs=None, outputs=[topbar, screen], show_progress="hidden")
        demo.queue(default_concurrency_limit=32)
    return demo


STUDY_CSS = """
.mcie-study { --mcie-accent: #0b63c5; --mcie-muted: #59636e; --mcie-line: #d0d7de; max-width: 1600px;
  margin: 0 auto; font-size: 1rem; }
.mcie-study kbd { font: .8rem ui-monospace, monospace; border: 1px solid var(--mcie-line); border-bottom-width: 2px;
  border-radius: 4px; padding: 0 .3rem; background: #f6f8fa; color: #1f2328; }
.mcie-study-progress { display: flex; align-items: center; gap: .75rem; font-size: 1.05rem; margin-bottom: .5rem; }
.mcie-study-progress progress { flex: 1; max-width: 24rem; height: .6rem; }
.mcie-study-task { display: grid; grid-template-columns: minmax(200px, 360px) 1fr; gap: 1rem; align-items: start; }
.mcie-study-source img, .mcie-study-output img { width: 100%; height: auto; display: block; border-radius: 6px;
  background: #f0f2f4; }
.mcie-study-source figcaption { color: var(--mcie-muted); font-size: .85rem; text-align: center; }
.mcie-study figure { margin: 0; }
.mcie-study-instruction h2 { margin: 0 0 .25rem; font-size: 1rem; color: var(--mcie-muted); text-transform: uppercase;
  letter-spacing: .04em; }
#study-instruction { font-size: 1.3rem; line-height: 1.45; white-space: pre-wrap; overflow-wrap: anywhere;
  padding: .6rem .8rem; border-left: 4px solid var(--mcie-accent); background: rgb(11 99 197 / 6%); margin: 0; }
.mcie-study-help { color: var(--mcie-muted); font-size: .9rem; }
.mcie-study-outputs { display: grid; gap: .75rem; margin: 1rem 0;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 220px), 1fr)); }
.mcie-study-output { position: relative; border: 2px solid transparent; border-radius: 8px; padding: 2px; }
.mcie-study-label { position: absolute; top: .35rem; left: .35rem; z-index: 1; background: rgb(0 0 0 / 72%);
  color: #fff; font-weight: 700; font-size: 1.3rem; border-radius: 6px; padding: 0 .55rem; }
.mcie-study-questions { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 420px), 1fr));
  gap: .75rem; }
.mcie-study-question { border: 2px solid var(--mcie-line); border-radius: 8px; padding: .5rem .75rem; margin: 0; }
.mcie-study-question.mcie-active { border-color: var(--mcie-accent); box-shadow: 0 0 0 3px rgb(11 99 197 / 15%); }
.mcie-study-question legend { font-weight: 600; padding: 0 .25rem; }
.mcie-q-number { display: inline-block; min-width: 1.4rem; text-align: center; border-radius: 50%;
  background: var(--mcie-accent); color: #fff; }
.mcie-q-name { color: var(--mcie-muted); font-weight: 400; }
.mcie-study-choices { display: flex; flex-wrap: wrap; gap: .4rem; margin: .4rem 0; }
.mcie-study button.mcie-choice { font: inherit; min-width: 3rem; padding: .35rem .7rem; border: 1px solid #afb8c1;
  border-radius: 6px; background: #fff !important; cursor: pointer; color: #1f2328 !important; opacity: 1;
  transition: none !important; }
.mcie-study button.mcie-choice[aria-pressed="true"] { background: #0b63c5 !important; border-color: #0b63c5;
  color: #fff !important; font-weight: 700; }
.mcie-study button.mcie-choice[aria-pressed="true"] kbd { background: #fff; color: #0b63c5; }
.mcie-study-saved { font-size: .85rem; color: #067647; }
.mcie-study-saved[data-status="saving"] { color: var(--mcie-muted); }
.mcie-study-saved[data-status="error"] { color: #b42318; }
.mcie-study-actions { display: flex; align-items: center; gap: 1rem; margin: .75rem 0; }
.mcie-study button.mcie-study-next { font: inherit; font-weight: 600; padding: .5rem 1.25rem; border: 0;
  border-radius: 6px; background: #0b63c5 !important; color: #fff !important; cursor: pointer; }
.mcie-study-busy .mcie-study-next { opacity: .6; cursor: progress; }
#study-hint { color: #b42318; }
.mcie-study-keys { color: var(--mcie-muted); font-size: .9rem; line-height: 1.8; }
.mcie-study-message { max-width: 40rem; padding: 2rem 0; font-size: 1.1rem; }
@media (max-width: 700px) { .mcie-study-task { grid-template-columns: 1fr; } }
"""

STUDY_JS = r"""
/* mcie study screen: keyboard and buttons -> the study's JSON API, one request at a time, in order. */
(() => {
  "use strict";
  if (window.mcieStudy) return;
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
  const state = { key: null, shownAt: 0, active: 0, choices: {}, chain: Promise.resolve(), busy: false };

  const root = () => $(".mcie-study[data-screen-key]");
  const criteria = (el) => JSON.parse(el.dataset.criteria || "[]");
  const labels = (el) => (el.dataset.labels || "").split("").filter(Boolean);

  function hint(message) {
    const el = $("#study-hint");
    if (el) el.textContent = message || "";
  }

  function mark(criterion, status, text) {
    const el = root() && $$(".mcie-study-saved", root()).find((s) => s.dataset.criterion === criterion);
    if (!el) return;
    el.dataset.status = status;
    el.textContent = text;
  }

  function paint() {
    const el = root();
    if (!el) return;
    const crit = criteria(el);
    for (const q of $$(".mcie-study-question", el)) {
      const c = q.dataset.criterion;
      q.classList.toggle("mcie-active", crit.indexOf(c) === state.active);
      q.dataset.choice = state.choices[c] || "";
      for (const b of $$("button[data-mcie-choice]", q)) {
        b.setAttribute("aria-pressed", String(b.dataset.mcieChoice === state.choices[c]));
      }
    }
  }

  function onScreen(el) {
    if (!el || el.dataset.screenKey === state.key) return;
    state.key = el.dataset.screenKey;
    state.shownAt = performance.now();
    state.busy = false;
    state.choices = {};
    hint("");
    if (el.dataset.state !== "screen") return;
    for (const q of $$(".mcie-study-question", el)) {
      if (q.dataset.choice) state.choices[q.dataset.criterion] = q.dataset.choice;
    }
    const crit = criteria(el);
    const open = crit.findIndex((c) => !state.choices[c]);
    state.active = open < 0 ? crit.length - 1 : open;
    paint();
  }

  async function post(url, body, csrf) {
    let response;
    try {
      response = await fetch(url, {
        method: "POST", credentials: "same-origin", body: JSON.stringify(body),
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
      });
    } catch (err) {
      throw new Error("no connection to the server - check your network and try again");
    }
    let data = {};
    try { data = await response.json(); } catch (err) { data = {}; }
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : `the server answered ${response.status}`;
      throw new Error(response.status === 401 ? "your session has ended: open your invitation link again" : detail);
    }
    return data;
  }

  function vote(criterion, choice) {
    const el = root();
    if (!el || el.dataset.state !== "screen" || state.busy) return;
    const latency = Math.max(0, Math.round(performance.now() - state.shownAt));
    const key = state.key;
    state.choices[criterion] = choice;
    paint();
    mark(criterion, "saving", "saving...");
    const body = { item_id: Number(el.dataset.item), criterion, choice: choice === "none" ? null : choice,
                   latency_ms: latency };
    state.chain = state.chain
      .then(() => post(`/api/study/${el.dataset.study}/vote`, body, el.dataset.csrf))
      .then(() => { if (state.key === key && state.choices[criterion] === choice) mark(criterion, "saved", "saved"); },
            (err) => {
              if (state.key !== key) return;
              if (state.choices[criterion] === choice) delete state.choices[criterion];
              paint();
              mark(criterion, "error", "not saved");
              hint(`Your choice was not saved (${err.message}). Please choose again.`);
            });
  }

  function answer(choice) {
    const el = root();
    const crit = criteria(el);
    if (!crit.length) return;
    vote(crit[state.active], choice);
    if (state.active < crit.length - 1) state.active += 1;
    paint();
  }

  function swap(el, markup) {
    const template = document.createElement("template");
    template.innerHTML = markup;
    const fresh = template.content.firstElementChild;
    if (!fresh) return;
    el.replaceWith(fresh);
    window.scrollTo({ top: 0 });
    onScreen(fresh);
  }

  function next() {
    const el = root();
    if (!el || el.dataset.state !== "screen" || state.busy) return;
    const crit = criteria(el);
    const missing = crit.map((c, i) => [c, i]).filter(([c]) => !state.choices[c]);
    if (missing.length) {
      hint(`Please answer question ${missing.map(([, i]) => i + 1).join(" and ")} first.`);
      state.active = missing[0][1];
      paint();
      return;
    }
    state.busy = true;
    el.classList.add("mcie-study-busy");
    const key = state.key;
    state.chain = state.chain
      .then(() => post(`/api/study/${el.dataset.study}/advance`, { item_id: Number(el.dataset.item), render: true },
                       el.dataset.csrf))
      .then((data) => { if (state.key === key && data.next && data.next.html) swap(el, data.next.html); },
            (err) => {
              if (state.key !== key) return;
              state.busy = false;
              el.classList.remove("mcie-study-busy");
              hint(`Could not go on: ${err.message}`);
            });
  }

  document.addEventListener("keydown", (event) => {
    const el = root();
    if (!el || el.dataset.state !== "screen") return;
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const target = event.target;
    if (target && target.closest && target.closest("input, textarea, select, [contenteditable]")) return;
    const labs = labels(el);
    const key = event.key;
    let handled = true;
    if (key === "Enter") next();
    else if (key === "0") answer("none");
    else if (/^[1-9]$/.test(key) && Number(key) <= labs.length) answer(labs[Number(key) - 1]);
    else if (/^[a-zA-Z]$/.test(key) && labs.includes(key.toUpperCase())) answer(key.toUpperCase());
    else if (key === "Backspace" || key === "ArrowUp") { state.active = Math.max(0, state.active - 1); paint(); }
    else if (key === "ArrowDown") { state.active = Math.min(criteria(el).length - 1, state.active + 1); paint(); }
    else handled = false;
    if (handled) { event.preventDefault(); event.stopPropagation(); }
  }, true);

  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("button[data-mcie-choice], #study-next");
    const el = root();
    if (!button || !el || !el.contains(button)) return;
    event.preventDefault();
    if (button.id === "study-next") { next(); return; }
    const crit = criteria(el);
    state.active = Math.max(0, crit.indexOf(button.dataset.mcieCriterion));
    answer(button.dataset.mcieChoice);
  });

  new MutationObserver(() => onScreen(root())).observe(document.documentElement, { childList: true, subtree: true });
  window.mcieStudy = { state, next, answer };
})();
"""


def page_assets() -> dict[str, str]:
    """``head`` (the page script) and ``css`` of the participant's page for ``gr.mount_gradio_app``."""
    return {"head": f"<script>{STUDY_JS}</script>", "css": STUDY_CSS}


# ----------------------------------------------------------------------------------------------------------
# the leads' results view


def lead_of(url: str, request: gr.Request | None) -> WebUser:
    """The lead or admin behind an event; anybody else is refused (checked on every event)."""
    user = user_for_username(url, getattr(request, "username", None))
    if user is None or not user.is_lead:
        raise gr.Error("Only leads and admins may see the study results.")
    return user


def render_kpis(values: Sequence[tuple[str, str, str]]) -> str:
    cells = "".join(
        f'<div class="mcie-kpi" id="{esc(i)}"><b>{esc(v)}</b><span>{esc(t)}</span></div>' for i, v, t in values
    )
    return f'<div class="mcie-kpis">{cells}</div>'


def _status(message: str, *, error: bool = False) -> str:
    return f'<div class="{"mcie-error" if error else "mcie-ok"}" role="status">{esc(message)}</div>' if message else ""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ci(ci: Sequence[float] | None, *, percent: bool = True) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if percent else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


RESULTS_COLUMNS = ["criterion", "method", "chosen", "share of first choices", "95% CI", "preferred by", "95% CI ",
                   "Bradley-Terry strength", "95% CI  "]  # fmt: skip
PARTICIPANT_COLUMNS = ["username", "user id", "done", "finished (UTC)", "link revoked", "excluded", "reason",
                       "attention failed", "median latency (s)", "fast"]  # fmt: skip


def results_frame(res: dict[str, Any]) -> pd.DataFrame:
    """One row per (criterion, method) - and a "none acceptable" row per criterion - of the results dict."""
    rows = []
    for criterion, block in res.get("by_criterion", {}).items():
        strengths = block["bradley_terry"]["strengths"]
        for method, share in block["shares"].items():
            preferred = block["preferred"][method]
            strength = strengths[method]
            rows.append([
                criterion, method, share["n_chosen"], _pct(share["share"]), _ci(share["ci"]),
                _pct(preferred["share"]), _ci(preferred["ci"]),
                "-" if strength["strength"] is None else f"{strength['strength']:.2f}",
                _ci(strength["ci"], percent=False),
            ])  # fmt: skip
        rows.append([criterion, "(none acceptable)", "", _pct(block["none_share"]), "", "", "", "", ""])
    return pd.DataFrame(rows, columns=RESULTS_COLUMNS)


def participants_frame(statuses: Sequence[study.ParticipantStatus], res: dict[str, Any] | None) -> pd.DataFrame:
    """Every participant's progress, with the quality checks of ``res`` when the results were computed."""
    quality = {r["participant"]: r for r in ((res or {}).get("quality") or {}).get("participants", [])}
    rows = []
    for p in statuses:
        q = quality.get(p.user_id, {})
        latency = q.get("median_latency_ms")
        rows.append([
            p.username, p.user_id, f"{p.n_completed}/{p.n_assigned}",
            p.finished_at.strftime("%Y-%m-%d %H:%M") if p.finished_at else "", "yes" if p.revoked else "",
            "yes" if p.excluded else "", p.exclusion_reason or "",
            f"{q['attention_failed']} of {q['attention_checks']}" if q.get("attention_checks") else "",
            "" if latency is None else f"{latency / 1000:.1f}", "yes" if q.get("fast") else "",
        ])  # fmt: skip
    return pd.DataFrame(rows, columns=PARTICIPANT_COLUMNS)


def _fresh_file(suffix: str, name: str) -> Path:
    """A new file for a download button; files older than an hour are removed."""
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - DOWNLOAD_MAX_AGE_S
    for old in DOWNLOAD_DIR.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass
    return DOWNLOAD_DIR / f"{name}-{secrets.token_hex(6)}{suffix}"


PLOTS = ("shares", "preferred", "strengths", "win_matrix", "position_bias")


def figures_for(res: dict[str, Any], criterion: str) -> list[Any]:
    """The five plotly figures of one criterion, in :data:`PLOTS` order."""
    return [
        study_analysis.plot_shares(res, criterion),
        study_analysis.plot_shares(res, criterion, what="preferred"),
        study_analysis.plot_strengths(res, criterion),
        study_analysis.plot_win_matrix(res, criterion),
        study_analysis.plot_position_bias(res, criterion),
    ]


@dataclass
class StudyResultsTab:
    """The components of the results tab; :meth:`refresh_list` fills the study picker (bind it to a load event)."""

    url: str
    tab: Any = None
    w: dict[str, Any] = field(default_factory=dict)
    plots: list[Any] = field(default_factory=list)

    # --- outputs of each event ------------------------------------------------------------------------------
    def study_outputs(self) -> list[Any]:
        w = self.w
        return [w["kpis"], w["participants"], w["votes_csv"], w["status"]]

    def results_outputs(self) -> list[Any]:
        w = self.w
        return [w["data"], w["summary"], w["criterion"], *self.plots, w["results_json"], *self.study_outputs()]

    # --- events ---------------------------------------------------------------------------------------------
    def refresh_list(self, current: Any, request: gr.Request) -> Any:
        lead_of(self.url, request)
        studies = study.list_studies(self.url)
        choices = [(f"{s.name} (#{s.id}, {s.status}, {s.enrolled} enrolled)", s.id) for s in studies]
        ids = [value for _, value in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return gr.Dropdown(choices=choices, value=value)

    def show_study(self, study_id: Any, request: gr.Request) -> dict[Any, Any]:
        """Progress and votes of the picked study (the results wait for the Compute button)."""
        lead_of(self.url, request)
        return self._study_view(study_id, None)

    def _study_view(self, study_id: Any, res: dict[str, Any] | None, message: str = "") -> dict[Any, Any]:
        w = self.w
        if study_id is None:
            return {w["kpis"]: render_kpis([]), w["participants"]: pd.DataFrame(columns=PARTICIPANT_COLUMNS),
                    w["votes_csv"]: gr.DownloadButton(value=None, interactive=False),
                    w["status"]: _status("No study yet: create one with `mcie study create`.")}  # fmt: skip
        study_id = int(study_id)
        summary = next((s for s in study.list_studies(self.url) if s.id == study_id), None)
        statuses = study.participants_status(self.url, study_id)
        path = _fresh_file(".csv", f"study-{study_id}-votes")
        n_votes = study.export_votes(self.url, study_id, path)
        kpis = [
            ("study-kpi-status", summary.status if summary else "-", "status"),
            ("study-kpi-items", str(summary.n_items if summary else 0), "items"),
            ("study-kpi-methods", str(len(summary.methods) if summary else 0), "methods"),
            ("study-kpi-enrolled", str(len(statuses)), "participants enrolled"),
            ("study-kpi-finished", str(sum(p.finished_at is not None for p in statuses)), "finished"),
            ("study-kpi-votes", str(n_votes), "votes stored"),
            ("study-kpi-excluded", str(sum(p.excluded for p in statuses)), "excluded"),
        ]
        return {
            w["kpis"]: render_kpis(kpis),
            w["participants"]: participants_frame(statuses, res),
            w["votes_csv"]: gr.DownloadButton(value=str(path), interactive=n_votes > 0),
            w["status"]: _status(message),
        }

    def compute(self, study_id: Any, n_boot: Any, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        w = self.w
        if study_id is None:
            return {w["status"]: _status("Pick a study first.", error=True)}
        n = int(n_boot or 0)
        if not 0 <= n <= 5000:
            return {w["status"]: _status("Bootstrap resamples must be between 0 and 5000.", error=True)}
        try:
            res = study.study_results(self.url, int(study_id), n_boot=n)
        except (study.StudyError, ValueError) as exc:
            return {w["status"]: _status(str(exc), error=True)}
        return self._results_view(int(study_id), res, f"Results computed with {n} bootstrap resamples.")

    def _results_view(self, study_id: int, res: dict[str, Any], message: str) -> dict[Any, Any]:
        w = self.w
        criteria = list(res.get("by_criterion", {}))
        criterion = criteria[0] if criteria else None
        path = _fresh_file(".json", f"study-{study_id}-results")
        path.write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
        out = {
            w["data"]: res,
            w["summary"]: results_frame(res) if criteria else pd.DataFrame({"": ["no completed votes yet"]}),
            w["criterion"]: gr.Radio(choices=criteria, value=criterion),
            w["results_json"]: gr.DownloadButton(value=str(path), interactive=True),
        }
        out |= self._plots(res, criterion)
        return out | self._study_view(study_id, res, message)

    def _plots(self, res: dict[str, Any] | None, criterion: str | None) -> dict[Any, Any]:
        if not res or criterion not in res.get("by_criterion", {}):
            return dict.fromkeys(self.plots)
        return dict(zip(self.plots, figures_for(res, criterion), strict=True))

    def redraw(self, res: dict[str, Any] | None, criterion: str | None, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        return self._plots(res, criterion)

    def set_excluded(
        self, study_id: Any, username: str, reason: str, n_boot: Any, excluded: bool, request: gr.Request
    ) -> dict[Any, Any]:
        lead = lead_of(self.url, request)
        w = self.w
        if study_id is None or not (username or "").strip():
            return {w["status"]: _status("Pick a study and type a participant's username.", error=True)}
        try:
            user_id = study.resolve_participant(self.url, int(study_id), username)
            study.set_excluded(self.url, int(study_id), user_id, excluded, reason, actor_id=lead.id)
            res = study.study_results(self.url, int(study_id), n_boot=max(0, min(int(n_boot or 0), 5000)))
        except (study.StudyError, ValueError) as exc:
            return {w["status"]: _status(str(exc), error=True)}
        done = f"{'Excluded' if excluded else 'Included'} {username.strip()}; the results were computed again."
        return self._results_view(int(study_id), res, done)

    def exclude(self, study_id: Any, username: str, reason: str, n_boot: Any, request: gr.Request) -> dict[Any, Any]:
        return self.set_excluded(study_id, username, reason, n_boot, True, request)

    def include(self, study_id: Any, username: str, reason: str, n_boot: Any, request: gr.Request) -> dict[Any, Any]:
        return self.set_excluded(study_id, username, reason, n_boot, False, request)


def study_results_tab(settings: Settings, *, label: str = "User study") -> StudyResultsTab:
    """Build the leads' "User study" tab in the enclosing ``gr.Tabs()`` and wire its events.

    The dashboard includes it with ``study_results_tab(settings)`` inside its ``with gr.Tabs(...):`` block; the
    study list fills when the tab is selected (and with its "Reload" button)."""
    view = StudyResultsTab(settings.database_url)
    w = view.w
    with gr.Tab(label, id="study-results", elem_id="tab-study-results") as tab:
        view.tab = tab
        gr.Markdown(
            "Results of the user studies (`mcie study ...` creates and manages them): first-choice shares, the share "
            "of participants preferring each method and Bradley-Terry strengths, with percentile-bootstrap "
            "intervals over participants; excluded participants are left out of every figure."
        )
        with gr.Row():
            w["study"] = gr.Dropdown(choices=[], label="Study", elem_id="study-pick", scale=3)
            w["n_boot"] = gr.Number(1000, label="Bootstrap resamples", precision=0, minimum=0, maximum=5000,
                                    elem_id="study-nboot", scale=1)  # fmt: skip
            compute = gr.Button("Compute results", variant="primary", elem_id="study-compute", scale=1)
            reload = gr.Button("Reload the list", size="sm", elem_id="study-reload", scale=1)
        w["status"] = gr.HTML(elem_id="study-status", js_on_load=None)
        w["kpis"] = gr.HTML(elem_id="study-kpis", js_on_load=None)
        w["data"] = gr.State(None)
        w["summary"] = gr.Dataframe(interactive=False, wrap=True, elem_id="study-summary", label="Results")
        w["criterion"] = gr.Radio([], label="Criterion for the plots", elem_id="study-criterion")
        with gr.Row():
            view.plots.append(gr.Plot(label="Share of first choices", elem_id="study-plot-shares"))
            view.plots.append(gr.Plot(label="Preferred method", elem_id="study-plot-preferred"))
        with gr.Row():
            view.plots.append(gr.Plot(label="Bradley-Terry strengths", elem_id="study-plot-strengths"))
            view.plots.append(gr.Plot(label="Pairwise wins", elem_id="study-plot-wins"))
        view.plots.append(gr.Plot(label="Position bias", elem_id="study-plot-position"))
        w["participants"] = gr.Dataframe(interactive=False, wrap=True, elem_id="study-participants",
                                         label="Participants")  # fmt: skip
        with gr.Row():
            w["who"] = gr.Textbox(label="Participant (username)", max_lines=1, max_length=64, elem_id="study-who")
            w["reason"] = gr.Textbox(label="Reason (required to exclude; kept and audited)", max_lines=2,
                                     max_length=1000, elem_id="study-reason")  # fmt: skip
            exclude = gr.Button("Exclude from the results", variant="stop", elem_id="study-exclude")
            include = gr.Button("Include again", elem_id="study-include")
        with gr.Row():
            w["votes_csv"] = gr.DownloadButton("Download the votes (CSV)", interactive=False, elem_id="study-votes")
            w["results_json"] = gr.DownloadButton("Download the results (JSON)", interactive=False,
                                                  elem_id="study-results-json")  # fmt: skip
    quiet = {"show_progress": "minimal"}
    tab.select(view.refresh_list, [w["study"]], [w["study"]], **quiet)
    reload.click(view.refresh_list, [w["study"]], [w["study"]], **quiet)
    w["study"].change(view.show_study, [w["study"]], view.study_outputs(), **quiet)
    compute.click(view.compute, [w["study"], w["n_boot"]], view.results_outputs(), trigger_mode="once", **quiet)
    w["criterion"].input(view.redraw, [w["data"], w["criterion"]], view.plots, **quiet)
    moves = [w["study"], w["who"], w["reason"], w["n_boot"]]
    exclude.click(view.exclude, moves, view.results_outputs(), trigger_mode="once", **quiet)
    include.click(view.include, moves, view.results_outputs(), trigger_mode="once", **quiet)
    return view


def build_results(settings: Settings) -> gr.Blocks:
    """The results tab on a page of its own (``/studies``, leads and admins)."""
    with gr.Blocks(title="MCIE user studies", analytics_enabled=False, fill_width=True) as demo:
        gr.HTML(
            '<div class="mcie-topbar"><span class="mcie-brand">MCIE user studies</span><nav>'
            '<a href="/dashboard/">Dashboard</a></nav></div>',
            js_on_load=None,
        )
        with gr.Tabs():
            view = study_results_tab(settings)
        demo.load(view.refresh_list, [view.w["study"]], [view.w["study"]], show_progress="hidden")
        demo.queue(default_concurrency_limit=8)
    return demo


def results_page_assets() -> dict[str, str]:
    """``css`` of the results page (the review app's styles, for the top bar and the KPIs)."""
    return {"css": (STATIC / "review.css").read_text(encoding="utf-8")}
