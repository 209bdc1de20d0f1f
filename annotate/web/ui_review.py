"""The reviewer's screen (Gradio, mounted at ``/review``): one sample at a time, answered with the keyboard.

What a reviewer sees: the complex instruction and its sub-instructions (each with its colour, operation and box), the
source, every intermediate result and the target side by side (thumbnails from ``/thumb``, click for full size from
``/img``), a before/after slider of source and target, and the target with every box drawn on it, where a box can be
corrected by dragging. The MLLM's verdict stays hidden until the review is submitted unless the project setting
``show_mllm_verdict_before_submit`` says otherwise. Next to it: the three questions with a rubric for every level,
a comment box, Submit / Skip / Flag, the shortcuts, and the reviewer's progress. A second tab lists their reviews;
selecting one reopens it for revision.

"Preview edit" (key ``p``) asks MCIE-E1 for its edit of the sample on screen (:mod:`annotate.previews`): the job runs
in the server's preview worker, a Gradio timer polls its state ("queued", "running", the error) until the result is
shown beside the target; a preview made before (same sample, model version, seed, parameters) is shown as soon as the
sample is. Without a configured model the button is disabled and says why.

Flow: the sample on screen and the next one are both leased (``next_sample(..., exclude=[current])``); the next
one's HTML is rendered ahead and its thumbnails warm the browser cache, so after Submit the screen changes at once -
but only after ``submit_review`` returned (the review is committed). A refused or failed submit keeps the answers
on screen and says why. All data text is escaped; the page's JavaScript (``static/review.js``) only drives Gradio's
own controls.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gradio as gr
import pandas as pd

from mcie.annotate import previews, queue
from mcie.annotate.project import get_project_config
from mcie.annotate.reviews import (
    Answer,
    flag_sample,
    reviewer_history,
    reviewer_progress,
    reviewer_review,
    revise_review,
    sample_view,
    skip_sample,
    submit_review,
)
from mcie.annotate.web.auth import WebUser
from mcie.annotate.web.common import esc, render_topbar, review_page_assets, reviewer_of
from mcie.annotate.web.sample_html import PANEL_SIZE, STRIP_SIZE, framed_image, render_sample, thumb_url
from mcie.config import Settings
from mcie.db.session import session_scope

log = logging.getLogger(__name__)

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), strongest first.
HISTORY_PAGE = 25
PREVIEW_POLL_S = 2.0

CONSISTENCY_CHOICES = [("Yes (y)", "yes"), ("No (n)", "no")]
CONSISTENCY_RUBRIC = (
    ("y", "Yes", "Every sub-instruction was carried out in the target, on the right object or region, and no "
     "sub-instruction undoes, contradicts or re-edits what another one did."),
    ("n", "No", "At least one sub-instruction is missing, done wrong or on the wrong object, or two "
     "sub-instructions conflict (the same object edited twice, a later edit undoing an earlier one)."),
)
QUALITY_RUBRIC = (
    (1, "Broken", "Unusable: corrupted or garbled image, unrecognisable edits, severe artifacts everywhere."),
    (2, "Poor", "Obvious artifacts seen at once: seams, smears, melted or duplicated objects, wrong lighting."),
    (3, "Acceptable", "Edits recognisable but flawed on a closer look: blurry or soft regions, visible seams, "
     "colour or perspective mismatch."),
    (4, "Good", "Clean, natural edits; only minor flaws at full size; untouched regions preserved."),
    (5, "Flawless", "Photo-realistic and artifact-free at full size; edits blend in lighting, perspective and texture; "
     "untouched regions identical."),
)
COMPLEXITY_RUBRIC = (
    (1, "Trivial", "One small tweak to a single object (a colour, a small removal); the scene is otherwise unchanged."),
    (2, "Simple", "Two independent edits, or one larger edit, on separate objects; nothing interacts."),
    (3, "Moderate", "Several edits on different objects or regions, each straightforward; little interaction."),
    (4, "Complex", "Several edits across the scene that interact (placement relative to other objects, consistent "
     "lighting or style) or mix add, remove and change."),
    (5, "Very complex", "Many interacting edits across the whole scene (objects, attributes, layout, background) "
     "that must be reasoned about together."),
)
QUICK_SKIP_REASONS = ("Cannot judge: images too small or unclear", "Not my expertise", "Images did not load")
QUICK_FLAG_REASONS = ("Broken or missing image", "Offensive or unsafe content", "Instruction does not match images")
HISTORY_COLUMNS = ["review", "sample", "updated (UTC)", "consistent", "quality", "complexity", "revision",
                   "instruction", "comment"]


# ----------------------------------------------------------------------------------------------------------
# the sample on screen (what the gr.State holds)


@dataclass
class Card:
    """A leased sample ready to show: its pre-rendered HTML and the images to warm the cache with."""

    sample_id: int
    assignment_id: int
    purpose: str
    html: str
    images: list[str]
    first_turn: int
    last_turn: int
    mllm: tuple[str | None, str | None]
    shown_at: float = 0.0


def _new_screen() -> dict[str, Any]:
    return {"current": None, "next": None, "revise": None}


# ----------------------------------------------------------------------------------------------------------
# rendering the screen's other parts (the sample itself: annotate.web.sample_html)


def render_empty(message: str) -> str:
    body = f'<div class="mcie-empty">{esc(message)}</div>'
    return f'<div class="mcie-sample" data-sample-key="empty-{secrets.token_hex(4)}" data-mode="empty">{body}</div>'


def render_prefetch(images: Sequence[str]) -> str:
    """Hidden images that warm the browser cache with the next sample's thumbnails."""
    tags = [f'<img src="{thumb_url(sha, STRIP_SIZE)}" alt="" loading="eager">' for sha in images]
    if images:
        tags += [f'<img src="{thumb_url(sha, PANEL_SIZE)}" alt="" loading="eager">' for sha in (images[0], images[-1])]
    return f'<div aria-hidden="true">{"".join(tags)}</div>'


