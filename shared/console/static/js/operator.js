// Operator pages: datasets, training runs (live), models and versions with the gate's decision, aliases, canary,
// promote and rollback, the audit log, monitoring charts, usage per meter, and dead letters with replay.
//
// They call the same public APIs as the `flywheel` command, with the credential the user signed in with: the
// internal token (every tenant; the registry's reads and changes name the tenant, chosen here and kept in the
// tab's session storage) or a partner key (its own tenant; what only the internal token may do is not offered).

import { api, ApiError, auth } from "./api.js";
import { chartBox, lineChart, seconds } from "./charts.js";
import { clearError, confirmAction, duration, errorBlock, fixed, h, mount, showError, table, toast, when } from "./ui.js";

const POLL_MS = 1000;
const LIST_POLL_MS = 2000;
const ACTIVE_RUN = new Set(["queued", "running", "cancelling"]);
const RUN_BADGE = { succeeded: "ok", failed: "bad", cancelled: "warn", cancelling: "warn" };
const TENANT_KEY = "flywheel.tenant";

const isOperator = () => auth.role === "operator";
const enc = encodeURIComponent;
const wrap = (node) => h("div", { class: "table-wrap" }, node);
const percent = (value) => (value === null || value === undefined ? "—" : `${Math.round(value * 100)}%`);

// ----------------------------------------------------------------------------------------------- shared bits

// A failure that is not the credential's (401 signs out, in the router) is shown where the data would be.
function shown(error) {
  if (error instanceof ApiError && error.status === 401) throw error;
  return errorBlock(error);
}

const tenant = {
  get current() { return isOperator() ? sessionStorage.getItem(TENANT_KEY) : null; },
  remember(value) { if (isOperator() && value) sessionStorage.setItem(TENANT_KEY, value); },
  // What a registry read adds to its query, and a change to its body: the tenant, for the internal token only.
  get scope() { return isOperator() ? { tenant: this.current } : {}; },
};

// The internal token acts for one tenant at a time on the registry: a picker of the partners, remembered.
async function tenantPicker(onPick) {
  const { partners } = await api("ingestion", "/v1/partners");
  if (!partners.length) return h("p", { class: "muted" }, "No partner yet: create one with `flywheel partners create`.");
  if (!partners.some((p) => p.id === tenant.current)) tenant.remember(partners[0].id);
  const select = h("select", { id: "tenant", name: "tenant", "data-field": "tenant" },
    partners.map((p) => h("option", { value: p.id, selected: p.id === tenant.current }, `${p.name} (${p.id})`)));
  select.addEventListener("change", () => { tenant.remember(select.value); onPick(select.value); });
  return h("div", { class: "tenant-picker" }, h("label", { for: "tenant" }, "Tenant"), select);
}

function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}`.trim() }, text);
}

function figure(id, label, value) {
  return h("div", { class: "card" }, h("div", { class: "figure", id }, value), h("div", { class: "figure-label" }, label));
}

function aliasTarget(state) {
  const weights = Object.entries(state.weights || {});
  if (weights.length) return weights.map(([version, weight]) => `v${version} ${weight}%`).join(" · ");
  return state.version ? `v${state.version}` : "—";
}

// --------------------------------------------------------------------------------------------------- datasets

function consensus(stats) {
  const tasks = stats.tasks || {};
  const total = (tasks.open || 0) + (tasks.done || 0) + (tasks.review || 0);
  return { total, done: tasks.done || 0, review: tasks.review || 0, share: total ? (tasks.done || 0) / total : 0 };
}

async function labelingOf(dataset) {
  const [state, stats] = await Promise.all([
    api("labeling", `/v1/datasets/${enc(dataset.id)}`).catch((error) => ({ error })),
    api("labeling", `/v1/datasets/${enc(dataset.id)}/stats`).catch((error) => ({ error })),
  ]);
  return { ...dataset, state, stats };
}

export async function datasets(root) {
  const listed = (await api("ingestion", "/v1/datasets")).datasets;
  const rows = await Promise.all(listed.map(labelingOf));
  const columns = [
    { title: "Dataset", render: (d) => [h("strong", {}, d.name), h("div", { class: "muted" }, d.id)] },
    isOperator() && { title: "Tenant", key: "tenant" },
    { title: "Task", render: (d) => d.task_type.replace("_", " ") },
    { title: "Items", class: "num", render: (d) => (d.stats.error ? "—" : consensus(d.stats).total) },
    { title: "Labeled", class: "num", render: (d) => (d.stats.error ? "—" : consensus(d.stats).done) },
    {
      title: "Consensus",
      render: (d) => {
        if (d.stats.error) return h("span", { class: "muted" }, d.stats.error.message);
        const c = consensus(d.stats);
        return [h("div", { class: "progress", title: `${c.done} of ${c.total} decided` }, h("div", { style: `width:${Math.round(c.share * 100)}%` })),
          h("div", { class: "muted" }, `${percent(c.share)}${c.review ? ` · ${c.review} in review` : ""}`)];
      },
    },
    {
      title: "Agreement",
      render: (d) => {
        if (d.stats.error) return "—";
        if (d.task_type === "token_classification") return `entity F1 ${fixed(d.stats.entity_f1, 2)}`;
        return [percent(d.stats.percent_agreement), h("div", { class: "muted" }, `κ ${fixed(d.stats.fleiss_kappa, 2)}`)];
      },
    },
    {
      title: "Retrain threshold",
      class: "num",
      render: (d) => {
        const threshold = d.state.error ? d.retrain_threshold : d.state.retrain_threshold;
        if (!threshold) return h("span", { class: "muted" }, "off");
        return d.state.error ? String(threshold) : `${d.state.labels_since_snapshot} / ${threshold}`;
      },
    },
    {
      title: "In production",
      render: (d) => (d.state.production_model
        ? h("a", { href: `#/models/${enc(d.state.production_model)}`, onclick: () => tenant.remember(d.tenant) }, `${d.state.production_model} v${d.state.production_version}`)
        : h("span", { class: "muted" }, "—")),
    },
  ].filter(Boolean);
  mount(root,
    h("h1", {}, "Datasets"),
    h("p", { class: "muted" }, "Labeled is decided by consensus; the retrain threshold counts labels since the last snapshot."),
    wrap(table(columns, rows, { empty: "No dataset yet." })));
}

