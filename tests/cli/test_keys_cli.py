"""`flywheel keys` against a real ingestion service: issue with scopes and expiry, rotate, list, revoke."""

from __future__ import annotations

import re

import pytest

from cli.main import main
from tests.helpers import bearer, create_dataset, create_partner


@pytest.fixture
def operator_env(platform, settings, monkeypatch):
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    monkeypatch.setenv("FLYWHEEL_HOME", str(settings.home))
    monkeypatch.setenv("INGESTION_URL", ingestion.url)
    monkeypatch.setenv("FLYWHEEL_INTERNAL_TOKEN", settings.internal_token)
    return ingestion, issued


def secret_in(output: str) -> str:
    return re.search(r"API key \(shown once, store it now\): (fwk_\S+)", output).group(1)


def test_keys_issue_rotate_list_and_revoke(operator_env, capsys) -> None:
    ingestion, issued = operator_env
    partner = issued["partner"]["id"]
    dataset = create_dataset(ingestion.client, issued["api_key"])

    assert main(["keys", "issue", partner, "--scopes", "predict,read", "--expires-in-days", "30"]) == 0
    output = capsys.readouterr().out
    assert "scopes predict,read, expires 20" in output
    limited = secret_in(output)
    assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(limited)).status_code == 200
    push = ingestion.client.post(
        f"/v1/datasets/{dataset['id']}/items", json={"items": [{"text": "x"}]}, headers=bearer(limited)
    )
    assert push.status_code == 403

    old_id = issued["key"]["id"]
    assert main(["keys", "issue", partner, "--replaces", old_id, "--grace-hours", "2"]) == 0
    output = capsys.readouterr().out
    assert f"key {old_id} keeps working until 20" in output
    rotated = secret_in(output)
    for key in (issued["api_key"], rotated):
        assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(key)).status_code == 200

    assert main(["keys", "list", partner]) == 0
    listing = capsys.readouterr().out
    assert "last_used_at" in listing.splitlines()[0] and len(listing.splitlines()) == 4
    assert "predict,read" in listing and "push,label,predict,read,admin" in listing

    assert main(["keys", "revoke", partner, old_id]) == 0
    assert f"key {old_id} revoked at" in capsys.readouterr().out
    assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(issued["api_key"])).status_code == 401


def test_keys_issue_refuses_an_unknown_scope(operator_env, capsys) -> None:
    _, issued = operator_env
    with pytest.raises(SystemExit):
        main(["keys", "issue", issued["partner"]["id"], "--scopes", "push,root"])
    assert "scopes are push,label,predict,read,admin" in capsys.readouterr().err
