"""The leads' dashboard's views, pure: plotly figures, tables, HTML fragments and CSV downloads made from what
:mod:`annotate.dashboard_data` returns. No Gradio and no database here: :mod:`annotate.web.ui_dashboard` wires them
to the tabs, and tests call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from mcie.annotate import dashboard_data as dd
from mcie.annotate import jobs
from mcie.annotate.web.common import esc, fresh_download

QUESTIONS = ("consistency", "quality", "complexity")


# ----------------------------------------------------------------------------------------------------------
# tables and CSV files


def write_csv(frame: pd.DataFrame | None, name: str) -> str | None:
    """Write ``frame`` to a fresh CSV file for a download button. None for no data."""
    if frame is None or frame.empty:
        return None
    path = fresh_download(name or "table", ".csv")
    frame.to_csv(path, index=not isinstance(frame.index, pd.RangeIndex))
    return str(path)


def shown_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame for gr.Dataframe: index as columns, floats rounded."""
    out = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame.copy()
    out.columns = [str(c) for c in out.columns]
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].round(3)
    return out


def _empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(xaxis_visible=False, yaxis_visible=False, height=260, margin={"l": 20, "r": 20, "t": 40, "b": 20})
    return fig


def _layout(fig: go.Figure, title: str, height: int = 360) -> go.Figure:
    fig.update_layout(title=title, height=height, margin={"l": 50, "r": 20, "t": 50, "b": 50}, template="plotly_white")
    return fig


# ----------------------------------------------------------------------------------------------------------
# progress figures (pure: dashboard_data's frames in, figure out)


def status_frame(counts: Mapping[str, int]) -> pd.DataFrame:
    return pd.DataFrame({"status": list(counts), "samples": [int(v) for v in counts.values()]})


def status_figure(frame: pd.DataFrame) -> go.Figure:
    if frame.empty or frame["samples"].sum() == 0:
        return _empty_figure("No samples yet")
    fig = go.Figure(go.Bar(x=frame["status"], y=frame["samples"], text=frame["samples"], textposition="auto"))
    return _layout(fig, "Samples by status")


def per_day_figure(frame: pd.DataFrame) -> go.Figure:
    """Reviews per reviewer per day (``day, rater, n_reviews``) as bars stacked by reviewer."""
    if frame.empty:
        return _empty_figure("No reviews yet")
    wide = frame.pivot_table(index="day", columns="rater", values="n_reviews", aggfunc="sum", fill_value=0)
    fig = go.Figure([go.Bar(x=[str(d) for d in wide.index], y=wide[c], name=str(c)) for c in wide.columns])
    fig.update_layout(barmode="stack", xaxis_title="day (UTC)", yaxis_title="reviews", legend_title="reviewer")
    return _layout(fig, "Reviews per reviewer per day")


def seconds_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def throughput_figure(frame: pd.DataFrame, freq: str = "D") -> go.Figure:
    """Reviews per day or hour (bars) and the running total (line, right axis). The x axis is categorical with
    one label per bin, so a single bin is labelled by its day or hour, not by plotly's zoomed time ticks."""
    if frame.empty:
        return _empty_figure("No reviews yet")
    hourly = freq.lower() in ("h", "1h")
    unit = "hour" if hourly else "day"
    x = [pd.Timestamp(p).strftime("%Y-%m-%d %H:00" if hourly else "%Y-%m-%d") for p in frame["period"]]
    fig = go.Figure([
        go.Bar(x=x, y=frame["n_reviews"], name=f"reviews per {unit}"),
        go.Scatter(x=x, y=frame["cumulative"], name="total", mode="lines+markers", yaxis="y2"),
    ])
    fig.update_layout(xaxis={"title": f"{unit} (UTC)", "type": "category"}, yaxis={"title": f"per {unit}"},
                      yaxis2={"title": "total", "overlaying": "y", "side": "right"})
    return _layout(fig, "Throughput over time")


# ----------------------------------------------------------------------------------------------------------
# agreement figures (pure: agreement_figures' JSON in, (figure, table) out)