// ---------------------------------------------------------------------------------------------- training runs

async function allRuns() {
  const found = [];
  let after = 0;
  for (let page = 0; page < 10 && after !== null; page += 1) {
    const answer = await api("training", "/v1/runs", { query: { limit: 200, after } });
    found.push(...answer.runs);
    after = answer.next_after;
  }
  return found.reverse();
}

function epochText(run) {
  const p = run.progress || {};
  return p.epochs ? `${p.epoch ?? 0} / ${p.epochs}` : "—";
}

function runBadge(run) {
  return badge(run.cancel_requested && run.status === "running" ? "cancelling" : run.status, RUN_BADGE[run.status] || "");
}

export async function runs(root) {
  const box = h("div", { id: "runs-list" });
  const columns = [
    { title: "Run", render: (r) => h("a", { href: `#/runs/${enc(r.id)}`, "data-run": r.id }, r.id) },
    isOperator() && { title: "Tenant", key: "tenant" },
    { title: "Model", render: (r) => [r.model_name, h("div", { class: "muted" }, r.dataset_id)] },
    { title: "Status", render: runBadge },
    { title: "Epoch", class: "num", render: epochText },
    { title: "Loss", class: "num", render: (r) => fixed(r.progress?.loss) },
    { title: "Started", render: (r) => when(r.started_at || r.created_at) },
    { title: "Reason", render: (r) => h("span", { class: "muted" }, r.reason) },
  ].filter(Boolean);
  let timer = null;
  let stopped = false;
  const load = async () => {
    try {
      mount(box, wrap(table(columns, await allRuns(), { empty: "No training run yet." })));
    } catch (error) {
      mount(box, shown(error));
    }
    if (!stopped) timer = setTimeout(load, LIST_POLL_MS);
  };
  mount(root, h("h1", {}, "Training runs"), h("p", { class: "muted" }, "Newest first; the list follows new runs as they start."), box);
  await load();
  return () => { stopped = true; clearTimeout(timer); };
}

function lossSeries(run) {
  const history = run.history || [];
  const xs = history.map((e) => e.epoch);
  const train = history.map((e) => e.train_loss ?? null);
  const validation = history.map((e) => e.val_loss ?? null);
  const p = run.progress || {};
  if (ACTIVE_RUN.has(run.status) && p.steps && p.step > 0 && p.step < p.steps && p.loss !== null && p.loss !== undefined) {
    xs.push((p.epoch || 0) + p.step / p.steps);  // the running mean loss of the epoch under way
    train.push(p.loss);
    validation.push(null);
  }
  return [xs, train, validation];
}

function runDetails(run) {
  const metrics = run.metrics || {};
  const rows = [
    ["Dataset", run.dataset_id], ["Snapshot", run.snapshot_id], ["Tenant", run.tenant],
    ["Base model", run.base_model], ["Device", run.device || "—"], ["Attempts", run.attempts],
    ["Reason", run.reason], ["Created", when(run.created_at)], ["Finished", when(run.finished_at)],
    ["Validation macro-F1", fixed(metrics.macro_f1)], ["Test macro-F1", fixed(metrics.test?.macro_f1)],
    ["Lift over the classical baseline", fixed(run.baseline_lift)],
    ["Hyper-parameters", Object.entries(run.hyperparameters || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") || "defaults"],
  ];
  return h("div", { class: "table-wrap" }, h("table", { class: "details" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v ?? "—"))))));
}

