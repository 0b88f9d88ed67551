"""The `flywheel` command against real services: resumable pushes, traces, dead letters, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from tests.helpers import INTERNAL, create_dataset, create_partner


@pytest.fixture
def cli_env(platform, settings, monkeypatch):
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    monkeypatch.setenv("FLYWHEEL_HOME", str(settings.home))
    monkeypatch.setenv("INGESTION_URL", ingestion.url)
    monkeypatch.setenv("INGESTION_PORT", ingestion.url.rsplit(":", 1)[1])
    monkeypatch.setenv("FLYWHEEL_API_KEY", issued["api_key"])
    monkeypatch.setenv("FLYWHEEL_INTERNAL_TOKEN", settings.internal_token)
    return ingestion, issued


def test_push_resumes_after_an_interruption_without_duplicates(cli_env, tmp_path: Path, capsys) -> None:
    ingestion, issued = cli_env
    dataset = create_dataset(ingestion.client, issued["api_key"])
    source = tmp_path / "reviews.jsonl"
    source.write_text("\n".join(json.dumps({"text": f"review {i}", "label": "pos"}) for i in range(1200)) + "\n")
    partner = issued["partner"]["id"]
    ingestion.client.patch(f"/v1/partners/{partner}", json={"daily_item_quota": 700}, headers=INTERNAL)

    assert main(["push", dataset["id"], str(source)]) == 1
    assert "daily item quota" in capsys.readouterr().err
    ingestion.client.patch(f"/v1/partners/{partner}", json={"daily_item_quota": None}, headers=INTERNAL)
    assert main(["push", dataset["id"], str(source)]) == 0
    output = capsys.readouterr()
    assert "resuming at batch 2 of 3" in output.err
    assert "1200 items: 1200 accepted, 0 duplicates" in output.out
    usage = ingestion.client.get("/v1/usage", headers={"Authorization": f"Bearer {issued['api_key']}"}).get_json()
    assert usage["days"][0]["items"] == 1200 and usage["days"][0]["duplicates"] == 0


def test_a_csv_and_a_folder_of_images_push_too(cli_env, tmp_path: Path, capsys) -> None:
    from tests.ingestion.conftest import png

    ingestion, issued = cli_env
    texts = create_dataset(ingestion.client, issued["api_key"])
    (tmp_path / "items.csv").write_text("text,label\ngood,pos\nbad,neg\nunsure,\n")
    assert main(["push", texts["id"], str(tmp_path / "items.csv")]) == 0
    assert "3 items: 3 accepted" in capsys.readouterr().out
    photos = create_dataset(
        ingestion.client, issued["api_key"], name="photos", task_type="image_classification", labels=["cat", "dog"]
    )
    for label, color in (("cat", (1, 2, 3)), ("dog", (4, 5, 6))):
        (tmp_path / "photos" / label).mkdir(parents=True)
        (tmp_path / "photos" / label / "a.png").write_bytes(png(color))
    assert main(["push", photos["id"], str(tmp_path / "photos")]) == 0
    assert "2 items: 2 accepted" in capsys.readouterr().out


def test_trace_prints_a_timeline_across_services(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = {
        "ingestion.log": [
            {
                "timestamp": "2026-01-01T00:00:00.000Z",
                "service": "ingestion",
                "event": "items_ingested",
                "trace_id": "t-1",
                "accepted": 2,
            }
        ],
        "labeling-worker.log": [
            {
                "timestamp": "2026-01-01T00:00:00.250Z",
                "service": "labeling",
                "event": "tasks_created",
                "trace_id": "t-1",
                "created": 2,
            },
            {"timestamp": "2026-01-01T00:00:00.100Z", "service": "labeling", "event": "unrelated", "trace_id": "t-2"},
        ],
    }
    for name, records in lines.items():
        (logs / name).write_text("\n".join(json.dumps(r) for r in records) + "\nnot json t-1\n")
    assert main(["trace", "t-1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "2 lines across ingestion, labeling" in out[0]
    assert "+   0.000s  ingestion" in out[2] and "items_ingested" in out[2]
    assert "+   0.250s  labeling" in out[3] and "created=2" in out[3]
    assert main(["trace", "t-404"]) == 1


def test_api_errors_are_reported_without_a_traceback(cli_env, capsys) -> None:
    assert main(["datasets", "show", "ds_missing"]) == 1
    err = capsys.readouterr().err
    assert "does not exist (404 not_found)" in err and "Traceback" not in err
    assert main(["dead-letters", "list", "--service", "ingestion"]) == 0
    assert "no dead letters" in capsys.readouterr().out
