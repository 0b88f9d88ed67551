"""`flywheel demo` (and `make demo`): the whole loop on real data, with nobody touching a queue.

Each dataset — handwritten digits (images), standard-library docstrings (text) and synthetic sentences with
people, companies, places and dates (entity spans), see demo_data.py — is split three ways before anything is
sent, and no item moves between the parts:

- the pool: pushed by the partner, a new share each cycle, and labeled;
- production traffic: a separate stream of requests, a new share each cycle, predicted by the version in
  production; every wrong answer is sent back as feedback (the loop's feedback), which becomes a
  high-priority labeling task in the next cycle, and so training data;
- held out: predicted every cycle and never pushed, labeled, fed back or trained on. Its accuracy is the
  summary's figure: how the served version does on items the platform has never seen in any form.

Each cycle: the partner pushes; three simulated annotators label every task from the ground truth with 10%
noise; consensus forms; the retrain policy fires a snapshot and a training run; training exports a verified
ONNX model and scores it and production on the snapshot's test split; the registry's gate promotes it or
keeps production; inference hot-swaps to a promoted version; the held-out set and the cycle's traffic are
predicted. Two tables are printed and written as JSON: the cycles, and the gate's decisions (both versions'
scores on the same test items, the interval of the difference, each condition passed or failed).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cli.demo_data import (
    DIGIT_LABELS,
    ENTITY_LABELS,
    HELD_OUT_ENTITY_TEMPLATES,
    TEXT_LABELS,
    digit_images,
    entity_sentences,
    shuffled,
    stdlib_docstrings,
)
from shared.client import Flywheel, answer_or_none, wait_for
from shared.settings import Settings
from shared.tables import render

PRODUCTION = "production"
TOKENS = "token_classification"

NOISE = 0.10
ANNOTATORS = 3
POLL_S = 0.5
"""How often the demo asks whether an asynchronous step (an event, a run, a promotion) has happened."""


@dataclass
class DatasetPlan:
    name: str
    task_type: str
    labels: tuple[str, ...]
    items: list[tuple[Any, Any]]  # (text or png bytes, true label; for entity spans, the true spans)
    per_cycle: int
    """Pool items the partner pushes each cycle."""
    traffic: int
    """Production requests each cycle; their wrong answers are the feedback."""
    holdout: int
    """Items only ever predicted: the held-out accuracy's denominator."""
    retrain_threshold: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def spans(self) -> bool:
        return self.task_type == TOKENS

    def item(self, content: Any, label: str | None = None) -> dict[str, Any]:
        if self.spans:
            return {"text": content}  # pushed unlabeled: the annotators mark the entities
        key = "text" if self.task_type == "text_classification" else "image"
        return {key: content, "label": label}


@dataclass
class GateResult:
    """What the registry's gate decided for one version, read from the version's recorded decision."""

    outcome: str | None
    reason: str | None
    test_set: dict[str, Any] | None  # {snapshot_id, split, items, sha256}: the items both versions were scored on
    metric: str | None
    candidate: float | None
    production_version: int | None
    production: float | None  # production's score on the same test items (None when there was no production)
    production_error: str | None
    difference: dict[str, Any] | None  # {value, ci_low, ci_high, confidence, method}
    conditions: list[dict[str, Any]]  # [{name, passed}] in the gate's order
    baseline_lift: float | None = None  # candidate macro-F1 minus the classical baseline's, on the same test items

    @classmethod
    def from_decision(cls, decision: dict[str, Any] | None) -> GateResult:
        decision = decision or {}
        metric = (decision.get("policy") or {}).get("primary_metric")
        candidate = (decision.get("candidate") or {}).get("metrics") or {}
        production = decision.get("production") or {}
        difference = decision.get("difference")
        return cls(
            outcome=decision.get("outcome"),
            reason=decision.get("reason"),
            test_set=decision.get("evaluation_set"),
            metric=metric,
            candidate=candidate.get(metric),
            production_version=production.get("version"),
            production=(production.get("metrics") or {}).get(metric),
            production_error=production.get("error"),
            difference=None
            if difference is None
            else {key: difference.get(key) for key in ("value", "ci_low", "ci_high", "confidence", "method")},
            conditions=[{"name": c["name"], "passed": c["passed"]} for c in decision.get("conditions") or []],
            baseline_lift=decision.get("baseline_lift"),
        )


