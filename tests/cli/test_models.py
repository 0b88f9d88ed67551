"""`flywheel models list|show|compare|promote|rollback|audit` against a registry served over HTTP."""

from __future__ import annotations

import argparse
import io

import pytest

from cli import models as cli
from tests.conftest import INTERNAL_TOKEN, serve
from tests.registry.evaluations import EvaluatedRuns, balanced
from tests.registry.support import deliver

pytestmark = pytest.mark.timeout(60)

TENANT = "ptn_registry_cli"


@pytest.fixture
def served(registry):
    url, stop = serve(registry.app)
    yield url
    stop()


def run(argv: list[str], url: str, capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="flywheel")
    cli.add_models_parser(parser.add_subparsers(dest="command", required=True))
    status = cli.run_models_command(parser.parse_args(argv), url, INTERNAL_TOKEN)
    return status, capsys.readouterr().out


@pytest.fixture
def evaluated(registry, runs) -> EvaluatedRuns:
    return EvaluatedRuns(registry, runs)


def test_the_models_commands_list_show_promote_rollback_and_audit(registry, evaluated, served, capsys) -> None:
    for f1 in (0.80, 0.70):
        deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=f1))

    out = io.StringIO()
    assert cli.models_list(served, INTERNAL_TOKEN, tenant=TENANT, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["model", "dataset", "task", "latest", "aliases", "tags"]
    assert "reviews-clf" in lines[1] and "production=v1, staging=v2" in lines[1]

    out = io.StringIO()
    assert cli.models_show(served, INTERNAL_TOKEN, "reviews-clf", tenant=TENANT, out=out) == 0
    shown = out.getvalue()
    assert "macro_f1 must beat production by 0.01" in shown
    assert any(line.split()[:3] == ["2", "ready", "0.7000"] for line in shown.splitlines())

    out = io.StringIO()
    status = cli.models_promote(
        served, INTERNAL_TOKEN, "reviews-clf", tenant=TENANT, version=2, reason="drill", actor="ops", out=out
    )
    assert status == 0
    assert out.getvalue().strip() == "reviews-clf: production v1 -> v2 (promote: drill)"

    canary = ["models", "promote", "reviews-clf", "--tenant", TENANT, "--weights", "1:90,2:10", "--reason", "c"]
    status, printed = run(canary, served, capsys)
    assert status == 0 and "production v2 -> v1:90%/v2:10%" in printed
    status, printed = run(
        ["models", "rollback", "reviews-clf", "--tenant", TENANT, "--reason", "bad canary"], served, capsys
    )
    assert status == 0 and "production v1:90%/v2:10% -> v2 (rollback" in printed

    status, printed = run(
        ["models", "audit", "reviews-clf", "--tenant", TENANT, "--alias", "production"], served, capsys
    )
    assert status == 0
    rows = printed.splitlines()
    assert rows[0].split() == ["when", "alias", "action", "from", "to", "who", "why"]
    assert [row.split()[2] for row in rows[1:]] == ["rollback", "canary", "promote", "auto_promote"]
    assert "internal-token:ops" in rows[3] and "drill" in rows[3]

    assert cli.models_promote(served, INTERNAL_TOKEN, "reviews-clf", tenant=TENANT, version=7, reason="x") == 1
    assert "registry answered 404: version 7 of model 'reviews-clf' does not exist" in capsys.readouterr().err
    assert cli.models_list(served, "wrong-token", tenant=TENANT) == 1
    assert "registry answered 401" in capsys.readouterr().err


def test_show_prints_the_gate_conditions_and_compare_puts_versions_side_by_side_on_one_set(
    registry, runs, evaluated, served, capsys
) -> None:
    deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=0.80))  # v1 production
    deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=0.70))  # v2 staged by (a)
    deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=0.90, snapshot_id="snap-2", y_true=balanced(300)))
    deliver(registry.runtime, TENANT, runs(TENANT, macro_f1=0.95))  # v4: an old run without an evaluation report

    status, shown = run(["models", "show", "reviews-clf", "--tenant", TENANT, "--version", "2"], served, capsys)
    assert status == 0
    assert "gate       v2 -> staging: refused by (a) margin: macro_f1 0.7000 vs production v1 0.8000" in shown
    assert "scored on  the test split of snapshot snap-1 (200 items, sha256 " in shown
    assert "macro_f1   v2 0.7000, production v1 0.8000, majority baseline 0.3333" in shown
    conditions = {line.split()[1]: line.split()[2] for line in shown.splitlines() if line.startswith("(")}
    assert conditions == {
        "min_test_items": "pass",
        "margin": "FAIL",
        "credible_improvement": "FAIL",
        "class_regression": "pass",  # each class drops by exactly the 0.10 allowed
        "min_score": "pass",
    }
    assert any(line.split()[:5] == ["(a)", "margin", "FAIL", "-0.1000", "0.0100"] for line in shown.splitlines())

    status, shown = run(["models", "show", "reviews-clf", "--tenant", TENANT], served, capsys)  # the newest: v4
    assert "gate       v4 -> staging: the gate cannot decide: the run carries no evaluation report" in shown

    status, compared = run(["models", "compare", "reviews-clf", "1", "2", "--tenant", TENANT], served, capsys)
    assert status == 0
    lines = compared.splitlines()
    assert lines[0].startswith("v1 and v2 on the same items: the test split of snapshot snap-1 (200 items")
    assert lines[0].endswith("scored by v2's gate decision")
    assert ["macro_f1", "0.8000", "0.7000", "-0.1000"] in [line.split() for line in lines]
    assert ["neg", "100", "0.8000", "0.7000", "-0.1000"] in [line.split() for line in lines]
    assert lines[lines.index(next(line for line in lines if line.startswith("class")))].split() == [
        "class",
        "support",
        "v1",
        "f1",
        "v2",
        "f1",
        "delta",
    ]

    status, compared = run(["models", "compare", "reviews-clf", "2", "3", "--tenant", TENANT], served, capsys)
    assert status == 0
    assert compared.startswith("v2 and v3 were not scored on the same evaluation set")
    assert "v2 on the test split of snapshot snap-1 (200 items" in compared
    assert "v3 on the test split of snapshot snap-2 (300 items" in compared
    assert "v1 f1" not in compared and "delta" not in compared

    status, compared = run(["models", "compare", "reviews-clf", "1", "4", "--tenant", TENANT], served, capsys)
    assert "v4 has no evaluation set" in compared and "validation split of snapshot snap-1" in compared
    assert ["macro_f1", "0.95"] in [line.split() for line in compared.splitlines()]

    assert cli.models_compare(served, INTERNAL_TOKEN, "reviews-clf", 1, 9, tenant=TENANT, out=io.StringIO()) == 1
    assert "registry answered 404: version 9 of model 'reviews-clf' does not exist" in capsys.readouterr().err