export async function run(root, runId) {
  let current = await api("training", `/v1/runs/${enc(runId)}`);
  const status = h("span", { id: "run-status" });
  const progressBar = h("div", {});
  const note = h("p", { class: "muted", id: "run-note" });
  const cancel = h("button", { id: "cancel-run", class: "danger", type: "button" }, "Cancel run");
  const details = h("div", { id: "run-details" });
  const actions = h("div", { class: "run-actions" });
  const epoch = figure("run-epoch", "epochs done", "—");
  const step = figure("run-step", "step in the epoch", "—");
  const loss = figure("run-loss", "training loss (running mean)", "—");
  const speed = figure("run-speed", "samples / s", "—");
  const eta = figure("run-eta", "time left (ETA)", "—");
  const lossBox = chartBox("loss-chart");
  const card = h("section", { class: "card", id: "run" },
    h("h1", {}, "Run ", h("code", {}, runId), " ", status),
    note,
    h("div", { class: "progress", id: "run-progress" }, progressBar),
    h("div", { class: "grid" }, epoch, step, loss, speed, eta),
    actions,
    h("h2", {}, "Loss per epoch"),
    lossBox,
    h("h2", {}, "Details"),
    details);
  mount(root, h("p", {}, h("a", { href: "#/runs" }, "← Training runs")), card);
  const chart = lineChart(lossBox, {
    title: "Loss", time: false, xLabel: "epoch", yLabel: "loss",
    series: [{ label: "training loss" }, { label: "validation loss", dash: [6, 4] }],
  });

  const render = (r) => {
    const p = r.progress || {};
    mount(status, runBadge(r));
    epoch.querySelector(".figure").textContent = epochText(r);
    step.querySelector(".figure").textContent = p.steps ? `${p.step ?? 0} / ${p.steps}` : "—";
    loss.querySelector(".figure").textContent = fixed(p.loss);
    speed.querySelector(".figure").textContent = fixed(p.samples_per_second, 1);
    eta.querySelector(".figure").textContent = ACTIVE_RUN.has(r.status) ? duration(p.eta_seconds) : "—";
    const done = p.epochs ? ((p.epoch || 0) + (p.steps ? (p.step || 0) / p.steps : 0)) / p.epochs : 0;
    progressBar.style.width = `${Math.round(Math.min(1, r.status === "succeeded" ? 1 : done) * 100)}%`;
    note.textContent = r.failure_reason
      || (r.status === "queued" ? (r.dispatched_at ? "Queued: waiting for a training worker." : "Waiting for one of the tenant's running slots.") : "")
      || (r.status === "succeeded" ? "Trained, evaluated and published; the registry decides whether it serves." : "");
    const actionable = isOperator() && ACTIVE_RUN.has(r.status) && !r.cancel_requested;
    mount(actions,
      actionable ? cancel : null,
      r.status === "succeeded" ? h("a", { id: "run-model", href: `#/models/${enc(r.model_name)}`, onclick: () => tenant.remember(r.tenant) }, `Model ${r.model_name} →`) : null);
    mount(details, runDetails(r));
    chart.update(lossSeries(r));
  };

  let timer = null;
  let stopped = false;
  const poll = async () => {
    if (stopped) return;
    try {
      current = await api("training", `/v1/runs/${enc(runId)}`);
      render(current);
      clearError(card);
    } catch (error) {
      showError(card, error);
      if (error instanceof ApiError && error.status === 401) return;  // the credential went: stop asking
    }
    if (!stopped && ACTIVE_RUN.has(current.status)) timer = setTimeout(poll, POLL_MS);
  };
  cancel.addEventListener("click", async () => {
    const ok = await confirmAction(`Cancel run ${runId}?`, "A queued run is cancelled at once, a running one at its next training step; nothing of it is registered.", { confirm: "Cancel run" });
    if (!ok) return;
    try {
      render(await api("training", `/v1/runs/${enc(runId)}/cancel`, { method: "POST" }));
      toast("Cancellation requested");
      clearTimeout(timer);
      timer = setTimeout(poll, POLL_MS);
    } catch (error) {
      showError(card, error);
    }
  });
  render(current);
  if (ACTIVE_RUN.has(current.status)) timer = setTimeout(poll, POLL_MS);
  return () => { stopped = true; clearTimeout(timer); chart.destroy(); };
}

// ------------------------------------------------------------------------------------------------------ models

