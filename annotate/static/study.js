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
