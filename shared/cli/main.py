"""The `flywheel` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import requests

from shared.settings import SERVICES, Settings


def _service_module(service: str) -> Any:
    return importlib.import_module(f"services.{service}.app")


def cmd_worker(args: argparse.Namespace) -> int:
    from shared.runtime import worker_argv

    module = _service_module(args.service)
    celery = module.create_celery()
    celery.flywheel_runtime.bus.start_relay()
    celery.worker_main(worker_argv(module.SPEC))
    return 0


def _internal_headers(settings: Settings) -> dict[str, str]:
    token = settings.internal_token
    if not token:
        path = settings.home / "internal-token"
        token = path.read_text().strip() if path.exists() else ""
    if not token:
        raise SystemExit("no internal token: set FLYWHEEL_INTERNAL_TOKEN (a local `flywheel up` prints where it is)")
    return {"Authorization": f"Bearer {token}"}


def _service_url(settings: Settings, service: str) -> str:
    return f"http://127.0.0.1:{settings.for_service(service).port}"


def cmd_dead_letters(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    headers = _internal_headers(settings)
    if args.action == "list":
        rows = []
        for service in [args.service] if args.service else SERVICES:
            response = requests.get(
                f"{_service_url(settings, service)}/v1/admin/dead-letters",
                params={"include_replayed": args.all},
                headers=headers,
                timeout=10,
            )
            response.raise_for_status()
            rows += [(service, row) for row in response.json()["dead_letters"]]
        if not rows:
            print("no dead letters")
            return 0
        print(f"{'service':<10} {'id':>5} {'consumer':<34} {'attempts':>8}  {'replayed':<8} error")
        for service, row in rows:
            replayed = "yes" if row.get("replayed_at") else "no"
            print(
                f"{service:<10} {row['id']:>5} {row['consumer']:<34} {row['attempts']:>8}  "
                f"{replayed:<8} {row['error'][:80]}"
            )
        return 0
    response = requests.post(
        f"{_service_url(settings, args.service)}/v1/admin/dead-letters/{args.id}/replay", headers=headers, timeout=10
    )
    if response.status_code >= 400:
        print(response.json().get("error", {}).get("message", response.text), file=sys.stderr)
        return 1
    print(f"replayed dead letter {args.id} of {args.service} to {response.json()['consumer']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description="Flywheel: data in, better models out.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole platform on this machine")
    up.add_argument("--detach", action="store_true", help="return once every service is ready")
    sub.add_parser("down", help="stop a platform started with `up --detach`")
    sub.add_parser("status", help="show each service's readiness; exit 0 only when all are ready")

    worker = sub.add_parser("worker", help="run one service's Celery worker")
    worker.add_argument("service", choices=SERVICES)

    dead = sub.add_parser("dead-letters", help="list or replay events that failed after their retries")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    dead_list = dead_sub.add_parser("list")
    dead_list.add_argument("--service", choices=SERVICES)
    dead_list.add_argument("--all", action="store_true", help="include records already replayed")
    replay = dead_sub.add_parser("replay")
    replay.add_argument("service", choices=SERVICES)
    replay.add_argument("id", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.cli import launcher

    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return launcher.up(detach=args.detach)
        if args.command == "down":
            return launcher.down()
        if args.command == "status":
            return launcher.status()
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "dead-letters":
            return cmd_dead_letters(args)
    except launcher.LaunchError as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"flywheel: a service did not answer: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
