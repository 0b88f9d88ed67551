"""The `flywheel` commands that talk to the platform's APIs (the launcher's are in launcher.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.context import CliContext, progress
from shared.settings import SERVICES
from shared.tables import render

TERMINAL_RUN_STATES = {"succeeded", "failed", "cancelled"}


def partners_create(context: CliContext, name: str) -> int:
    issued = context.operator().ingestion.create_partner(name)
    print(f"partner {issued['partner']['id']} ({name})")
    print(f"API key (shown once, store it now): {issued['api_key']}")
    return 0


def datasets_create(context: CliContext, args: Any) -> int:
    options = {"overlap": args.overlap, "pii_policy": args.pii}
    if args.retrain_threshold:
        options["retrain_threshold"] = args.retrain_threshold
    dataset = context.partner().ingestion.create_dataset(args.name, args.task_type, args.labels.split(","), **options)
    print(json.dumps(dataset, indent=2))
    return 0


def datasets_show(context: CliContext, dataset_id: str) -> int:
    client = context.partner()
    print(
        json.dumps(
            client.ingestion.get_dataset(dataset_id) | {"labeling": client.labeling.dataset(dataset_id)}, indent=2
        )
    )
    return 0


def datasets_stats(context: CliContext, dataset_id: str) -> int:
    stats = context.partner().labeling.stats(dataset_id)
    print(f"tasks: {stats['tasks']}")
    print(f"labels: {stats['label_counts']}")
    kappa = stats["fleiss_kappa"]
    print(
        f"percent agreement: {_pct(stats['percent_agreement'])}   Fleiss' kappa: "
        f"{'n/a' if kappa is None else f'{kappa:.3f}'} over {stats['items_in_agreement_stats']} items"
    )
    columns = ["annotator_id", "labels", "agreement_with_consensus"]
    print(render(columns, stats["annotators"], none="None", empty="(none)"))
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def label(context: CliContext, dataset_id: str) -> int:
    """An interactive labeling loop: the next task, its pre-label, a number to choose, s to skip, q to quit."""
    labeling = context.annotator().labeling
    done = 0
    while True:
        task = labeling.next_task(dataset_id)
        if task is None:
            print(f"\nNothing left to label. You labeled {done} tasks.")
            return 0
        labels = task["labels"]
        print("\n" + "-" * 60)
        if task.get("text") is not None:
            print(task["text"])
        else:
            print(f"[image, sha256 {task['sha256'][:12]}…; fetch /v1/tasks/{task['id']}/content to view]")
        if task.get("prelabel"):
            print(f"model suggests: {task['prelabel']} ({100 * (task['prelabel_confidence'] or 0):.0f}%)")
        if task.get("feedback"):
            print(f"a user corrected it to: {task['feedback']['correct_label']}")
        for number, name in enumerate(labels, start=1):
            print(f"  {number}. {name}")
        answer = input("label [number, s=skip, q=quit]: ").strip().lower()
        if answer == "q":
            print(f"You labeled {done} tasks.")
            return 0
        if answer == "s":
            labeling.skip(task["id"])
            continue
        if answer.isdigit() and 1 <= int(answer) <= len(labels):
            result = labeling.annotate(task["id"], labels[int(answer) - 1])
            done += 1
            if result["task_status"] == "done":
                print(f"consensus: {result['consensus_label']}")
        else:
            print("not a choice; the task stays yours (its lease is renewed when you ask again)")


def retrain(context: CliContext, args: Any) -> int:
    operator = context.operator()
    snapshot_id = args.snapshot
    if snapshot_id is None:
        snapshot = operator.labeling.create_snapshot(args.dataset)
        snapshot_id = snapshot["id"]
        print(f"snapshot {snapshot_id}: {snapshot['item_count']} items {snapshot['label_counts']}")
    dataset = operator.labeling.dataset(args.dataset)
    options: dict[str, Any] = {"reason": args.reason}
    if args.base_model:
        options["base_model"] = args.base_model
    if args.hyperparameters:
        options["hyperparameters"] = json.loads(args.hyperparameters)
    run = operator.training.create_run(
        dataset["tenant"], args.dataset, snapshot_id, model_name=args.model_name, **options
    )
    print(f"run {run['id']} {run['status']}; follow it with `flywheel runs watch {run['id']}`")
    return 0


def runs_list(context: CliContext, args: Any) -> int:
    client = context.partner() if context.api_key else context.operator()
    query = {k: v for k, v in {"status": args.status, "dataset_id": args.dataset}.items() if v}
    runs = client.training.list_runs(**query)
    rows = [
        {
            "id": run["id"],
            "status": run["status"],
            "model": run.get("model_name"),
            "epoch": (run.get("progress") or {}).get("epoch"),
            "macro_f1": (run.get("metrics") or {}).get("macro_f1"),
            "created": run.get("created_at", "")[:19],
        }
        for run in runs
    ]
    print(render(["id", "status", "model", "epoch", "macro_f1", "created"], rows, none="None", empty="(none)"))
    return 0


def usage(context: CliContext, args: Any) -> int:
    """A partner's own usage (with its API key), or an operator's view of every tenant or one (`--tenant`);
    `--export` prints a billing period's records as CloudEvents JSON lines or CSV."""
    by = args.by or []
    if args.export:
        if not args.period:
            raise SystemExit("--export needs --period YYYY-MM (a billing period)")
        body = context.operator().ingestion.billing_export(args.period, tenant=args.tenant, format=args.export)
        sys.stdout.write(body.decode() if isinstance(body, bytes) else str(body))
        return 0
    if context.api_key and not args.tenant:
        report = context.partner().ingestion.usage(period=args.period, bucket=args.bucket, by=by)["report"]
    else:
        report = context.operator().ingestion.billing_usage(
            tenant=args.tenant, period=args.period, bucket=args.bucket, by=by
        )
    print(f"usage from {report['from']} to {report['to']} per {report['bucket']}")
    columns = ["tenant", "meter", "bucket", *report["by"], "value"]
    rows = [row | {"value": _quantity(row["value"])} for row in report["meters"]]
    print(render(columns, rows, none="-", empty="(no usage)"))
    return 0


