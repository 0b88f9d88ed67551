// Small DOM helpers every page uses: element building, errors beside their fields, toasts, tables, dates.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function mount(root, ...children) {
  root.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

let toastTimer;
export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = `show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.className = ""; }, 3500);
}

// An API error shown where the user looks: each field's message beside its input (data-field), the rest on top.
export function showError(container, error) {
  for (const old of container.querySelectorAll(".field-error")) old.remove();
  let banner = container.querySelector(".form-error");
  if (!banner) {
    banner = h("p", { class: "form-error", role: "alert" });
    container.prepend(banner);
  }
  const fields = error.fields || {};
  const unplaced = [];
  for (const [path, message] of Object.entries(fields)) {
    // flask-smorest nests request errors under where they were read (json, query, form): the field comes next.
    const name = path.replace(/^(json|query|form|headers|path)\./, "").split(".")[0];
    const input = container.querySelector(`[data-field="${name}"]`);
    if (input) input.after(h("span", { class: "field-error", role: "alert" }, message));
    else unplaced.push(`${path}: ${message}`);
  }
  banner.textContent = [error.message, ...unplaced].join(" — ");
  banner.hidden = false;
}

export function clearError(container) {
  for (const old of container.querySelectorAll(".field-error")) old.remove();
  const banner = container.querySelector(".form-error");
  if (banner) banner.hidden = true;
}

export function errorBlock(error) {
  return h("p", { class: "form-error", role: "alert" }, `${error.message}${error.status ? ` (${error.status} ${error.code})` : ""}`);
}

export function table(columns, rows, { empty = "Nothing yet." } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c.title)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => h("td", { class: c.class }, c.render ? c.render(row) : row[c.key]))))));
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function fixed(value, digits = 3) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// Confirm a consequential action in a dialog of our own (testable, and it names what will happen).
export function confirmAction(title, text, { confirm = "Confirm", reason = false } = {}) {
  return new Promise((resolve) => {
    const input = reason ? h("input", { name: "reason", "data-field": "reason", placeholder: "why (recorded in the audit log)", required: true }) : null;
    const dialog = h("dialog", { class: "confirm" },
      h("form", { method: "dialog" },
        h("h3", {}, title), h("p", {}, text), input,
        h("div", { class: "actions" },
          h("button", { value: "cancel", type: "submit", class: "secondary", formnovalidate: true }, "Cancel"),
          h("button", { value: "ok", type: "submit", class: "danger" }, confirm))));
    dialog.addEventListener("close", () => {
      const ok = dialog.returnValue === "ok" && (!input || input.value.trim());
      dialog.remove();
      resolve(ok ? (input ? input.value.trim() : true) : null);
    });
    document.body.append(dialog);
    dialog.showModal();
    (input || dialog.querySelector("button.danger")).focus();
  });
}
