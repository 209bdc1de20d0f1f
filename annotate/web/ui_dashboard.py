"""The leads' dashboard (Gradio, mounted at ``/dashboard``; leads and admins only).

Tabs:

- **Progress**: samples by status, reviews per reviewer per day, throughput over time, median seconds per review
  and the forecast finish date (:mod:`annotate.dashboard_data`);
- **Agreement**: Krippendorff's alpha with confidence intervals per question, Fleiss' kappa, the pairwise Cohen's
  kappa heatmap, each reviewer's agreement with the leave-one-out consensus, gold accuracy, score distributions per
  reviewer, the MLLM-vs-human confusion matrix, and each rater's reliability (skill with a 95% interval per
  question, careless/biased flags with their evidence; ``agreement_figures``) - plotly plots, and every table
  downloadable as CSV;
- **Adjudication**: the samples the acceptance rule could not settle, every review side by side, and a lead's
  accept/reject with a required reason (:func:`annotate.acceptance.adjudicate`);
- **Acceptance rule**: thresholds a lead can change, with a preview of how many samples each setting would accept
  before it is applied (:func:`annotate.acceptance.preview_rule` / ``apply_rule``), and the decision rule (paper or
  reliability-weighted, with its cut), previewed the same way;
- **Review budget**: reviews spent per sample by review policy, the share of samples decided after 1/2/3+ reviews,
  the expected number of wrong decisions, each rater's reliability over time (``dashboard_data.review_budget``),
  and the review policy (fixed or adaptive, its band and cap);
- **Settings**: whether reviewers see the MLLM's verdict before they submit;
- **Export**: a dataset export (JSONL + images, Parquet or WebDataset) of the accepted samples, or of the statuses
  and score thresholds chosen, into ``<data_dir>/exports/<name>`` (a single folder name: nothing outside that folder
  can be written), queued as a job (:class:`annotate.export_jobs.ExportJobs`, :mod:`annotate.jobs`) that a worker
  runs through :func:`exports.api.run_export`, so the dashboard stays usable; the table lists the recorded exports
  (``exports`` table) with their status, sample count, path, manifest hash and error, and below it the newest jobs
  (exports and previews) with their progress.

The figures, tables and HTML fragments are pure functions of :mod:`annotate.web.dashboard_views`; this module holds
the Blocks, the widgets and the event handlers. The server refuses every route under ``/dashboard`` to non-leads
(:class:`annotate.web.auth.RoleGate`); each event handler checks the role again from the request (:func:`lead_of`)
before it reads or changes anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from mcie.annotate import dashboard_data as dd
from mcie.annotate import jobs
from mcie.annotate.acceptance import adjudicate, adjudication_queue, apply_rule, preview_rule
from mcie.annotate.export_jobs import EXPORT_FORMATS, ExportJobs, ExportRequestError, export_filter, exports_frame
from mcie.annotate.project import AcceptanceRule, ProjectConfigError, get_project_config, set_project_config
from mcie.annotate.reviews import sample_view
from mcie.annotate.web.common import esc, lead_of, render_kpis, render_topbar, review_page_assets, status_line
from mcie.annotate.web.dashboard_views import (
    QUESTIONS,
    adjudication_frame,
    alpha_figure,
    alpha_table,
    budget_parts,
    confusion_parts,
    decided_after_parts,
    distribution_parts,
    gold_parts,
    grounding_figure,
    loo_parts,
    pairwise_parts,
    per_day_figure,
    reliability_parts,
    reliability_time_parts,
    render_flags,
    render_jobs,
    render_preview,
    render_reviews,
    seconds_text,
    shown_frame,
    status_figure,
    status_frame,
    throughput_figure,
    write_csv,
)
from mcie.annotate.web.sample_html import render_sample
from mcie.annotate.web.ui_study import study_results_tab
from mcie.config import Settings
from mcie.db.models import SampleStatus
from mcie.db.session import session_scope

log = logging.getLogger(__name__)

JOB_LIST_LIMIT = 10
EXPORT_POLL_S = 2.0


# ----------------------------------------------------------------------------------------------------------
# the Blocks


@dataclass
class Table:
    """A plot, its table and the table's CSV download, filled together."""

    plot: Any
    table: Any
    download: Any
    name: str

    def outputs(self) -> list[Any]:
        return [self.plot, self.table, self.download]

    def fill(self, fig: go.Figure, frame: pd.DataFrame) -> dict[Any, Any]:
        path = write_csv(frame, self.name)
        return {
            self.plot: fig,
            self.table: shown_frame(frame) if not frame.empty else pd.DataFrame({"": ["no data yet"]}),
            self.download: gr.DownloadButton(value=path, interactive=path is not None),
        }