export async function models(root) {
  const box = h("div", { id: "models-list" });
  const columns = [
    { title: "Model", render: (m) => [h("a", { href: `#/models/${enc(m.name)}`, "data-model": m.name }, m.name), h("div", { class: "muted" }, m.dataset_id)] },
    { title: "Task", render: (m) => (m.task_type || "").replace("_", " ") },
    { title: "Aliases", render: (m) => Object.entries(m.aliases || {}).map(([name, state]) => [badge(`${name} → ${aliasTarget(state)}`, name === "production" ? "ok" : ""), " "]) },
    { title: "Versions", class: "num", key: "version_count" },
    { title: "Latest", class: "num", render: (m) => (m.latest_version ? `v${m.latest_version}` : "—") },
    { title: "", render: (m) => h("a", { href: `#/models/${enc(m.name)}/monitoring` }, "Monitoring") },
  ];
  const load = async () => {
    try {
      const answer = await api("registry", "/v1/models", { query: { ...tenant.scope, limit: 500 } });
      mount(box, wrap(table(columns, answer.models, { empty: "No model yet: a model appears when its first version is registered." })));
    } catch (error) {
      mount(box, shown(error));
    }
  };
  const picker = isOperator() ? await tenantPicker(load) : null;
  mount(root, h("h1", {}, "Models"), picker, box);
  if (!isOperator() || tenant.current) await load();
}

function decisionView(version, compared) {
  const decision = version.decision;
  if (!decision) return h("p", { class: "muted" }, `v${version.version} has no gate decision (registered before the gate, or not decided yet).`);
  const candidate = decision.candidate?.metrics || {};
  const production = decision.production;
  const productionScores = production?.metrics || null;
  const set = decision.evaluation_set;
  const metricRows = ["accuracy", "macro_f1", "ece"].map((name) => ({
    name, candidate: candidate[name], production: productionScores ? productionScores[name] : null,
  }));
  const metricColumns = [
    { title: "Metric", key: "name" },
    { title: `Candidate v${version.version}`, class: "num", render: (r) => fixed(r.candidate) },
    production && { title: `Production v${production.version}`, class: "num", render: (r) => (production.error ? production.error : fixed(r.production)) },
    production && { title: "Difference", class: "num", render: (r) => (r.production === null || r.production === undefined ? "—" : fixed(r.candidate - r.production)) },
  ].filter(Boolean);
  const difference = decision.difference;
  const perClass = compared?.evaluation?.per_class
    || Object.entries(candidate.per_class || {}).map(([label, s]) => ({ label, support: s.support, b: s.f1, a: productionScores?.per_class?.[label]?.f1 ?? null }));
  const classColumns = [
    { title: "Class", key: "label" },
    { title: "Items", class: "num", key: "support" },
    production && { title: `v${production.version} F1`, class: "num", render: (r) => fixed(r.a) },
    { title: `v${version.version} F1`, class: "num", render: (r) => fixed(r.b) },
    production && { title: "Change", class: "num", render: (r) => (r.a === null || r.a === undefined ? "—" : fixed(r.b - r.a)) },
  ].filter(Boolean);
  const conditionColumns = [
    { title: "Condition", render: (c) => `(${c.id}) ${c.name}` },
    { title: "", render: (c) => badge(c.passed ? "passed" : "failed", c.passed ? "ok" : "bad") },
    { title: "Observed", class: "num", render: (c) => fixed(c.observed) },
    { title: "Threshold", class: "num", render: (c) => fixed(c.threshold) },
    { title: "Detail", render: (c) => h("span", { class: "muted" }, c.detail) },
  ];
  return h("div", { id: "decision", "data-version": version.version },
    h("p", {}, badge(decision.outcome, decision.outcome === "production" ? "ok" : "warn"), " ", decision.reason),
    set ? h("p", { class: "muted" }, `${production ? "Both" : "Scored"} on the ${set.split} split of snapshot ${set.snapshot_id}: ${set.items} items (sha256 ${String(set.sha256).slice(0, 12)}).`) : null,
    difference && difference.ci_low !== null ? h("p", { class: "muted" }, `${difference.metric} difference ${fixed(difference.value)}, ${Math.round(difference.confidence * 100)}% interval [${fixed(difference.ci_low)}, ${fixed(difference.ci_high)}] (${difference.method}).`) : null,
    wrap(table(metricColumns, metricRows)),
    h("h3", {}, "Per class, on the same items"),
    wrap(table(classColumns, perClass, { empty: "No per-class scores." })),
    h("h3", {}, "Conditions"),
    wrap(table(conditionColumns, decision.conditions || [], { empty: "No condition was evaluated." })));
}