@dataclass
class CycleResult:
    cycle: int
    dataset: str
    pushed: int
    consensus_labels: int
    feedback_tasks: int
    run_id: str | None
    validation_macro_f1: float | None
    version: int | None
    decision: str | None
    gate: GateResult | None
    serving_version: int | None
    holdout_predictions: int
    holdout_accuracy: float | None
    traffic_predictions: int
    traffic_accuracy: float | None
    feedback_sent: int
    seconds: dict[str, float]
    entity_f1: float | None = None
    """Token classification: the served version's entity F1 (exact offsets and type, micro) on the held-out
    sentences, written from templates the training sentences never use; None for the classification datasets."""
    traffic_entity_f1: float | None = None


def default_plans(scale: float = 1.0) -> list[DatasetPlan]:
    """Sized so that the first snapshot (the retrain threshold's worth of labels) already has a test split the
    gate decides on: 10% of 500 items is 50, and fewer than the registry's default 30 happens about once in 2,000
    datasets. Pool, traffic and held-out items for two cycles: digits 1,200 + 300 + 200 of 1,797, text
    1,160 + 200 + 150 of about 1,550, entity sentences 600 + 120 + 150 (faker's names, companies, cities and dates
    in templates of demo_data.py; the held-out ones from templates no other sentence uses)."""
    digits = shuffled(digit_images())
    texts = shuffled(stdlib_docstrings())
    holdout_sentences = int(150 * scale)
    return [
        DatasetPlan(
            "digits",
            "image_classification",
            DIGIT_LABELS,
            digits,
            per_cycle=int(600 * scale),
            traffic=int(150 * scale),
            holdout=int(200 * scale),
            retrain_threshold=int(500 * scale),
            hyperparameters={"epochs": 8, "image_size": 32},
        ),
        DatasetPlan(
            "stdlib-docs",
            "text_classification",
            TEXT_LABELS,
            texts,
            per_cycle=int(580 * scale),
            traffic=int(100 * scale),
            holdout=int(150 * scale),
            retrain_threshold=int(500 * scale),
            hyperparameters={"epochs": 3, "max_length": 64},
        ),
        DatasetPlan(
            "people-places",
            TOKENS,
            ENTITY_LABELS,
            entity_sentences(holdout_sentences, seed=11, templates=HELD_OUT_ENTITY_TEMPLATES)
            + entity_sentences(int(720 * scale), seed=7),
            per_cycle=int(300 * scale),
            traffic=int(60 * scale),
            holdout=holdout_sentences,
            retrain_threshold=int(250 * scale),
            hyperparameters={"epochs": 3, "max_length": 48},
        ),
    ]