def _table_block(label: str, name: str) -> Table:
    """A plot, its CSV download button, and its table folded away under it."""
    plot = gr.Plot(label=label, elem_id=f"plot-{name}")
    download = gr.DownloadButton(f"Download the table (CSV): {label}", interactive=False, size="sm",
                                 elem_id=f"csv-{name}")
    with gr.Accordion(f"Table: {label}", open=False, elem_id=f"acc-{name}"):
        table = gr.Dataframe(interactive=False, wrap=True, elem_id=f"table-{name}")
    return Table(plot, table, download, name)


@dataclass
class DashboardWidgets:
    """The dashboard's components that event handlers read and write (filled by :func:`build`)."""

    kpis: Any = None
    agreement_data: Any = None
    agreement_summary: Any = None
    reliability_flags: Any = None
    adj_table: Any = None
    adj_info: Any = None
    adj_ids: Any = None
    adj_status: Any = None
    adj_sample: Any = None
    adj_reviews: Any = None
    adj_selected: Any = None
    adj_reason: Any = None
    adj_outcome: Any = None
    rule_consistent: Any = None
    rule_quality: Any = None
    rule_complexity: Any = None
    rule_spread: Any = None
    rule_preview: Any = None
    show_mllm: Any = None
    rule_status: Any = None
    rule_previewed: Any = None
    decision_status: Any = None
    decision_preview: Any = None
    decision_previewed: Any = None
    decision_rule: Any = None
    accept_at: Any = None
    budget_kpis: Any = None
    policy: Any = None
    band_low: Any = None
    band_high: Any = None
    max_reviews: Any = None
    policy_status: Any = None
    settings_status: Any = None
    export_table: Any = None
    export_info: Any = None
    export_timer: Any = None
    export_status: Any = None
    export_name: Any = None
    export_format: Any = None
    export_val: Any = None
    export_statuses: Any = None
    export_min_quality: Any = None
    export_min_complexity: Any = None