export async function model(root, name) {
  const path = `/v1/models/${enc(name)}`;
  let selected = null;
  const render = async () => {
    const picker = isOperator() ? await tenantPicker(() => { selected = null; render(); }) : null;
    if (isOperator() && !tenant.current) return mount(root, h("h1", {}, name), picker);
    let info;
    let versionList;
    let audit;
    try {
      [info, versionList, audit] = await Promise.all([
        api("registry", path, { query: tenant.scope }),
        api("registry", `${path}/versions`, { query: { ...tenant.scope, limit: 500 } }),
        api("registry", `${path}/audit`, { query: { ...tenant.scope, limit: 100 } }),
      ]);
    } catch (error) {
      return mount(root, h("p", {}, h("a", { href: "#/models" }, "← Models")), picker, h("h1", {}, name), shown(error));
    }
    const versions = versionList.versions;
    const production = info.aliases?.production;
    const current = selected ?? versions[0]?.version;
    const chosen = versions.find((v) => v.version === current);
    let compared = null;
    const against = chosen?.decision?.production?.version;
    if (against && against !== chosen.version) {
      compared = await api("registry", `${path}/compare`, { query: { ...tenant.scope, a: against, b: chosen.version } }).catch(() => null);
    }

    const versionsCard = h("section", { class: "card", id: "versions" });
    const aliasesCard = h("section", { class: "card", id: "aliases" });
    const act = async (title, text, confirm, request, done) => {
      const reason = await confirmAction(title, text, { confirm, reason: true });
      if (!reason) return;
      try {
        const answer = await request(reason);
        toast(answer.changed ? done : "Nothing changed: the alias was already there.");
        await render();
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) throw error;
        showError(versionsCard, error);
      }
    };
    const promote = (version) => act(
      `Promote v${version} to production?`,
      `production points at ${production ? aliasTarget(production) : "nothing"} now; inference loads v${version} beside it and swaps when it is ready. The reason goes to the audit log.`,
      "Promote",
      (reason) => api("registry", `${path}/aliases/production`, { method: "PUT", body: { ...tenant.scope, version, reason } }),
      `v${version} is now in production`);
    const rollback = () => act(
      "Roll production back?",
      `production goes back to the version it pointed at before ${production ? aliasTarget(production) : "now"}. The reason goes to the audit log.`,
      "Roll back",
      (reason) => api("registry", `${path}/rollback`, { method: "POST", body: { ...tenant.scope, alias: "production", reason } }),
      "production rolled back");

    const versionColumns = [
      { title: "Version", render: (v) => h("button", { class: "link", type: "button", onclick: () => { selected = v.version; render(); } }, `v${v.version}`) },
      { title: "Status", render: (v) => v.status },
      { title: "Aliases", render: (v) => v.aliases.map((a) => [badge(a, a === "production" ? "ok" : ""), " "]) },
      { title: "Validation F1", class: "num", render: (v) => fixed(v.metrics?.macro_f1) },
      { title: "Test F1", class: "num", render: (v) => fixed(v.metrics?.test?.macro_f1) },
      { title: "Lift", class: "num", render: (v) => fixed(v.baseline_lift) },
      { title: "Gate", render: (v) => (v.decision ? badge(v.decision.outcome, v.decision.outcome === "production" ? "ok" : "warn") : "—") },
      { title: "Registered", render: (v) => when(v.created_at) },
      isOperator() && {
        title: "",
        render: (v) => (v.status !== "archived" && !v.aliases.includes("production")
          ? h("button", { type: "button", class: "promote", id: `promote-v${v.version}`, "data-version": v.version, onclick: () => promote(v.version) }, "Promote")
          : null),
      },
    ].filter(Boolean);
    mount(versionsCard, h("h2", {}, "Versions"), wrap(table(versionColumns, versions, { empty: "No version yet." })),
      chosen ? [h("h2", {}, `Gate decision of v${chosen.version}`), decisionView(chosen, compared)] : null);

    const aliasRows = Object.entries(info.aliases || {}).map(([alias, state]) => ({ alias, state }));
    mount(aliasesCard, h("h2", {}, "Aliases and canary"),
      wrap(table([
        { title: "Alias", render: (r) => badge(r.alias, r.alias === "production" ? "ok" : "") },
        { title: "Serves", render: (r) => aliasTarget(r.state) },
      ], aliasRows, { empty: "No alias: nothing serves this model." })),
      isOperator() && production ? h("button", { type: "button", id: "rollback", class: "secondary", onclick: rollback }, "Roll production back") : null,
      isOperator() ? canaryForm(path, production, versions, render) : null);

    const auditColumns = [
      { title: "When", render: (c) => when(c.created_at) },
      { title: "Alias", key: "alias" },
      { title: "Action", key: "action" },
      { title: "From", render: (c) => (Object.keys(c.from_weights || {}).length ? aliasTarget({ weights: c.from_weights }) : c.from_version ? `v${c.from_version}` : "—") },
      { title: "To", render: (c) => (Object.keys(c.to_weights || {}).length ? aliasTarget({ weights: c.to_weights }) : c.to_version ? `v${c.to_version}` : "—") },
      { title: "Who", key: "actor" },
      { title: "Why", render: (c) => h("span", { class: "audit-reason" }, c.reason) },
    ];
    mount(root,
      h("p", {}, h("a", { href: "#/models" }, "← Models"), " · ", h("a", { href: `#/models/${enc(name)}/monitoring` }, "Monitoring")),
      picker,
      h("h1", {}, name),
      h("p", { class: "muted" }, `${(info.task_type || "").replace("_", " ")} · dataset ${info.dataset_id} · ${info.version_count} version(s) · gate on ${info.policy?.primary_metric}, auto-promote ${info.policy?.auto_promote ? "on" : "off"}`),
      aliasesCard,
      versionsCard,
      h("section", { class: "card", id: "audit" }, h("h2", {}, "Audit log"), wrap(table(auditColumns, audit.changes, { empty: "No alias change yet." }))));
  };
  await render();
}