def _quantity(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def invoice(context: CliContext, args: Any) -> int:
    """Each tenant's invoice for a billing period: one line per priced meter, and the total (operator)."""
    answer = context.operator().ingestion.billing_invoices(args.period, tenant=args.tenant)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if not answer["invoices"]:
        print(f"no usage in {args.period}")
    columns = ["meter", "quantity", "unit", "unit_price", "amount"]
    for found in answer["invoices"]:
        print(f"invoice {found['tenant']} {found['period']} ({found['currency']})")
        print(render(columns, found["lines"], none="-", empty="(nothing billable)"))
        print(f"total {found['total']} {found['currency']}")
        print()
    return 0


def runs_watch(context: CliContext, run_id: str, interval: float = 1.0) -> int:
    client = context.partner() if context.api_key else context.operator()
    while True:
        run = client.training.get_run(run_id)
        state = run.get("progress") or {}
        epochs, loss, eta = state.get("epochs"), state.get("loss"), state.get("eta_seconds")
        shown_loss = "-" if loss is None else f"{loss:.4f}"
        shown_eta = "-" if eta is None else f"{eta:.0f}s"
        label = f"{run['status']:<10} loss {shown_loss} eta {shown_eta}"
        progress(state.get("epoch") or 0, epochs, label)
        if run["status"] in TERMINAL_RUN_STATES:
            print(file=sys.stderr)
            print(json.dumps({k: run.get(k) for k in ("id", "status", "metrics", "failure_reason")}, indent=2))
            return 0 if run["status"] == "succeeded" else 1
        time.sleep(interval)


def predict(context: CliContext, args: Any) -> int:
    inference = context.partner().inference
    if args.image:
        answer = inference.predict(args.model, images=[Path(path).read_bytes() for path in args.image])
    else:
        answer = inference.predict(args.model, texts=args.text)
    print(f"model {answer['model_name']} v{answer['model_version']}")
    for prediction in answer["predictions"]:
        top = sorted(prediction["probabilities"].items(), key=lambda kv: -kv[1])[:3]
        print(
            f"{prediction['prediction_id']}  {prediction['label']:<15} "
            + "  ".join(f"{name}={p:.2f}" for name, p in top)
        )
    return 0


def trace(context: CliContext, trace_id: str, args: Any) -> int:
    """Every log line of every service that carries this trace id, as one timeline (see cli/trace.py)."""
    from cli.trace import Cluster, run_trace

    if args.kubernetes and args.source:
        print("flywheel: name a log source or --kubernetes, not both", file=sys.stderr)
        return 2
    cluster = Cluster(args.namespace, args.context, args.since) if args.kubernetes else None
    return run_trace(trace_id, source=args.source, log_dir=args.logs or context.settings.log_dir, cluster=cluster)


def collect_trace(log_dir: Path, trace_id: str) -> list[dict[str, Any]]:
    """The lines of the local log files (`flywheel up`'s) that carry `trace_id`, oldest first."""
    from cli.trace import collect_trace as collect
    from cli.trace import file_lines

    return collect(file_lines(log_dir), trace_id) if log_dir.exists() else []


def base_models_import(context: CliContext, name: str, path: Path, sha256: str | None) -> int:
    from services.training.base_models import import_base_model
    from shared.storage import create_store

    settings = context.settings
    store = create_store(
        s3_endpoint=settings.s3_endpoint or None,
        s3_access_key=settings.s3_access_key,
        s3_secret_key=settings.s3_secret_key,
        s3_secure=settings.s3_secure,
        s3_region=settings.s3_region,
        file_root=settings.file_store_root,
        s3_server_side_encryption=settings.s3_server_side_encryption,
    )
    record = import_base_model(store, name, path, expected_sha256=sha256)
    print(json.dumps(record, indent=2))
    return 0


def dead_letters_list(context: CliContext, service: str | None, include_replayed: bool) -> int:
    operator = context.operator()
    rows = []
    for name in [service] if service else SERVICES:
        answer = operator.admin(name).get("/v1/admin/dead-letters", params={"include_replayed": include_replayed})
        rows += [
            {
                "service": name,
                "id": row["id"],
                "consumer": row["consumer"],
                "attempts": row["attempts"],
                "replayed": "yes" if row.get("replayed_at") else "no",
                "error": row["error"][:80],
            }
            for row in answer["dead_letters"]
        ]
    print(render(["service", "id", "consumer", "attempts", "replayed", "error"], rows, empty="no dead letters"))
    return 0


def dead_letters_replay(context: CliContext, service: str, dead_letter_id: int) -> int:
    replayed = context.operator().admin(service).post(f"/v1/admin/dead-letters/{dead_letter_id}/replay")
    print(f"replayed dead letter {dead_letter_id} of {service} to {replayed['consumer']}")
    return 0
