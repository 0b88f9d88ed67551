"""The push API: what a partner sees for good, duplicate, bad and hostile input."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image
from sqlalchemy import func, select

from services.ingestion.models import Item
from shared.events.tables import event_tables
from tests.helpers import in_lock_order
from tests.ingestion.conftest import make_tenant, png


def noisy_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (48, 48), random.Random(7).randbytes(48 * 48 * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def item_count(service, dataset_id: str) -> int:
    with service.runtime.db.session() as session:
        return session.scalar(select(func.count()).select_from(Item).where(Item.dataset_id == dataset_id))


def outbox_events(service, event_type: str) -> list[dict]:
    outbox = event_tables(service.runtime.db.metadata).outbox
    with service.runtime.db.session() as session:
        rows = session.scalars(select(outbox.c.envelope).where(outbox.c.event_type == event_type)).all()
    return list(rows)


def download(tenant, item_id: str) -> bytes:
    url = tenant.service.client.get(f"/v1/items/{item_id}/download", headers=tenant.headers).get_json()["url"]
    response = tenant.service.client.get(url.split("localhost", 1)[-1])
    assert response.status_code == 200, response.get_json()
    return response.data


def test_each_item_is_accepted_duplicate_or_rejected_with_a_reason(tenant) -> None:
    dataset = tenant.text["id"]
    response = tenant.push(
        dataset,
        [
            {"text": "a wonderful film", "label": "pos", "metadata": {"source": "imdb", "row": 1}},
            {"text": "two hours lost", "label": "meh"},
            {"text": "a wonderful film"},
            {"text": "unlabeled but fine"},
        ],
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 1)
    first, bad, dup, fourth = body["items"]
    assert first["status"] == "accepted" and first["item_id"].startswith("itm_")
    assert bad == {"index": 1, "status": "rejected", "item_id": None, "reason": bad["reason"]}
    assert "'meh' is not in the dataset's label set" in bad["reason"]
    assert dup["status"] == "duplicate" and dup["item_id"] == first["item_id"]
    assert fourth["status"] == "accepted"
    again = tenant.push(dataset, [{"text": "unlabeled but fine"}]).get_json()
    assert again["items"][0] == {"index": 0, "status": "duplicate", "item_id": fourth["item_id"], "reason": None}

    item = tenant.service.client.get(f"/v1/items/{first['item_id']}", headers=tenant.headers).get_json()
    assert item["label"] == "pos" and item["metadata"] == {"source": "imdb", "row": 1}
    assert item["kind"] == "text" and item["size"] == len("a wonderful film")
    assert download(tenant, first["item_id"]) == b"a wonderful film"
    assert download(tenant, fourth["item_id"]) == b"unlabeled but fine"
    [event] = outbox_events(tenant.service, "item.ingested")
    assert [i["item_id"] for i in event["payload"]["items"]] == [first["item_id"], fourth["item_id"]]
    assert event["payload"]["items"][0]["content"]["offset"] == 0
    assert event["payload"]["items"][1]["content"]["offset"] == len("a wonderful film")


def test_images_as_base64_and_multipart(tenant) -> None:
    dataset = tenant.images["id"]
    red, blue = png((255, 0, 0)), png((0, 0, 255), fmt="JPEG")
    body = tenant.push(dataset, [{"image": b64(red), "label": "cat"}, {"image": b64(red)}]).get_json()
    assert [i["status"] for i in body["items"]] == ["accepted", "duplicate"]
    assert download(tenant, body["items"][0]["item_id"]) == red

    multipart = tenant.service.client.post(
        f"/v1/datasets/{dataset}/items",
        data={"files": [(io.BytesIO(blue), "blue.jpg"), (io.BytesIO(red), "red.png")], "label": "dog"},
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert multipart.status_code == 200, multipart.get_json()
    statuses = [i["status"] for i in multipart.get_json()["items"]]
    assert statuses == ["accepted", "duplicate"]
    blue_id = multipart.get_json()["items"][0]["item_id"]
    item = tenant.service.client.get(f"/v1/items/{blue_id}", headers=tenant.headers).get_json()
    assert item["content_type"] == "image/jpeg" and item["label"] == "dog"
    assert item["metadata"]["filename"] == "blue.jpg"
    too_deep = tenant.service.client.post(
        f"/v1/datasets/{dataset}/items",
        data={"files": [(io.BytesIO(red), "red.png")], "metadata": "[" * 3000 + "]" * 3000},
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert too_deep.status_code == 422, too_deep.get_json()
    assert "nested too deeply" in too_deep.get_json()["error"]["details"]["fields"]["metadata"][0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (noisy_png()[:4000], "corrupt or truncated"),
        (b"definitely not an image", "not a recognisable image"),
        (b"", "empty image"),
    ],
)
def test_corrupt_images_are_refused_with_422_and_nothing_is_stored(tenant, content: bytes, message: str) -> None:
    dataset = tenant.images["id"]
    response = tenant.push(dataset, [{"image": b64(png((1, 2, 3)))}, {"image": b64(content)}])
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert message in error["details"]["fields"]["items"]["1"]["image"][0]
    assert item_count(tenant.service, dataset) == 0


def test_disallowed_formats_and_decompression_bombs_are_refused(tenant) -> None:
    dataset = tenant.images["id"]
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81 MP in a few kilobytes
    assert len(bomb.getvalue()) < 100_000
    response = tenant.push(dataset, [{"image": b64(tiff.getvalue())}, {"image": b64(bomb.getvalue())}])
    assert response.status_code == 422
    fields = response.get_json()["error"]["details"]["fields"]["items"]
    assert "TIFF is not allowed" in fields["0"]["image"][0]
    assert "pixels" in fields["1"]["image"][0] or "decompression bomb" in fields["1"]["image"][0]
    bad_b64 = tenant.push(dataset, [{"image": "%%%not base64%%%"}])
    assert bad_b64.status_code == 422
    assert bad_b64.get_json()["error"]["details"]["fields"]["items"]["0"]["image"] == ["is not valid base64"]


def test_malformed_and_mistyped_bodies_get_field_level_errors(tenant) -> None:
    dataset = tenant.text["id"]
    client = tenant.service.client
    url = f"/v1/datasets/{dataset}/items"
    malformed = client.post(url, data="{items: oops", headers=tenant.headers, content_type="application/json")
    assert malformed.status_code == 400 and malformed.get_json()["error"]["code"]
    not_object = client.post(url, json=["x"], headers=tenant.headers)
    assert not_object.status_code == 422
    missing = client.post(url, json={}, headers=tenant.headers)
    assert missing.get_json()["error"]["details"]["fields"]["items"]
    wrong = tenant.push(dataset, [{"text": 42}, {"label": "pos"}, {"text": "ok", "metadata": "nope"}])
    assert wrong.status_code == 422
    fields = wrong.get_json()["error"]["details"]["fields"]["items"]
    assert fields["0"]["text"] and fields["1"]["_schema"] and fields["2"]["metadata"]
    image_in_text = tenant.push(dataset, [{"image": b64(png())}])
    assert image_in_text.get_json()["error"]["details"]["fields"]["items"]["0"]["image"] == [
        "this dataset takes text items"
    ]
    non_utf8 = client.post(
        url, data=b'{"items": [{"text": "\xff\xfe"}]}', headers=tenant.headers, content_type="application/json"
    )
    assert non_utf8.status_code == 400
    assert item_count(tenant.service, dataset) == 0


def test_oversized_pushes_answer_413(platform) -> None:
    service = platform("ingestion", max_request_bytes=200_000)
    tenant = make_tenant(service, "acme")
    too_many = tenant.push(tenant.text["id"], [{"text": f"item {i}"} for i in range(1001)])
    assert too_many.status_code == 413
    assert too_many.get_json()["error"]["code"] == "payload_too_large"
    too_big = tenant.push(tenant.text["id"], [{"text": "x" * 90_000}, {"text": "y" * 90_000}, {"text": "z" * 90_000}])
    assert too_big.status_code == 413
    assert too_big.get_json()["error"]["code"] == "payload_too_large"


def test_credentials_and_tenant_isolation(ingestion, tenant) -> None:
    other = make_tenant(ingestion, "globex")
    url = f"/v1/datasets/{tenant.text['id']}/items"
    assert ingestion.client.post(url, json={"items": [{"text": "x"}]}).status_code == 401
    assert ingestion.client.post(url, json={"items": [{"text": "x"}]}, headers=other.headers).status_code == 404
    accepted = tenant.push(tenant.text["id"], [{"text": "mine"}]).get_json()["items"][0]["item_id"]
    for path in (f"/v1/items/{accepted}", f"/v1/items/{accepted}/download", f"/v1/datasets/{tenant.text['id']}/items"):
        assert ingestion.client.get(path, headers=other.headers).status_code == 404, path
    assert ingestion.client.delete(f"/v1/items/{accepted}", headers=other.headers).status_code == 404
    listed = ingestion.client.get("/v1/datasets", headers=other.headers).get_json()["datasets"]
    assert {d["id"] for d in listed} == {other.text["id"], other.images["id"]}


def test_idempotency_key_replays_the_first_response_without_side_effects(tenant) -> None:
    dataset = tenant.text["id"]
    items = [{"text": "first"}, {"text": "second"}]
    first = tenant.push(dataset, items, **{"Idempotency-Key": "push-0001"})
    again = tenant.push(dataset, items, **{"Idempotency-Key": "push-0001"})
    assert first.status_code == again.status_code == 200
    assert again.get_json() == first.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [i["status"] for i in again.get_json()["items"]] == ["accepted", "accepted"]
    assert item_count(tenant.service, dataset) == 2
    assert len(outbox_events(tenant.service, "item.ingested")) == 1
    reused = tenant.push(dataset, [{"text": "different"}], **{"Idempotency-Key": "push-0001"})
    assert reused.status_code == 409
    failed = tenant.push(dataset, [{"text": 1}], **{"Idempotency-Key": "push-0002"})
    assert failed.status_code == 422
    fixed = tenant.push(dataset, [{"text": "third"}], **{"Idempotency-Key": "push-0002"})
    assert fixed.status_code == 200, "a failed attempt must release its key"


def test_daily_quota_answers_429_with_retry_after_and_stores_nothing(tenant) -> None:
    client = tenant.service.client
    from tests.helpers import INTERNAL

    client.patch(f"/v1/partners/{tenant.partner_id}", json={"daily_item_quota": 3}, headers=INTERNAL)
    assert tenant.push(tenant.text["id"], [{"text": "a"}, {"text": "b"}]).status_code == 200
    over = tenant.push(tenant.text["id"], [{"text": "c"}, {"text": "d"}])
    assert over.status_code == 429
    assert 0 < int(over.headers["Retry-After"]) <= 86_400
    assert over.get_json()["error"]["details"] == {"quota": "items", "limit": 3}
    assert item_count(tenant.service, tenant.text["id"]) == 2
    assert tenant.push(tenant.text["id"], [{"text": "a"}, {"text": "c"}]).status_code == 200  # dup + 1 new = 3
    usage = client.get("/v1/usage", headers=tenant.headers).get_json()
    assert usage["daily_item_quota"] == 3
    [today] = usage["days"]
    assert (today["items"], today["pushes"], today["duplicates"]) == (3, 2, 1)
    assert today["bytes"] == 3
    client.patch(
        f"/v1/partners/{tenant.partner_id}", json={"daily_byte_quota": 4, "daily_item_quota": None}, headers=INTERNAL
    )
    assert tenant.push(tenant.text["id"], [{"text": "xy"}]).status_code == 429


def test_pii_is_redacted_when_the_dataset_asks(ingestion) -> None:
    tenant = make_tenant(ingestion, "acme", pii_policy="redact")
    text = "Reach jane.doe@example.com or +44 20 7946 0958; card 4111 1111 1111 1111, order 12345."
    item_id = tenant.push(tenant.text["id"], [{"text": text}]).get_json()["items"][0]["item_id"]
    stored = download(tenant, item_id).decode()
    assert stored == "Reach [EMAIL] or [PHONE]; card [CARD], order 12345."
    item = ingestion.client.get(f"/v1/items/{item_id}", headers=tenant.headers).get_json()
    assert item["redactions"] == {"email": 1, "phone": 1, "card": 1}
    plain = make_tenant(ingestion, "initech")
    kept = plain.push(plain.text["id"], [{"text": text}]).get_json()["items"][0]["item_id"]
    assert download(plain, kept).decode() == text


def test_listing_pages_with_a_cursor_and_filters(tenant) -> None:
    dataset = tenant.text["id"]
    tenant.push(dataset, [{"text": f"text {i}", "label": "pos" if i % 2 else None} for i in range(7)])
    client = tenant.service.client
    seen, cursor = [], None
    while True:
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        page = client.get(f"/v1/datasets/{dataset}/items{query}", headers=tenant.headers).get_json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    labeled = client.get(f"/v1/datasets/{dataset}/items?labeled=true", headers=tenant.headers).get_json()
    assert len(labeled["items"]) == 3
    assert client.get(f"/v1/datasets/{dataset}/items?cursor=@@@", headers=tenant.headers).status_code == 400


def test_download_urls_are_signed_and_expire(tenant, monkeypatch) -> None:
    item_id = tenant.push(tenant.text["id"], [{"text": "secret"}]).get_json()["items"][0]["item_id"]
    url = tenant.service.client.get(f"/v1/items/{item_id}/download", headers=tenant.headers).get_json()["url"]
    path = url.split("localhost", 1)[-1]
    forged = path[:-4] + ("0000" if not path.endswith("0000") else "1111")
    assert tenant.service.client.get(forged).status_code == 401
    import time as time_module

    real = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real() + 3600)
    expired = tenant.service.client.get(path)
    assert expired.status_code == 401 and "expired" in expired.get_json()["error"]["message"]


def test_delete_erases_content_and_emits_item_deleted(tenant) -> None:
    dataset = tenant.text["id"]
    ids = [
        i["item_id"]
        for i in tenant.push(dataset, [{"text": "keep one"}, {"text": "erase me"}, {"text": "keep two"}]).get_json()[
            "items"
        ]
    ]
    client = tenant.service.client
    assert client.delete(f"/v1/items/{ids[1]}", headers=tenant.headers).status_code == 202
    assert client.get(f"/v1/items/{ids[1]}", headers=tenant.headers).status_code == 404
    assert client.delete(f"/v1/items/{ids[1]}", headers=tenant.headers).status_code == 404
    assert download(tenant, ids[0]) == b"keep one"
    assert download(tenant, ids[2]) == b"keep two"
    with tenant.service.runtime.db.session() as session:
        kept = session.get(Item, ids[0])
    pack = tenant.service.runtime.storage.get_bytes(kept.bucket, kept.object_key)
    assert b"erase me" not in pack and pack == b"keep one" + bytes(8) + b"keep two"
    [event] = outbox_events(tenant.service, "item.deleted")
    assert event["payload"]["dataset_id"] == dataset and event["payload"]["item_ids"] == [ids[1]]
    again = tenant.push(dataset, [{"text": "erase me"}]).get_json()
    assert again["items"][0]["status"] == "accepted", "erased content can be pushed again"

    image_id = tenant.push(tenant.images["id"], [{"image": b64(png())}]).get_json()["items"][0]["item_id"]
    with tenant.service.runtime.db.session() as session:
        image = session.get(Item, image_id)
    assert client.delete(f"/v1/items/{image_id}", headers=tenant.headers).status_code == 202
    assert not tenant.service.runtime.storage.exists(image.bucket, image.object_key)


def test_two_deletions_of_one_item_at_once_give_202_and_404(platform, postgres_database) -> None:
    # Both requests read the item, then queue for the pack's row locks. The second must find it gone (404);
    # it used to take the single-item branch and delete the whole pack, and announce the deletion again.
    database_url = postgres_database()
    tenant = make_tenant(platform("ingestion", database_url=database_url), "acme")
    pushed = tenant.push(tenant.text["id"], [{"text": "keep"}, {"text": "erase twice"}]).get_json()["items"]
    item_id = pushed[1]["item_id"]

    def delete() -> int:
        return tenant.service.client.delete(f"/v1/items/{item_id}", headers=tenant.headers).status_code

    answers = in_lock_order(database_url, "SELECT id FROM items WHERE id = %s FOR UPDATE", (item_id,), [delete] * 2)
    assert sorted(answers) == [202, 404]
    assert len(outbox_events(tenant.service, "item.deleted")) == 1
    assert download(tenant, pushed[0]["item_id"]) == b"keep"


def test_a_nul_character_in_an_identifier_or_a_path_answers_422_on_postgresql(platform, postgres_database) -> None:
    # PostgreSQL text columns cannot hold NUL: the subject id is refused by its validator, naming the field, in
    # a push and in an erasure's path.
    tenant = make_tenant(platform("ingestion", database_url=postgres_database()), "acme")
    refused = tenant.push(tenant.text["id"], [{"text": "about someone", "subject_id": "cus\x0042"}])
    assert refused.status_code == 422, refused.get_json()
    assert "subject_id" in str(refused.get_json()["error"]["details"]), refused.get_json()
    assert item_count(tenant.service, tenant.text["id"]) == 0
    erased = tenant.service.client.delete("/v1/subjects/cus%0042", headers=tenant.headers)
    assert erased.status_code == 422, erased.get_json()
    assert "control characters" in str(erased.get_json()["error"]["details"]["fields"]["subject_id"])
    operation = tenant.service.client.get("/openapi.json").get_json()["paths"]["/v1/subjects/{subject_id}"]["delete"]
    assert "422" in operation["responses"]