// A canary on production: the version it serves now keeps 100 - share %, the candidate gets share %.
function canaryForm(path, production, versions, reload) {
  const candidate = h("select", { id: "canary-version", name: "version", "data-field": "weights" },
    versions.filter((v) => v.status !== "archived").map((v) => h("option", { value: v.version }, `v${v.version}`)));
  const share = h("input", { id: "canary-share", name: "share", type: "number", min: 1, max: 99, value: 10, "data-field": "share" });
  const form = h("form", { id: "canary-form" },
    h("h3", {}, "Canary"),
    h("p", { class: "muted" }, production?.version ? `v${production.version} keeps the rest of production's traffic.` : "production must point at one version first."),
    h("label", { for: "canary-version" }, "Candidate"), candidate,
    h("label", { for: "canary-share" }, "Share of traffic (%)"), share,
    h("button", { type: "submit" }, "Start canary"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError(form);
    const percentage = Number(share.value);
    const base = production?.version;
    const weights = { [candidate.value]: percentage, ...(base ? { [base]: 100 - percentage } : {}) };
    const reason = await confirmAction(`Send ${percentage}% of production to v${candidate.value}?`, "The split is audited; roll back or promote to end it.", { confirm: "Start canary", reason: true });
    if (!reason) return;
    try {
      await api("registry", `${path}/aliases/production`, { method: "PUT", body: { ...tenant.scope, weights, reason } });
      toast("Canary started");
      await reload();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) throw error;
      showError(form, error);
    }
  });
  return form;
}

// -------------------------------------------------------------------------------------------------- monitoring

function versionSeries(windows, versions, pick) {
  const xs = windows.map((w) => seconds(w.end));
  return [xs, ...versions.map((v) => windows.map((w) => {
    const value = w.versions?.[v] ? pick(w.versions[v]) : null;
    return value === undefined ? null : value;
  }))];
}

function meterSeries(meters, name) {
  const rows = meters.filter((m) => m.meter === "prediction_rows" && (!m.model || m.model === name));
  const buckets = [...new Set(rows.map((m) => m.bucket))].sort();
  const totals = buckets.map((bucket) => rows.filter((m) => m.bucket === bucket).reduce((sum, m) => sum + m.value, 0));
  return [buckets.map((bucket) => seconds(bucket.length === 7 ? `${bucket}-01` : bucket)), totals];
}