def render_progress(progress: Any, held: int = 0) -> str:
    """Done today, done in total, and what is left for this reviewer: the pool they may still get plus the ``held``
    samples already leased to them (the one on screen and the prefetched next one)."""
    left = int(progress.queue_left) + int(held)
    return (
        '<div class="mcie-progress" id="mcie-progress">'
        f'<span class="mcie-stat"><b id="done-today">{int(progress.done_today)}</b> done today</span>'
        f'<span class="mcie-stat"><b id="done-total">{int(progress.done_total)}</b> in total</span>'
        f'<span class="mcie-stat"><b id="queue-left">{left}</b> left for you</span></div>'
    )


def render_status(message: str, *, error: bool = False) -> str:
    if not message:
        return ""
    return f'<div class="{"mcie-error" if error else "mcie-ok"}" role="status">{esc(message)}</div>'


def render_preview(
    sample_id: int | None,
    target: str | None,
    status: Any = None,
    *,
    note: str = "",
    error: bool = False,
    off: str | None = None,
) -> str:
    """The preview panel: the target and, beside it, the model's edit when it is done, else the job's state (queued,
    running, failed with its error) or how to ask for one; ``off`` explains why previews are unavailable."""
    if off:
        return (f'<div class="mcie-preview mcie-preview-empty"><span class="mcie-preview-off">{esc(off)}</span>'
                "</div>")
    if sample_id is None:
        return '<div class="mcie-preview mcie-preview-empty"></div>'
    state = "none" if status is None else str(status.status)
    if status is None:
        slot = ('<div class="mcie-preview-wait">No preview yet: press <kbd>p</kbd> (or "Preview edit") to see what '
                "the model makes of this sample.</div>")
    elif state == "done" and status.image:
        slot = framed_image(status.image, STRIP_SIZE, "model preview", [])
    elif state == "queued":
        ahead = f" ({int(status.ahead)} job{'s' if status.ahead != 1 else ''} ahead)" if status.ahead else ""
        slot = f'<div class="mcie-preview-wait" role="status">Queued{esc(ahead)}…</div>'
    elif state == "running":
        slot = ('<div class="mcie-preview-wait" role="status">Running the model… (the first preview also loads '
                "it)</div>")
    else:
        slot = (f'<div class="mcie-error" role="alert">The preview failed: {esc(status.error or "unknown error")}. '
                "Press p to try again.</div>")
    caption = "model preview"
    if status is not None:
        steps = (status.params or {}).get("num_inference_steps")
        caption = (f"MCIE-E1 {esc(status.model_version)} · seed {int(status.seed)}"
                   + (f" · {int(steps)} steps" if steps else "") + (" · from the cache" if status.cached else ""))
    target_fig = ""
    if target:
        target_fig = f'<figure>{framed_image(target, STRIP_SIZE, "target", [])}<figcaption>target</figcaption></figure>'
    notice = render_status(note, error=error) if note else ""
    return (
        f'<div class="mcie-preview" data-sample-id="{int(sample_id)}" data-state="{esc(state)}">{notice}'
        f'<div class="mcie-preview-pair">{target_fig}<figure>{slot}<figcaption>{caption}</figcaption></figure></div>'
        "</div>"
    )


def _yes_no(value: bool | None) -> str:
    return "yes" if value else "no"


def render_last(sample_id: int, answer: Any, mllm: tuple[str | None, str | None], revision: int) -> str:
    verdict, reason = mllm
    said = (
        f"consistent {_yes_no(answer.consistent)}, quality {int(answer.quality)}, complexity {int(answer.complexity)}"
    )
    mllm_text = "no MLLM verdict recorded" if verdict is None else f"MLLM verdict: <b>{esc(verdict)}</b>" + (
        f" - {esc(reason)}" if reason else "")
    rev = f" (revision {int(revision)})" if revision > 1 else ""
    return f'<div class="mcie-last">Saved sample {int(sample_id)}{rev}: {said}. {mllm_text}</div>'