def alpha_table(figures: Mapping[str, Any]) -> pd.DataFrame:
    """Alpha (with CI), Fleiss' kappa and counts per question, on the calibration set and on every overlap."""
    rows = []
    for subset in ("calibration", "overlapping"):
        questions = (figures.get(subset) or {}).get("questions", {})
        for name in QUESTIONS:
            q = questions.get(name) or {}
            ci = q.get("alpha_ci") or [None, None]
            rows.append({"samples": subset, "question": name, "alpha": q.get("alpha"), "ci_low": ci[0],
                         "ci_high": ci[1], "fleiss_kappa": q.get("fleiss_kappa"),
                         "observed_agreement": q.get("observed_agreement"), "n_units": q.get("n_units"),
                         "n_raters": q.get("n_raters"), "n_ratings": q.get("n_ratings")})
    return pd.DataFrame(rows)


def alpha_figure(table: pd.DataFrame) -> go.Figure:
    """Krippendorff's alpha per question with its 95% bootstrap interval, one bar group per sample set."""
    known = table.dropna(subset=["alpha"]) if not table.empty else table
    if known.empty:
        return _empty_figure("Not enough samples with two or more reviews for alpha yet")
    fig = go.Figure()
    for subset, part in known.groupby("samples", sort=False):
        low = (part["alpha"] - part["ci_low"]).fillna(0).clip(lower=0)
        high = (part["ci_high"] - part["alpha"]).fillna(0).clip(lower=0)
        fig.add_trace(go.Bar(x=part["question"], y=part["alpha"], name=f"{subset} samples",
                             error_y={"type": "data", "symmetric": False, "array": high, "arrayminus": low},
                             text=[f"{a:.2f}" for a in part["alpha"]]))
    fig.add_hline(y=0.667, line_dash="dot", annotation_text="0.667 tentative")
    fig.add_hline(y=0.8, line_dash="dash", annotation_text="0.8 reliable")
    fig.update_layout(barmode="group", yaxis={"range": [min(0.0, float(known["alpha"].min())) - 0.05, 1.05]})
    return _layout(fig, "Krippendorff's alpha per question (95% CI)")


def pairwise_parts(figures: Mapping[str, Any], question: str) -> tuple[go.Figure, pd.DataFrame]:
    """The pairwise Cohen's kappa heatmap of one question, and a long table of every question's pairs."""
    pw = figures.get("pairwise_cohen") or {}
    raters = pw.get("raters") or []
    rows = []
    for name in QUESTIONS:
        matrix = pw.get(name) or []
        for i, a in enumerate(raters):
            for j, b in enumerate(raters):
                if i < j and matrix:
                    shared = (pw.get("shared") or [[None] * len(raters)] * len(raters))[i][j]
                    rows.append({"question": name, "rater_a": a, "rater_b": b, "kappa": matrix[i][j], "shared": shared})
    table = pd.DataFrame(rows, columns=["question", "rater_a", "rater_b", "kappa", "shared"])
    matrix = pw.get(question) or []
    if not raters or not matrix:
        return _empty_figure("No two reviewers share samples yet"), table
    z = [[math.nan if v is None else float(v) for v in row] for row in matrix]
    text = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in z]
    weights = (pw.get("weights") or {}).get(question)
    fig = go.Figure(go.Heatmap(z=z, x=raters, y=raters, zmin=-1, zmax=1, colorscale="RdBu", text=text,
                               texttemplate="%{text}", hovertemplate="%{y} vs %{x}: %{z:.2f}<extra></extra>"))
    title = f"Pairwise Cohen's kappa - {question}" + (f" ({weights} weights)" if weights else "")
    title += f"; blank below {pw.get('min_shared', '?')} shared samples"
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=max(340, 34 * len(raters) + 140)), table


def loo_parts(figures: Mapping[str, Any], question: str) -> tuple[go.Figure, pd.DataFrame]:
    """Each reviewer's agreement with the consensus of the others, for one question (table: all questions)."""
    loo = figures.get("leave_one_out") or {}
    table = pd.concat([pd.DataFrame(loo.get(q) or []).assign(question=q) for q in QUESTIONS], ignore_index=True)
    rows = pd.DataFrame(loo.get(question) or [])
    if rows.empty:
        return _empty_figure("No overlapping reviews yet"), table
    fig = go.Figure(go.Bar(x=rows["rater"], y=rows["agreement"], text=rows["n_units"].map(lambda n: f"n={n}"),
                           name="agreement"))
    fig.update_layout(yaxis={"title": "share agreeing with the others", "range": [0, 1.05]})
    return _layout(fig, f"Agreement with the leave-one-out consensus - {question}"), table