export async function monitoring(root, name) {
  const charts = [];
  const form = h("form", { id: "monitoring-form" },
    h("label", { for: "windows" }, "Windows"), h("input", { id: "windows", name: "windows", type: "number", value: 6, "data-field": "windows" }),
    h("label", { for: "window_s" }, "Window length (seconds; empty: the model's policy)"), h("input", { id: "window_s", name: "window_s", type: "number", "data-field": "window_s" }),
    h("button", { type: "submit" }, "Show"));
  const body = h("div", { id: "monitoring" });
  const header = [h("p", {}, h("a", { href: `#/models/${enc(name)}` }, `← ${name}`)), h("h1", {}, `Monitoring: ${name}`)];
  const drop = () => { while (charts.length) charts.pop().destroy(); };

  const draw = (id, options, data) => {
    const box = body.querySelector(`#${id}`);
    const chart = lineChart(box, options);
    chart.update(data);
    charts.push(chart);
  };

  const usageFor = async () => {
    if (isOperator()) return (await api("ingestion", "/v1/billing/usage", { query: { tenant: tenant.current, by: "model", bucket: "hour", days: 7 } })).meters;
    return (await api("ingestion", "/v1/usage", { query: { by: "model", bucket: "hour", days: 7 } })).report.meters;
  };

  const load = async () => {
    drop();
    clearError(form);
    let report;
    try {
      // The internal token reads a tenant's monitoring for the tenant it names (X-Flywheel-Tenant).
      const headers = isOperator() ? { "X-Flywheel-Tenant": tenant.current } : {};
      report = await api("inference", `/v1/monitoring/models/${enc(name)}`, { query: { windows: form.windows.value, window_s: form.window_s.value }, headers });
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) throw error;
      mount(body);
      return showError(form, error);
    }
    const versions = report.versions.map((v) => String(v.version));
    const perVersion = (suffix = "", dash) => versions.map((v) => ({ label: `v${v}${suffix}`, dash }));
    const meters = await usageFor().catch(() => []);
    mount(body,
      h("p", { class: "muted" }, `${report.windows.length} windows of ${duration(report.window_s)}; versions: ${report.versions.map((v) => `v${v.version} (${v.role})`).join(", ") || "none"}.`),
      h("div", { class: "grid charts" },
        chartBox("accuracy-chart"), chartBox("drift-chart"), chartBox("latency-chart"), chartBox("traffic-chart")),
      chartBox("usage-chart"),
      h("h2", {}, "Active alerts"),
      wrap(table([
        { title: "Kind", render: (a) => badge(a.kind, "bad") },
        { title: "Version", render: (a) => `v${a.model_version}` },
        { title: "Value", class: "num", render: (a) => fixed(a.value) },
        { title: "Threshold", class: "num", render: (a) => fixed(a.threshold) },
        { title: "Reason", key: "reason" },
      ], report.alerts, { empty: "No active alert." })));
    const windows = report.windows;
    draw("accuracy-chart", { title: "Live accuracy (sampled labels)", series: perVersion(), yLabel: "accuracy" },
      versionSeries(windows, versions, (w) => w.quality?.accuracy));
    draw("drift-chart", { title: "Drift against the evaluation baseline", series: [...perVersion(" prediction JS"), ...perVersion(" confidence KS", [6, 4])] },
      [...versionSeries(windows, versions, (w) => w.drift?.prediction_js), ...versionSeries(windows, versions, (w) => w.drift?.confidence_ks).slice(1)]);
    draw("latency-chart", { title: "Latency (ms)", series: [...perVersion(" p50"), ...perVersion(" p99", [6, 4])], yLabel: "ms" },
      [...versionSeries(windows, versions, (w) => w.latency?.p50_ms), ...versionSeries(windows, versions, (w) => w.latency?.p99_ms).slice(1)]);
    draw("traffic-chart", { title: "Predictions per window", series: perVersion() },
      versionSeries(windows, versions, (w) => w.predictions));
    draw("usage-chart", { title: "Predictions metered per hour", series: [{ label: "prediction rows" }] }, meterSeries(meters, name));
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  const picker = isOperator() ? await tenantPicker(load) : null;
  mount(root, header, picker, form, body);
  await load();
  return drop;
}

// ------------------------------------------------------------------------------------------------------- usage

