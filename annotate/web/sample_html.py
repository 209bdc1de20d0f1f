"""The review screen's sample as HTML, shared by the review screen and the dashboard's adjudication view: the turn
strip, the before/after slider, the drawing panel with each sub-instruction's box in its colour, and the MLLM's
verdict. Pure: a :class:`annotate.reviews.SampleView` in, HTML out; every data text is escaped.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from mcie.annotate.web.common import esc

PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2", "#F0E442", "#000000")
STRIP_SIZE = 384
PANEL_SIZE = 768


def _colour(k: int) -> str:
    return PALETTE[k % len(PALETTE)]


def thumb_url(sha: str, size: int) -> str:
    return f"/thumb/{esc(sha)}?size={size}"


def full_url(sha: str) -> str:
    return f"/img/{esc(sha)}"


def _box_rects(boxes: Sequence[tuple[int, Sequence[float], str]], css: str = "mcie-box") -> str:
    """SVG rects for (turn, normalized box, colour); a dark halo under each keeps it visible on any image."""
    out = []
    for turn, (x0, y0, x1, y1), colour in boxes:
        geometry = f'x="{x0:.4f}" y="{y0:.4f}" width="{x1 - x0:.4f}" height="{y1 - y0:.4f}"'
        out.append(
            f'<rect {geometry} class="mcie-halo" vector-effect="non-scaling-stroke" '
            'style="stroke:rgb(0 0 0 / 55%);stroke-width:5px"/>'
            f'<rect {geometry} class="{css}" data-turn="{int(turn)}" vector-effect="non-scaling-stroke" '
            f'style="stroke:{colour}"><title>sub-instruction {int(turn)}</title></rect>'
        )
    return "".join(out)


def framed_image(
    sha: str, size: int, alt: str, boxes: Sequence[tuple[int, Sequence[float], str]], extra: str = ""
) -> str:
    svg = f'<svg viewBox="0 0 1 1" preserveAspectRatio="none" aria-hidden="true">{_box_rects(boxes)}{extra}</svg>'
    return (
        f'<div class="mcie-frame"><img src="{thumb_url(sha, size)}" data-full="{full_url(sha)}" alt="{esc(alt)}" '
        f'loading="eager" decoding="async" draggable="false">{svg}</div>'
    )


def _sub_boxes(view: Any) -> list[tuple[int, Sequence[float], str]]:
    return [(s.turn_index, s.box, _colour(k)) for k, s in enumerate(view.sub_instructions) if s.box is not None]


def _legend(view: Any, corrections: dict[int, list[float]]) -> str:
    rows = []
    for k, sub in enumerate(view.sub_instructions):
        colour = _colour(k)
        if sub.box is None:
            note = "no box"
        else:
            note = "box [" + ", ".join(f"{v:.2f}" for v in sub.box) + "]" + (f" from {esc(sub.box_source)}"
                                                                            if sub.box_source else "")
        corrected = corrections.get(sub.turn_index)
        corr_text = ("corrected box: [" + ", ".join(f"{v:.3f}" for v in corrected) + "]") if corrected else ""
        rows.append(
            f'<li class="mcie-sub" data-turn="{int(sub.turn_index)}" data-color="{colour}">'
            f'<span class="mcie-swatch" style="border-color:{colour}" title="colour of its box"></span>'
            f'<span><span class="mcie-op">{esc(sub.operation)}</span>'
            f'<span class="mcie-sub-text">{esc(sub.text)}</span>'
            f'<span class="mcie-box-note">turn {int(sub.turn_index)} · {note}</span>'
            f'<span class="mcie-corr-text" data-turn="{int(sub.turn_index)}">{corr_text}</span></span>'
            f'<span class="mcie-sub-actions"><button type="button" data-mcie-redraw="{int(sub.turn_index)}" '
            f'title="drag a rectangle on the target to correct this box">redraw box</button>'
            f'<button type="button" data-mcie-clear="{int(sub.turn_index)}" title="drop the correction">reset</button>'
            "</span></li>"
        )
    return f'<ol class="mcie-subs" aria-label="sub-instructions">{"".join(rows)}</ol>'


def _step_boxes(view: Any, index: int) -> list[tuple[int, Sequence[float], str]]:
    """Boxes drawn on step ``index``: all of them on the source and the target, the turn's own on an intermediate."""
    boxes = _sub_boxes(view)
    if index == 0 or index == len(view.steps) - 1:
        return boxes
    turn = view.first_turn + index - 1
    return [b for b in boxes if b[0] == turn]


