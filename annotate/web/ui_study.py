"""The user study in the browser: the participant's screen (Gradio, mounted at ``/study``) and the leads' results tab.

**Participant screen.** One item at a time: the source image and the instruction, then the outputs labelled A, B,
C ... in the participant's recorded screen order (never a method name; attention checks look like any other item),
and the study's questions - "which output follows the instruction best?" and "which output best keeps what should
not change?" - each with "none is acceptable". Progress reads "Item 37 of 100". Keys (shown on the screen): 1-9 or
the letters pick an output for the highlighted question (then the next question is highlighted), 0 = none is
acceptable, Up/Backspace and Down move between questions, Enter goes to the next item; the buttons do the same with
the mouse. Every choice is stored at once through the JSON API of :mod:`annotate.web.study_routes`
(``POST /api/study/{id}/vote``, with the milliseconds since the screen was shown, measured in the browser), so
nothing is lost when the browser closes; a choice can be changed until Enter (``.../advance``, which returns the
next screen's HTML, rendered here). Requests leave the page one at a time, in order, so the stored choice is always
the last one made. A participant who comes back lands on the first screen they have not completed, with the choices
they already made; after the last one they see a thank-you screen. Gradio renders the first screen on page load
(:meth:`StudyScreen.on_load`); the page script (``static/study.js``) does the rest.

**Leads.** :func:`study_results_tab` builds a "User study" tab for any Blocks (the dashboard can include it: call it
inside its ``gr.Tabs()``): pick a study, compute :func:`annotate.study.study_results`, and see the results table
(shares, preferred-method shares and Bradley-Terry strengths with bootstrap intervals), the plotly plots of
:mod:`annotate.study_analysis` per criterion, every participant's progress and quality checks, exclusions (with a
reason) and the votes and results as downloads. :func:`build_results` serves the tab on its own at ``/studies``.
Every handler checks the user's role again. All data text is escaped.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import pandas as pd

from mcie.annotate import study, study_analysis
from mcie.annotate.web.auth import WebUser, session_study, user_for_username
from mcie.annotate.web.common import esc, fresh_download, lead_of, render_kpis, static_text, status_line
from mcie.config import Settings
from mcie.db.models import StudyStatus
from mcie.db.session import session_scope

log = logging.getLogger(__name__)

IMAGE_SIZE = 768
QUESTIONS: dict[str, tuple[str, str]] = {
    "instruction": ("Instruction following", "Which output follows the instruction best?"),
    "background": (
        "Background consistency",
        "Which output best keeps everything the instruction does not ask to change?",
    ),
}

RESULTS_REFUSAL = "Only leads and admins may see the study results."


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
        if limited is not None:
            study_id: int | None = limited
        else:
            with session_scope(self.url) as session:
                study_id = study.participant_study(session, user.id)
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
            with session_scope(self.url) as session:  # the usual case: reads only
                screen = study.quick_current_item(session, study_id, user_id)
                upcoming = study.upcoming_images(session, study_id, user_id, screen.position) if screen else []
            if screen is None:  # no screen yet (the first visit assigns the sequence), finished, or refused
                with session_scope(self.url, write=True) as session:
                    screen = study.current_item(session, study_id, user_id)
                    if screen is None:
                        return render_finished(study.participant_progress(session, study_id, user_id).total)
                    upcoming = study.upcoming_images(session, study_id, user_id, screen.position)
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


def page_assets() -> dict[str, str]:
    """``head`` (the page script) and ``css`` of the participant's page for ``gr.mount_gradio_app``."""
    return {"head": f"<script>{static_text('study.js')}</script>", "css": static_text("study.css")}


# ----------------------------------------------------------------------------------------------------------
# the leads' results view


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ci(ci: Sequence[float] | None, *, percent: bool = True) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if percent else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


RESULTS_COLUMNS = ["criterion", "method", "chosen", "share of first choices", "95% CI", "preferred by", "95% CI ",
                   "Bradley-Terry strength", "95% CI  "]
