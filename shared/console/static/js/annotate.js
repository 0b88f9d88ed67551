// Annotator pages: pick a dataset, then label leased tasks one after another with the keyboard.
//
// Keys: 1–9 and 0 pick a label (the tenth is 0); Enter submits; S skips; in span tasks ←/→ move over the words,
// Shift+←/→ extends the selection (a mouse drag or Shift+click selects too), a digit marks the selection with
// that label, and Z undoes the last span. Offsets are in Unicode code points, as the API counts characters.

import { api, ApiError } from "./api.js";
import { fixed, h, mount, showError, toast } from "./ui.js";

const LEASE_SECONDS = 300;

function figures(entry) {
  return h("div", { class: "grid figures" },
    h("div", { class: "card" }, h("div", { class: "figure", "data-figure": "annotations" }, entry.annotations ?? 0), h("div", { class: "figure-label" }, "labeled by you")),
    h("div", { class: "card" }, h("div", { class: "figure", "data-figure": "skips" }, entry.skips ?? 0), h("div", { class: "figure-label" }, "skipped")),
    h("div", { class: "card" }, h("div", { class: "figure", "data-figure": "agreement" }, entry.agreement_with_consensus == null ? "—" : `${Math.round(entry.agreement_with_consensus * 100)}%`),
      h("div", { class: "figure-label" }, `agreement with consensus${entry.decided ? ` (${entry.agreed} of ${entry.decided} decided)` : ""}`)));
}

export async function annotatorHome(root) {
  const me = await api("labeling", "/v1/annotators/me");
  const rows = me.datasets.map((entry) => h("a", { class: "card dataset-choice", href: `#/annotate/${encodeURIComponent(entry.dataset_id)}`, dataset: { dataset: entry.dataset_id } },
    h("strong", {}, entry.name || entry.dataset_id), " ", h("span", { class: "badge" }, entry.task_type || ""),
    h("div", { class: "muted" }, `${entry.annotations ?? 0} labeled by you · agreement ${entry.agreement_with_consensus == null ? "—" : `${Math.round(entry.agreement_with_consensus * 100)}%`}`)));
  mount(root, h("h1", {}, `Hello, ${me.name}`), h("p", { class: "muted" }, "Pick a dataset to label."), rows.length ? rows : h("p", { class: "muted" }, "No dataset is assigned to you yet."));
}

