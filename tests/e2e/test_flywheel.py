"""The whole flywheel across five services running as separate processes (`flywheel up`), at small scale:
labeled data in, a model trained, registered, promoted and served, feedback back into labeling, and one
trace id visible in the logs of all five services."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from cli.commands import collect_trace
from cli.demo_data import DIGIT_LABELS, digit_images, shuffled
from cli.launcher import detached_platform
from shared.client import Flywheel, answer_or_none
from shared.settings import SERVICES
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TRAIN_ITEMS = 240


@pytest.fixture
def running_platform(tmp_path: Path, redis_url: str, s3_server):
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        FLYWHEEL_INTERNAL_TOKEN=INTERNAL_TOKEN,
        S3_ENDPOINT=s3_server.endpoint,
        S3_ACCESS_KEY=s3_server.access_key,
        S3_SECRET_KEY=s3_server.secret_key,
        KEY_CACHE_SECONDS="2",
        EVENT_RETRY_BACKOFF="0.5",
    )
    with detached_platform(tmp_path / "home", env, timeout=180) as urls:
        yield urls, tmp_path / "home" / "logs"


def test_data_in_model_out_feedback_back_in(running_platform) -> None:
    urls, log_dir = running_platform
    operator = Flywheel.from_urls(urls, INTERNAL_TOKEN)
    issued = operator.ingestion.create_partner("e2e")
    tenant = issued["partner"]["id"]
    partner = operator.with_token(issued["api_key"])
    dataset = partner.ingestion.create_dataset(
        "digits", "image_classification", list(DIGIT_LABELS), overlap=1, retrain_threshold=TRAIN_ITEMS
    )["id"]
    eventually(lambda: _knows(partner, dataset), what="labeling to learn of the dataset")
    partner.labeling.settings(dataset, training_hyperparameters={"epochs": 5, "image_size": 32, "batch_size": 32})

    digits = shuffled(digit_images())
    labeled, holdout = digits[:TRAIN_ITEMS], digits[TRAIN_ITEMS : TRAIN_ITEMS + 40]
    trace_id = f"e2e-{uuid.uuid4().hex[:12]}"
    for start in range(0, TRAIN_ITEMS, 120):
        batch = labeled[start : start + 120]
        answer = partner.ingestion.push(
            dataset, [{"image": png, "label": label} for png, label in batch], trace_id=trace_id
        )
        assert answer["accepted"] == len(batch)

    # The partner's labels are the consensus (overlap 1): crossing the threshold snapshots and trains.
    run = eventually(lambda: _only(partner.training.list_runs(dataset_id=dataset)), timeout=60, what="a run")
    assert run["reason"].startswith("retrain policy") and run["hyperparameters"]["image_size"] == 32
    run = eventually(
        lambda: _finished(partner.training.get_run(run["id"])), timeout=600, interval=2, what="training to finish"
    )
    assert run["status"] == "succeeded", run.get("failure_reason")
    assert run["metrics"]["macro_f1"] > 0.5

    version = eventually(lambda: _only(_versions(partner)), timeout=60, what="the registered version")
    assert version["run_id"] == run["id"] and version["version"] == 1
    assert "production" in version["aliases"]
    audit = partner.registry.audit("digits")
    assert audit[0]["alias"] == "production" and audit[0]["to_version"] == 1

    answer = eventually(
        lambda: _predict(partner, [png for png, _ in holdout]), timeout=120, interval=1, what="inference to serve v1"
    )
    assert answer["model_version"] == 1 and len(answer["predictions"]) == len(holdout)
    correct = sum(p["label"] == truth for p, (_, truth) in zip(answer["predictions"], holdout, strict=True))
    assert correct / len(holdout) > 0.5

    # Model assistance against the real inference service: new tasks get pre-labels from the production
    # model, and the queue hands out the least confident first.
    fresh = digits[TRAIN_ITEMS + 40 : TRAIN_ITEMS + 46]
    partner.ingestion.push(dataset, [{"image": png} for png, _ in fresh])
    prelabeled = eventually(
        lambda: [t for t in partner.labeling.tasks(dataset, status="open") if t["prelabel"] is not None],
        timeout=60,
        what="pre-labels from the served model",
    )
    assert {t["prelabel_version"] for t in prelabeled} == {1}
    annotator = operator.with_token(operator.labeling.create_annotator(tenant, "a1", [dataset])["token"])
    eventually(
        lambda: (
            len(partner.labeling.tasks(dataset, status="open"))
            == len([t for t in partner.labeling.tasks(dataset, status="open") if t["prelabel"] is not None])
        ),
        timeout=60,
        what="every new task pre-labeled",
    )
    confidences = sorted(t["prelabel_confidence"] for t in partner.labeling.tasks(dataset, status="open"))
    first_task = annotator.labeling.next_task(dataset)
    assert first_task["prelabel_confidence"] == confidences[0], "least confident first"

    first = answer["predictions"][0]
    partner.inference.feedback(first["prediction_id"], holdout[0][1])
    feedback = eventually(
        lambda: [t for t in partner.labeling.tasks(dataset, status="open") if t["source"] == "feedback"],
        timeout=60,
        what="the feedback task",
    )
    assert feedback[0]["prelabel"] == first["label"] and feedback[0]["feedback"]["correct_label"] == holdout[0][1]

    # One trace id tells the datum's whole story, across all five services.
    def traced() -> set[str]:
        return {line.get("service") for line in collect_trace(log_dir, trace_id)}

    services = eventually(lambda: traced() >= set(SERVICES) and traced(), timeout=30, what="the trace everywhere")
    assert services >= set(SERVICES)
    events = [line["event"] for line in collect_trace(log_dir, trace_id)]
    for step in ("items_ingested", "tasks_created", "snapshot_created", "run_epoch_finished", "run_published"):
        assert any(step in event for event in events), (step, sorted(set(events)))
    assert tenant
    # Every line every process printed, the HTTP servers' own included, is JSON naming its service: a log
    # pipeline that parses JSON loses none of them.
    unparsed = [
        f"{log.name}:{number}: {line[:300]}"
        for log in sorted(log_dir.glob("*.log"))
        for number, line in enumerate(log.read_text().splitlines(), 1)
        if (_json_or_none(line) or {}).get("service") != log.stem.removesuffix("-worker")
    ]
    assert not unparsed, "\n".join(unparsed)


def _json_or_none(line: str) -> dict | None:
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _knows(client: Flywheel, dataset: str) -> bool:
    return answer_or_none(lambda: client.labeling.dataset(dataset)) is not None


def _only(items: list) -> dict | None:
    return items[0] if len(items) == 1 else None


def _finished(run: dict) -> dict | None:
    return run if run["status"] in {"succeeded", "failed", "cancelled"} else None


def _versions(client: Flywheel) -> list:
    return answer_or_none(lambda: client.registry.versions("digits")) or []


def _predict(client: Flywheel, images: list[bytes]) -> dict | None:
    return answer_or_none(lambda: client.inference.predict("digits", images=images))