class Dashboard:
    """Event handlers of the dashboard, bound to one database."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.progress: dict[str, Table] = {}
        self.agreement: dict[str, Table] = {}
        self.budget: dict[str, Table] = {}
        self.w = DashboardWidgets()
        self.exports = ExportJobs(settings)

    # --- progress -------------------------------------------------------------------------------------------
    def on_progress(self, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        with session_scope(self.url) as session:
            counts = status_frame(dd.status_counts(session))
            reviews = dd.reviews_frame(session)
            remaining = dd.remaining_reviews(session)
        per_day = dd.reviews_per_reviewer_per_day(reviews)
        freq = dd.throughput_freq(reviews)
        through = dd.throughput(reviews, freq=freq)
        median = dd.median_seconds_per_review(reviews, "server_s")
        client = dd.median_seconds_per_review(reviews)
        finish = dd.forecast_finish(remaining, reviews, datetime.now(UTC))
        kpis = render_kpis([
            ("kpi-samples", str(int(counts["samples"].sum())), "samples"),
            ("kpi-reviews", str(len(reviews)), "reviews"),
            ("kpi-remaining", str(remaining), "reviews still wanted"),
            ("kpi-median", seconds_text(median), "median time per review (server: lease to submit)"),
            ("kpi-median-client", seconds_text(client), "median time per review (reported by the client)"),
            ("kpi-forecast", finish.isoformat() if finish else "not enough data", "forecast finish (UTC)"),
        ])
        out = {self.w.kpis: kpis}
        out |= self.progress["status"].fill(status_figure(counts), counts)
        out |= self.progress["per_day"].fill(per_day_figure(per_day), per_day)
        out |= self.progress["throughput"].fill(throughput_figure(through, freq), through)
        return out

    # --- agreement ------------------------------------------------------------------------------------------
    def on_agreement(self, question: str, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        with session_scope(self.url) as session:
            figures = dd.agreement_figures(session)
        alpha = alpha_table(figures)
        out = {self.w.agreement_data: figures}
        out[self.w.agreement_summary] = render_kpis([
            ("kpi-agreement-reviews", str(figures.get("n_reviews", 0)), "reviews"),
            ("kpi-agreement-reviewers", str(figures.get("n_reviewers", 0)), "reviewers"),
            ("kpi-gold-reviews", str(figures.get("n_gold_reviews", 0)), "gold reviews"),
        ])
        out |= self.agreement["alpha"].fill(alpha_figure(alpha), alpha)
        out |= self.agreement["gold"].fill(*gold_parts(figures))
        out |= self.agreement["confusion"].fill(*confusion_parts(figures))
        out |= self.agreement["reliability"].fill(*reliability_parts(figures))
        out[self.w.reliability_flags] = render_flags(figures)
        return out | self.on_question(figures, question, request)

    def on_question(self, figures: dict[str, Any] | None, question: str, request: gr.Request) -> dict[Any, Any]:
        """Re-draw the per-question plots for another question (from the figures already computed)."""
        lead_of(self.url, request)
        if not figures:
            return {}
        question = question if question in QUESTIONS else "quality"
        out = self.agreement["pairwise"].fill(*pairwise_parts(figures, question))
        out |= self.agreement["loo"].fill(*loo_parts(figures, question))
        out |= self.agreement["distribution"].fill(*distribution_parts(figures, question))
        return out

    # --- adjudication ---------------------------------------------------------------------------------------
    def on_adjudication(self, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        with session_scope(self.url) as session:
            items = adjudication_queue(session)
        w = self.w
        info = "No sample waits for a lead."
        if items:
            info = f"{len(items)} sample(s) wait for a lead. Select a row to see its reviews."
        ids = [i.sample_id for i in items]
        return {w.adj_table: adjudication_frame(items), w.adj_info: info, w.adj_ids: ids}

    def on_adj_select(self, ids: list[int], evt: gr.SelectData, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if not isinstance(row, int) or not 0 <= row < len(ids):
            return {}
        return self.show_adjudication(ids[row])

    def show_adjudication(self, sample_id: int) -> dict[Any, Any]:
        w = self.w
        with session_scope(self.url) as session:  # the queue and the sample in one read transaction
            item = next((i for i in adjudication_queue(session) if i.sample_id == sample_id), None)
            view = None if item is None else sample_view(session, sample_id)
        if item is None or view is None:
            return {w.adj_status: status_line(f"Sample {sample_id} no longer waits for a lead.", error=True)}
        return {
            w.adj_sample: render_sample(view, show_mllm=True, mode="adjudicate"),
            w.adj_reviews: render_reviews(item),
            w.adj_selected: sample_id,
            w.adj_status: "",
        }

    def on_decide(
        self, sample_id: int | None, outcome: str | None, reason: str, request: gr.Request
    ) -> dict[Any, Any]:
        lead = lead_of(self.url, request)
        w = self.w
        if not sample_id:
            return {w.adj_status: status_line("Select a sample first.", error=True)}
        if outcome not in ("accepted", "rejected"):
            return {w.adj_status: status_line("Choose accept or reject.", error=True)}
        try:
            with session_scope(self.url, write=True) as session:
                adjudicate(session, int(sample_id), outcome, lead.id, reason or "")
        except (ValueError, PermissionError) as exc:
            return {w.adj_status: status_line(str(exc), error=True)}
        out = self.on_adjudication(request)
        out |= {w.adj_sample: "", w.adj_reviews: "", w.adj_selected: None, w.adj_reason: "",
                w.adj_outcome: None}
        remaining = out[w.adj_ids]
        if remaining:  # straight on to the next sample waiting for a lead
            out |= self.show_adjudication(remaining[0])
        return out | {w.adj_status: status_line(f"Sample {int(sample_id)} {outcome} by {lead.username}.")}

    # --- acceptance rule ------------------------------------------------------------------------------------
    def _rule(
        self, require_consistent: bool, quality_above: float, complexity_above: float, spread: float
    ) -> AcceptanceRule:
        return AcceptanceRule(require_consistent=bool(require_consistent), quality_above=float(quality_above),
                              complexity_above=float(complexity_above), max_score_spread=int(spread))

    def on_rule_load(self, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        with session_scope(self.url) as session:
            config = get_project_config(session)
            counts = preview_rule(session, config.acceptance)
        rule = config.acceptance
        w = self.w
        return {
            w.rule_consistent: rule.require_consistent,
            w.rule_quality: rule.quality_above,
            w.rule_complexity: rule.complexity_above,
            w.rule_spread: rule.max_score_spread,
            w.rule_preview: "<p>Current rule on the reviewed samples:</p>" + render_preview(counts),
            w.show_mllm: config.show_mllm_verdict_before_submit,
        }

    def on_preview(self, consistent, quality, complexity, spread, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        try:
            rule = self._rule(consistent, quality, complexity, spread)
        except ValueError as exc:
            return {self.w.rule_status: status_line(str(exc), error=True)}
        with session_scope(self.url) as session:
            counts = preview_rule(session, rule)
        return {
            self.w.rule_preview: "<p>With these thresholds:</p>" + render_preview(counts),
            self.w.rule_status: status_line("Preview only - nothing was changed. Apply to make it the rule."),
            self.w.rule_previewed: rule.model_dump(),
        }

    def on_apply(self, consistent, quality, complexity, spread, previewed, request: gr.Request) -> dict[Any, Any]:
        """Apply the thresholds on screen - only the ones just previewed, so a lead always sees the effect first."""
        lead = lead_of(self.url, request)
        try:
            rule = self._rule(consistent, quality, complexity, spread)
            if previewed != rule.model_dump():
                return {self.w.rule_status: status_line("Preview these thresholds first, then apply.", error=True)}
            with session_scope(self.url, write=True) as session:
                counts = apply_rule(session, rule, lead.id)
        except (ValueError, PermissionError) as exc:
            return {self.w.rule_status: status_line(str(exc), error=True)}
        return {
            self.w.rule_previewed: None,
            self.w.rule_preview: "<p>Applied:</p>" + render_preview(counts),
            self.w.rule_status: status_line(f"Rule applied by {lead.username}; {counts.get('changed', 0)} sample(s) "
                                           "changed status."),
        }

    # --- decision rule --------------------------------------------------------------------------------------
    def on_decision_preview(self, decision_rule: str, accept_at: float, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        w = self.w
        if decision_rule not in ("paper", "weighted"):
            return {w.decision_status: status_line("Choose the paper or the weighted rule.", error=True)}
        try:
            with session_scope(self.url) as session:
                counts = preview_rule(session, decision_rule=decision_rule, accept_at=float(accept_at))
        except ValueError as exc:
            return {w.decision_status: status_line(str(exc), error=True)}
        return {
            w.decision_preview: f"<p>With the {esc(decision_rule)} rule:</p>" + render_preview(counts),
            w.decision_status: status_line("Preview only - nothing was changed. Apply to make it the decision rule."),
            w.decision_previewed: {"decision_rule": decision_rule, "accept_at": float(accept_at)},
        }

    def on_decision_apply(
        self, decision_rule: str, accept_at: float, previewed: dict[str, Any] | None, request: gr.Request
    ) -> dict[Any, Any]:
        """Apply the decision rule on screen - only the one just previewed."""
        lead = lead_of(self.url, request)
        w = self.w
        chosen = {"decision_rule": decision_rule, "accept_at": float(accept_at)}
        if previewed != chosen:
            return {w.decision_status: status_line("Preview this decision rule first, then apply.", error=True)}
        try:
            with session_scope(self.url, write=True) as session:
                counts = apply_rule(session, None, lead.id, decision_rule=decision_rule, accept_at=float(accept_at))
        except (ValueError, PermissionError) as exc:
            return {w.decision_status: status_line(str(exc), error=True)}
        return {
            w.decision_previewed: None,
            w.decision_preview: "<p>Applied:</p>" + render_preview(counts),
            w.decision_status: status_line(f"Decision rule {decision_rule} applied by {lead.username}; "
                                          f"{counts.get('changed', 0)} sample(s) changed status."),
        }

    def on_decision_load(self, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        with session_scope(self.url) as session:
            config = get_project_config(session)
        return {self.w.decision_rule: config.decision_rule, self.w.accept_at: config.weighted.accept_at}

    # --- review budget --------------------------------------------------------------------------------------
    def on_budget(self, request: gr.Request) -> dict[Any, Any]:
        lead_of(self.url, request)
        with session_scope(self.url) as session:
            budget = dd.review_budget(session)
            config = get_project_config(session)
        wrong = budget.get("expected_wrong_decisions")
        per = budget.get("reviews_per_reviewed_sample")
        w = self.w
        out = {
            w.budget_kpis: render_kpis([
                ("kpi-budget-reviews", str(budget.get("n_reviews", 0)), "reviews (gold apart)"),
                ("kpi-budget-per-sample", "-" if per is None else f"{per:.2f}", "reviews per reviewed sample"),
                ("kpi-budget-gold", str(budget.get("n_gold_reviews", 0)), "gold reviews"),
                ("kpi-budget-wrong", "-" if wrong is None else f"{wrong:.1f}",
                 f"expected wrong decisions (of {budget.get('n_with_posterior', 0)} with a posterior)"),
            ]),
            w.policy: config.review_policy,
            w.band_low: config.adaptive.band_low,
            w.band_high: config.adaptive.band_high,
            w.max_reviews: config.adaptive.max_reviews,
        }
        out |= self.budget["by_policy"].fill(*budget_parts(budget))
        out |= self.budget["decided_after"].fill(*decided_after_parts(budget))
        out |= self.budget["over_time"].fill(*reliability_time_parts(budget))
        return out

    def on_policy_save(
        self, policy: str, band_low: float, band_high: float, max_reviews: float, request: gr.Request
    ) -> dict[Any, Any]:
        lead = lead_of(self.url, request)
        changes = {"review_policy": policy, "adaptive": {"band_low": float(band_low), "band_high": float(band_high),
                                                         "max_reviews": int(max_reviews)}}
        try:
            with session_scope(self.url, write=True) as session:
                set_project_config(session, changes, actor_id=lead.id)
        except ProjectConfigError as exc:
            return {self.w.policy_status: status_line(str(exc), error=True)}
        return {self.w.policy_status: status_line(f"Saved by {lead.username}: review policy {policy} (band "
                                                 f"{float(band_low):g}-{float(band_high):g}, cap {int(max_reviews)}); "
                                                 "it applies to the next reviews.")}

    # --- project setting ------------------------------------------------------------------------------------
    def on_show_mllm(self, show: bool, request: gr.Request) -> dict[Any, Any]:
        lead = lead_of(self.url, request)
        try:
            with session_scope(self.url, write=True) as session:
                set_project_config(session, {"show_mllm_verdict_before_submit": bool(show)}, actor_id=lead.id)
        except ProjectConfigError as exc:
            return {self.w.settings_status: status_line(str(exc), error=True)}
        state = "shown before" if show else "hidden until after"
        return {self.w.settings_status: status_line(f"Saved: reviewers now see the MLLM's verdict {state} they submit "
                                                   "(from their next sample).")}

    # --- exports --------------------------------------------------------------------------------------------
    def on_exports(self, request: gr.Request) -> dict[Any, Any]:
        """The recorded exports, what runs now, and the errors of this server's exports; the poll timer runs only
        while an export does."""
        lead_of(self.url, request)
        w = self.w
        with session_scope(self.url) as session:
            running = self.exports.running(session)
            frame = exports_frame(session)
            recent = jobs.list_jobs(session, limit=JOB_LIST_LIMIT)
        notes = [f"Exports are written into <code>{esc(self.exports.root)}</code>."]
        if running:
            names = ", ".join(f"<b>{esc(Path(str(j.payload.get('out', ''))).name)}</b> ({esc(j.status)})"
                              for j in running)
            notes.append(f"Exports waiting or running: {names}. This page refreshes until they finish.")
        return {
            w.export_table: frame if not frame.empty else pd.DataFrame({"": ["no exports yet"]}),
            w.export_info: "<p>" + "<br>".join(notes) + "</p>" + render_jobs(recent),
            w.export_timer: gr.Timer(active=bool(running)),
        }

    def on_export_start(
        self,
        fmt: str | None,
        name: str | None,
        val_fraction: float | None,
        statuses: list[str] | None,
        min_quality: float | None,
        min_complexity: float | None,
        request: gr.Request,
    ) -> dict[Any, Any]:
        """Start an export in the background (leads and admins only) and show it in the table."""
        lead = lead_of(self.url, request)
        w = self.w
        try:
            flt = export_filter(statuses, min_quality, min_complexity)
            with session_scope(self.url, write=True) as session:
                job = self.exports.start(session, lead, fmt, name, val_fraction, flt)
        except (ExportRequestError, PermissionError) as exc:
            return self.on_exports(request) | {w.export_status: status_line(str(exc), error=True)}
        return self.on_exports(request) | {
            w.export_status: status_line(f"Export {job.name!r} ({job.fmt}) started into {job.destination} "
                                        f"(job {job.job_id})."),
            w.export_name: "",
        }

    def on_topbar(self, request: gr.Request) -> str:
        return render_topbar(lead_of(self.url, request))


# --- grounding vs reviewers' corrections (issue 11) -----------------------------------------------------------


def grounding_view(url: str, request: gr.Request | None) -> tuple[go.Figure, pd.DataFrame]:
    """The tab's figure and table, for a lead or admin only."""
    lead_of(url, request)
    with session_scope(url) as session:
        frames = dd.grounding_frames(session)
    frame = dd.grounding_vs_corrections(*frames)
    return grounding_figure(frame), frame


