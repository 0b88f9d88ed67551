"""`flywheel usage`: a partner's own meters, an operator's view per tenant, and the billing export."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from cli.main import main
from tests.helpers import bearer, create_dataset, create_partner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two_partners(platform, settings, monkeypatch):
    ingestion = platform("ingestion")
    acme, globex = create_partner(ingestion.client, "acme"), create_partner(ingestion.client, "globex")
    for issued, texts in ((acme, ["one", "two", "three"]), (globex, ["four"])):
        dataset = create_dataset(ingestion.client, issued["api_key"])
        pushed = ingestion.client.post(
            f"/v1/datasets/{dataset['id']}/items",
            json={"items": [{"text": text} for text in texts]},
            headers=bearer(issued["api_key"]),
        )
        assert pushed.status_code == 200
    monkeypatch.setenv("FLYWHEEL_HOME", str(settings.home))
    monkeypatch.setenv("INGESTION_URL", ingestion.url)
    monkeypatch.setenv("FLYWHEEL_INTERNAL_TOKEN", settings.internal_token)
    monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
    return acme, globex, monkeypatch


def test_usage_for_a_partner_an_operator_and_an_export(two_partners, capsys) -> None:
    acme, globex, monkeypatch = two_partners
    acme_id, globex_id = acme["partner"]["id"], globex["partner"]["id"]
    period = datetime.now(UTC).strftime("%Y-%m")

    assert main(["usage", "--tenant", globex_id, "--period", period, "--bucket", "month"]) == 0
    out = capsys.readouterr().out
    assert globex_id in out and acme_id not in out
    [line] = [line for line in out.splitlines() if "items_ingested" in line]
    assert line.split()[-1] == "1" and period in line

    assert main(["usage", "--period", period]) == 0  # an operator without --tenant: everyone
    out = capsys.readouterr().out
    assert acme_id in out and globex_id in out

    monkeypatch.setenv("FLYWHEEL_API_KEY", acme["api_key"])
    assert main(["usage", "--by", "model"]) == 0  # a partner: its own only
    out = capsys.readouterr().out
    assert acme_id in out and globex_id not in out and "model" in out.splitlines()[1]
    [line] = [line for line in out.splitlines() if "items_ingested" in line]
    assert line.split()[-1] == "3"

    assert main(["usage", "--period", period, "--export", "cloudevents", "--tenant", acme_id]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {event["subject"] for event in events} == {acme_id}
    assert sorted(event["type"] for event in events) == [
        "io.flywheel.usage.bytes_ingested",
        "io.flywheel.usage.items_ingested",
    ]

    assert main(["usage", "--period", "2026-13"]) == 1
    assert "YYYY-MM" in capsys.readouterr().err