export async function usage(root) {
  const charts = [];
  const tenants = isOperator() ? (await api("ingestion", "/v1/partners")).partners : [];
  const form = h("form", { id: "usage-form" },
    isOperator() ? [h("label", { for: "usage-tenant" }, "Tenant"), h("select", { id: "usage-tenant", name: "tenant", "data-field": "tenant" },
      h("option", { value: "" }, "every tenant"), tenants.map((t) => h("option", { value: t.id }, `${t.name} (${t.id})`)))] : null,
    h("label", { for: "usage-days" }, "Last days"), h("input", { id: "usage-days", name: "days", type: "number", value: 30, "data-field": "days" }),
    h("label", { for: "usage-period" }, "or billing month (YYYY-MM)"), h("input", { id: "usage-period", name: "period", "data-field": "period", placeholder: "2026-01" }),
    h("label", { for: "usage-bucket" }, "Per"), h("select", { id: "usage-bucket", name: "bucket", "data-field": "bucket" },
      ["day", "hour", "month"].map((b) => h("option", { value: b }, b))),
    h("button", { type: "submit" }, "Show"));
  const body = h("div", { id: "usage" });
  const drop = () => { while (charts.length) charts.pop().destroy(); };

  const load = async () => {
    drop();
    clearError(form);
    const query = { days: form.days.value, period: form.period.value.trim(), bucket: form.bucket.value, tenant: isOperator() ? form.tenant.value : undefined };
    let report;
    let quotas = null;
    try {
      if (isOperator()) report = await api("ingestion", "/v1/billing/usage", { query });
      else ({ report, ...quotas } = await api("ingestion", "/v1/usage", { query }));
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) throw error;
      mount(body);
      return showError(form, error);
    }
    const totals = new Map();
    for (const row of report.meters) {
      const key = `${row.tenant}\u0000${row.meter}`;
      const entry = totals.get(key) || { tenant: row.tenant, meter: row.meter, value: 0, records: 0 };
      entry.value += row.value;
      entry.records += row.records;
      totals.set(key, entry);
    }
    const meterNames = [...new Set(report.meters.map((m) => m.meter))].sort();
    mount(body,
      h("p", { class: "muted" }, `From ${when(report.from)} to ${when(report.to)}, per ${report.bucket}.`),
      wrap(table([
        isOperator() && { title: "Tenant", key: "tenant" },
        { title: "Meter", key: "meter" },
        { title: "Total", class: "num", render: (r) => Number(r.value.toFixed(3)).toLocaleString() },
        { title: "Records", class: "num", key: "records" },
      ].filter(Boolean), [...totals.values()], { empty: "Nothing metered in this window." })),
      quotas ? [h("h2", {}, "Daily pushes and quotas"), wrap(table([
        { title: "Day", key: "day" },
        { title: "Items", class: "num", key: "items" },
        { title: "Bytes", class: "num", key: "bytes" },
        { title: "Pushes", class: "num", key: "pushes" },
      ], quotas.days, { empty: "No push yet." })),
      h("p", { class: "muted" }, `Daily quotas: ${quotas.daily_item_quota ?? "no"} items, ${quotas.daily_byte_quota ?? "no"} bytes.`)] : null,
      h("div", { class: "grid charts" }, meterNames.map((meter) => chartBox(`meter-${meter}`))));
    for (const meter of meterNames) {
      const rows = report.meters.filter((m) => m.meter === meter);
      const buckets = [...new Set(rows.map((m) => m.bucket))].sort();
      const owners = [...new Set(rows.map((m) => m.tenant))].sort();
      const data = [buckets.map((b) => seconds(b.length === 7 ? `${b}-01` : b)),
        ...owners.map((owner) => buckets.map((b) => rows.filter((m) => m.bucket === b && m.tenant === owner).reduce((sum, m) => sum + m.value, 0)))];
      const chart = lineChart(body.querySelector(`#meter-${CSS.escape(meter)}`), { title: meter, series: owners.map((owner) => ({ label: owner })) });
      chart.update(data);
      charts.push(chart);
    }
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  mount(root, h("h1", {}, "Usage"), h("p", { class: "muted" }, isOperator() ? "Every tenant's meters, as billing counts them." : "Your meters, as billing counts them."), form, body);
  await load();
  return drop;
}

// ------------------------------------------------------------------------------------------------ dead letters

async function servicesOf() {
  const response = await fetch(new URL("config.json", document.baseURI));
  return (await response.json()).services;
}

export async function deadLetters(root) {
  const services = await servicesOf();
  const include = h("input", { id: "include-replayed", type: "checkbox", style: "width:auto" });
  const body = h("div", { id: "dead-letters" });
  const load = async () => {
    const sections = await Promise.all(services.map(async (service) => {
      const card = h("section", { class: "card", "data-service": service }, h("h2", {}, service));
      try {
        const { dead_letters: letters } = await api(service, "/v1/admin/dead-letters", { query: { include_replayed: include.checked } });
        card.append(wrap(table([
          { title: "#", key: "id" },
          { title: "Event", render: (d) => [d.event_type || "—", h("div", { class: "muted" }, d.event_id || "")] },
          { title: "Consumer", render: (d) => h("code", {}, d.consumer) },
          { title: "Error", render: (d) => h("span", { class: "muted" }, d.error) },
          { title: "Attempts", class: "num", key: "attempts" },
          { title: "Failed", render: (d) => when(d.created_at) },
          { title: "Replayed", render: (d) => (d.replay_count ? `${d.replay_count}× · ${when(d.replayed_at)}` : "—") },
          { title: "", render: (d) => h("button", { type: "button", class: "replay", "data-id": d.id, onclick: () => replay(service, d, card) }, "Replay") },
        ], letters, { empty: "No dead letter." })));
      } catch (error) {
        card.append(shown(error));
      }
      return card;
    }));
    mount(body, sections);
  };
  const replay = async (service, letter, card) => {
    const ok = await confirmAction(`Replay dead letter #${letter.id} of ${service}?`, `The event ${letter.event_type || ""} goes again to ${letter.consumer}; its inbox still drops it if it was handled since.`, { confirm: "Replay" });
    if (!ok) return;
    try {
      await api(service, `/v1/admin/dead-letters/${letter.id}/replay`, { method: "POST" });
      toast(`Dead letter #${letter.id} sent again`);
      await load();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) throw error;
      showError(card, error);
    }
  };
  include.addEventListener("change", load);
  mount(root, h("h1", {}, "Dead letters"),
    h("p", { class: "muted" }, "Events a consumer still failed after its retries, per service, newest first."),
    h("label", {}, include, " include replayed ones"), body);
  await load();
}
