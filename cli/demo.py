"""`flywheel demo` (and `make demo`): the whole loop on real data, with nobody touching a queue.

For each dataset — handwritten digits (images) and standard-library docstrings (text), see demo_data.py —
and each cycle: a partner pushes a new share of the data; three simulated annotators label every task from
the ground truth with 10% noise; consensus forms; the retrain policy fires a snapshot and a training run;
training exports a verified ONNX model; the registry's gate promotes it (or keeps production); inference
hot-swaps to it; a held-out set is predicted and every wrong prediction is sent back as feedback, which
becomes a high-priority labeling task in the next cycle. A summary table is printed and written as JSON.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cli.demo_data import DIGIT_LABELS, TEXT_LABELS, digit_images, shuffled, stdlib_docstrings
from shared.client import Flywheel, answer_or_none, wait_for
from shared.settings import Settings
from shared.tables import render

NOISE = 0.10
ANNOTATORS = 3
POLL_S = 0.5
"""How often the demo asks whether an asynchronous step (an event, a run, a promotion) has happened."""


@dataclass
class DatasetPlan:
    name: str
    task_type: str
    labels: tuple[str, ...]
    items: list[tuple[Any, str]]  # (text or png bytes, true label)
    per_cycle: int
    holdout: int
    retrain_threshold: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def item(self, content: Any, label: str | None = None) -> dict[str, Any]:
        key = "text" if self.task_type == "text_classification" else "image"
        return {key: content, "label": label}


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
    serving_version: int | None
    predictions: int
    holdout_accuracy: float | None
    feedback_sent: int
    seconds: dict[str, float]


def default_plans(scale: float = 1.0) -> list[DatasetPlan]:
    digits = shuffled(digit_images())
    texts = shuffled(stdlib_docstrings())
    return [
        DatasetPlan(
            "digits",
            "image_classification",
            DIGIT_LABELS,
            digits,
            per_cycle=int(600 * scale),
            holdout=int(200 * scale),
            retrain_threshold=int(500 * scale),
            hyperparameters={"epochs": 8, "image_size": 32},
        ),
        DatasetPlan(
            "stdlib-docs",
            "text_classification",
            TEXT_LABELS,
            texts,
            per_cycle=int(300 * scale),
            holdout=int(100 * scale),
            retrain_threshold=int(250 * scale),
            hyperparameters={"epochs": 4, "max_length": 64},
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
        states = {plan.name: self._prepare(plan) for plan in plans}
        for cycle in range(1, cycles + 1):
            for plan in plans:
                results.append(self._cycle(plan, states[plan.name], cycle))
        return results

    def _prepare(self, plan: DatasetPlan) -> dict[str, Any]:
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
        holdout, pool = plan.items[: plan.holdout], plan.items[plan.holdout :]
        return {
            "dataset": dataset["id"],
            "annotators": [self.operator.with_token(t).labeling for t in tokens],
            "truth": {},
            "pool": pool,
            "holdout": holdout,
            "offset": 0,
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
        version = decision = serving = None
        f1 = (run.get("metrics") or {}).get("macro_f1")
        if run["status"] == "succeeded":
            version, decision = self._registered(plan, run["id"])
            serving = self._serving_version(plan, state, version, decision)
        seconds["train_register_serve"] = time.monotonic() - started

        started = time.monotonic()
        predictions, accuracy, feedback = self._predict_and_feedback(plan, state) if serving else (0, None, 0)
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
            decision=decision,
            serving_version=serving,
            predictions=predictions,
            holdout_accuracy=accuracy,
            feedback_sent=feedback,
            seconds={k: round(v, 1) for k, v in seconds.items()},
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
                    f"  run {run['status']}: macro-F1 {metrics.get('macro_f1')}"
                    + (f" ({run.get('failure_reason')})" if run.get("failure_reason") else "")
                )
                return run
            time.sleep(1)

    def _registered(self, plan: DatasetPlan, run_id: str) -> tuple[int | None, str | None]:
        def find() -> dict[str, Any] | None:
            versions = answer_or_none(lambda: self.partner.registry.versions(plan.name)) or []
            return next((v for v in versions if v.get("run_id") == run_id), None)

        version = wait_for(find, timeout=60, what="the registry to register the model", interval=POLL_S)
        outcome = (version.get("decision") or {}).get("outcome")
        self.say(f"  registered v{version['version']}: {outcome or 'recorded'}")
        return version["version"], outcome

    def _serving_version(self, plan: DatasetPlan, state: dict[str, Any], version: int | None, decision: Any) -> int:
        content = plan.item(state["holdout"][0][0])
        probe = {"texts": [content["text"]]} if "text" in content else {"images": [content["image"]]}

        def served() -> int | None:
            answer = answer_or_none(lambda: self.partner.inference.predict(plan.name, **probe))
            if answer is None:
                return None
            expected = version if decision == "production" or state["version"] is None else state["version"]
            return answer["model_version"] if answer["model_version"] in {expected, version} else None

        serving = wait_for(served, timeout=120, what="inference to serve the model", interval=POLL_S)
        state["version"] = serving
        self.say(f"  inference serves v{serving}")
        return serving

    def _predict_and_feedback(self, plan: DatasetPlan, state: dict[str, Any]) -> tuple[int, float, int]:
        correct = sent = served = 0
        holdout = state["holdout"]
        for start in range(0, len(holdout), 32):
            batch = holdout[start : start + 32]
            contents = [plan.item(content) for content, _ in batch]
            if "text" in contents[0]:
                answer = self.partner.inference.predict(plan.name, texts=[c["text"] for c in contents])
            else:
                answer = self.partner.inference.predict(plan.name, images=[c["image"] for c in contents])
            for prediction, (_, truth) in zip(answer["predictions"], batch, strict=True):
                served += 1
                if prediction["label"] == truth:
                    correct += 1
                elif sent < 20:
                    self.partner.inference.feedback(prediction["prediction_id"], truth)
                    state["feedback_truth"][f"fb_{prediction['prediction_id']}"[:60]] = truth
                    sent += 1
        accuracy = correct / served if served else None
        self.say(f"  {served} predictions, held-out accuracy {accuracy:.3f}; {sent} corrections sent as feedback")
        return served, accuracy, sent


def summary_table(results: list[CycleResult]) -> str:
    headers = ["cycle", "dataset", "labels", "val F1", "version", "decision", "serving", "preds", "acc", "push s"]
    rows = [
        [
            r.cycle,
            r.dataset,
            r.consensus_labels,
            None if r.validation_macro_f1 is None else f"{r.validation_macro_f1:.3f}",
            r.version,
            r.decision,
            r.serving_version,
            r.predictions,
            None if r.holdout_accuracy is None else f"{r.holdout_accuracy:.3f}",
            r.seconds["push"],
            r.seconds["label"],
            r.seconds["train_register_serve"],
        ]
        for r in results
    ]
    return render([*headers, "label s", "train→serve s"], rows, align="><>>><>>>>>>", rule=True)


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
    out = settings.home / "demo" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"tenant": demo.tenant, "seconds": round(total, 1), "cycles": [asdict(r) for r in results]}, indent=2
        )
    )
    print(
        f"\nTotal {total:.0f}s. Summary: {out}. Logs: {settings.log_dir} "
        f"(follow one datum: flywheel trace <trace id printed above>)."
    )
    if keep_running or not started_here:
        print("The platform is still running: `flywheel status`, `flywheel down` to stop it.")
    return 0


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