def gold_parts(figures: Mapping[str, Any]) -> tuple[go.Figure, pd.DataFrame]:
    table = pd.DataFrame(figures.get("gold_accuracy") or [])
    if table.empty:
        return _empty_figure("No gold reviews yet"), table
    fig = go.Figure([go.Bar(x=table["rater"], y=table[c], name=c.replace("_accuracy", ""))
                     for c in ("consistent_accuracy", "quality_accuracy", "complexity_accuracy") if c in table])
    fig.update_layout(barmode="group", yaxis={"title": "accuracy on gold samples", "range": [0, 1.05]})
    return _layout(fig, "Gold accuracy per reviewer"), table


def distribution_parts(figures: Mapping[str, Any], question: str) -> tuple[go.Figure, pd.DataFrame]:
    """Score distribution per reviewer (shares of 1..5) for quality or complexity (table: both)."""
    dist = figures.get("score_distribution") or {}
    table = pd.concat([pd.DataFrame(dist.get(q) or []).assign(question=q) for q in ("quality", "complexity")],
                      ignore_index=True)
    rows = pd.DataFrame(dist.get(question if question in dist else "quality") or [])
    if rows.empty:
        return _empty_figure("No reviews yet"), table
    levels = [c for c in rows.columns if c.startswith("n_") and c[2:].isdigit()]
    totals = rows[levels].sum(axis=1).replace(0, 1)
    fig = go.Figure([go.Bar(x=rows["rater"], y=rows[c] / totals, name=c[2:]) for c in levels])
    fig.update_layout(barmode="stack", yaxis={"title": "share of the reviewer's scores", "range": [0, 1]},
                      legend_title="score")
    shown = question if question in dist else "quality"
    return _layout(fig, f"Score distribution per reviewer - {shown}"), table


def confusion_parts(figures: Mapping[str, Any]) -> tuple[go.Figure, pd.DataFrame]:
    """The MLLM conflict verdict against the reviewers' majority consistency."""
    mvh = figures.get("mllm_vs_human") or {}
    confusion = mvh.get("confusion") or {}
    table = pd.DataFrame(confusion).T.rename_axis("mllm").reset_index() if confusion else pd.DataFrame()
    if not confusion or not mvh.get("n_samples"):
        return _empty_figure("No sample has both an MLLM verdict and human reviews yet"), table
    rows, cols = list(confusion), list(next(iter(confusion.values())))
    z = [[confusion[r][c] for c in cols] for r in rows]
    fig = go.Figure(go.Heatmap(z=z, x=[f"human: {c}" for c in cols], y=[f"MLLM: {r}" for r in rows], colorscale="Blues",
                               text=z, texttemplate="%{text}", showscale=False))
    fig.update_yaxes(autorange="reversed")
    agreement, kappa = mvh.get("agreement"), mvh.get("kappa")
    title = f"MLLM vs human on {mvh['n_samples']} samples"
    if agreement is not None:
        title += f" - agreement {agreement:.2f}"
    if kappa is not None:
        title += f", kappa {kappa:.2f}"
    return _layout(fig, title, height=320), table


def reliability_parts(figures: Mapping[str, Any]) -> tuple[go.Figure, pd.DataFrame]:
    """Each rater's skill per question with its 95% interval (1 perfect, 0 random), best rater first; the table has
    a row per rater and question with the bias and the fitted model."""
    raters = (figures.get("reliability") or {}).get("raters") or []
    rows = []
    for r in raters:
        for q in QUESTIONS:
            v = (r.get("questions") or {}).get(q) or {}
            ci, bias_ci = v.get("skill_ci") or [None, None], v.get("bias_ci") or [None, None]
            rows.append({"rank": r.get("rank"), "rater": r.get("rater"), "question": q, "skill": v.get("skill"),
                         "skill_low": ci[0], "skill_high": ci[1], "bias": v.get("bias"), "bias_low": bias_ci[0],
                         "bias_high": bias_ci[1], "samples_checked": v.get("n_samples"), "gold": v.get("n_gold"),
                         "model": ", ".join(f"{k} {x}" for k, x in (v.get("model") or {}).items()),
                         "flags": "; ".join(f["flag"] for f in r.get("flags") or [] if f["question"] in (q, "all"))})
    table = pd.DataFrame(rows)
    known = table.dropna(subset=["skill"]) if not table.empty else table
    if known.empty:
        return _empty_figure("No rater has been checked against others or gold yet"), table
    fig = go.Figure()
    for q, part in known.groupby("question", sort=False):
        low = (part["skill"] - part["skill_low"]).fillna(0).clip(lower=0)
        high = (part["skill_high"] - part["skill"]).fillna(0).clip(lower=0)
        fig.add_trace(go.Bar(x=part["rater"], y=part["skill"], name=q,
                             error_y={"type": "data", "symmetric": False, "array": high, "arrayminus": low}))
    fig.add_hline(y=0.3, line_dash="dot", annotation_text="0.3: careless below")
    fig.update_layout(barmode="group", yaxis={"title": "skill (chance-corrected)"})
    return _layout(fig, "Rater reliability per question (95% interval), best rater first"), table