def _rubric(rows: Sequence[tuple[Any, str, str]], keys: str) -> str:
    """The rubric of one question: every level with its meaning, in a block the reviewer can fold away."""
    items = "".join(f"<li><b>{esc(v)} {esc(name)}</b>: {esc(text)}</li>" for v, name, text in rows)
    return (
        f'<details class="mcie-rubric-box" open><summary>Rubric (keys {esc(keys)})</summary>'
        f'<ul class="mcie-rubric">{items}</ul></details>'
    )


KEYS_HTML = (
    '<div class="mcie-keys"><div id="mcie-active-question">Next digit sets IMAGE QUALITY</div>'
    "<kbd>y</kbd>/<kbd>n</kbd> consistent · <kbd>1</kbd>-<kbd>5</kbd> quality, then complexity · "
    "<kbd>Backspace</kbd> back to quality · <kbd>Enter</kbd> submit · <kbd>s</kbd> skip · <kbd>f</kbd> flag · "
    "<kbd>c</kbd> comment · <kbd>t</kbd> before/after · <kbd>p</kbd> preview edit · <kbd>Esc</kbd> leave a text box, "
    "cancel"
    '<div id="mcie-hint" aria-live="polite"></div></div>'
)


def _reason_panel_html() -> str:
    skip = "".join(f'<button type="button" data-mcie-reason="{esc(r)}">{esc(r)}</button>' for r in QUICK_SKIP_REASONS)
    flag = "".join(f'<button type="button" data-mcie-reason="{esc(r)}">{esc(r)}</button>' for r in QUICK_FLAG_REASONS)
    return (
        '<div><b id="mcie-reason-title"></b><div class="mcie-quick-reasons">'
        f'<span class="mcie-quick-skip">{skip}</span><span class="mcie-quick-flag">{flag}</span>'
        '<button type="button" id="reason-cancel">Cancel (Esc)</button></div></div>'
    )


# ----------------------------------------------------------------------------------------------------------
# answers from the form


def parse_corrections(text: str | None) -> list[dict[str, Any]] | None:
    """The box-corrections field (JSON list of {"turn_index", "box"}) as a list, None when empty.

    Only the shape is checked here; :func:`annotate.reviews.validate_answer` checks turns and ranges."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the box corrections are not valid JSON ({exc.msg}, at character {exc.pos})") from None
    if not isinstance(value, list):
        raise ValueError('the box corrections must be a JSON list like [{"turn_index": 2, "box": [x0, y0, x1, y1]}]')
    return value or None


def build_answer(
    consistent: str | None, quality: Any, complexity: Any, comment: str | None, boxes: str | None
) -> Answer:
    """An :class:`annotate.reviews.Answer` from the form, or ValueError naming what is missing or wrong."""
    missing = [name for name, v in (("consistency (y/n)", consistent), ("quality (1-5)", quality),
                                    ("complexity (1-5)", complexity)) if v in (None, "")]
    if missing:
        raise ValueError("Please answer " + ", ".join(missing) + " first.")
    return Answer(
        consistent=consistent == "yes",
        quality=int(quality),
        complexity=int(complexity),
        comment=(comment or "").strip() or None,
        box_corrections=parse_corrections(boxes),
    )


# ----------------------------------------------------------------------------------------------------------
# talking to the service layer


def _show_mllm(url: str) -> bool:
    with session_scope(url) as session:
        return get_project_config(session).show_mllm_verdict_before_submit


def card_for(url: str, lease: Any, *, show_mllm: bool) -> Card:
    with session_scope(url) as session:
        view = sample_view(session, lease.sample_id)
    return Card(
        sample_id=lease.sample_id,
        assignment_id=lease.assignment_id,
        purpose=str(lease.purpose),
        html=render_sample(view, show_mllm=show_mllm),
        images=[sha for _, sha in view.steps],
        first_turn=view.first_turn,
        last_turn=view.last_turn,
        mllm=(view.mllm_verdict, view.mllm_reason),
    )


def lease_card(url: str, user_id: int, exclude: Sequence[int] = ()) -> Card | None:
    """Lease (or get back) a sample for the user and render it; None when their queue is empty."""
    with session_scope(url, write=True) as session:  # committed before the view is read: a broken view keeps it
        lease = queue.next_sample(session, user_id, exclude=list(exclude))
    if lease is None:
        return None
    return card_for(url, lease, show_mllm=_show_mllm(url))


def _progress_html(url: str, user_id: int, screen: dict[str, Any]) -> str:
    held = sum(1 for key in ("current", "next") if screen.get(key) is not None)
    with session_scope(url) as session:
        progress = reviewer_progress(session, user_id)
    return render_progress(progress, held)


def history_frame(url: str, user_id: int, offset: int) -> tuple[pd.DataFrame, list[int]]:
    """One page of the user's reviews as a table (text shown as plain text) and the review ids of its rows."""
    with session_scope(url) as session:
        rows = reviewer_history(session, user_id, limit=HISTORY_PAGE, offset=offset)
    table = [
        [r.review_id, r.sample_id, r.updated_at.strftime("%Y-%m-%d %H:%M"), _yes_no(r.consistent), r.quality,
         r.complexity, r.revision, _clip(r.instruction, 90), _clip(r.comment or "", 60)]
        for r in rows
    ]
    return pd.DataFrame(table, columns=HISTORY_COLUMNS), [r.review_id for r in rows]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _own_review(url: str, user_id: int, review_id: int) -> Any:
    with session_scope(url) as session:
        row = reviewer_review(session, user_id, review_id)
    if row is None:
        raise gr.Error(f"Review {review_id} is not one of yours.")
    return row