// Words and single punctuation marks over the text's code points: what a span selection snaps to.
export function tokenize(text) {
  const chars = Array.from(text);
  const tokens = [];
  const word = /[\p{L}\p{N}\p{M}_'’-]/u;
  let i = 0;
  while (i < chars.length) {
    if (/\s/u.test(chars[i])) { i += 1; continue; }
    const start = i;
    if (word.test(chars[i])) while (i < chars.length && word.test(chars[i])) i += 1;
    else i += 1;
    tokens.push({ start, end: i, text: chars.slice(start, i).join("") });
  }
  return { chars, tokens };
}

class SpanEditor {
  constructor(text, labels, prelabels) {
    const { chars, tokens } = tokenize(text);
    this.chars = chars;
    this.tokens = tokens;
    this.labels = labels;
    this.spans = (prelabels || []).map((span) => ({ ...span, prelabel: true }));
    this.cursor = 0;
    this.anchor = null;
    this.node = h("div", { class: "task-text spans", "data-role": "span-text" });
    this.list = h("div", { class: "spans-list", "data-role": "spans" });
    this.node.addEventListener("mouseup", () => this.fromMouse());
    this.render();
  }

  selection() {
    const from = this.anchor === null ? this.cursor : Math.min(this.anchor, this.cursor);
    const to = this.anchor === null ? this.cursor : Math.max(this.anchor, this.cursor);
    return [from, to];
  }

  move(step, extend) {
    if (!this.tokens.length) return;
    if (extend && this.anchor === null) this.anchor = this.cursor;
    if (!extend) this.anchor = null;
    this.cursor = Math.max(0, Math.min(this.tokens.length - 1, this.cursor + step));
    this.render();
  }

  fromMouse() {
    const selected = window.getSelection();
    if (!selected || selected.isCollapsed) return;
    const indices = [...this.node.querySelectorAll(".tok")].filter((node) => selected.containsNode(node, true)).map((node) => Number(node.dataset.index));
    if (!indices.length) return;
    this.anchor = Math.min(...indices);
    this.cursor = Math.max(...indices);
    selected.removeAllRanges();
    this.render();
  }

  click(index, extend) {
    if (extend) { if (this.anchor === null) this.anchor = this.cursor; } else this.anchor = null;
    this.cursor = index;
    this.render();
  }

  // Mark the selected words with `label`; a span overlapping another is refused before the API sees it.
  mark(label) {
    const [from, to] = this.selection();
    const span = { start: this.tokens[from].start, end: this.tokens[to].end, label };
    const clash = this.spans.find((other) => span.start < other.end && other.start < span.end);
    if (clash) throw new ApiError(0, "overlap", `“${this.chars.slice(span.start, span.end).join("")}” overlaps the ${clash.label} span “${this.chars.slice(clash.start, clash.end).join("")}”; undo it first (Z)`);
    this.spans.push(span);
    this.anchor = null;
    this.render();
    return span;
  }

  undo() {
    const removed = this.spans.pop();
    this.render();
    return removed;
  }

  render() {
    const [from, to] = this.selection();
    const parts = [];
    let position = 0;
    this.tokens.forEach((token, index) => {
      if (token.start > position) parts.push(this.chars.slice(position, token.start).join(""));
      const span = this.spans.find((s) => token.start >= s.start && token.end <= s.end);
      const classes = ["tok", index === this.cursor ? "cursor" : "", index >= from && index <= to && this.anchor !== null ? "selecting" : "", span ? "entity" : "", span?.prelabel ? "prelabel" : ""].filter(Boolean).join(" ");
      parts.push(h("span", { class: classes, dataset: { index: String(index), start: String(token.start), end: String(token.end) }, onclick: (event) => this.click(index, event.shiftKey) }, token.text));
      if (span && token.end === span.end) parts.push(h("span", { class: "entity-tag" }, span.label));
      position = token.end;
    });
    if (position < this.chars.length) parts.push(this.chars.slice(position).join(""));
    mount(this.node, parts);
    mount(this.list, this.spans.length
      ? h("ol", {}, this.spans.map((s) => h("li", { dataset: { start: String(s.start), end: String(s.end), label: s.label } }, h("strong", {}, s.label), ` “${this.chars.slice(s.start, s.end).join("")}” `, h("span", { class: "muted" }, `${s.start}–${s.end}${s.prelabel ? " · model's guess" : ""}`))))
      : h("p", { class: "muted" }, "No entities marked. Enter submits “no entities”."));
  }

  answer() {
    return this.spans.map(({ start, end, label }) => ({ start, end, label }));
  }
}

export async function annotateDataset(root, datasetId) {
  let task = null;
  let selected = null;
  let editor = null;
  let busy = false;
  let ticker = null;
  let labelsNode = null;
  const status = h("div", { class: "task-meta" });
  const area = h("div", { class: "task" });
  const mine = h("div", {});

  async function refreshFigures() {
    try {
      const me = await api("labeling", "/v1/annotators/me");
      const entry = me.datasets.find((d) => d.dataset_id === datasetId) || {};
      mount(mine, figures(entry));
    } catch (error) { mount(mine, h("p", { class: "form-error" }, error.message)); }
  }

  function countdown() {
    clearInterval(ticker);
    const lease = h("span", { class: "lease", "data-role": "lease" });
    const tick = () => {
      const left = Math.round((new Date(task.lease_expires_at) - Date.now()) / 1000);
      if (left <= 0) {
        clearInterval(ticker);
        toast("Your lease ran out: the task went back to the queue.", "error");
        next();
        return;
      }
      lease.textContent = `lease ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
      lease.classList.toggle("expiring", left <= 30);
    };
    tick();
    ticker = setInterval(tick, 1000);
    return lease;
  }

  function labelButtons() {
    return h("div", { class: "labels", "data-role": "labels" }, task.labels.map((label, index) => h("button", {
      type: "button",
      class: [label === selected && !editor ? "selected" : "", label === task.prelabel && !editor ? "prelabel" : ""].filter(Boolean).join(" "),
      dataset: { label },
      onclick: () => choose(label),
    }, index < 10 ? h("kbd", {}, String((index + 1) % 10)) : null, label)));
  }

  function choose(label) {
    if (editor) {
      try { editor.mark(label); } catch (error) { showError(area, error); }
      return;
    }
    selected = label;
    const fresh = labelButtons();
    labelsNode.replaceWith(fresh);
    labelsNode = fresh;
  }

  async function render() {
    const spanTask = task.task_type === "token_classification";
    editor = spanTask ? new SpanEditor(task.text || "", task.labels, task.prelabel_spans) : null;
    selected = spanTask ? null : task.prelabel || null;
    let content;
    if (task.kind === "image") {
      const image = await api("labeling", `/v1/tasks/${task.id}/content`, { blob: true });
      content = h("img", { class: "task-image", alt: `item ${task.item_id}`, src: URL.createObjectURL(image), "data-role": "image" });
    } else content = editor ? editor.node : h("div", { class: "task-text", "data-role": "text" }, task.text);
    const note = !spanTask && task.prelabel
      ? h("p", { class: "prelabel-note muted" }, `Model's guess (${task.prelabel_model || "production"} v${task.prelabel_version ?? "?"}): `, h("strong", {}, task.prelabel), ` at ${fixed(task.prelabel_confidence, 2)}; Enter accepts it.`)
      : spanTask && (task.prelabel_spans || []).length ? h("p", { class: "prelabel-note muted" }, "The model's entities are marked with a dashed underline; Z removes the last one.") : null;
    mount(status, h("span", {}, `task ${task.id}`), h("span", {}, task.source === "feedback" ? "feedback on a prediction" : task.source), h("span", {}, `needs ${task.required} label${task.required > 1 ? "s" : ""}`), countdown());
    labelsNode = labelButtons();
    area.dataset.task = String(task.id);
    mount(area, h("p", { class: "form-error", role: "alert", hidden: true }), content, note, labelsNode, editor ? editor.list : null,
      h("div", {}, h("button", { type: "button", "data-role": "submit", onclick: submit }, "Submit (Enter)"), h("button", { type: "button", class: "secondary", "data-role": "skip", onclick: skip }, "Skip (S)")),
      h("p", { class: "keys" }, spanTask ? "←/→ move · Shift+←/→ or drag to select · 1–9 mark · Z undo · Enter submit · S skip" : "1–9 pick a label · Enter submit · S skip"));
  }

  async function next() {
    clearInterval(ticker);
    try {
      task = await api("labeling", `/v1/datasets/${encodeURIComponent(datasetId)}/tasks/next`, { query: { lease_seconds: LEASE_SECONDS } });
    } catch (error) { mount(area, h("p", { class: "form-error", role: "alert" }, error.message)); return; }
    if (!task) {
      editor = null;
      area.dataset.task = "";
      mount(status);
      mount(area, h("p", { "data-role": "empty" }, "Nothing left to label for you right now."), h("button", { type: "button", onclick: next }, "Check again"));
      return;
    }
    await render();
  }

  async function submit() {
    if (busy || !task) return;
    if (!editor && !selected) { showError(area, new ApiError(0, "no_label", "Pick a label first (1–9).")); return; }
    busy = true;
    try {
      const body = editor ? { spans: editor.answer() } : { label: selected };
      const answer = await api("labeling", `/v1/tasks/${task.id}/annotations`, { method: "POST", body });
      toast(answer.consensus_label ? `Saved. Consensus: ${answer.consensus_label}` : "Saved.");
      await refreshFigures();
      await next();
    } catch (error) { showError(area, error); } finally { busy = false; }
  }

  async function skip() {
    if (busy || !task) return;
    busy = true;
    try {
      await api("labeling", `/v1/tasks/${task.id}/skip`, { method: "POST" });
      toast("Skipped: it goes back to the queue for someone else.");
      await refreshFigures();
      await next();
    } catch (error) { showError(area, error); } finally { busy = false; }
  }

  function onKey(event) {
    if (!task || event.target.closest("input, textarea, select, dialog")) return;
    const key = event.key;
    if (/^[0-9]$/.test(key)) {
      const label = task.labels[(Number(key) + 9) % 10];
      if (label) { event.preventDefault(); choose(label); }
    } else if (key === "Enter") { event.preventDefault(); submit(); }
    else if (key === "s" || key === "S") { event.preventDefault(); skip(); }
    else if (editor && (key === "z" || key === "Z")) { event.preventDefault(); editor.undo(); }
    else if (editor && (key === "ArrowRight" || key === "ArrowLeft")) { event.preventDefault(); editor.move(key === "ArrowRight" ? 1 : -1, event.shiftKey); }
  }

  document.addEventListener("keydown", onKey);
  mount(root, h("h1", {}, "Label"), mine, status, area);
  await refreshFigures();
  await next();
  return () => { document.removeEventListener("keydown", onKey); clearInterval(ticker); };
}
