"""`flywheel models list|show|promote|rollback|audit` against a registry served over HTTP."""

from __future__ import annotations

import argparse
import io

import pytest

from cli import models as cli
from tests.conftest import INTERNAL_TOKEN, serve
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


def test_the_models_commands_list_show_promote_rollback_and_audit(registry, runs, served, capsys) -> None:
    for f1 in (0.80, 0.70):
        deliver(registry.runtime, TENANT, runs(TENANT, macro_f1=f1))

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