def grounding_tab(settings: Settings) -> Table:
    """The leads' "Grounding" tab: IoU of MLLM, pixel-difference and chosen boxes with the reviewers' corrections,
    by operation, so a lead sees whether the MLLM's grounding is worth its cost. Fills on its Refresh button."""
    url = settings.database_url
    with gr.Tab("Grounding", id="grounding", elem_id="tab-grounding"):
        gr.Markdown("Reviewers' box corrections are the ground truth: for every corrected turn, the IoU of the best "
                    "MLLM box, the best pixel-difference box and the box the pipeline chose (several corrections of "
                    "one turn: their median). `mean_first_iou` is the MLLM's first answer (or the largest changed "
                    "region). See docs/grounding.md for how boxes are chosen.")
        refresh = gr.Button("Refresh", size="sm", elem_id="grounding-refresh")
        block = _table_block("Grounding vs corrections", "grounding")

    def on_grounding(request: gr.Request) -> dict[Any, Any]:
        return block.fill(*grounding_view(url, request))

    _on(refresh.click, on_grounding, [], block.outputs())
    return block


def _on(event: Callable[..., Any], fn: Callable[..., Any], inputs: list[Any], outputs: list[Any]) -> Any:
    return event(fn, inputs, outputs, show_progress="minimal")


