"""The `flywheel` command reaches a deployment wherever it is: every service on a port of its own (none of them
the defaults), found through <SERVICE>_URL alone, with no local platform state to fall back on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from shared.client import Flywheel
from shared.settings import DEFAULT_PORTS, SERVICES
from tests.conftest import INTERNAL_TOKEN, serve
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(180)


def printed(capsys) -> str:
    """What the command printed, without the services' own log lines (they run in this process)."""
    lines = capsys.readouterr().out.splitlines()
    return "\n".join(line for line in lines if not (line.startswith('{"') and '"level": ' in line))


@pytest.fixture
def deployment(platform, worker, tmp_path: Path, monkeypatch):
    urls: dict[str, str] = {}
    # Callees first, so that each caller is told where they are: inference asks the registry, labeling asks
    # inference; every service verifies keys at ingestion (the platform fixture serves it already).
    for name in ("ingestion", "registry", "training", "inference", "labeling"):
        service = platform(name, registry_url=urls.get("registry", ""), inference_url=urls.get("inference", ""))
        if name == "ingestion":
            urls[name] = service.url
        else:
            urls[name], stop = serve(service.app)
            monkeypatch.setattr(service, "stop", stop)
    assert not {int(url.rsplit(":", 1)[1]) for url in urls.values()} & set(DEFAULT_PORTS.values())
    client_home = tmp_path / "elsewhere"  # no `flywheel up` state here: the URLs are all the CLI has
    monkeypatch.setenv("FLYWHEEL_HOME", str(client_home))
    monkeypatch.setenv("FLYWHEEL_INTERNAL_TOKEN", INTERNAL_TOKEN)
    for name in SERVICES:
        monkeypatch.delenv(f"{name.upper()}_PORT", raising=False)
        monkeypatch.setenv(f"{name.upper()}_URL", urls[name])
    with worker("labeling", inference_url=urls["inference"]):
        yield urls


def test_every_command_group_reaches_services_on_non_default_ports(deployment, tmp_path, capsys, monkeypatch) -> None:
    assert main(["status"]) == 0
    status = printed(capsys)
    rows = [line.split() for line in status.splitlines()]
    for name, url in deployment.items():
        assert [name, url, "ready"] in rows

    assert main(["partners", "create", "acme"]) == 0
    created = printed(capsys)
    partner = created.split("partner ", 1)[1].split()[0]
    monkeypatch.setenv("FLYWHEEL_API_KEY", created.split("store it now): ", 1)[1].split()[0])

    assert main(["datasets", "create", "reviews", "--task-type", "text_classification", "--labels", "neg,pos"]) == 0
    dataset = json.loads(printed(capsys))["id"]
    source = tmp_path / "reviews.jsonl"
    source.write_text("".join(json.dumps({"text": f"review number {i}"}) + "\n" for i in range(4)))
    assert main(["push", dataset, str(source)]) == 0
    assert "4 items: 4 accepted" in printed(capsys)

    operator = Flywheel.from_urls(deployment, INTERNAL_TOKEN)
    eventually(lambda: len(operator.labeling.tasks(dataset)) == 4, what="labeling made four tasks")
    assert main(["datasets", "show", dataset]) == 0
    shown = json.loads(printed(capsys))
    assert shown["id"] == dataset and shown["labeling"]["labels"] == ["neg", "pos"]

    annotator = operator.labeling.create_annotator(partner, "ann", [dataset])
    monkeypatch.setenv("FLYWHEEL_ANNOTATOR_TOKEN", annotator["token"])
    answers = iter(["2", "1", "2", "1"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    assert main(["label", dataset]) == 0
    assert "Nothing left to label. You labeled 4 tasks." in printed(capsys)
    assert main(["datasets", "stats", dataset]) == 0
    assert "labels: {'neg': 2, 'pos': 2}" in printed(capsys)

    assert main(["retrain", dataset, "--model-name", "reviews-clf", "--reason", "remote drill"]) == 0
    retrained = printed(capsys)
    assert "snapshot snap_" in retrained and "4 items" in retrained
    run_id = retrained.split("run ", 1)[1].split()[0]
    assert main(["runs", "list", "--dataset", dataset]) == 0
    assert run_id in printed(capsys)
    operator.training.cancel_run(run_id)  # no training worker here: the run would wait in its queue
    assert main(["runs", "watch", run_id]) == 1
    assert json.loads(printed(capsys))["status"] == "cancelled"

    assert main(["models", "list"]) == 0
    assert "no models" in printed(capsys)  # the registry answered: nothing is registered yet
    assert main(["predict", "reviews-clf", "--text", "is it good?"]) == 1
    assert "(404 not_found)" in capsys.readouterr().err  # inference answered: nothing is served yet

    assert main(["dead-letters", "list"]) == 0
    assert "no dead letters" in printed(capsys)
