"""`flywheel models list|show|compare|promote|rollback|audit`: the registry's API from a terminal.

Each command is a function of (base_url, token, …) that calls the API through `shared.client.RegistryClient`,
prints a table to `out` and returns an exit status (0, or 1 with the API's error message on stderr).
`add_models_parser` and `run_models_command` wire them into an argparse CLI; the `flywheel` command supplies
the registry's URL and a token (the internal token, or a partner's API key for the read-only commands).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from shared.client import ApiError, RegistryClient
from shared.tables import print_table

TIMEOUT_SECONDS = 10


def _client(base_url: str, token: str) -> RegistryClient:
    return RegistryClient(base_url, token, timeout=TIMEOUT_SECONDS)


def _query(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _metric(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(name)
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _aliases(aliases: dict[str, Any]) -> str:
    parts = []
    for name, state in sorted(aliases.items()):
        if state.get("weights"):
            split = "/".join(f"v{v}:{w}%" for v, w in sorted(state["weights"].items(), key=lambda kv: int(kv[0])))
            parts.append(f"{name}=({split})")
        else:
            parts.append(f"{name}=v{state['version']}")
    return ", ".join(parts) or "-"


def _guarded(run: Callable[[], int]) -> int:
    try:
        return run()
    except ApiError as exc:
        fields = exc.details.get("fields")
        detail = f" {json.dumps(fields)}" if fields else ""
        print(f"registry answered {exc.status}: {exc.message}{detail}", file=sys.stderr)
        return 1


def models_list(
    base_url: str,
    token: str,
    *,
    tenant: str | None = None,
    tag: str | None = None,
    alias: str | None = None,
    dataset_id: str | None = None,
    limit: int = 100,
    out: TextIO | None = None,
) -> int:
    """One line per model: name, dataset, task, latest version, aliases, tags."""
    out = out or sys.stdout

    def run() -> int:
        query = _query(tenant=tenant, tag=tag, alias=alias, dataset_id=dataset_id, limit=limit)
        body = _client(base_url, token).get("/v1/models", params=query)  # the page, for its total
        if not body["models"]:
            print("no models", file=out)
            return 0
        rows = [
            (
                m["name"],
                m["dataset_id"],
                m["task_type"],
                m["latest_version"],
                _aliases(m["aliases"]),
                ",".join(f"{k}={v}" for k, v in sorted(m["tags"].items())) or None,
            )
            for m in body["models"]
        ]
        print_table(("model", "dataset", "task", "latest", "aliases", "tags"), rows, out=out)
        if body["next_offset"] is not None:
            print(f"({body['total']} models; showing {len(rows)})", file=out)
        return 0

    return _guarded(run)


def models_show(
    base_url: str,
    token: str,
    model_name: str,
    *,
    tenant: str | None = None,
    limit: int = 20,
    version: int | None = None,
    out: TextIO | None = None,
) -> int:
    """The model (dataset, policy, aliases), its latest versions, and one version's gate decision with its
    conditions (`version`, by default the newest)."""
    out = out or sys.stdout

    def run() -> int:
        client = _client(base_url, token)
        model = client.get_model(model_name, **_query(tenant=tenant))
        versions = client.versions(model_name, **_query(tenant=tenant, limit=limit))
        policy = model["policy"]
        print(f"model      {model['name']}  ({model['task_type']}, dataset {model['dataset_id']})", file=out)
        print(f"aliases    {_aliases(model['aliases'])}", file=out)
        print(f"policy     {_policy(policy)}", file=out)
        if model["description"]:
            print(f"about      {model['description']}", file=out)
        print(file=out)
        metric = policy["primary_metric"]
        rows = [
            (
                v["version"],
                v["status"],
                _metric(v["metrics"], metric),
                _metric(v["metrics"], "accuracy"),
                v["snapshot_id"],
                v["run_id"],
                ",".join(v["aliases"]) or None,
                (v["decision"] or {}).get("outcome"),
                v["created_at"][:19],
            )
            for v in versions
        ]
        headers = ("version", "status", metric, "accuracy", "snapshot", "run", "aliases", "gate", "created")
        print_table(headers, rows, out=out)
        chosen = version if version is not None else (versions[0]["version"] if versions else None)
        if chosen is not None:
            print(file=out)
            shown = client.version(model_name, chosen, **_query(tenant=tenant))
            _print_decision(shown, out)
            _print_cost(shown, out)
        return 0

    return _guarded(run)


def _policy(policy: dict[str, Any]) -> str:
    baseline = "the classical baseline" if policy.get("floor") == "classical_baseline" else "the majority baseline"
    floor = baseline if policy["min_score"] is None else f"{policy['min_score']}"
    return (
        f"{policy['primary_metric']} must beat production by {policy['margin']}, "
        f"its {policy['confidence'] * 100:g}% interval above 0; no class's F1 may drop by more than "
        f"{policy['max_class_regression']}; floor {floor}; at least {policy['min_test_items']} test items"
        f"{'' if policy['auto_promote'] else ' (automatic promotion off)'}"
    )


def _number(value: Any, *, signed: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return str(value)
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _describe_set(evaluation_set: dict[str, Any]) -> str:
    return (
        f"the {evaluation_set['split']} split of snapshot {evaluation_set['snapshot_id']} "
        f"({evaluation_set['items']} items, sha256 {evaluation_set['sha256'][:12]})"
    )


def _condition_numbers(condition: dict[str, Any]) -> tuple[str | None, str | None]:
    """A condition's observed value and threshold as printed: item counts whole, differences signed."""
    observed, threshold = condition.get("observed"), condition.get("threshold")
    if condition["name"] == "min_test_items":
        return _number(int(observed)), _number(int(threshold))
    return _number(observed, signed=condition["name"] in {"margin", "credible_improvement"}), _number(threshold)


