/* mcie review screen: keyboard shortcuts, box correction drawing, before/after slider, image zoom.

   Loaded once into the page head; every listener is delegated from `document`, so it keeps working when Gradio
   re-renders the sample view. The server owns every answer: this script only clicks Gradio's own radio buttons and
   buttons and writes Gradio's box-corrections textbox (with an `input` event, as if typed).

   Keys (ignored while typing in a text field; Esc leaves the field):
     y / n     instruction consistency yes / no
     1-5       the active score: the first digit sets quality, the next complexity (Backspace: back to quality)
     Enter     submit          s  skip (asks a reason)      f  flag (asks a reason)
     c         comment box     t  toggle before/after       ?  show/hide the key list     Esc  cancel / close
     p         preview edit: ask the model for its edit of the sample (shown beside the target when ready)
*/
(() => {
  "use strict";
  if (window.mcie) return;

  const TYPING = 'textarea, select, [contenteditable=""], [contenteditable="true"], ' +
    'input:not([type=radio]):not([type=checkbox]):not([type=button]):not([type=submit]):not([type=range])' +
    ':not([type=reset]):not([type=file])';
  const QUESTION_TEXT = {
    quality: "Next digit sets IMAGE QUALITY",
    complexity: "Next digit sets SCENARIO COMPLEXITY",
    done: "Both scores set: Enter submits, a digit starts over with quality",
  };
  const state = { active: "quality", sampleKey: null, drawTurn: null, drag: null, reasonMode: null };
  const $ = (selector, root = document) => root.querySelector(selector);
  const body = () => document.body;
  const shown = (el) => !!el && el.getClientRects().length > 0;

  // ------------------------------------------------------------------------------------------------ answers
  function checkedValue(id) {
    const input = $(`#${id} input:checked`) || $(`#${id} input[aria-checked="true"]`);
    return input ? input.value : null;
  }

  function pickRadio(id, value) {
    const input = $(`#${id} input[value="${value}"]`);
    if (!input) return false;
    input.click();
    return true;
  }

  function setActive(question) {
    state.active = question;
    for (const q of ["quality", "complexity", "done"]) body().classList.toggle(`mcie-active-${q}`, q === question);
    const label = $("#mcie-active-question");
    if (label) label.textContent = QUESTION_TEXT[question];
  }

  function onDigit(digit) {
    if (state.active === "complexity") {
      pickRadio("q-complexity", digit);
      setActive("done");
    } else {
      pickRadio("q-quality", digit);
      setActive("complexity");
    }
  }

  function hint(message) {
    const el = $("#mcie-hint");
    if (!el) return;
    el.textContent = message;
    el.classList.add("mcie-hint-on");
    clearTimeout(hint.timer);
    hint.timer = setTimeout(() => el.classList.remove("mcie-hint-on"), 2500);
  }

  function missingAnswers() {
    const missing = [];
    if (!checkedValue("q-consistent")) missing.push("consistency (y/n)");
    if (!checkedValue("q-quality")) missing.push("quality (1-5)");
    if (!checkedValue("q-complexity")) missing.push("complexity (1-5)");
    return missing;
  }

  function submit() {
    const missing = missingAnswers();
    if (missing.length) {
      hint(`Still to answer: ${missing.join(", ")}`);
      return;
    }
    const button = $("#submit-btn");
    if (button && !button.disabled) button.click();
  }

  // ------------------------------------------------------------------------------------------------ skip / flag
  function reasonBox() {
    return $("#reason-box textarea") || $("#reason-box input");
  }

  function openReason(mode) {
    state.reasonMode = mode;
    body().classList.add("mcie-reason-open");
    body().classList.toggle("mcie-reason-skip", mode === "skip");
    body().classList.toggle("mcie-reason-flag", mode === "flag");
    const title = $("#mcie-reason-title");
    if (title) {
      title.textContent = mode === "skip"
        ? "Skip this sample: why? (Enter confirms, Esc cancels)"
        : "Flag this sample for a lead: what is wrong? (Enter confirms, Esc cancels)";
    }
    const box = reasonBox();
    if (box) setTimeout(() => box.focus(), 0);
  }

  function closeReason() {
    state.reasonMode = null;
    body().classList.remove("mcie-reason-open", "mcie-reason-skip", "mcie-reason-flag");
    if (document.activeElement && document.activeElement.closest("#reason-panel")) document.activeElement.blur();
  }

  function confirmReason() {
    const box = reasonBox();
    if (!box || !box.value.trim()) {
      hint("Please give a reason first.");
      return;
    }
    const button = $(state.reasonMode === "flag" ? "#flag-confirm" : "#skip-confirm");
    if (button) button.click();
  }

  function afterReason() {
    // called when the skip/flag event finished: close the panel unless the server reported an error
    if (!$("#status .mcie-error")) closeReason();
  }

  // ------------------------------------------------------------------------------------------------ box correction
  function correctionsBox() {
    return $("#box-corrections textarea") || $("#box-corrections input");
  }

  function readCorrections() {
    const box = correctionsBox();
    if (!box || !box.value.trim()) return [];
    try {
      const parsed = JSON.parse(box.value);
      return Array.isArray(parsed) ? parsed : [];
    } catch (_err) {
      return [];
    }
  }

  function writeCorrections(list) {
    const box = correctionsBox();
    if (!box) return;
    box.value = list.length ? JSON.stringify(list) : "";
    box.dispatchEvent(new Event("input", { bubbles: true }));
    renderCorrections();
  }

  function setCorrection(turn, bbox) {
    const list = readCorrections().filter((c) => Number(c.turn_index) !== turn);
    if (bbox) list.push({ turn_index: turn, box: bbox.map((v) => Math.round(v * 10000) / 10000) });
    list.sort((a, b) => a.turn_index - b.turn_index);
    writeCorrections(list);
  }

  function colourOf(turn) {
    const row = $(`.mcie-sub[data-turn="${turn}"]`);
    return row ? row.dataset.color : "#000";
  }

  function svgRect(svg, cls, turn, b) {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    rect.setAttribute("class", cls);
    rect.setAttribute("data-turn", String(turn));
    rect.setAttribute("x", b[0]);
    rect.setAttribute("y", b[1]);
    rect.setAttribute("width", Math.max(0, b[2] - b[0]));
    rect.setAttribute("height", Math.max(0, b[3] - b[1]));
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    rect.style.stroke = colourOf(turn);
    svg.appendChild(rect);
    return rect;
  }

  function renderCorrections() {
    const corrections = readCorrections();
    document.querySelectorAll(".mcie-draw svg").forEach((svg) => {
      svg.querySelectorAll("rect.mcie-corr").forEach((r) => r.remove());
      for (const c of corrections) {
        if (Array.isArray(c.box) && c.box.length === 4) svgRect(svg, "mcie-corr", Number(c.turn_index), c.box);
      }
    });
    document.querySelectorAll(".mcie-corr-text").forEach((el) => {
      const c = corrections.find((x) => Number(x.turn_index) === Number(el.dataset.turn));
      el.textContent = c && Array.isArray(c.box) ? `corrected box: [${c.box.map((v) => v.toFixed(3)).join(", ")}]` : "";
    });
  }

  function startDraw(turn) {
    state.drawTurn = turn;
    body().classList.add("mcie-drawing");
    const label = $("#mcie-draw-label");
    if (label) label.textContent = `Drag a rectangle on the target for sub-instruction ${turn} (Esc cancels)`;
    const panel = $(".mcie-draw");
    if (panel) panel.scrollIntoView({ block: "nearest" });
  }

  function stopDraw() {
    state.drawTurn = null;
    state.drag = null;
    body().classList.remove("mcie-drawing");
  }

  function pointIn(panel, event) {
    const img = panel.querySelector("img");
    const r = img.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((event.clientX - r.left) / r.width), clamp((event.clientY - r.top) / r.height)];
  }

  function dragBox(a, b) {
    return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  }

  document.addEventListener("pointerdown", (event) => {
    const panel = event.target.closest(".mcie-draw");
    if (!panel || state.drawTurn === null) return;
    event.preventDefault();
    panel.setPointerCapture(event.pointerId);
    const start = pointIn(panel, event);
    const rect = svgRect(panel.querySelector("svg"), "mcie-corr mcie-corr-live", state.drawTurn, [...start, ...start]);
    state.drag = { panel, start, rect };
  });

  document.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    const b = dragBox(state.drag.start, pointIn(state.drag.panel, event));
    state.drag.rect.setAttribute("x", b[0]);
    state.drag.rect.setAttribute("y", b[1]);
    state.drag.rect.setAttribute("width", b[2] - b[0]);
    state.drag.rect.setAttribute("height", b[3] - b[1]);
  });

  document.addEventListener("pointerup", (event) => {
    if (!state.drag) return;
    const { panel, start, rect } = state.drag;
    const b = dragBox(start, pointIn(panel, event));
    rect.remove();
    const turn = state.drawTurn;
    stopDraw();
    if (b[2] - b[0] < 0.01 || b[3] - b[1] < 0.01) {
      hint("That box is too small; click 'redraw' and drag a larger rectangle.");
      return;
    }
    setCorrection(turn, b);
    hint(`Box of sub-instruction ${turn} corrected; it is saved with your review.`);
  });

  // ------------------------------------------------------------------------------------------------ zoom, slider
  function openLightbox(src, alt) {
    let box = $("#mcie-lightbox");
    if (!box) {
      box = document.createElement("div");
      box.id = "mcie-lightbox";
      box.setAttribute("role", "dialog");
      box.appendChild(document.createElement("img"));
      box.addEventListener("click", (e) => {
        if (e.target.tagName === "IMG") box.classList.toggle("mcie-zoomed");
        else closeLightbox();
      });
      document.body.appendChild(box);
    }
    const img = box.querySelector("img");
    img.src = src;
    img.alt = alt || "";
    box.classList.remove("mcie-zoomed");
    box.classList.add("mcie-open");
  }

  function closeLightbox() {
    const box = $("#mcie-lightbox");
    if (box) box.classList.remove("mcie-open");
  }

  function lightboxOpen() {
    const box = $("#mcie-lightbox");
    return !!box && box.classList.contains("mcie-open");
  }

  function setCompare(el, pos) {
    el.style.setProperty("--pos", `${pos}%`);
    const range = el.querySelector("input[type=range]");
    if (range) range.value = String(pos);
  }

  document.addEventListener("input", (event) => {
    const range = event.target.closest(".mcie-compare input[type=range]");
    if (range) setCompare(range.closest(".mcie-compare"), Number(range.value));
    if (event.target.closest("#box-corrections")) renderCorrections();
  });

  document.addEventListener("click", (event) => {
    const t = event.target;
    const redraw = t.closest("[data-mcie-redraw]");
    if (redraw) {
      event.preventDefault();
      redraw.blur(); // keep Enter for Submit
      startDraw(Number(redraw.dataset.mcieRedraw));
      return;
    }
    const clear = t.closest("[data-mcie-clear]");
    if (clear) {
      event.preventDefault();
      clear.blur();
      setCorrection(Number(clear.dataset.mcieClear), null);
      return;
    }
    const quick = t.closest("[data-mcie-reason]");
    if (quick) {
      const box = reasonBox();
      if (box) {
        box.value = quick.dataset.mcieReason;
        box.dispatchEvent(new Event("input", { bubbles: true }));
        box.focus();
      }
      return;
    }
    if (t.closest("#reason-cancel")) {
      closeReason();
      return;
    }
    const zoom = t.closest("img[data-full]");
    if (zoom && state.drawTurn === null) openLightbox(zoom.dataset.full, zoom.alt);
  });

  // ------------------------------------------------------------------------------------------------ preview
  function preview() {
    const button = $("#preview-btn");
    if (button && !button.disabled) {
      button.click();
      hint("Preview asked for; it appears beside the target when ready.");
      return;
    }
    const off = $("#preview-panel .mcie-preview-off");
    hint(off ? off.textContent : "Preview edit is not available here.");
  }

  // A preview panel written for another sample (an answer that arrived after the screen moved on) is hidden.
  function checkPreview() {
    const panel = $("#preview-panel .mcie-preview[data-sample-id]");
    if (!panel) return;
    const root = $("#sample-view .mcie-sample");
    const stale = !root || root.dataset.sampleId !== panel.dataset.sampleId;
    if (panel.classList.contains("mcie-preview-stale") !== stale) panel.classList.toggle("mcie-preview-stale", stale);
  }

  // ------------------------------------------------------------------------------------------------ keys
  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const target = event.target;
    const key = event.key;
    if (target instanceof Element && target.matches(TYPING)) {
      if (target.closest("#reason-box")) {
        if (key === "Enter" && !event.shiftKey) {
          event.preventDefault();
          confirmReason();
        } else if (key === "Escape") {
          event.preventDefault();
          closeReason();
        }
      } else if (key === "Escape") {
        target.blur();
      }
      return; // typing: no shortcuts
    }
    if (!shown($("#sample-view .mcie-sample"))) return; // another tab is open
    if (key === "Escape") {
      if (lightboxOpen()) closeLightbox();
      else if (state.drawTurn !== null) stopDraw();
      else if (state.reasonMode) closeReason();
      else if ($("#cancel-revise-btn") && shown($("#cancel-revise-btn"))) $("#cancel-revise-btn").click();
      return;
    }
    if (lightboxOpen()) return;
    if (key === "Enter" && target instanceof Element && target.closest("button, a, summary")) return;
    const lower = key.length === 1 ? key.toLowerCase() : key;
    let handled = true;
    if (lower === "y") pickRadio("q-consistent", "yes");
    else if (lower === "n") pickRadio("q-consistent", "no");
    else if (/^[1-5]$/.test(key)) onDigit(key);
    else if (key === "Backspace") setActive("quality");
    else if (key === "Enter") submit();
    else if (lower === "s") openReason("skip");
    else if (lower === "f") openReason("flag");
    else if (lower === "p") preview();
    else if (lower === "c") {
      const comment = $("#comment textarea");
      if (comment) comment.focus();
    } else if (lower === "t") {
      const cmp = $(".mcie-compare");
      if (cmp) setCompare(cmp, Number(cmp.querySelector("input[type=range]").value) > 50 ? 0 : 100);
    } else if (key === "?") body().classList.toggle("mcie-keys-open");
    else handled = false;
    if (handled) event.preventDefault();
  }

  document.addEventListener("keydown", onKey);

  // mouse answers move the active question along too
  document.addEventListener("change", (event) => {
    if (event.target.closest("#q-quality")) setActive(checkedValue("q-complexity") ? "done" : "complexity");
    else if (event.target.closest("#q-complexity")) setActive("done");
  });

  // ------------------------------------------------------------------------------------------------ new sample
  function onNewSample() {
    const root = $("#sample-view .mcie-sample");
    const key = root ? root.dataset.sampleKey : null;
    if (!key || key === state.sampleKey) return;
    state.sampleKey = key;
    stopDraw();
    closeReason();
    closeLightbox();
    setActive(root.dataset.mode === "revise" ? "done" : "quality"); // a revision starts from the saved answers
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    setTimeout(renderCorrections, 60);
  }

  new MutationObserver(() => {
    onNewSample();
    checkPreview();
  }).observe(document.documentElement, { childList: true, subtree: true });

  // ------------------------------------------------------------------------------------------------ session
  // Say at once when the login session has ended (idle too long, password changed, account disabled), instead of
  // letting the next Submit fail: the answers on screen are not saved until a new login.
  async function checkSession() {
    try {
      const response = await fetch("/api/whoami", { credentials: "same-origin", cache: "no-store" });
      if (response.status !== 401) return;
    } catch (_err) {
      return; // offline for a moment: not a logout
    }
    if ($("#mcie-session-ended")) return;
    const banner = document.createElement("div");
    banner.id = "mcie-session-ended";
    banner.setAttribute("role", "alert");
    const link = document.createElement("a");
    link.href = `/login?next=${encodeURIComponent(location.pathname)}`;
    link.textContent = "Log in again";
    banner.append("Your session has ended; nothing more can be saved until you log in again. ", link);
    document.body.prepend(banner);
  }

  setInterval(checkSession, 120000);
  window.addEventListener("focus", checkSession);

  window.mcie = { openReason, closeReason, afterReason, setActive, renderCorrections, state };
})();