def render_flags(figures: Mapping[str, Any]) -> str:
    """The raters flagged careless or biased, each with the evidence (escaped)."""
    rel = figures.get("reliability") or {}
    items = [f"<li><b>{esc(r['rater'])}</b> - {esc(f['flag'].replace('_', ' '))} ({esc(f['question'])}): "
             f"{esc(f['evidence'])}</li>" for r in rel.get("raters") or [] for f in r.get("flags") or []]
    fit = "a fresh fit" if rel.get("fit_id") is None else f"fit {esc(rel.get('fit_id'))}"
    head = (f"<p>Rater reliability from {fit} on {esc(rel.get('n_reviews', 0))} reviews "
            f"({esc(rel.get('n_informative', 0))} samples checked against other reviews or gold).</p>")
    if not items:
        return head + "<p>No rater is flagged careless or biased.</p>"
    return head + '<ul class="mcie-flags">' + "".join(items) + "</ul>"


# ----------------------------------------------------------------------------------------------------------
# review budget (pure: review_budget's JSON in)


def budget_parts(budget: Mapping[str, Any]) -> tuple[go.Figure, pd.DataFrame]:
    """Reviews per decided sample by review policy."""
    table = pd.DataFrame(budget.get("by_policy") or [])
    if table.empty:
        return _empty_figure("No sample has been decided yet"), table
    fig = go.Figure(go.Bar(x=table["policy"], y=table["reviews_per_sample"],
                           text=[f"{n} samples" for n in table["decided_samples"]]))
    fig.update_layout(yaxis={"title": "reviews per decided sample"})
    return _layout(fig, "Reviews spent per sample by review policy"), table


def decided_after_parts(budget: Mapping[str, Any]) -> tuple[go.Figure, pd.DataFrame]:
    shares = budget.get("decided_after") or {}
    table = pd.DataFrame({"reviews": list(shares), "share_of_decided": list(shares.values())})
    if not budget.get("n_decided"):
        return _empty_figure("No sample has been decided yet"), table
    fig = go.Figure(go.Bar(x=table["reviews"], y=table["share_of_decided"],
                           text=[f"{v:.0%}" for v in table["share_of_decided"]]))
    fig.update_layout(xaxis={"title": "reviews when decided"}, yaxis={"title": "share", "range": [0, 1.05]})
    return _layout(fig, "Samples decided after 1, 2 and 3+ reviews"), table


def reliability_time_parts(budget: Mapping[str, Any]) -> tuple[go.Figure, pd.DataFrame]:
    table = pd.DataFrame(budget.get("reliability_over_time") or [])
    if table.empty:
        return _empty_figure("No reliability fit stored yet (the server refits as reviews come in)"), table
    fig = go.Figure([go.Scatter(x=part["n_reviews"], y=part["skill"], mode="lines+markers", name=str(rater))
                     for rater, part in table.groupby("rater", sort=True)])
    fig.update_layout(xaxis={"title": "reviews in the project at the fit"}, yaxis={"title": "overall skill"})
    return _layout(fig, "Rater reliability over time"), table


# ----------------------------------------------------------------------------------------------------------
# adjudication (pure rendering)