def _print_decision(version: dict[str, Any], out: TextIO) -> None:
    """One version's gate decision: where it went and why, on which items, the difference, each condition."""
    decision = version["decision"]
    number = version["version"]
    if not decision:
        print(f"gate       v{number}: no decision recorded", file=out)
        return
    print(f"gate       v{number} -> {decision['outcome']}: {decision['reason']}", file=out)
    evaluation_set = decision.get("evaluation_set")
    if not evaluation_set:
        return
    metric = decision["policy"]["primary_metric"]
    print(f"scored on  {_describe_set(evaluation_set)}", file=out)
    scores = [f"v{number} {_number(decision['candidate']['metrics'][metric])}"]
    production = decision.get("production") or {}
    if production.get("metrics"):
        scores.append(f"production v{production['version']} {_number(production['metrics'][metric])}")
    elif production.get("error"):
        scores.append(f"production not scored ({production['error']})")
    for name, baseline in sorted((decision.get("baselines") or {}).items()):
        scores.append(f"{name} baseline {_number(baseline[metric])}")
    print(f"{metric:<10} {', '.join(scores)}", file=out)
    difference = decision.get("difference")
    if difference and difference.get("ci_low") is not None:
        print(
            f"difference {_number(difference['value'], signed=True)}, {difference['confidence'] * 100:g}% interval "
            f"[{_number(difference['ci_low'], signed=True)}, {_number(difference['ci_high'], signed=True)}] "
            f"({difference['method']}, {difference['samples']} resamples)",
            file=out,
        )
    rows = [
        (
            f"({c['id']}) {c['name']}",
            "pass" if c["passed"] else "FAIL",
            *_condition_numbers(c),
            c["detail"],
        )
        for c in decision["conditions"]
    ]
    print(file=out)
    print_table(("condition", "result", "observed", "threshold", "detail"), rows, out=out)


def _print_cost(version: dict[str, Any], out: TextIO) -> None:
    """What the version cost to train and costs to serve, and what it gained: the return on its retrain."""
    cost, number = version.get("cost"), version["version"]
    print(file=out)
    if not cost:
        print(f"cost       v{number}: the meters could not be read", file=out)
        return
    currency, training, serving = cost["currency"], cost["training"], cost["serving"]
    if training:
        print(
            f"training   {training['seconds']} {training['device'] or '?'} device-seconds: {training['cost']} "
            f"{currency} at {training['unit_price']} per {training['unit']}",
            file=out,
        )
    else:
        print("training   not metered", file=out)
    if serving["compute_seconds_per_1k"] is None:
        print(f"serving    no predictions in the last {serving['window_hours']} h", file=out)
    else:
        print(
            f"serving    {serving['compute_seconds_per_1k']} compute-seconds per 1k predictions "
            f"({serving['compute_cost_per_1k']} {currency}; billed {serving['price_per_1k']}) over "
            f"{serving['predictions']} predictions in the last {serving['window_hours']} h",
            file=out,
        )
    gain = cost.get("gain")
    if gain and gain.get("difference") is not None:
        per_point = cost.get("training_cost_per_point")
        price = f", {per_point} {currency} of training per point" if per_point else ""
        gained = _number(gain["difference"], signed=True)
        print(f"gained     {gain['metric']} {gained} over production{price}", file=out)