class Demo:
    def __init__(self, settings: Settings, *, say: Callable[[str], None] = print, seed: int = 7) -> None:
        self.settings = settings
        self.say = say
        self.random = random.Random(seed)  # noqa: S311 - simulated annotator noise, not a secret
        token = settings.internal_token or (settings.home / "internal-token").read_text().strip()
        self.tenant_name = f"demo-{uuid.uuid4().hex[:6]}"
        self.operator = Flywheel.from_settings(settings, token)
        self.partner: Flywheel | None = None
        self.tenant = ""

    def run(self, plans: list[DatasetPlan], cycles: int) -> list[CycleResult]:
        issued = self.operator.ingestion.create_partner(self.tenant_name)
        self.tenant = issued["partner"]["id"]
        self.partner = self.operator.with_token(issued["api_key"])
        self.say(f"partner {self.tenant_name} ({self.tenant})")
        results: list[CycleResult] = []
        states = {plan.name: self._prepare(plan, cycles) for plan in plans}
        for cycle in range(1, cycles + 1):
            for plan in plans:
                results.append(self._cycle(plan, states[plan.name], cycle))
        return results

    def _prepare(self, plan: DatasetPlan, cycles: int) -> dict[str, Any]:
        dataset = self.partner.ingestion.create_dataset(
            plan.name, plan.task_type, list(plan.labels), overlap=ANNOTATORS, retrain_threshold=plan.retrain_threshold
        )
        wait_for(
            lambda: self._labeling_knows(dataset["id"]),
            timeout=30,
            what="labeling to learn of the dataset",
            interval=POLL_S,
        )
        # Sized for a laptop CPU: 32-pixel digits, MiniLM at 64 tokens, a few epochs.
        self.partner.labeling.settings(dataset["id"], training_hyperparameters=plan.hyperparameters)
        tokens = [
            self.operator.labeling.create_annotator(self.tenant, f"annotator-{i + 1}", [dataset["id"]])["token"]
            for i in range(ANNOTATORS)
        ]
        # Three disjoint parts, fixed before anything is sent: held out, production traffic, the pool.
        traffic_end = plan.holdout + plan.traffic * cycles
        return {
            "dataset": dataset["id"],
            "annotators": [self.operator.with_token(t).labeling for t in tokens],
            "truth": {},
            "holdout": plan.items[: plan.holdout],
            "traffic": plan.items[plan.holdout : traffic_end],
            "pool": plan.items[traffic_end:],
            "offset": 0,
            "traffic_offset": 0,
            "feedback_truth": {},
            "version": None,
        }

    def _labeling_knows(self, dataset_id: str) -> bool:
        return answer_or_none(lambda: self.partner.labeling.dataset(dataset_id)) is not None

    def _cycle(self, plan: DatasetPlan, state: dict[str, Any], cycle: int) -> CycleResult:
        seconds: dict[str, float] = {}
        dataset_id = state["dataset"]
        self.say(f"\n== cycle {cycle}: {plan.name}")
        started = time.monotonic()
        chunk = state["pool"][state["offset"] : state["offset"] + plan.per_cycle]
        state["offset"] += len(chunk)
        runs_before = {run["id"] for run in self.operator.training.list_runs(dataset_id=dataset_id)}
        trace_id = f"demo-{plan.name}-cycle{cycle}-{uuid.uuid4().hex[:6]}"
        for start in range(0, len(chunk), 100):
            batch = chunk[start : start + 100]
            answer = self.partner.ingestion.push(
                dataset_id, [plan.item(content) for content, _ in batch], trace_id=trace_id
            )
            for result, (_, label) in zip(answer["items"], batch, strict=True):
                if result["item_id"]:
                    state["truth"][result["item_id"]] = label
        seconds["push"] = time.monotonic() - started
        self.say(f"pushed {len(chunk)} items (trace {trace_id})")

        started = time.monotonic()
        wait_for(
            lambda: self._open_tasks(dataset_id) >= len(chunk) * 0.95,
            timeout=60,
            what="labeling tasks",
            interval=POLL_S,
        )
        labeled, feedback_tasks = self._label_everything(plan, state)
        seconds["label"] = time.monotonic() - started
        self.say(f"{labeled} annotations ({feedback_tasks} feedback tasks); consensus forming")

        started = time.monotonic()
        run = wait_for(
            lambda: self._new_run(dataset_id, runs_before),
            timeout=60,
            what="the retrain policy to start a run",
            interval=POLL_S,
        )
        self.say(f"retrain policy fired: run {run['id']} on snapshot {run['snapshot_id']}")
        run = self._follow_run(run["id"])
        version = gate = None
        metrics = run.get("metrics") or {}
        f1 = metrics.get("entity_f1") if plan.spans else metrics.get("macro_f1")
        if run["status"] == "succeeded":
            version, gate = self._registered(plan, run["id"])
        serving = self._serving_version(plan, state, version, gate)
        seconds["train_register_serve"] = time.monotonic() - started

        started = time.monotonic()
        held_out: tuple[int, float | None] = (0, None)
        traffic: tuple[int, float | None, int] = (0, None, 0)
        entity_f1 = traffic_entity_f1 = None
        if serving is not None and plan.spans:
            count, entity_f1 = self._score_entities(plan, state["holdout"], "held out")
            held_out = (count, None)
            start = state["traffic_offset"]
            state["traffic_offset"] += plan.traffic
            (count, traffic_entity_f1) = self._score_entities(
                plan, state["traffic"][start : start + plan.traffic], "traffic"
            )
            traffic = (count, None, 0)
        elif serving is not None:
            held_out = self._score_held_out(plan, state)
            traffic = self._serve_traffic(plan, state)
        seconds["predict_feedback"] = time.monotonic() - started
        stats = self.partner.labeling.stats(dataset_id)
        return CycleResult(
            cycle=cycle,
            dataset=plan.name,
            pushed=len(chunk),
            consensus_labels=stats["tasks"].get("done", 0),
            feedback_tasks=feedback_tasks,
            run_id=run["id"],
            validation_macro_f1=f1,
            version=version,
            decision=None if gate is None else gate.outcome,
            gate=gate,
            serving_version=serving,
            holdout_predictions=held_out[0],
            holdout_accuracy=held_out[1],
            traffic_predictions=traffic[0],
            traffic_accuracy=traffic[1],
            feedback_sent=traffic[2],
            seconds={k: round(v, 1) for k, v in seconds.items()},
            entity_f1=entity_f1,
            traffic_entity_f1=traffic_entity_f1,
        )

    def _open_tasks(self, dataset_id: str) -> int:
        return len(self.partner.labeling.tasks(dataset_id, status="open", limit=1000))

    def _label_everything(self, plan: DatasetPlan, state: dict[str, Any]) -> tuple[int, int]:
        """Each annotator labels everything it is handed, from the truth, wrong 10% of the time."""
        labeled = feedback = 0
        active = list(state["annotators"])
        while active:
            for annotator in list(active):
                task = annotator.next_task(state["dataset"])
                if task is None:
                    active.remove(annotator)
                    continue
                truth = state["truth"].get(task["item_id"]) or state["feedback_truth"].get(task["item_id"])
                if truth is None:
                    annotator.skip(task["id"])
                    continue
                feedback += task["source"] == "feedback"
                if plan.spans:
                    spans = list(truth)
                    if spans and self.random.random() < NOISE:  # an annotator's typical slip: a missed entity
                        spans.pop(self.random.randrange(len(spans)))
                    annotator.annotate(task["id"], spans=spans)
                    labeled += 1
                    continue
                label = truth
                if self.random.random() < NOISE:
                    label = self.random.choice([name for name in plan.labels if name != truth])
                annotator.annotate(task["id"], label)
                labeled += 1
        return labeled, feedback // ANNOTATORS

    def _new_run(self, dataset_id: str, before: set[str]) -> dict[str, Any] | None:
        runs = [r for r in self.operator.training.list_runs(dataset_id=dataset_id) if r["id"] not in before]
        return runs[-1] if runs else None

    def _follow_run(self, run_id: str) -> dict[str, Any]:
        last_epoch = -1
        while True:
            run = self.operator.training.get_run(run_id)
            progress = run.get("progress") or {}
            if progress.get("epoch", 0) != last_epoch and run["status"] == "running":
                last_epoch = progress.get("epoch", 0)
                loss = progress.get("loss")
                self.say(
                    f"  training: epoch {last_epoch}/{progress.get('epochs')}"
                    + (f" loss {loss:.3f}" if loss is not None else "")
                )
            if run["status"] in {"succeeded", "failed", "cancelled"}:
                metrics = run.get("metrics") or {}
                self.say(
                    f"  run {run['status']}: "
                    + (
                        f"entity F1 {metrics['entity_f1']}"
                        if "entity_f1" in metrics
                        else f"macro-F1 {metrics.get('macro_f1')}"
                    )
                    + (f" ({run.get('failure_reason')})" if run.get("failure_reason") else "")
                )
                return run
            time.sleep(1)

    def _registered(self, plan: DatasetPlan, run_id: str) -> tuple[int, GateResult]:
        def find() -> dict[str, Any] | None:
            versions = answer_or_none(lambda: self.partner.registry.versions(plan.name)) or []
            return next((v for v in versions if v.get("run_id") == run_id), None)

        version = wait_for(find, timeout=60, what="the registry to register the model", interval=POLL_S)
        gate = GateResult.from_decision(version.get("decision"))
        self.say(f"  registered v{version['version']}: {gate.outcome or 'recorded'} ({gate.reason or 'no decision'})")
        if gate.test_set is not None:
            scores = f"candidate {_score(gate.candidate)}"
            if gate.production_version is not None:
                scores += f", production v{gate.production_version} " + (
                    _score(gate.production) if gate.production_error is None else f"not scored: {gate.production_error}"
                )
            self.say(f"  gate: {gate.metric} on {_test_set(gate.test_set)}: {scores}, {_interval(gate.difference)}")
            self.say(f"  gate conditions: {_conditions(gate.conditions)}")
        return version["version"], gate

    def _serving_version(
        self, plan: DatasetPlan, state: dict[str, Any], version: int | None, gate: GateResult | None
    ) -> int | None:
        """The version inference answers with once the gate's decision has taken effect (None: nothing serves)."""
        promoted = gate is not None and gate.outcome == PRODUCTION
        expected = version if promoted else state["version"]
        if expected is None:
            self.say("  nothing is in production yet: no predictions this cycle")
            return None
        content = plan.item(state["holdout"][0][0])
        probe = {"texts": [content["text"]]} if "text" in content else {"images": [content["image"]]}

        def served() -> int | None:
            answer = answer_or_none(lambda: self.partner.inference.predict(plan.name, **probe))
            return expected if answer is not None and answer["model_version"] == expected else None

        serving = wait_for(served, timeout=120, what=f"inference to serve v{expected}", interval=POLL_S)
        state["version"] = serving
        self.say(f"  inference serves v{serving}" + ("" if promoted else " (production keeps serving)"))
        return serving

    def _predict(self, plan: DatasetPlan, items: list[tuple[Any, str]]) -> list[tuple[dict[str, Any], str]]:
        """Each item's served prediction beside its true label."""
        answers = []
        for start in range(0, len(items), 32):
            batch = items[start : start + 32]
            contents = [plan.item(content) for content, _ in batch]
            if "text" in contents[0]:
                answer = self.partner.inference.predict(plan.name, texts=[c["text"] for c in contents])
            else:
                answer = self.partner.inference.predict(plan.name, images=[c["image"] for c in contents])
            answers += zip(answer["predictions"], [truth for _, truth in batch], strict=True)
        return answers

    def _score_held_out(self, plan: DatasetPlan, state: dict[str, Any]) -> tuple[int, float | None]:
        """Predict the held-out items; nothing about them goes back to the platform."""
        answers = self._predict(plan, state["holdout"])
        accuracy = _accuracy(answers)
        self.say(f"  held out: {len(answers)} predictions, accuracy {_score(accuracy)} (never pushed or fed back)")
        return len(answers), accuracy

    def _score_entities(self, plan: DatasetPlan, items: list[tuple[str, list[dict]]], what: str) -> tuple[int, float]:
        """Predict sentences and score the entities found against the true spans (exact offsets and type). Span
        corrections are not fed back yet (a token prediction is not logged), so traffic is only scored."""
        found: list[list[dict]] = []
        for start in range(0, len(items), 32):
            texts = [text for text, _ in items[start : start + 32]]
            found += [p["entities"] for p in self.partner.inference.predict(plan.name, texts=texts)["predictions"]]
        score = entity_f1([spans for _, spans in items], found)
        note = " (never pushed or fed back)" if what == "held out" else "; span corrections are not fed back yet"
        self.say(f"  {what}: {len(items)} sentences, entity F1 {_score(score)}{note}")
        return len(items), score

    def _serve_traffic(self, plan: DatasetPlan, state: dict[str, Any]) -> tuple[int, float | None, int]:
        """This cycle's production traffic; every wrong answer goes back as feedback, labeled in the next cycle."""
        start = state["traffic_offset"]
        requests = state["traffic"][start : start + plan.traffic]
        state["traffic_offset"] += len(requests)
        answers = self._predict(plan, requests)
        sent = 0
        for prediction, truth in answers:
            if prediction["label"] != truth:
                self.partner.inference.feedback(prediction["prediction_id"], truth)
                state["feedback_truth"][f"fb_{prediction['prediction_id']}"[:60]] = truth
                sent += 1
        accuracy = _accuracy(answers)
        self.say(
            f"  traffic: {len(answers)} predictions, accuracy {_score(accuracy)}; {sent} corrections sent as feedback"
        )
        return len(answers), accuracy, sent


