"""The `flywheel` command: run the platform locally, and use every public API from a terminal.

Credentials come from the environment (or flags): FLYWHEEL_API_KEY for a partner's commands,
FLYWHEEL_INTERNAL_TOKEN (or the token file `flywheel up` writes) for operator commands, and
FLYWHEEL_ANNOTATOR_TOKEN for `flywheel label`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import requests

from shared.client import ApiError
from shared.events.catalog import TASK_TYPES
from shared.settings import SERVICES


def cmd_worker(args: argparse.Namespace) -> int:
    from celery.signals import worker_ready

    from cli.launcher import READY_FILE_ENV
    from shared.events.celery_app import service_queues
    from shared.logging import get_logger
    from shared.runtime import redact_url, worker_argv

    module = importlib.import_module(f"services.{args.service}.app")
    if not module.SPEC.runs_worker:
        print(f"flywheel: {args.service} runs no Celery worker: its HTTP processes consume its events", file=sys.stderr)
        return 2
    celery = module.create_celery()
    runtime = celery.flywheel_runtime
    runtime.bus.start_relay()
    argv = worker_argv(module.SPEC)
    get_logger(__name__).info(
        "worker_starting",
        queues=service_queues(module.SPEC.name),
        pool=module.SPEC.worker_pool,
        concurrency=module.SPEC.worker_concurrency,
        broker=redact_url(runtime.settings.redis_url),
    )
    ready_file = os.environ.get(READY_FILE_ENV)
    if ready_file:  # started by `flywheel up`, which waits until the worker consumes

        def on_ready(**_: Any) -> None:
            Path(ready_file).write_text(str(os.getpid()))

        worker_ready.connect(on_ready, weak=False)
    celery.worker_main(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cli.keys import add_keys_parser
    from cli.models import add_models_parser
    from cli.trace import add_trace_parser

    parser = argparse.ArgumentParser(prog="flywheel", description="Flywheel: data in, better models out.")
    parser.add_argument("--api-key", help="a partner API key (default: $FLYWHEEL_API_KEY)")
    parser.add_argument("--annotator-token", help="an annotator token (default: $FLYWHEEL_ANNOTATOR_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole platform on this machine")
    up.add_argument("--detach", action="store_true", help="return once every service is ready")
    sub.add_parser("down", help="stop the platform `up` started (detached or not)")
    sub.add_parser("status", help="show each service's readiness; exit 0 only when all are ready")
    worker = sub.add_parser("worker", help="run one service's Celery worker")
    worker.add_argument("service", choices=SERVICES)

    demo = sub.add_parser("demo", help="run the whole loop on bundled data and print a summary")
    demo.add_argument("--keep-running", action="store_true", help="leave the platform up afterwards")
    demo.add_argument("--cycles", type=int, default=2)

    partners = sub.add_parser("partners", help="partners (operator)").add_subparsers(dest="action", required=True)
    partners.add_parser("create").add_argument("name")
    add_keys_parser(sub)

    datasets = sub.add_parser("datasets", help="datasets (partner)").add_subparsers(dest="action", required=True)
    create = datasets.add_parser("create")
    create.add_argument("name")
    create.add_argument("--task-type", choices=TASK_TYPES, required=True)
    create.add_argument("--labels", required=True, help="comma-separated label set")
    create.add_argument("--overlap", type=int, default=1)
    create.add_argument("--retrain-threshold", type=int)
    create.add_argument("--pii", choices=("off", "redact"), default="off")
    datasets.add_parser("show").add_argument("dataset")
    datasets.add_parser("stats").add_argument("dataset")

    push = sub.add_parser("push", help="push a folder of images, a JSONL or a CSV file (resumable)")
    push.add_argument("dataset")
    push.add_argument("path", type=Path)

    sub.add_parser("label", help="label interactively as an annotator").add_argument("dataset")

    retrain = sub.add_parser("retrain", help="train a new model on a dataset (operator)")
    retrain.add_argument("dataset")
    retrain.add_argument("--snapshot", help="an existing snapshot (default: take one now)")
    retrain.add_argument("--model-name")
    retrain.add_argument("--base-model")
    retrain.add_argument("--hyperparameters", help="JSON, e.g. '{\"epochs\": 3}'")
    retrain.add_argument("--reason", default="requested from the CLI")

    runs = sub.add_parser("runs", help="training runs").add_subparsers(dest="action", required=True)
    listing = runs.add_parser("list")
    listing.add_argument("--status")
    listing.add_argument("--dataset")
    runs.add_parser("watch").add_argument("run_id")

    add_models_parser(sub)

    usage = sub.add_parser("usage", help="metered usage per tenant, and billing exports")
    usage.add_argument("--tenant", help="one tenant (operator); default: your own with an API key, else all")
    usage.add_argument("--period", help="a billing month, YYYY-MM (default: the last 30 days)")
    usage.add_argument("--bucket", choices=["hour", "day", "month"], default="day")
    usage.add_argument("--by", action="append", choices=["model", "version"], help="group by (repeatable)")
    usage.add_argument("--export", choices=["cloudevents", "csv"], help="print the period's records (operator)")

    invoice = sub.add_parser("invoice", help="a billing period's invoice lines per tenant (operator)")
    invoice.add_argument("--period", required=True, help="the billing month, YYYY-MM")
    invoice.add_argument("--tenant", help="one tenant; default: every tenant with usage in the period")
    invoice.add_argument("--json", action="store_true", help="print the API's answer as JSON")

    predict = sub.add_parser("predict", help="ask a served model (partner)")
    predict.add_argument("model")
    inputs = predict.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", action="append")
    inputs.add_argument("--image", action="append")

    watched = sub.add_parser("monitor", help="a served model's live quality, drift and resources (partner)")
    watched.add_argument("model")
    watched.add_argument("--windows", type=int, default=12, help="how many windows (default 12)")
    watched.add_argument("--window-s", type=int, help="window length in seconds (default: the policy's)")
    watched.add_argument("--watch", type=float, help="redraw every this many seconds")

    base = sub.add_parser("base-models", help="pretrained weights for image backbones").add_subparsers(
        dest="action", required=True
    )
    imported = base.add_parser("import")
    imported.add_argument("name", help="resnet18 or mobilenet_v3_small")
    imported.add_argument("file", type=Path, help="a safetensors file or a torch state dict")
    imported.add_argument("--sha256", help="refuse the file unless it hashes to this")

    dead = sub.add_parser("dead-letters", help="events that failed after their retries (operator)")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    dead_list = dead_sub.add_parser("list")
    dead_list.add_argument("--service", choices=SERVICES)
    dead_list.add_argument("--all", action="store_true", help="include records already replayed")
    replay = dead_sub.add_parser("replay")
    replay.add_argument("service", choices=SERVICES)
    replay.add_argument("id", type=int)

    add_trace_parser(sub)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    from cli import commands, launcher
    from cli.context import CliContext
    from cli.push import push as push_command

    command = args.command
    if command == "up":
        return launcher.up(detach=args.detach)
    if command == "down":
        return launcher.down()
    if command == "status":
        return launcher.status()
    if command == "worker":
        return cmd_worker(args)
    if command == "demo":
        from cli.demo import run_demo

        return run_demo(cycles=args.cycles, keep_running=args.keep_running)
    context = CliContext.from_args(args)
    handlers: dict[tuple[str, str | None], Any] = {
        ("partners", "create"): lambda: commands.partners_create(context, args.name),
        ("datasets", "create"): lambda: commands.datasets_create(context, args),
        ("datasets", "show"): lambda: commands.datasets_show(context, args.dataset),
        ("datasets", "stats"): lambda: commands.datasets_stats(context, args.dataset),
        ("push", None): lambda: push_command(context, args.dataset, args.path),
        ("label", None): lambda: commands.label(context, args.dataset),
        ("retrain", None): lambda: commands.retrain(context, args),
        ("runs", "list"): lambda: commands.runs_list(context, args),
        ("runs", "watch"): lambda: commands.runs_watch(context, args.run_id),
        ("predict", None): lambda: commands.predict(context, args),
        ("usage", None): lambda: commands.usage(context, args),
        ("invoice", None): lambda: commands.invoice(context, args),
        ("base-models", "import"): lambda: commands.base_models_import(context, args.name, args.file, args.sha256),
        ("dead-letters", "list"): lambda: commands.dead_letters_list(context, args.service, args.all),
        ("dead-letters", "replay"): lambda: commands.dead_letters_replay(context, args.service, args.id),
        ("trace", None): lambda: commands.trace(context, args.trace_id, args),
    }
    if command == "keys":
        from cli.keys import run_keys_command

        return run_keys_command(context, args)
    if command == "monitor":
        from cli.monitor import monitor

        return monitor(
            context.partner().inference, args.model, windows=args.windows, window_s=args.window_s, watch=args.watch
        )
    if command == "models":
        from cli.models import run_models_command

        token = (
            context.api_key if context.api_key and args.models_action in {"list", "show", "compare", "audit"} else None
        )
        return run_models_command(args, context.settings.service_url("registry"), token or context.internal_token)
    return handlers[(command, getattr(args, "action", None))]()


def main(argv: list[str] | None = None) -> int:
    from cli.supervisor import LaunchError

    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except LaunchError as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 1
    except ApiError as exc:
        print(f"flywheel: {exc.message} ({exc.status} {exc.code})", file=sys.stderr)
        if exc.details:
            print(f"details: {exc.details}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"flywheel: a service did not answer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