def models_compare(
    base_url: str,
    token: str,
    model_name: str,
    a: int,
    b: int,
    *,
    tenant: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Two versions side by side per class on the same evaluation set, when one's gate decision scored the other;
    otherwise says so and shows each on its own set."""
    out = out or sys.stdout

    def run() -> int:
        body = _client(base_url, token).get(f"/v1/models/{model_name}/compare", params=_query(tenant=tenant, a=a, b=b))
        shared = body["evaluation"]
        if shared is not None:
            print(
                f"v{a} and v{b} on the same items: {_describe_set(shared['evaluation_set'])}, "
                + (
                    f"scored by v{shared['scored_by']}'s gate decision"
                    if shared["scored_by"] is not None
                    else "each scored there by its own gate decision"
                ),
                file=out,
            )
            print(file=out)
            metrics = [
                (m["name"], _number(m["a"]), _number(m["b"]), _number(m["delta"], signed=True))
                for m in shared["metrics"]
            ]
            print_table(("metric", f"v{a}", f"v{b}", "delta"), metrics, out=out)
            print(file=out)
            classes = [
                (c["label"], c["support"], _number(c["a"]), _number(c["b"]), _number(c["delta"], signed=True))
                for c in shared["per_class"]
            ]
            print_table(("class", "support", f"v{a} f1", f"v{b} f1", "delta"), classes, out=out)
            return 0
        print(
            f"v{a} and v{b} were not scored on the same evaluation set: each is shown on its own, "
            "and their numbers are not comparable",
            file=out,
        )
        for side, key in ((body["a"], "a"), (body["b"], "b")):
            print(file=out)
            if side["evaluation_set"] and side["scores"]:
                scores = side["scores"]
                print(
                    f"v{side['version']} on {_describe_set(side['evaluation_set'])}: accuracy "
                    f"{_number(scores['accuracy'])}, macro_f1 {_number(scores['macro_f1'])}",
                    file=out,
                )
                classes = [
                    (label, row["support"], _number(row["precision"]), _number(row["recall"]), _number(row["f1"]))
                    for label, row in scores["per_class"].items()
                ]
                print_table(("class", "support", "precision", "recall", "f1"), classes, out=out)
            else:
                print(
                    f"v{side['version']} has no evaluation set (its gate never scored it on frozen test items); "
                    f"its training record, on the validation split of snapshot {side['snapshot_id']}:",
                    file=out,
                )
                record = [(row["name"], row[key]) for row in body["metrics"] if row[key] is not None]
                print_table(("metric", "value"), record, out=out)
        return 0

    return _guarded(run)


def models_promote(
    base_url: str,
    token: str,
    model_name: str,
    *,
    tenant: str,
    reason: str,
    version: int | None = None,
    weights: dict[str, int] | None = None,
    alias: str = "production",
    actor: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Point `alias` at `version`, or split it between two versions with `weights` (a canary). Internal token."""
    out = out or sys.stdout

    def run() -> int:
        target: dict[str, Any] = {"weights": weights} if weights else {"version": version}
        result = _client(base_url, token).set_alias(
            model_name, alias, tenant=tenant, reason=reason, **target, **_query(actor=actor)
        )
        _print_change(result, alias, out)
        return 0

    return _guarded(run)


def models_rollback(
    base_url: str,
    token: str,
    model_name: str,
    *,
    tenant: str,
    reason: str,
    alias: str = "production",
    actor: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Put `alias` (production by default) back on the version it pointed at before. Internal token."""
    out = out or sys.stdout

    def run() -> int:
        result = _client(base_url, token).rollback(model_name, tenant=tenant, reason=reason, alias=alias, actor=actor)
        _print_change(result, alias, out)
        return 0

    return _guarded(run)


def _describe_state(version: int | None, weights: dict[str, int]) -> str:
    if version is None:
        return "-"
    if weights:
        return "/".join(f"v{v}:{w}%" for v, w in sorted(weights.items(), key=lambda kv: int(kv[0])))
    return f"v{version}"


def _print_change(result: dict[str, Any], alias: str, out: TextIO) -> None:
    change = result["change"]
    if change is None:
        print(f"{alias} unchanged: {_aliases({alias: result['model']['aliases'][alias]})}", file=out)
        return
    before = _describe_state(change["from_version"], change["from_weights"])
    after = _describe_state(change["to_version"], change["to_weights"])
    print(f"{result['model']['name']}: {alias} {before} -> {after} ({change['action']}: {change['reason']})", file=out)


def models_audit(
    base_url: str,
    token: str,
    model_name: str,
    *,
    tenant: str | None = None,
    alias: str | None = None,
    limit: int = 50,
    out: TextIO | None = None,
) -> int:
    """The model's alias changes, newest first: when, alias, action, from, to, who, why."""
    out = out or sys.stdout

    def run() -> int:
        changes = _client(base_url, token).audit(model_name, **_query(tenant=tenant, alias=alias, limit=limit))
        if not changes:
            print("no alias changes", file=out)
            return 0
        rows = [
            (
                c["created_at"][:19],
                c["alias"],
                c["action"],
                _describe_state(c["from_version"], c["from_weights"]),
                _describe_state(c["to_version"], c["to_weights"]),
                c["actor"],
                c["reason"],
            )
            for c in changes
        ]
        print_table(("when", "alias", "action", "from", "to", "who", "why"), rows, out=out)
        return 0

    return _guarded(run)


# -- argparse wiring -----------------------------------------------------------------------------------------


def _current_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _weights(text: str) -> dict[str, int]:
    """`3:90,4:10` → {"3": 90, "4": 10}."""
    try:
        pairs = [part.split(":", 1) for part in text.split(",")]
        return {version.strip(): int(percent) for version, percent in pairs}
    except ValueError as exc:
        raise argparse.ArgumentTypeError("weights look like 3:90,4:10") from exc


def add_models_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `models list|show|compare|promote|rollback|audit` to the `flywheel` command's subparsers."""
    models = subparsers.add_parser("models", help="the model registry: models, versions, aliases")
    actions = models.add_subparsers(dest="models_action", required=True)

    def with_tenant(parser: argparse.ArgumentParser, *, required: bool = False) -> argparse.ArgumentParser:
        parser.add_argument("--tenant", required=required, help="the tenant (needed with the internal token)")
        return parser

    listing = with_tenant(actions.add_parser("list", help="list models"))
    listing.add_argument("--tag", help="key or key:value")
    listing.add_argument("--alias", help="only models with this alias")
    listing.add_argument("--dataset", dest="dataset_id")
    show = with_tenant(actions.add_parser("show", help="a model, its latest versions and a gate decision"))
    show.add_argument("model")
    show.add_argument("--limit", type=int, default=20)
    show.add_argument("--version", type=int, help="whose gate decision to show (default: the newest version)")
    compare = with_tenant(actions.add_parser("compare", help="two versions side by side on the same test items"))
    compare.add_argument("model")
    compare.add_argument("a", type=int, metavar="V1")
    compare.add_argument("b", type=int, metavar="V2")
    promote = with_tenant(
        actions.add_parser("promote", help="point an alias at a version (or a canary)"), required=True
    )
    promote.add_argument("model")
    target = promote.add_mutually_exclusive_group(required=True)
    target.add_argument("version", nargs="?", type=int)
    target.add_argument("--weights", type=_weights, help="a canary split, e.g. 3:90,4:10")
    promote.add_argument("--alias", default="production")
    promote.add_argument("--reason", required=True)
    promote.add_argument("--actor", default=_current_user())
    rollback = with_tenant(
        actions.add_parser("rollback", help="put an alias back on its previous version"), required=True
    )
    rollback.add_argument("model")
    rollback.add_argument("--alias", default="production")
    rollback.add_argument("--reason", required=True)
    rollback.add_argument("--actor", default=_current_user())
    audit = with_tenant(actions.add_parser("audit", help="who moved which alias, when and why"))
    audit.add_argument("model")
    audit.add_argument("--alias")
    audit.add_argument("--limit", type=int, default=50)
    return models


def run_models_command(args: argparse.Namespace, base_url: str, token: str) -> int:
    """Run the parsed `models …` command against the registry at `base_url`."""
    action = args.models_action
    if action == "list":
        return models_list(
            base_url, token, tenant=args.tenant, tag=args.tag, alias=args.alias, dataset_id=args.dataset_id
        )
    if action == "show":
        return models_show(base_url, token, args.model, tenant=args.tenant, limit=args.limit, version=args.version)
    if action == "compare":
        return models_compare(base_url, token, args.model, args.a, args.b, tenant=args.tenant)
    if action == "promote":
        return models_promote(
            base_url,
            token,
            args.model,
            tenant=args.tenant,
            reason=args.reason,
            version=args.version,
            weights=args.weights,
            alias=args.alias,
            actor=args.actor,
        )
    if action == "rollback":
        return models_rollback(
            base_url, token, args.model, tenant=args.tenant, reason=args.reason, alias=args.alias, actor=args.actor
        )
    return models_audit(base_url, token, args.model, tenant=args.tenant, alias=args.alias, limit=args.limit)