def _strip(view: Any) -> str:
    figures = []
    for index, (label, sha) in enumerate(view.steps):
        figures.append(
            f'<figure class="mcie-step">{framed_image(sha, STRIP_SIZE, label, _step_boxes(view, index))}'
            f"<figcaption>{esc(label)}</figcaption></figure>"
        )
    return f'<div class="mcie-strip">{"".join(figures)}</div>'


def _compare(view: Any) -> str:
    source, target = view.steps[0][1], view.steps[-1][1]
    return (
        '<div class="mcie-panel"><h3>Before / after (drag the slider, or press t)</h3>'
        '<div class="mcie-compare" style="--pos:50%"><div class="mcie-compare-stage">'
        f'<img src="{thumb_url(source, PANEL_SIZE)}" data-full="{full_url(source)}" alt="source" draggable="false">'
        f'<img class="mcie-after" src="{thumb_url(target, PANEL_SIZE)}" data-full="{full_url(target)}" alt="target" '
        'draggable="false"><span class="mcie-divider"></span>'
        '<span class="mcie-tag mcie-tag-before">source</span><span class="mcie-tag mcie-tag-after">target</span></div>'
        '<input type="range" min="0" max="100" value="50" aria-label="before/after position"></div></div>'
    )


def _draw_panel(view: Any, corrections: dict[int, list[float]]) -> str:
    colours = {s.turn_index: _colour(k) for k, s in enumerate(view.sub_instructions)}
    corrected = [(t, b, colours.get(t, "#000")) for t, b in corrections.items()]
    extra = "".join(
        f'<rect x="{b[0]:.4f}" y="{b[1]:.4f}" width="{b[2] - b[0]:.4f}" height="{b[3] - b[1]:.4f}" class="mcie-corr" '
        f'data-turn="{int(t)}" vector-effect="non-scaling-stroke" style="stroke:{c}"/>'
        for t, b, c in corrected
    )
    target = view.steps[-1][1]
    return (
        '<div class="mcie-panel"><h3>Target with the boxes (click for full size)</h3>'
        '<span id="mcie-draw-label"></span>'
        f'<div class="mcie-draw">{framed_image(target, PANEL_SIZE, "target with boxes", _sub_boxes(view), extra)}</div>'
        "</div>"
    )


def render_verdict(view: Any, *, visible: bool) -> str:
    if not visible:
        return (
            '<div class="mcie-verdict mcie-verdict-hidden">The MLLM\'s verdict is shown after you submit, so that it '
            "does not steer your answer.</div>"
        )
    if view.mllm_verdict is None:
        return '<div class="mcie-verdict">MLLM verdict: none recorded for this sample.</div>'
    reason = f" - {esc(view.mllm_reason)}" if view.mllm_reason else ""
    return f'<div class="mcie-verdict">MLLM verdict: <b>{esc(view.mllm_verdict)}</b>{reason}</div>'


def render_sample(
    view: Any,
    *,
    show_mllm: bool,
    mode: str = "review",
    banner: str | None = None,
    corrections: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The whole sample view; ``mode`` is ``review`` (a leased sample) or ``revise`` (a past review reopened)."""
    corr = {int(c["turn_index"]): [float(v) for v in c["box"]] for c in (corrections or [])}
    key = f"{mode}-{int(view.sample_id)}-{secrets.token_hex(4)}"
    flagged = ""
    if view.flagged:
        flagged = f'<div class="mcie-flagged">Flagged for a lead: {esc(view.flag_reason or "")}</div>'
    top = f'<div class="mcie-revise-banner">{esc(banner)}</div>' if banner else ""
    n = len(view.sub_instructions)
    return (
        f'<div class="mcie-sample" data-sample-key="{esc(key)}" data-mode="{esc(mode)}" '
        f'data-sample-id="{int(view.sample_id)}">{top}'
        f"<h2>Sample {int(view.sample_id)}</h2>"
        f'<div class="mcie-meta">{n} sub-instruction{"s" if n != 1 else ""} · turns {int(view.first_turn)}-'
        f"{int(view.last_turn)} of {esc(view.dataset)} / {esc(view.external_id)}</div>{flagged}"
        f'<div class="mcie-instruction" id="mcie-instruction">{esc(view.instruction)}</div>'
        f"{_legend(view, corr)}{_strip(view)}"
        f'<div class="mcie-panels">{_compare(view)}{_draw_panel(view, corr)}</div>'
        f"{render_verdict(view, visible=show_mllm)}</div>"
    )
