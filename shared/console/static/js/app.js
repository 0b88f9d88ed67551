// The console's shell: sign-in, navigation by role, and a hash router (#/path) over the pages.

import { api, ApiError, auth, roleOf } from "./api.js";
import { annotatorHome, annotateDataset } from "./annotate.js";
import * as operator from "./operator.js";
import { h, mount, showError } from "./ui.js";

const NAV = {
  annotator: [["#/annotate", "Label"]],
  partner: [["#/datasets", "Datasets"], ["#/runs", "Training runs"], ["#/models", "Models"], ["#/usage", "Usage"]],
  operator: [
    ["#/datasets", "Datasets"], ["#/runs", "Training runs"], ["#/models", "Models"],
    ["#/usage", "Usage"], ["#/dead-letters", "Dead letters"],
  ],
};

// [pattern, page, roles]: a page receives (root, params) and may return a cleanup function.
const ROUTES = [
  [/^\/annotate$/, annotatorHome, ["annotator"]],
  [/^\/annotate\/([^/]+)$/, annotateDataset, ["annotator"]],
  [/^\/datasets$/, operator.datasets, ["partner", "operator"]],
  [/^\/runs$/, operator.runs, ["partner", "operator"]],
  [/^\/runs\/([^/]+)$/, operator.run, ["partner", "operator"]],
  [/^\/models$/, operator.models, ["partner", "operator"]],
  [/^\/models\/([^/]+)$/, operator.model, ["partner", "operator"]],
  [/^\/models\/([^/]+)\/monitoring$/, operator.monitoring, ["partner", "operator"]],
  [/^\/usage$/, operator.usage, ["partner", "operator"]],
  [/^\/dead-letters$/, operator.deadLetters, ["operator"]],
];

const HOME = { annotator: "#/annotate", partner: "#/datasets", operator: "#/datasets" };

let cleanup = null;

// A credential is checked against an API it must open before it is kept: the annotator's own figures, the
// partner's datasets, or (internal token) the partner list.
async function verify(token) {
  const role = roleOf(token);
  const probe = { annotator: ["labeling", "/v1/annotators/me"], partner: ["ingestion", "/v1/datasets"], operator: ["ingestion", "/v1/partners"] }[role];
  await api(probe[0], probe[1], { token });
  return role;
}

function signInPage(root) {
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", "data-field": "token", required: true, placeholder: "fwa_… (annotator), fwk_… (partner key) or the internal token" });
  const form = h("form", { class: "card narrow", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Annotators use the token an operator issued them; operators use the internal token or a partner key. It stays in this browser tab only."),
    h("label", { for: "token" }, "Token"), input,
    h("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    try {
      const role = await verify(token);
      auth.signIn(token, role);
      location.hash = HOME[role];
      renderChrome();
    } catch (error) {
      const message = error instanceof ApiError && error.status === 401 ? `This token is not accepted: ${error.message}` : error.message;
      showError(form, new ApiError(error.status, error.code, message, { fields: { token: [message] } }));
    }
  });
  mount(root, form);
  input.focus();
}

function renderChrome() {
  const role = auth.role;
  const nav = document.getElementById("nav");
  mount(nav, (NAV[role] || []).map(([href, title]) => h("a", { href, class: location.hash.startsWith(href) ? "active" : "" }, title)));
  const who = document.getElementById("who");
  mount(who, role ? [h("span", { class: "role" }, role), h("button", { class: "link", id: "sign-out", onclick: () => { auth.signOut(); location.hash = "#/sign-in"; renderChrome(); } }, "Sign out")] : []);
}

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const root = document.getElementById("page");
  const path = (location.hash || "#/").slice(1);
  renderChrome();
  if (!auth.token || path === "/sign-in") return signInPage(root);
  if (path === "/" || path === "") { location.hash = HOME[auth.role] || "#/sign-in"; return; }
  for (const [pattern, page, roles] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    if (!roles.includes(auth.role)) return mount(root, h("p", { class: "form-error" }, `This page is not for a ${auth.role} credential.`));
    mount(root, h("p", { class: "muted" }, "Loading…"));
    try {
      cleanup = (await page(root, ...match.slice(1).map(decodeURIComponent))) || null;
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) { auth.signOut(); return signInPage(root); }
      mount(root, h("p", { class: "form-error", role: "alert" }, error.message));
    }
    return;
  }
  mount(root, h("p", { class: "form-error" }, `No page at ${path}.`));
}

window.addEventListener("hashchange", route);
route();