PARTICIPANT_COLUMNS = ["username", "user id", "done", "finished (UTC)", "link revoked", "excluded", "reason",
                       "attention failed", "median latency (s)", "fast"]


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
            ])
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
        ])
    return pd.DataFrame(rows, columns=PARTICIPANT_COLUMNS)


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
class ResultsWidgets:
    """The results tab's components that event handlers read and write (filled by :func:`study_results_tab`)."""

    kpis: Any = None
    participants: Any = None
    votes_csv: Any = None
    status: Any = None
    data: Any = None
    summary: Any = None
    criterion: Any = None
    results_json: Any = None
    study: Any = None
    n_boot: Any = None
    who: Any = None
    reason: Any = None


@dataclass
class StudyResultsTab:
    """The components of the results tab; :meth:`refresh_list` fills the study picker (bind it to a load event)."""

    url: str
    tab: Any = None
    w: ResultsWidgets = field(default_factory=lambda: ResultsWidgets())
    plots: list[Any] = field(default_factory=list)

    # --- outputs of each event ------------------------------------------------------------------------------
    def study_outputs(self) -> list[Any]:
        w = self.w
        return [w.kpis, w.participants, w.votes_csv, w.status]

    def results_outputs(self) -> list[Any]:
        w = self.w
        return [w.data, w.summary, w.criterion, *self.plots, w.results_json, *self.study_outputs()]

    # --- events ---------------------------------------------------------------------------------------------
    def refresh_list(self, current: Any, request: gr.Request) -> Any:
        lead_of(self.url, request, refusal=RESULTS_REFUSAL)
        with session_scope(self.url) as session:
            studies = study.list_studies(session)
        choices = [(f"{s.name} (#{s.id}, {s.status}, {s.enrolled} enrolled)", s.id) for s in studies]
        ids = [value for _, value in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return gr.Dropdown(choices=choices, value=value)

    def show_study(self, study_id: Any, request: gr.Request) -> dict[Any, Any]:
        """Progress and votes of the picked study (the results wait for the Compute button)."""
        lead_of(self.url, request, refusal=RESULTS_REFUSAL)
        return self._study_view(study_id, None)

    def _study_view(self, study_id: Any, res: dict[str, Any] | None, message: str = "") -> dict[Any, Any]:
        w = self.w
        if study_id is None:
            return {w.kpis: render_kpis([]), w.participants: pd.DataFrame(columns=PARTICIPANT_COLUMNS),
                    w.votes_csv: gr.DownloadButton(value=None, interactive=False),
                    w.status: status_line("No study yet: create one with `mcie study create`.")}
        study_id = int(study_id)
        path = fresh_download(f"study-{study_id}-votes", ".csv")
        with session_scope(self.url) as session:
            summary = next((s for s in study.list_studies(session) if s.id == study_id), None)
            statuses = study.participants_status(session, study_id)
            n_votes = study.export_votes(session, study_id, path)
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
            w.kpis: render_kpis(kpis),
            w.participants: participants_frame(statuses, res),
            w.votes_csv: gr.DownloadButton(value=str(path), interactive=n_votes > 0),
            w.status: status_line(message),
        }

    def compute(self, study_id: Any, n_boot: Any, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request, refusal=RESULTS_REFUSAL)
        w = self.w
        if study_id is None:
            return {w.status: status_line("Pick a study first.", error=True)}
        n = int(n_boot or 0)
        if not 0 <= n <= 5000:
            return {w.status: status_line("Bootstrap resamples must be between 0 and 5000.", error=True)}
        try:
            with session_scope(self.url) as session:
                res = study.study_results(session, int(study_id), n_boot=n)
        except (study.StudyError, ValueError) as exc:
            return {w.status: status_line(str(exc), error=True)}
        return self._results_view(int(study_id), res, f"Results computed with {n} bootstrap resamples.")

    def _results_view(self, study_id: int, res: dict[str, Any], message: str) -> dict[Any, Any]:
        w = self.w
        criteria = list(res.get("by_criterion", {}))
        criterion = criteria[0] if criteria else None
        path = fresh_download(f"study-{study_id}-results", ".json")
        path.write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
        out = {
            w.data: res,
            w.summary: results_frame(res) if criteria else pd.DataFrame({"": ["no completed votes yet"]}),
            w.criterion: gr.Radio(choices=criteria, value=criterion),
            w.results_json: gr.DownloadButton(value=str(path), interactive=True),
        }
        out |= self._plots(res, criterion)
        return out | self._study_view(study_id, res, message)

    def _plots(self, res: dict[str, Any] | None, criterion: str | None) -> dict[Any, Any]:
        if not res or criterion not in res.get("by_criterion", {}):
            return dict.fromkeys(self.plots)
        return dict(zip(self.plots, figures_for(res, criterion), strict=True))

    def redraw(self, res: dict[str, Any] | None, criterion: str | None, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request, refusal=RESULTS_REFUSAL)
        return self._plots(res, criterion)

    def set_excluded(
        self, study_id: Any, username: str, reason: str, n_boot: Any, excluded: bool, request: gr.Request
    ) -> dict[Any, Any]:
        lead = lead_of(self.url, request, refusal=RESULTS_REFUSAL)
        w = self.w
        if study_id is None or not (username or "").strip():
            return {w.status: status_line("Pick a study and type a participant's username.", error=True)}
        try:
            with session_scope(self.url, write=True) as session:
                user_id = study.resolve_participant(session, int(study_id), username)
                study.set_excluded(session, int(study_id), user_id, excluded, reason, actor_id=lead.id)
            with session_scope(self.url) as session:  # computed after the decision is committed
                res = study.study_results(session, int(study_id), n_boot=max(0, min(int(n_boot or 0), 5000)))
        except (study.StudyError, ValueError) as exc:
            return {w.status: status_line(str(exc), error=True)}
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
            w.study = gr.Dropdown(choices=[], label="Study", elem_id="study-pick", scale=3)
            w.n_boot = gr.Number(1000, label="Bootstrap resamples", precision=0, minimum=0, maximum=5000,
                                    elem_id="study-nboot", scale=1)
            compute = gr.Button("Compute results", variant="primary", elem_id="study-compute", scale=1)
            reload = gr.Button("Reload the list", size="sm", elem_id="study-reload", scale=1)
        w.status = gr.HTML(elem_id="study-status", js_on_load=None)
        w.kpis = gr.HTML(elem_id="study-kpis", js_on_load=None)
        w.data = gr.State(None)
        w.summary = gr.Dataframe(interactive=False, wrap=True, elem_id="study-summary", label="Results")
        w.criterion = gr.Radio([], label="Criterion for the plots", elem_id="study-criterion")
        with gr.Row():
            view.plots.append(gr.Plot(label="Share of first choices", elem_id="study-plot-shares"))
            view.plots.append(gr.Plot(label="Preferred method", elem_id="study-plot-preferred"))
        with gr.Row():
            view.plots.append(gr.Plot(label="Bradley-Terry strengths", elem_id="study-plot-strengths"))
            view.plots.append(gr.Plot(label="Pairwise wins", elem_id="study-plot-wins"))
        view.plots.append(gr.Plot(label="Position bias", elem_id="study-plot-position"))
        w.participants = gr.Dataframe(interactive=False, wrap=True, elem_id="study-participants",
                                         label="Participants")
        with gr.Row():
            w.who = gr.Textbox(label="Participant (username)", max_lines=1, max_length=64, elem_id="study-who")
            w.reason = gr.Textbox(label="Reason (required to exclude; kept and audited)", max_lines=2,
                                     max_length=1000, elem_id="study-reason")
            exclude = gr.Button("Exclude from the results", variant="stop", elem_id="study-exclude")
            include = gr.Button("Include again", elem_id="study-include")
        with gr.Row():
            w.votes_csv = gr.DownloadButton("Download the votes (CSV)", interactive=False, elem_id="study-votes")
            w.results_json = gr.DownloadButton("Download the results (JSON)", interactive=False,
                                                  elem_id="study-results-json")
    quiet = {"show_progress": "minimal"}
    tab.select(view.refresh_list, [w.study], [w.study], **quiet)
    reload.click(view.refresh_list, [w.study], [w.study], **quiet)
    w.study.change(view.show_study, [w.study], view.study_outputs(), **quiet)
    compute.click(view.compute, [w.study, w.n_boot], view.results_outputs(), trigger_mode="once", **quiet)
    w.criterion.input(view.redraw, [w.data, w.criterion], view.plots, **quiet)
    moves = [w.study, w.who, w.reason, w.n_boot]
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
        demo.load(view.refresh_list, [view.w.study], [view.w.study], show_progress="hidden")
        demo.queue(default_concurrency_limit=8)
    return demo


def results_page_assets() -> dict[str, str]:
    """``css`` of the results page (the review app's styles, for the top bar and the KPIs)."""
    return {"css": static_text("review.css")}