# ----------------------------------------------------------------------------------------------------------
# the Blocks


@dataclass
class Widgets:
    """The components event handlers read and write."""

    screen: Any
    hist: Any
    topbar: Any
    sample: Any
    prefetch: Any
    progress: Any
    status: Any
    last: Any
    consistent: Any
    quality: Any
    complexity: Any
    comment: Any
    boxes: Any
    reason: Any
    cancel_revise: Any
    history: Any
    history_info: Any
    tabs: Any
    preview: Any = None
    preview_job: Any = None
    preview_timer: Any = None
    form: Any = None  # the questions, rubrics and buttons: hidden while there is no sample to answer
    preview_box: Any = None

    def answers(self) -> list[Any]:
        return [self.consistent, self.quality, self.complexity, self.comment, self.boxes]

    def screen_outputs(self) -> list[Any]:
        """What the review tab's events change (never the history's state: see :class:`ReviewApp`)."""
        return [
            self.screen, self.topbar, self.sample, self.prefetch, self.progress, self.status, self.last,
            self.consistent, self.quality, self.complexity, self.comment, self.boxes, self.reason,
            self.cancel_revise, self.form, self.preview_box, *self.preview_outputs(),
        ]

    def preview_outputs(self) -> list[Any]:
        return [self.preview, self.preview_job, self.preview_timer]

    def history_outputs(self) -> list[Any]:
        return [self.hist, self.history, self.history_info]


def _answerable(w: Widgets, shown: bool) -> dict[Any, Any]:
    """Show the answer form and the preview box only while a sample is on screen (an empty queue shows its message
    and nothing to click)."""
    return {w.form: gr.update(visible=shown), w.preview_box: gr.update(visible=shown)}


def _cleared(w: Widgets) -> dict[Any, Any]:
    return {w.consistent: None, w.quality: None, w.complexity: None, w.comment: "", w.boxes: "", w.reason: ""}


def _new_history() -> dict[str, Any]:
    return {"offset": 0, "ids": []}


