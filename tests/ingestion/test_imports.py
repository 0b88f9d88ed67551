"""Bulk imports: uploaded as a stream, processed by the real worker with progress and per-line errors."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import pytest

from tests.helpers import eventually
from tests.ingestion.conftest import png

pytestmark = pytest.mark.timeout(180)


def upload(tenant, dataset_id: str, body: bytes, content_type: str):
    return tenant.service.client.post(
        f"/v1/datasets/{dataset_id}/imports", data=body, headers=tenant.headers, content_type=content_type
    )


def wait_finished(tenant, import_id: str, timeout: float = 120) -> dict:
    def finished():
        record = tenant.service.client.get(f"/v1/imports/{import_id}", headers=tenant.headers).get_json()
        return record if record["status"] in {"succeeded", "failed"} else None

    return eventually(finished, timeout=timeout, interval=0.25, what=f"import {import_id} to finish")


def test_a_5000_line_jsonl_import_with_progress_and_per_line_errors(tenant, worker, logs) -> None:
    lines = [
        json.dumps({"text": f"review number {i} of a long list", "label": ["neg", "pos"][i % 2]}) for i in range(5000)
    ]
    lines[10] = "{not json"
    lines[20] = json.dumps({"text": "bad label", "label": "meh"})
    lines[30] = json.dumps({"text": ""})
    lines[40] = lines[41]  # a duplicate of the next line
    lines[50] = json.dumps({"image": base64.b64encode(png()).decode()})
    lines[60] = "[" * 3000 + "]" * 3000  # nested deeper than the parser follows: malformed, not a failed import
    body = ("\n".join(lines) + "\n").encode()
    response = upload(tenant, tenant.text["id"], body, "application/x-ndjson")
    assert response.status_code == 202, response.get_json()
    record = response.get_json()
    assert record["status"] == "queued" and record["size"] == len(body)

    with worker("ingestion"):
        done = wait_finished(tenant, record["id"])
    assert done["status"] == "succeeded", done
    assert done["total"] == done["processed"] == 5000
    assert done["accepted"] == 4994 and done["duplicates"] == 1 and done["rejected"] == 5
    errors = {error["line"]: error["error"] for error in done["errors"]}
    assert "invalid JSON" in errors[11]
    assert "'meh' is not in the dataset's label set" in errors[21]
    assert "text" in errors[31]
    assert "this dataset takes text items" in errors[51]
    assert "invalid JSON: nested too deeply to parse" in errors[61]
    progress = logs.find(event="import_progress", import_id=record["id"])
    assert len(progress) >= 10 and progress[-1]["processed"] == 5000
    listed = tenant.service.client.get(
        f"/v1/datasets/{tenant.text['id']}/items?limit=1000", headers=tenant.headers
    ).get_json()
    assert len(listed["items"]) == 1000 and listed["next_cursor"]


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_of_images_labels_by_folder_and_refuses_unsafe_entries(tenant, worker) -> None:
    entries = {f"cat/{i}.png": png((i * 20, 10, 10)) for i in range(6)}
    entries |= {f"dog/{i}.jpg": png((10, i * 20, 10), fmt="JPEG") for i in range(4)}
    entries["unlabeled.png"] = png((1, 1, 1))
    entries["../escape.png"] = png((2, 2, 2))
    entries["bird/x.png"] = png((3, 3, 3))
    entries["cat/broken.png"] = b"\x89PNG not really"
    entries["__MACOSX/._cat"] = b"resource fork"
    response = upload(tenant, tenant.images["id"], zip_of(entries), "application/zip")
    assert response.status_code == 202, response.get_json()
    with worker("ingestion"):
        done = wait_finished(tenant, response.get_json()["id"])
    assert done["status"] == "succeeded", done
    assert done["total"] == len(entries)
    assert done["accepted"] == 11
    assert done["rejected"] == 4
    messages = " | ".join(error["error"] for error in done["errors"])
    assert "'../escape.png': unsafe path refused" in messages
    assert "'bird' is not in the dataset's label set" in messages
    assert "'cat/broken.png'" in messages and "hidden or system file" in messages
    items = tenant.service.client.get(
        f"/v1/datasets/{tenant.images['id']}/items?label=dog", headers=tenant.headers
    ).get_json()["items"]
    assert len(items) == 4 and all(item["content_type"] == "image/jpeg" for item in items)


def test_a_zip_bomb_fails_the_import_with_a_reason(tenant, worker) -> None:
    bomb = zip_of({"cat/huge.png": bytes(60 * 1024 * 1024)})
    assert len(bomb) < 200_000
    response = upload(tenant, tenant.images["id"], bomb, "application/zip")
    with worker("ingestion"):
        done = wait_finished(tenant, response.get_json()["id"])
    assert done["status"] == "failed"
    assert "zip bomb" in done["failure"]
    assert done["accepted"] == 0


def test_uploads_in_the_wrong_shape_are_refused(tenant) -> None:
    assert upload(tenant, tenant.text["id"], b"a,b\n", "text/csv").status_code == 422
    assert upload(tenant, tenant.text["id"], zip_of({"a.png": png()}), "application/zip").status_code == 422
    assert upload(tenant, tenant.text["id"], b"", "application/x-ndjson").status_code == 422
    not_zip = upload(tenant, tenant.images["id"], b"PK not a zip", "application/zip")
    assert not_zip.status_code == 202  # detected by the worker, which fails the import with a reason
    other = tenant.service.client.get(f"/v1/imports/{not_zip.get_json()['id']}x", headers=tenant.headers)
    assert other.status_code == 404