def build(settings: Settings) -> gr.Blocks:
    """The dashboard's Blocks (mount it with :func:`page_assets`)."""
    d = Dashboard(settings)
    w = d.w
    with gr.Blocks(title="MCIE dashboard", analytics_enabled=False, fill_width=True) as demo:
        topbar = gr.HTML(elem_id="topbar", js_on_load=None)
        with gr.Tabs(elem_id="dash-tabs"):
            with gr.Tab("Progress", id="progress", elem_id="tab-progress"):
                w.kpis = gr.HTML(elem_id="kpis", js_on_load=None)
                progress_refresh = gr.Button("Refresh", size="sm", elem_id="progress-refresh")
                d.progress = {
                    "status": _table_block("Samples by status", "status"),
                    "per_day": _table_block("Reviews per reviewer per day", "per-day"),
                    "throughput": _table_block("Throughput", "throughput"),
                }
            with gr.Tab("Agreement", id="agreement", elem_id="tab-agreement"):
                w.agreement_data = gr.State(None)
                with gr.Row():
                    agreement_refresh = gr.Button("Compute agreement (1000 bootstrap resamples: a few seconds)",
                                                  size="sm", elem_id="agreement-refresh")
                    question = gr.Radio(list(QUESTIONS), value="quality", label="Question for the per-reviewer plots",
                                        elem_id="agreement-question")
                w.agreement_summary = gr.HTML(elem_id="agreement-summary", js_on_load=None)
                d.agreement = {
                    "alpha": _table_block("Alpha and Fleiss' kappa per question", "alpha"),
                    "pairwise": _table_block("Pairwise Cohen's kappa", "pairwise"),
                    "loo": _table_block("Leave-one-out agreement", "loo"),
                    "distribution": _table_block("Score distributions", "distribution"),
                    "gold": _table_block("Gold accuracy", "gold"),
                    "confusion": _table_block("MLLM vs human confusion", "confusion"),
                    "reliability": _table_block("Rater reliability", "reliability"),
                }
                w.reliability_flags = gr.HTML(elem_id="reliability-flags", js_on_load=None)
            with gr.Tab("Adjudication", id="adjudication", elem_id="tab-adjudication"):
                w.adj_ids = gr.State([])
                w.adj_selected = gr.State(None)
                w.adj_info = gr.Markdown(elem_id="adj-info")
                w.adj_table = gr.Dataframe(interactive=False, wrap=True, elem_id="adj-table",
                                              column_widths=["80px", "80px", "55%", "35%"])
                adj_refresh = gr.Button("Refresh", size="sm", elem_id="adj-refresh")
                w.adj_reviews = gr.HTML(elem_id="adj-reviews", js_on_load=None)
                with gr.Row():
                    w.adj_outcome = gr.Radio([("Accept", "accepted"), ("Reject", "rejected")], label="Decision",
                                                elem_id="adj-outcome")
                    w.adj_reason = gr.Textbox(label="Reason (required, kept with the decision)", lines=2,
                                                 max_length=2000, elem_id="adj-reason")
                decide = gr.Button("Record decision", variant="primary", elem_id="adj-decide")
                w.adj_status = gr.HTML(elem_id="adj-status", js_on_load=None)
                w.adj_sample = gr.HTML(elem_id="adj-sample", js_on_load=None)
            with gr.Tab("Acceptance rule", id="rule", elem_id="tab-rule"):
                gr.Markdown("A sample is accepted when its reviewers find it consistent and its median quality and "
                            "complexity are strictly above the thresholds (the paper: above 3). Preview first: "
                            "nothing changes until you apply.")
                with gr.Row():
                    w.rule_consistent = gr.Checkbox(label="Require 'consistent'", value=True,
                                                       elem_id="rule-consistent")
                    w.rule_quality = gr.Slider(0, 5, value=3, step=0.5, label="Quality above",
                                                  elem_id="rule-quality")
                    w.rule_complexity = gr.Slider(0, 5, value=3, step=0.5, label="Complexity above",
                                                     elem_id="rule-complexity")
                    w.rule_spread = gr.Slider(0, 4, value=2, step=1, label="Largest score spread before a dispute",
                                                 elem_id="rule-spread")
                with gr.Row():
                    preview = gr.Button("Preview", elem_id="rule-preview-btn")
                    apply = gr.Button("Apply this rule", variant="stop", elem_id="rule-apply-btn")
                w.rule_previewed = gr.State(None)
                w.rule_preview = gr.HTML(elem_id="rule-preview", js_on_load=None)
                w.rule_status = gr.HTML(elem_id="rule-status", js_on_load=None)
                gr.Markdown("**Decision rule.** *paper*: the thresholds above on the majority and the medians. "
                            "*weighted*: each rater weighed by their fitted reliability (the Agreement tab); a sample "
                            "is accepted when the posterior probability that it meets the thresholds is at least the "
                            "cut. Every decision records the rule and its posterior; exports carry both.")
                with gr.Row():
                    w.decision_rule = gr.Radio(["paper", "weighted"], value="paper", label="Decision rule",
                                                  elem_id="decision-rule")
                    w.accept_at = gr.Slider(0.05, 0.95, value=0.5, step=0.05,
                                               label="Weighted: accept when P(meets the rule) is at least",
                                               elem_id="decision-accept-at")
                with gr.Row():
                    decision_preview = gr.Button("Preview", elem_id="decision-preview-btn")
                    decision_apply = gr.Button("Apply this decision rule", variant="stop", elem_id="decision-apply-btn")
                w.decision_previewed = gr.State(None)
                w.decision_preview = gr.HTML(elem_id="decision-preview", js_on_load=None)
                w.decision_status = gr.HTML(elem_id="decision-status", js_on_load=None)
            with gr.Tab("Review budget", id="budget", elem_id="tab-budget"):
                w.budget_kpis = gr.HTML(elem_id="budget-kpis", js_on_load=None)
                budget_refresh = gr.Button("Refresh", size="sm", elem_id="budget-refresh")
                d.budget = {
                    "by_policy": _table_block("Reviews per sample by policy", "budget-policy"),
                    "decided_after": _table_block("Decided after 1/2/3+ reviews", "budget-decided"),
                    "over_time": _table_block("Rater reliability over time", "budget-reliability"),
                }
                gr.Markdown("**Review policy.** *fixed*: every sample gets the reviews per sample of the project "
                            "(the paper: one). *adaptive*: one review, and another from a different, preferably "
                            "more reliable rater only while the posterior is inside the band and the sample is "
                            "under the cap; disagreements with the MLLM come first. Calibration samples keep their "
                            "overlap either way.")
                with gr.Row():
                    w.policy = gr.Radio(["fixed", "adaptive"], value="fixed", label="Review policy",
                                           elem_id="review-policy")
                    w.band_low = gr.Slider(0, 1, value=0.2, step=0.05, label="Uncertain from",
                                              elem_id="band-low")
                    w.band_high = gr.Slider(0, 1, value=0.8, step=0.05, label="Uncertain up to",
                                               elem_id="band-high")
                    w.max_reviews = gr.Slider(1, 10, value=3, step=1, label="Cap on reviews per sample",
                                                 elem_id="max-reviews")
                policy_save = gr.Button("Save the review policy", variant="primary", elem_id="policy-save")
                w.policy_status = gr.HTML(elem_id="policy-status", js_on_load=None)
            with gr.Tab("Settings", id="settings", elem_id="tab-settings"):
                w.show_mllm = gr.Checkbox(label="Show the MLLM's verdict to reviewers before they submit (it may "
                                             "anchor their answers; the paper's protocol hides it)",
                                             elem_id="show-mllm")
                w.settings_status = gr.HTML(elem_id="settings-status", js_on_load=None)
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                gr.Markdown("Export the dataset for training: the accepted samples by default, or the statuses and "
                            "median-score thresholds chosen below. The export runs in the background; the folder "
                            "appears, complete with its manifest, only when it has finished.")
                with gr.Row():
                    w.export_format = gr.Radio(list(EXPORT_FORMATS), value="jsonl", label="Format",
                                                  elem_id="export-format")
                    w.export_name = gr.Textbox(label="Folder name under <data dir>/exports (blank: a dated name)",
                                                  max_length=100, elem_id="export-name")
                    w.export_val = gr.Number(0.05, minimum=0, maximum=1, step=0.01,
                                                label="Validation share (of instances)", elem_id="export-val")
                with gr.Row():
                    w.export_statuses = gr.CheckboxGroup([s.value for s in SampleStatus],
                                                            value=[SampleStatus.accepted.value],
                                                            label="Sample statuses", elem_id="export-statuses")
                    w.export_min_quality = gr.Slider(0, 5, value=0, step=0.5,
                                                        label="Median quality at least (0: any)",
                                                        elem_id="export-min-quality")
                    w.export_min_complexity = gr.Slider(0, 5, value=0, step=0.5,
                                                           label="Median complexity at least (0: any)",
                                                           elem_id="export-min-complexity")
                with gr.Row():
                    export_start = gr.Button("Start export", variant="primary", elem_id="export-start")
                    export_refresh = gr.Button("Refresh", size="sm", elem_id="export-refresh")
                w.export_status = gr.HTML(elem_id="export-status", js_on_load=None)
                w.export_info = gr.HTML(elem_id="export-info", js_on_load=None)
                w.export_table = gr.Dataframe(interactive=False, wrap=True, elem_id="export-table")
                w.export_timer = gr.Timer(EXPORT_POLL_S, active=False)
            grounding_tab(settings)
            study_results_tab(settings)

        progress_out = [w.kpis] + [o for t in d.progress.values() for o in t.outputs()]
        agreement_out = [w.agreement_data, w.agreement_summary, w.reliability_flags]
        agreement_out += [o for t in d.agreement.values() for o in t.outputs()]
        adj_out = [w.adj_table, w.adj_info, w.adj_ids, w.adj_status, w.adj_sample, w.adj_reviews,
                   w.adj_selected, w.adj_reason, w.adj_outcome]
        rule_in = [w.rule_consistent, w.rule_quality, w.rule_complexity, w.rule_spread]
        rule_out = [*rule_in, w.rule_preview, w.rule_status, w.show_mllm, w.rule_previewed]
        decision_in = [w.decision_rule, w.accept_at]
        decision_out = [w.decision_preview, w.decision_status, w.decision_previewed]
        budget_out = [w.budget_kpis, w.policy, w.band_low, w.band_high, w.max_reviews]
        budget_out += [o for t in d.budget.values() for o in t.outputs()]
        export_in = [w.export_format, w.export_name, w.export_val, w.export_statuses,
                     w.export_min_quality, w.export_min_complexity]
        export_out = [w.export_table, w.export_info, w.export_timer, w.export_status, w.export_name]

        demo.load(d.on_topbar, None, topbar)
        demo.load(d.on_progress, None, progress_out)
        demo.load(d.on_adjudication, None, adj_out)
        demo.load(d.on_rule_load, None, rule_out)
        _on(progress_refresh.click, d.on_progress, [], progress_out)
        _on(agreement_refresh.click, d.on_agreement, [question], agreement_out)
        _on(question.change, d.on_question, [w.agreement_data, question], agreement_out)
        _on(adj_refresh.click, d.on_adjudication, [], adj_out)
        _on(w.adj_table.select, d.on_adj_select, [w.adj_ids], adj_out)
        decide.click(d.on_decide, [w.adj_selected, w.adj_outcome, w.adj_reason], adj_out,
                     trigger_mode="once")
        _on(preview.click, d.on_preview, rule_in, rule_out)
        apply.click(d.on_apply, [*rule_in, w.rule_previewed], rule_out, trigger_mode="once")
        w.show_mllm.input(d.on_show_mllm, [w.show_mllm], [w.settings_status])
        demo.load(d.on_decision_load, None, decision_in)
        _on(decision_preview.click, d.on_decision_preview, decision_in, decision_out)
        decision_apply.click(d.on_decision_apply, [*decision_in, w.decision_previewed], decision_out,
                             trigger_mode="once")
        demo.load(d.on_budget, None, budget_out)
        _on(budget_refresh.click, d.on_budget, [], budget_out)
        policy_save.click(d.on_policy_save, [w.policy, w.band_low, w.band_high, w.max_reviews],
                          [w.policy_status], trigger_mode="once")
        demo.load(d.on_exports, None, export_out)
        export_start.click(d.on_export_start, export_in, export_out, trigger_mode="once", api_name="export_start")
        _on(export_refresh.click, d.on_exports, [], export_out)
        w.export_timer.tick(d.on_exports, None, export_out, show_progress="hidden")
        demo.queue(default_concurrency_limit=8)
    return demo


def page_assets() -> dict[str, str]:
    """``head``/``css`` for ``gr.mount_gradio_app`` (the review page's styles; images zoom with its script)."""
    return review_page_assets()