def entity_f1(truth: list[list[dict]], found: list[list[dict]]) -> float:
    """Micro entity F1 over sentences: an entity counts when its offsets and type match exactly (seqeval's strict
    mode on the same spans)."""
    as_set = [{(s["start"], s["end"], s["label"]) for s in spans} for spans in truth]
    predicted = [{(s["start"], s["end"], s["label"]) for s in spans} for spans in found]
    hits = sum(len(t & p) for t, p in zip(as_set, predicted, strict=True))
    guessed, actual = sum(map(len, predicted)), sum(map(len, as_set))
    return 0.0 if hits == 0 else 2 * hits / (guessed + actual)


def _accuracy(answers: list[tuple[dict[str, Any], str]]) -> float | None:
    return sum(prediction["label"] == truth for prediction, truth in answers) / len(answers) if answers else None


def _score(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def _test_set(test_set: dict[str, Any]) -> str:
    return f"{test_set['snapshot_id']} ({test_set['items']} {test_set['split']} items)"


def _interval(difference: dict[str, Any] | None) -> str:
    if difference is None or difference.get("value") is None:
        return "nothing in production to compare with"
    if difference.get("ci_low") is None:
        return f"difference {difference['value']:+.3f}"
    return (
        f"difference {difference['value']:+.3f} [{difference['ci_low']:+.3f}, {difference['ci_high']:+.3f}] "
        f"({difference['confidence'] * 100:g}% interval)"
    )


def _conditions(conditions: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['name']}: {'pass' if c['passed'] else 'FAIL'}" for c in conditions) or "-"


def summary_table(results: list[CycleResult]) -> str:
    """One row per cycle and dataset: labels, the version trained, the gate's outcome, what serves, and the
    served version's accuracy on the held-out items (never seen by the platform) and on the cycle's traffic."""
    headers = [
        "cycle",
        "dataset",
        "labels",
        "val F1",
        "version",
        "decision",
        "serving",
        "held-out",
        "held-out acc",
        "entity_f1",
        "traffic acc",
        "feedback",
        "push s",
        "label s",
        "train→serve s",
    ]
    rows = [
        [
            r.cycle,
            r.dataset,
            r.consensus_labels,
            _score(r.validation_macro_f1),
            r.version,
            r.decision,
            r.serving_version,
            r.holdout_predictions,
            _score(r.holdout_accuracy),
            _score(r.entity_f1),
            _score(r.traffic_accuracy),
            r.feedback_sent,
            r.seconds["push"],
            r.seconds["label"],
            r.seconds["train_register_serve"],
        ]
        for r in results
    ]
    return render(headers, rows, align="><>>><>>>>>>>>>", rule=True)


def gate_table(results: list[CycleResult]) -> str:
    """One row per registered version: the test items the gate scored both versions on, both scores there, the
    interval of the difference, and each condition."""
    headers = [
        "cycle",
        "dataset",
        "version",
        "test set",
        "items",
        "metric",
        "candidate",
        "production",
        "difference",
        "baseline_lift",
    ]
    rows = []
    for r in results:
        gate = r.gate
        if gate is None or gate.test_set is None:
            continue
        if gate.production_version is None:
            production = None
        elif gate.production_error is not None:
            production = f"v{gate.production_version} not scored"
        else:
            production = f"v{gate.production_version} {_score(gate.production)}"
        difference = gate.difference or {}
        interval = None
        if difference.get("ci_low") is not None:
            interval = f"{difference['value']:+.3f} [{difference['ci_low']:+.3f}, {difference['ci_high']:+.3f}]"
        rows.append(
            [
                r.cycle,
                r.dataset,
                r.version,
                gate.test_set["snapshot_id"],
                gate.test_set["items"],
                gate.metric,
                _score(gate.candidate),
                production,
                interval,
                None if gate.baseline_lift is None else f"{gate.baseline_lift:+.3f}",
                _conditions(gate.conditions),
            ]
        )
    return render([*headers, "conditions"], rows, align="><><><>>>><", rule=True, empty="(no gate decisions)")


def run_demo(*, cycles: int = 2, keep_running: bool = True, scale: float = 1.0) -> int:
    from cli import launcher

    settings = Settings.from_env()
    started_here = False
    if launcher.status(out=_Null()) != 0:
        print("Starting the platform (flywheel up --detach)…")
        launcher.up(detach=True)
        started_here = True
    settings = Settings.from_env()
    began = time.monotonic()
    demo = Demo(settings, say=lambda line: print(line, flush=True))
    try:
        results = demo.run(default_plans(scale), cycles)
    finally:
        if started_here and not keep_running:
            launcher.down()
    total = time.monotonic() - began
    print("\n" + summary_table(results))
    print("\nThe gate: both versions scored on the same test items; the difference with its confidence interval")
    print(gate_table(results))
    out = settings.home / "demo" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"tenant": demo.tenant, "seconds": round(total, 1), "cycles": [asdict(r) for r in results]}, indent=2
        )
    )
    print(
        f"\nTotal {total:.0f}s. Summary: {out}. Logs: {settings.log_dir} "
        f"(follow one datum: flywheel trace <trace id printed above>). "
        f"A decision in full: flywheel models show <dataset> --tenant {demo.tenant} --version <n>."
    )
    if keep_running or not started_here:
        print("The platform is still running: `flywheel status`, `flywheel down` to stop it.")
    return 0


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