class ReviewApp:
    """Event handlers of the review screen, bound to one database.

    Every handler that changes the screen answers in one response: the committed review, the next sample (already
    leased and rendered) and the one after it, leased and rendered now so that its thumbnails load in the background
    while the reviewer looks at the new sample. One response per event means no second, concurrent event can
    overwrite the screen state; the history tab keeps its own state for the same reason.
    """

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.settings = settings
        self.w: Widgets
        # previews: off (with the reason) when no editing model is configured; the seed and parameters the button uses
        self.preview_off = previews.unavailable_reason(settings)
        self.preview_seed = 0
        self.preview_params: dict[str, Any] | None = None

    # --- showing samples ------------------------------------------------------------------------------------
    def _show(self, screen: dict[str, Any], card: Card | None) -> dict[Any, Any]:
        w = self.w
        if card is None:
            screen["current"] = None
            return {w.sample: render_empty("Your queue is empty - thank you! New samples appear here when they are "
                                           "ready; reload the page later."), w.prefetch: ""} | self._preview_of(
                None
            ) | _answerable(w, False)
        card.shown_at = time.time()
        screen["current"] = asdict(card)
        shown = {w.sample: card.html} | _answerable(w, True)
        return shown | self._preview_of(card.sample_id, card.images[-1] if card.images else None)

    def _prefetch(self, screen: dict[str, Any], user: WebUser) -> dict[Any, Any]:
        """Lease and render the sample after the current one; its thumbnails warm the browser cache."""
        w = self.w
        current = screen.get("current")
        screen["next"] = None
        if current is None:
            return {w.prefetch: ""}
        try:
            card = lease_card(self.url, user.id, exclude=[current["sample_id"]])
        except Exception:  # a failed prefetch only costs speed: the next submit leases synchronously
            log.exception("prefetch failed for user %s", user.id)
            card = None
        screen["next"] = None if card is None else asdict(card)
        return {w.prefetch: render_prefetch(card.images) if card else ""}

    def _advance(self, screen: dict[str, Any], user: WebUser) -> dict[Any, Any]:
        """Show the prefetched sample (or lease one now), then prefetch the one after it."""
        nxt = screen.get("next")
        card = Card(**{**nxt, "mllm": tuple(nxt["mllm"])}) if nxt is not None else lease_card(self.url, user.id)
        out = self._show(screen, card)
        return out | self._prefetch(screen, user) | {self.w.progress: _progress_html(self.url, user.id, screen)}

    def _page(self, hist: dict[str, Any], user: WebUser) -> dict[Any, Any]:
        offset = int(hist.get("offset", 0))
        frame, ids = history_frame(self.url, user.id, offset)
        hist = {"offset": offset, "ids": ids}
        info = "No reviews yet."
        if ids:
            info = f"Reviews {offset + 1}-{offset + len(ids)}, last changed first. Select a row to revise it."
        return {self.w.hist: hist, self.w.history: frame, self.w.history_info: info}

    # --- events ---------------------------------------------------------------------------------------------
    def on_load(self, request: gr.Request) -> dict[Any, Any]:
        user = reviewer_of(self.url, request)
        w = self.w
        screen = _new_screen()
        out = {w.topbar: render_topbar(user), w.status: "", w.last: "", w.cancel_revise: gr.update(visible=False)}
        try:
            out |= self._show(screen, lease_card(self.url, user.id)) | self._prefetch(screen, user)
        except Exception as exc:
            log.exception("could not lease a sample for user %s", user.id)
            out |= {w.sample: render_empty(f"Could not get a sample: {exc}")} | _answerable(w, False)
        return out | _cleared(w) | {w.screen: screen, w.progress: _progress_html(self.url, user.id, screen)}

    def on_submit(
        self, screen: dict[str, Any], consistent, quality, complexity, comment, boxes, request: gr.Request
    ) -> dict[Any, Any]:
        """Commit the review, then move on; a refused or failed submit changes nothing but the status line."""
        user = reviewer_of(self.url, request)
        if screen.get("revise"):
            return self._save_revision(screen, user, consistent, quality, complexity, comment, boxes)
        current = screen.get("current")
        w = self.w
        if current is None:
            return {w.status: render_status("There is no sample on screen to submit.", error=True)}
        try:
            answer = build_answer(consistent, quality, complexity, comment, boxes)
            record = self._submit(user, current, answer)
        except (ValueError, PermissionError) as exc:  # ReviewError is a ValueError: keep the answers, say why
            return {w.status: render_status(str(exc), error=True)}
        except Exception as exc:
            log.exception("submit failed for user %s sample %s", user.id, current["sample_id"])
            return {w.status: render_status(f"Could not save your review ({type(exc).__name__}); your answers are "
                                            "kept - please press Enter again.", error=True)}
        out = self._advance(screen, user) | _cleared(w)
        return out | {
            w.status: render_status(f"Saved your review of sample {record.sample_id}."),
            w.last: render_last(record.sample_id, answer, tuple(current["mllm"]), record.revision),
            w.screen: screen,
        }

    def _submit(self, user: WebUser, current: dict[str, Any], answer: Answer) -> Any:
        spent = max(0.0, time.time() - float(current.get("shown_at") or time.time()))
        with session_scope(self.url, write=True) as session:  # commits before the screen moves on
            return submit_review(session, user.id, current["sample_id"], answer, time_spent_s=round(spent, 1))

    def on_skip(self, screen: dict[str, Any], reason: str, request: gr.Request) -> dict[Any, Any]:
        user = reviewer_of(self.url, request)
        w = self.w
        current = screen.get("current")
        if screen.get("revise") or current is None:
            return {w.status: render_status("Only a sample from your queue can be skipped.", error=True)}
        try:
            with session_scope(self.url, write=True) as session:
                skip_sample(session, user.id, current["sample_id"], reason or "")
        except (ValueError, PermissionError) as exc:
            return {w.status: render_status(str(exc), error=True)}
        out = self._advance(screen, user) | _cleared(w)
        return out | {w.status: render_status(f"Skipped sample {current['sample_id']}."), w.screen: screen}

    def on_flag(self, screen: dict[str, Any], reason: str, request: gr.Request) -> dict[Any, Any]:
        user = reviewer_of(self.url, request)
        w = self.w
        target = screen.get("revise") or screen.get("current")
        if target is None:
            return {w.status: render_status("There is no sample on screen to flag.", error=True)}
        try:
            with session_scope(self.url, write=True) as session:
                flag_sample(session, user.id, target["sample_id"], reason or "")
        except (ValueError, PermissionError) as exc:
            return {w.status: render_status(str(exc), error=True)}
        return {
            w.reason: "",
            w.status: render_status(f"Flagged sample {target['sample_id']} for a lead. You can still answer it, or "
                                    "skip it with s."),
        }

    # --- history and revisions ------------------------------------------------------------------------------
    def on_history(self, hist: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        """The history tab was opened: show the current page again (it may have changed)."""
        return self._page(hist or _new_history(), reviewer_of(self.url, request))

    def on_history_page(self, hist: dict[str, Any], step: int, request: gr.Request) -> dict[Any, Any]:
        user = reviewer_of(self.url, request)
        hist = hist or _new_history()
        offset = int(hist.get("offset", 0))
        if step < 0 or len(hist.get("ids", [])) == HISTORY_PAGE:  # no page past the last one
            offset = max(0, offset + step * HISTORY_PAGE)
        return self._page({"offset": offset, "ids": []}, user)

    def on_newer(self, hist: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        return self.on_history_page(hist, -1, request)

    def on_older(self, hist: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        return self.on_history_page(hist, 1, request)

    def on_reopen(
        self, screen: dict[str, Any], hist: dict[str, Any], consistent, quality, complexity, comment, boxes,
        evt: gr.SelectData, request: gr.Request,
    ) -> dict[Any, Any]:
        user = reviewer_of(self.url, request)
        ids = (hist or {}).get("ids", [])
        row_index = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if not isinstance(row_index, int) or not 0 <= row_index < len(ids):
            return {}
        stash = [consistent, quality, complexity, comment, boxes]
        return self.reopen(screen, user, ids[row_index], stash=stash)

    def reopen(
        self, screen: dict[str, Any], user: WebUser, review_id: int, *, stash: list[Any] | None = None
    ) -> dict[Any, Any]:
        """Put a past review of the user on screen for revision, its answers filled in; ``stash`` keeps what was
        answered so far on the current sample, put back when the revision is saved or cancelled."""
        w = self.w
        if screen.get("revise"):  # reopening another review while revising: keep the first stash
            stash = screen["revise"].get("stash")
        row = _own_review(self.url, user.id, review_id)
        with session_scope(self.url) as session:
            view = sample_view(session, row.sample_id)
        banner = (f"Revising your review {row.review_id} of sample {row.sample_id} (now revision {row.revision}; "
                  f"saving makes revision {row.revision + 1}). Enter saves, Esc cancels.")
        screen["revise"] = {"review_id": row.review_id, "sample_id": row.sample_id, "revision": row.revision,
                            "shown_at": time.time(), "mllm": [view.mllm_verdict, view.mllm_reason], "stash": stash,
                            "target": view.steps[-1][1]}
        html_text = render_sample(view, show_mllm=True, mode="revise", banner=banner, corrections=row.box_corrections)
        return {
            w.screen: screen,
            w.sample: html_text,
            **_answerable(w, True),
            w.consistent: _yes_no(row.consistent),
            w.quality: row.quality,
            w.complexity: row.complexity,
            w.comment: row.comment or "",
            w.boxes: json.dumps(row.box_corrections) if row.box_corrections else "",
            w.cancel_revise: gr.update(visible=True),
            w.status: render_status(f"Review {row.review_id} reopened."),
            w.tabs: gr.Tabs(selected="review"),
        } | self._preview_of(row.sample_id, view.steps[-1][1])

    def _save_revision(
        self, screen: dict[str, Any], user: WebUser, consistent: str | None, quality: Any, complexity: Any,
        comment: str | None, boxes: str | None,
    ) -> dict[Any, Any]:
        w = self.w
        revise = screen["revise"]
        try:
            answer = build_answer(consistent, quality, complexity, comment, boxes)
            spent = max(0.0, time.time() - float(revise["shown_at"]))
            with session_scope(self.url, write=True) as session:
                record = revise_review(session, user.id, revise["review_id"], answer, time_spent_s=round(spent, 1))
        except (ValueError, PermissionError) as exc:
            return {w.status: render_status(str(exc), error=True)}
        except Exception as exc:
            log.exception("revision failed for user %s review %s", user.id, revise["review_id"])
            return {w.status: render_status(f"Could not save the revision ({type(exc).__name__}); your answers are "
                                            "kept.", error=True)}
        out = self._leave_revision(screen, user)
        out[w.status] = render_status(f"Saved revision {record.revision} of your review of sample {record.sample_id}.")
        out[w.last] = render_last(record.sample_id, answer, tuple(revise["mllm"]), record.revision)
        return out

    def _leave_revision(self, screen: dict[str, Any], user: WebUser) -> dict[Any, Any]:
        """Back to the sample from the queue, with the answers it had before the revision was opened."""
        w = self.w
        stash = (screen.get("revise") or {}).get("stash")
        screen["revise"] = None
        current = screen.get("current")
        if current is not None:
            current["shown_at"] = time.time()  # the time spent revising is not counted for the current sample
        body = current["html"] if current else render_empty("Your queue is empty - thank you!")
        out = {w.screen: screen, w.sample: body, w.cancel_revise: gr.update(visible=False)} | _cleared(w)
        out |= _answerable(w, current is not None)
        out |= self._preview_of(*_on_screen(screen))
        if stash and current is not None:
            out |= dict(zip(w.answers(), stash, strict=True))
        return out

    def on_cancel_revise(self, screen: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        user = reviewer_of(self.url, request)
        if not screen.get("revise"):
            return {}
        return self._leave_revision(screen, user) | {self.w.status: render_status("Revision cancelled.")}

    # --- previews -------------------------------------------------------------------------------------------
    def _preview_out(self, sample_id: int | None, target: str | None, status: Any = None, *, note: str = "",
                     error: bool = False) -> dict[Any, Any]:
        """The panel for ``status``; while the job is queued or running, the timer polls it."""
        w = self.w
        pending = status is not None and status.pending
        job = {"preview_id": status.id, "sample_id": sample_id, "target": target} if pending else None
        return {
            w.preview: render_preview(sample_id, target, status, note=note, error=error, off=self.preview_off),
            w.preview_job: job,
            w.preview_timer: gr.Timer(active=pending),
        }

    def _preview_of(self, sample_id: int | None, target: str | None = None) -> dict[Any, Any]:
        """What the panel shows when a sample appears: its existing preview (done or on its way), read from the
        table only - the model never runs here."""
        if sample_id is None or self.preview_off:
            return self._preview_out(sample_id, target)
        try:
            version = previews.current_version(self.settings)
            with session_scope(self.url) as session:
                status = previews.find_preview(session, sample_id, version, seed=self.preview_seed,
                                               params=self.preview_params)
        except Exception as exc:  # a preview problem must never keep the sample off the screen
            log.exception("could not look up the preview of sample %s", sample_id)
            return self._preview_out(sample_id, target, note=f"Could not look up a preview: {exc}", error=True)
        return self._preview_out(sample_id, target, status)

    def on_preview(self, screen: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        """The "Preview edit" button: queue the model's edit of the sample on screen (a finished one shows at once)."""
        user = reviewer_of(self.url, request)
        sample_id, target = _on_screen(screen)
        if sample_id is None:
            return self._preview_out(None, None)
        if self.preview_off:
            return self._preview_out(sample_id, target)
        try:
            with session_scope(self.url, write=True) as session:
                status = previews.request_preview(session, sample_id, user.id, seed=self.preview_seed,
                                                  params=self.preview_params, settings=self.settings)
        except (ValueError, PermissionError) as exc:  # PreviewError, PreviewUnavailable: say why
            return self._preview_out(sample_id, target, note=str(exc), error=True)
        except Exception as exc:
            log.exception("preview request failed for user %s sample %s", user.id, sample_id)
            return self._preview_out(sample_id, target, note=f"Could not ask for a preview ({type(exc).__name__}).",
                                     error=True)
        return self._preview_out(sample_id, target, status)

    def on_preview_tick(self, screen: dict[str, Any], job: dict[str, Any] | None,
                        request: gr.Request) -> dict[Any, Any]:
        """The timer: show the job's state; stop polling when it is done or failed, or the sample left the screen."""
        reviewer_of(self.url, request)
        w = self.w
        if not job or job.get("sample_id") != _on_screen(screen)[0]:
            return {w.preview_job: None, w.preview_timer: gr.Timer(active=False)}
        try:
            with session_scope(self.url) as session:
                status = previews.preview_status(session, int(job["preview_id"]))
        except Exception as exc:
            return self._preview_out(job["sample_id"], job.get("target"), note=str(exc), error=True)
        return self._preview_out(job["sample_id"], job.get("target"), status)


def _on_screen(screen: dict[str, Any] | None) -> tuple[int | None, str | None]:
    """The sample on screen (the one being revised, else the current one) and its target image."""
    screen = screen or {}
    if screen.get("revise"):
        return int(screen["revise"]["sample_id"]), screen["revise"].get("target")
    current = screen.get("current")
    if current is None:
        return None, None
    images = current.get("images") or []
    return int(current["sample_id"]), images[-1] if images else None


def build(settings: Settings) -> gr.Blocks:
    """The review screen's Blocks (mount it with :func:`page_assets` as ``head``/``css``)."""
    app = ReviewApp(settings)
    with gr.Blocks(title="MCIE review", analytics_enabled=False, fill_width=True) as demo:
        screen = gr.State(_new_screen())
        hist = gr.State(_new_history())
        preview_job = gr.State(None)
        preview_timer = gr.Timer(PREVIEW_POLL_S, active=False)
        topbar = gr.HTML(elem_id="topbar", js_on_load=None)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Review", id="review", elem_id="tab-review"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=520):
                        sample = gr.HTML(render_empty("Loading..."), elem_id="sample-view", js_on_load=None)
                        with gr.Group(elem_id="preview-box") as preview_box:
                            preview_btn = gr.Button(
                                "Preview edit (p)" if not app.preview_off else "Preview edit: no model configured",
                                interactive=not app.preview_off, size="sm", elem_id="preview-btn",
                            )
                            preview = gr.HTML(render_preview(None, None, off=app.preview_off), elem_id="preview-panel",
                                              js_on_load=None)
                    with gr.Column(scale=2, min_width=340):
                        progress = gr.HTML(elem_id="progress", js_on_load=None)
                        status = gr.HTML(elem_id="status", js_on_load=None)
                        last = gr.HTML(elem_id="last-review", js_on_load=None)
                        with gr.Column(elem_id="answer-form") as form:
                            gr.HTML(KEYS_HTML, js_on_load=None)
                            consistent = gr.Radio(CONSISTENCY_CHOICES, label="1. Instruction consistency (y / n)",
                                                  elem_id="q-consistent")
                            gr.HTML(_rubric(CONSISTENCY_RUBRIC, "y/n"), js_on_load=None)
                            quality = gr.Radio([(f"{v} {n}", v) for v, n, _ in QUALITY_RUBRIC],
                                               label="2. Image quality (1-5)", elem_id="q-quality")
                            gr.HTML(_rubric(QUALITY_RUBRIC, "1-5"), js_on_load=None)
                            complexity = gr.Radio([(f"{v} {n}", v) for v, n, _ in COMPLEXITY_RUBRIC],
                                                  label="3. Editing-scenario complexity (1-5)", elem_id="q-complexity")
                            gr.HTML(_rubric(COMPLEXITY_RUBRIC, "1-5"), js_on_load=None)
                            comment = gr.Textbox(label="Comment (optional; c to type, Esc to leave)", lines=2,
                                                 max_length=5000, elem_id="comment")
                            boxes = gr.Textbox(
                                label="Box corrections (optional): use 'redraw box' on a sub-instruction and drag on "
                                'the target, or type JSON like [{"turn_index": 2, "box": [0.1, 0.2, 0.5, 0.6]}]',
                                lines=1, max_length=5000, elem_id="box-corrections",
                            )
                            with gr.Row():
                                submit = gr.Button("Submit (Enter)", variant="primary", elem_id="submit-btn")
                                skip = gr.Button("Skip (s)", elem_id="skip-btn")
                                flag = gr.Button("Flag (f)", elem_id="flag-btn")
                                cancel_revise = gr.Button("Cancel revision (Esc)", visible=False,
                                                          elem_id="cancel-revise-btn")
                            with gr.Group(elem_id="reason-panel"):
                                gr.HTML(_reason_panel_html(), js_on_load=None)
                                reason = gr.Textbox(label="Reason", lines=1, max_length=1000, elem_id="reason-box")
                                skip_confirm = gr.Button("Skip this sample", variant="stop", elem_id="skip-confirm")
                                flag_confirm = gr.Button("Flag this sample", variant="stop", elem_id="flag-confirm")
                prefetch = gr.HTML(elem_id="prefetch", js_on_load=None)
            with gr.Tab("My reviews", id="history", elem_id="tab-history") as history_tab:
                history_info = gr.Markdown(elem_id="history-info")
                history = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, wrap=True, elem_id="history")
                with gr.Row():
                    newer = gr.Button("Newer", elem_id="history-newer")
                    older = gr.Button("Older", elem_id="history-older")
        app.w = w = Widgets(screen, hist, topbar, sample, prefetch, progress, status, last, consistent, quality,
                            complexity, comment, boxes, reason, cancel_revise, history, history_info, tabs,
                            preview=preview, preview_job=preview_job, preview_timer=preview_timer, form=form,
                            preview_box=preview_box)
        outputs = w.screen_outputs()
        quiet = {"show_progress": "hidden"}
        demo.load(app.on_load, inputs=None, outputs=outputs, **quiet)
        submit.click(app.on_submit, [screen, *w.answers()], outputs, trigger_mode="once", show_progress="minimal",
                     show_progress_on=[status])
        skip.click(None, js="() => window.mcie && window.mcie.openReason('skip')")
        flag.click(None, js="() => window.mcie && window.mcie.openReason('flag')")
        skip_confirm.click(app.on_skip, [screen, reason], outputs, trigger_mode="once", **quiet).then(
            None, js="() => window.mcie && window.mcie.afterReason()"
        )
        flag_confirm.click(app.on_flag, [screen, reason], outputs, trigger_mode="once", **quiet).then(
            None, js="() => window.mcie && window.mcie.afterReason()"
        )
        cancel_revise.click(app.on_cancel_revise, [screen], outputs, **quiet)
        history_tab.select(app.on_history, [hist], w.history_outputs(), **quiet)
        history.select(app.on_reopen, [screen, hist, *w.answers()], [*outputs, tabs], **quiet)
        newer.click(app.on_newer, [hist], w.history_outputs(), **quiet)
        preview_btn.click(app.on_preview, [screen], w.preview_outputs(), trigger_mode="once", **quiet)
        preview_timer.tick(app.on_preview_tick, [screen, preview_job], w.preview_outputs(), **quiet)
        older.click(app.on_older, [hist], w.history_outputs(), **quiet)
        demo.queue(default_concurrency_limit=32)
    return demo


def page_assets() -> dict[str, str]:
    """``head`` (the page script) and ``css`` for ``gr.mount_gradio_app`` (Gradio 6 takes them there)."""
    return review_page_assets()