def render_reviews(item: Any) -> str:
    """Every review of an adjudication item side by side (all text escaped)."""
    cards = []
    for r in item.reviews:
        verdict = '<span class="mcie-yes">consistent</span>' if r.consistent else '<span class="mcie-no">not ' \
            "consistent</span>"
        boxes = ""
        if r.box_corrections:
            boxes = "<div>box corrections: " + esc(
                "; ".join(f"turn {b.get('turn_index')}: {b.get('box')}" for b in r.box_corrections)) + "</div>"
        comment = f'<div class="mcie-comment">{esc(r.comment)}</div>' if r.comment else ""
        cards.append(
            f'<div class="mcie-adj-review"><b>{esc(r.reviewer)}</b> (review {int(r.review_id)}, revision '
            f"{int(r.revision)})<div>{verdict} · quality <b>{int(r.quality)}</b> · complexity "
            f"<b>{int(r.complexity)}</b></div>{comment}{boxes}</div>"
        )
    mllm = "no MLLM verdict" if item.mllm_verdict is None else f"MLLM verdict: <b>{esc(item.mllm_verdict)}</b>" + (
        f" - {esc(item.mllm_reason)}" if item.mllm_reason else "")
    return (
        f'<div class="mcie-adj"><p><b>Why it needs a lead:</b> {esc(item.why)}</p><p>{mllm}</p>'
        f'<div class="mcie-adj-grid">{"".join(cards) or "no reviews"}</div></div>'
    )


def adjudication_frame(items: Sequence[Any]) -> pd.DataFrame:
    rows = [[i.sample_id, len(i.reviews), i.why, i.instruction[:120]] for i in items]
    return pd.DataFrame(rows, columns=["sample", "reviews", "why", "instruction"])


def render_preview(counts: Mapping[str, int], current: Mapping[str, int] | None = None) -> str:
    labels = {
        "accepted": "would be accepted",
        "rejected": "would be rejected",
        "needs_adjudication": "would need a lead",
        "would_change": "would change status",
        "kept_lead_decisions": "keep their lead decision",
        "changed": "changed status",
    }
    cells = "".join(
        f'<div class="mcie-kpi" id="preview-{esc(k)}"><b>{int(counts[k])}</b><span>{esc(labels.get(k, k))}</span></div>'
        for k in labels
        if k in counts
    )
    return f'<div class="mcie-kpis">{cells}</div>'


# ----------------------------------------------------------------------------------------------------------
# exports


def render_jobs(rows: Sequence[jobs.JobView]) -> str:
    """The newest jobs (exports and previews) with their progress, as an HTML table (everything escaped)."""
    if not rows:
        return ""
    body = []
    for job in rows:
        progress = f"{round(job.progress * 100)}%" + (f" - {esc(job.progress_note)}" if job.progress_note else "")
        what = esc(str(job.payload.get("out") or job.payload.get("preview_id") or ""))
        error = f'<span class="mcie-error">{esc((job.error or "")[:200])}</span>' if job.error else ""
        body.append(f"<tr><td>{job.id}</td><td>{esc(job.kind)}</td><td>{esc(job.status)}</td><td>{progress}</td>"
                    f"<td>{job.attempts}/{job.max_attempts}</td><td>{what}</td><td>{error}</td></tr>")
    return ("<table class=mcie-jobs id=jobs-table><thead><tr><th>job</th><th>kind</th><th>status</th><th>progress"
            "</th><th>tries</th><th>what</th><th>error</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>")


# ----------------------------------------------------------------------------------------------------------
# grounding vs reviewers' corrections (issue 11)


def grounding_figure(frame: pd.DataFrame) -> go.Figure:
    """Mean IoU with the reviewers' corrected boxes, by operation, one bar per box source."""
    if frame.empty:
        return _empty_figure("No box corrections yet: reviewers' corrected boxes are the ground truth here.")
    fig = go.Figure()
    for source in dd.GROUNDING_SOURCES:
        part = frame[frame["source"] == source]
        if not part.empty:
            fig.add_bar(x=part["operation"], y=part["mean_iou"], name=source,
                        text=[f"{v:.2f} (n={n})" for v, n in zip(part["mean_iou"], part["turns"], strict=True)])
    fig.update_yaxes(range=[0, 1], title="mean IoU with the corrected box")
    return _layout(fig, "Grounding vs reviewers' corrections (mllm/diff: best box of that source)")
