"""training.completed becomes a verified, numbered version; duplicates and bad artifacts create nothing."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from services.registry.models import ModelVersion, RefusedRegistration, RegisteredModel
from shared.artifacts import MODELS_BUCKET
from shared.storage import StorageError
from tests.helpers import INTERNAL, eventually
from tests.registry.support import RunFactory, deliver, envelope, outbox, sha256

pytestmark = pytest.mark.timeout(120)

TENANT = "ptn_registry_a"


def versions_of(runtime, model_name: str) -> list[int]:
    with runtime.db.session() as session:
        return list(
            session.scalars(
                select(ModelVersion.version)
                .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
                .where(RegisteredModel.name == model_name)
                .order_by(ModelVersion.version)
            )
        )


def test_a_training_run_becomes_version_1_with_verified_files_lineage_and_signature(registry, evaluated, logs) -> None:
    payload = evaluated(TENANT, macro_f1=0.81)
    assert deliver(registry.runtime, TENANT, payload) == "handled"

    response = registry.client.get(
        "/v1/models/reviews-clf/versions/1", query_string={"tenant": TENANT}, headers=INTERNAL
    )
    assert response.status_code == 200, response.get_json()
    version = response.get_json()
    assert version["run_id"] == payload["run_id"]
    assert version["status"] == "ready"
    assert version["metrics"]["macro_f1"] == 0.81
    onnx = version["artifacts"]["model.onnx"]
    declared = payload["metadata"]["files"]["model.onnx"]
    assert (onnx["sha256"], onnx["size"]) == (declared["sha256"], declared["size"])
    assert set(version["artifacts"]) == {"model.onnx", "tokenizer.json", "metadata.json"}
    assert version["lineage"]["snapshot_id"] == "snap-1"
    assert version["lineage"]["manifest_sha256"] == payload["metadata"]["lineage"]["manifest_sha256"]
    assert version["lineage"]["base_model"] == "all-MiniLM-L6-v2"
    assert version["lineage"]["code_version"] == "abc1234"
    assert version["lineage"]["hyperparameters"] == {"lr": 5e-5, "epochs": 3, "seed": 7}
    assert version["signature"]["inputs"][0]["name"] == "input_ids"
    assert version["labels"] == ["neg", "pos"]
    assert version["preprocessing"]["tokenizer_files"] == ["tokenizer.json"]
    assert version["aliases"] == ["production"]
    assert version["decision"]["outcome"] == "production"
    assert version["decision"]["report"] == payload["evaluation"]

    created = outbox(registry.runtime, "model.version_created")
    assert [(e["payload"]["version"], e["payload"]["run_id"], e["tenant"]) for e in created] == [
        (1, payload["run_id"], TENANT)
    ]
    registered = logs.find(event="model_version_registered", run_id=payload["run_id"])
    assert registered and registered[0]["version"] == 1


def test_a_duplicate_training_completed_creates_nothing_new(registry, runs, worker, logs) -> None:
    """The same event twice (inbox), and the same run in a new event (unique run per model): one version."""
    payload = runs(TENANT)
    event = envelope(TENANT, payload)
    with worker("registry"):
        for _ in range(2):
            registry.runtime.bus.send(event.to_dict(), "registry")
        registry.runtime.bus.send(envelope(TENANT, payload).to_dict(), "registry")  # new event_id, same run_id
        eventually(
            lambda: (
                len(logs.find(event="event_duplicate_skipped", event_id=event.event_id)) == 1
                and logs.find(event="model_version_duplicate_skipped", run_id=payload["run_id"])
            ),
            what="both duplicates to be recognised",
        )
    assert versions_of(registry.runtime, "reviews-clf") == [1]
    assert len(outbox(registry.runtime, "model.version_created")) == 1
    assert len(outbox(registry.runtime, "model.promoted")) == 1


def _tamper(runs: RunFactory, payload: dict, name: str, data: bytes) -> None:
    ref = payload["artifacts"][name]
    runs.storage.put(ref["bucket"], ref["key"], data)


def test_an_artifact_that_fails_verification_is_refused_with_a_clear_reason(registry, runs, logs) -> None:
    tampered = runs(TENANT, run_id="run_tampered")
    _tamper(runs, tampered, "model.onnx", b"not the bytes training wrote")
    missing = runs(TENANT, run_id="run_missing")
    runs.storage.delete(MODELS_BUCKET, missing["artifacts"]["tokenizer.json"]["key"])
    resized = runs(TENANT, run_id="run_resized")
    resized["metadata"]["files"]["tokenizer.json"]["size"] += 1

    for payload in (tampered, missing, resized):
        assert deliver(registry.runtime, TENANT, payload) == "handled"  # recorded, not crashed, not retried

    with registry.runtime.db.session() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0
        assert session.scalar(select(func.count()).select_from(RegisteredModel)) == 0
    assert outbox(registry.runtime, "model.version_created") == []

    listed = registry.client.get("/v1/refused-registrations", query_string={"tenant": TENANT}, headers=INTERNAL)
    assert listed.status_code == 200
    reasons = {row["run_id"]: row for row in listed.get_json()["refusals"]}
    bad = reasons["run_tampered"]
    assert "model.onnx: sha256 mismatch" in bad["reason"]
    problem = bad["details"]["problems"][0]
    assert problem["expected_sha256"] == tampered["artifacts"]["model.onnx"]["sha256"]
    assert problem["actual_sha256"] == sha256(b"not the bytes training wrote")
    assert "tokenizer.json: not found in object storage" in reasons["run_missing"]["reason"]
    assert "tokenizer.json: size mismatch" in reasons["run_resized"]["reason"]
    refused = logs.find(event="model_version_refused", run_id="run_tampered")
    assert refused and "sha256 mismatch" in refused[0]["reason"]

    # The run is fixed and sent again: now it registers, as version 1.
    good = runs(TENANT, run_id="run_tampered")
    assert deliver(registry.runtime, TENANT, good) == "handled"
    assert versions_of(registry.runtime, "reviews-clf") == [1]


def test_metadata_that_breaks_the_contract_is_refused(registry, runs) -> None:
    payload = runs(TENANT)
    del payload["metadata"]["labels"]
    deliver(registry.runtime, TENANT, payload)
    with registry.runtime.db.session() as session:
        refusal = session.scalars(select(RefusedRegistration)).one()
    assert "ModelMetadata" in refusal.reason and "labels" in refusal.details["fields"]


def _postgres_registry(platform, postgres_database):
    url = postgres_database()
    return platform("registry", database_url=url), url


def test_twenty_concurrent_registrations_through_workers_number_1_to_20_on_postgresql(
    platform, postgres_database, worker
) -> None:
    registry, url = _postgres_registry(platform, postgres_database)
    runs = RunFactory(registry.runtime.storage)
    payloads = [runs(TENANT, macro_f1=0.5 + i / 100) for i in range(20)]
    with worker("registry", database_url=url), worker("registry", database_url=url):
        for payload in payloads:
            registry.runtime.bus.send(envelope(TENANT, payload).to_dict(), "registry")
        eventually(lambda: len(versions_of(registry.runtime, "reviews-clf")) >= 20, timeout=60, what="20 versions")
    assert versions_of(registry.runtime, "reviews-clf") == list(range(1, 21))
    with registry.runtime.db.session() as session:
        runs_by_version = dict(session.execute(select(ModelVersion.version, ModelVersion.run_id)).all())
        model = session.scalars(select(RegisteredModel)).one()
    assert sorted(runs_by_version.values()) == sorted(p["run_id"] for p in payloads)
    assert model.last_version == 20
    created = outbox(registry.runtime, "model.version_created")
    assert sorted(e["payload"]["version"] for e in created) == list(range(1, 21))


def test_twenty_five_concurrent_deliveries_with_five_repeated_runs_give_exactly_1_to_20_on_postgresql(
    platform, postgres_database
) -> None:
    registry, _ = _postgres_registry(platform, postgres_database)
    runs = RunFactory(registry.runtime.storage)
    payloads = [runs(TENANT, model_name="concurrent") for _ in range(20)]
    deliveries = payloads + payloads[:5]  # five runs arrive twice, each time in a new event
    barrier = threading.Barrier(len(deliveries))
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def one(payload: dict) -> None:
        event = envelope(TENANT, payload)
        barrier.wait()
        try:
            outcomes.append(deliver(registry.runtime, TENANT, payload, event))
        except BaseException as exc:  # reported below; a thread's exception would vanish otherwise
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(payload,)) for payload in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert versions_of(registry.runtime, "concurrent") == list(range(1, 21))
    with registry.runtime.db.session() as session:
        assert session.scalar(select(func.count(func.distinct(ModelVersion.run_id)))) == 20
    assert len(outbox(registry.runtime, "model.version_created")) == 20


def test_a_run_of_another_dataset_under_an_existing_model_name_is_refused(registry, runs) -> None:
    deliver(registry.runtime, TENANT, runs(TENANT))
    deliver(registry.runtime, TENANT, runs(TENANT, dataset_id="ds_somewhere_else"))
    assert versions_of(registry.runtime, "reviews-clf") == [1]
    with registry.runtime.db.session() as session:
        refusal = session.scalars(select(RefusedRegistration)).one()
    expected = f"model 'reviews-clf' belongs to dataset {runs.dataset_id}, the run trained on ds_somewhere_else"
    assert refusal.reason == expected


def test_unreachable_storage_is_retried_not_refused(registry, runs, platform) -> None:
    """A refusal is a verdict on the artifacts; storage that does not answer says nothing about them."""
    payload = runs(TENANT)
    cut_off = platform("registry", s3_endpoint="127.0.0.1:9")  # same database, an S3 endpoint nobody serves
    with pytest.raises(StorageError):
        deliver(cut_off.runtime, TENANT, payload)
    with registry.runtime.db.session() as session:
        assert session.scalar(select(func.count()).select_from(RefusedRegistration)) == 0
    assert deliver(registry.runtime, TENANT, payload) == "handled"  # the redelivery registers it
    assert versions_of(registry.runtime, "reviews-clf") == [1]
