"""`flywheel keys`: issue (with scopes, an expiry, or as the rotation of an older key), list and revoke a
partner's API keys (operator). The secret of a new key is printed once; only its hash is kept."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from cli.context import CliContext
from shared.auth import SCOPES
from shared.tables import render


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="a partner's API keys (operator)").add_subparsers(dest="action", required=True)
    issue = keys.add_parser("issue", help="issue a key; --replaces rotates an older one out after a grace period")
    issue.add_argument("partner")
    issue.add_argument("--scopes", type=_scopes, help=f"comma-separated, of {','.join(SCOPES)} (default: all)")
    issue.add_argument("--expires-in-days", type=float, help="the key expires this many days from now")
    issue.add_argument("--replaces", help="a live key of the partner: it keeps working for --grace-hours, then expires")
    issue.add_argument("--grace-hours", type=float, default=24.0, help="with --replaces (default 24; 0: at once)")
    keys.add_parser("list", help="the partner's keys: scopes, expiry, last use").add_argument("partner")
    revoke = keys.add_parser("revoke", help="refuse a key now (everywhere within KEY_CACHE_SECONDS)")
    revoke.add_argument("partner")
    revoke.add_argument("key")


def _scopes(value: str) -> list[str]:
    scopes = [scope.strip() for scope in value.split(",") if scope.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise argparse.ArgumentTypeError(f"scopes are {','.join(SCOPES)}; not {','.join(unknown) or value!r}")
    return scopes


def run_keys_command(context: CliContext, args: Any) -> int:
    ingestion = context.operator().ingestion
    if args.action == "issue":
        options: dict[str, Any] = {}
        if args.scopes:
            options["scopes"] = args.scopes
        if args.expires_in_days is not None:
            options["expires_at"] = (datetime.now(UTC) + timedelta(days=args.expires_in_days)).isoformat()
        if args.replaces:
            options["replaces"] = args.replaces
            options["grace_seconds"] = round(args.grace_hours * 3600)
        issued = ingestion.rotate_key(args.partner, **options)
        key = issued["key"]
        print(f"key {key['id']} for partner {args.partner}: scopes {','.join(key['scopes'])}", end="")
        print(f", expires {key['expires_at']}" if key["expires_at"] else ", no expiry")
        if args.replaces:
            old = next((k for k in ingestion.list_keys(args.partner) if k["id"] == args.replaces), None)
            print(f"key {args.replaces} keeps working until {old['expires_at'] if old else '?'}")
        print(f"API key (shown once, store it now): {issued['api_key']}")
        return 0
    if args.action == "list":
        columns = ["id", "prefix", "scopes", "created_at", "expires_at", "last_used_at", "revoked_at", "replaces"]
        rows = [{**key, "scopes": ",".join(key["scopes"])} for key in ingestion.list_keys(args.partner)]
        print(render(columns, rows, none="-", empty="(no keys)"))
        return 0
    revoked = ingestion.revoke_key(args.partner, args.key)
    print(f"key {revoked['id']} revoked at {revoked['revoked_at']}")
    return 0
