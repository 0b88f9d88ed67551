"""What the end-to-end tests share: a partner with a digits dataset, pushing labeled images, and small probes
for `eventually` over the public APIs."""

from __future__ import annotations

from typing import Any

from cli.demo_data import DIGIT_LABELS
from shared.client import Flywheel, answer_or_none
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import eventually

MODEL = "digits"
"""The registry names a dataset's model after the dataset."""


def digits_partner(
    urls: dict[str, str], name: str, *, retrain_threshold: int, hyperparameters: dict[str, Any]
) -> tuple[Flywheel, Flywheel, str, str]:
    """A new partner with a digits dataset (overlap 1: the partner's labels are the consensus), once labeling
    knows of it. Returns the operator's client, the partner's, the tenant and the dataset id."""
    operator = Flywheel.from_urls(urls, INTERNAL_TOKEN)
    issued = operator.ingestion.create_partner(name)
    partner = operator.with_token(issued["api_key"])
    dataset = partner.ingestion.create_dataset(
        MODEL, "image_classification", list(DIGIT_LABELS), overlap=1, retrain_threshold=retrain_threshold
    )["id"]
    eventually(
        lambda: answer_or_none(lambda: partner.labeling.dataset(dataset)) is not None,
        what="labeling to learn of the dataset",
    )
    partner.labeling.settings(dataset, training_hyperparameters=hyperparameters)
    return operator, partner, issued["partner"]["id"], dataset


def push_labeled(
    partner: Flywheel, dataset: str, items: list[tuple[bytes, str]], *, trace_id: str | None = None
) -> list[str]:
    """Push (png, label) pairs in batches; every one must be accepted. Returns their item ids, in order."""
    ids: list[str] = []
    for start in range(0, len(items), 120):
        batch = items[start : start + 120]
        answer = partner.ingestion.push(
            dataset, [{"image": png, "label": label} for png, label in batch], trace_id=trace_id
        )
        assert answer["accepted"] == len(batch), answer
        ids += [result["item_id"] for result in answer["items"]]
    return ids


def only(items: list) -> dict | None:
    return items[0] if len(items) == 1 else None


def finished(run: dict) -> dict | None:
    return run if run["status"] in {"succeeded", "failed", "cancelled"} else None


def versions(client: Flywheel) -> list:
    return answer_or_none(lambda: client.registry.versions(MODEL)) or []


def predict(client: Flywheel, images: list[bytes]) -> dict | None:
    return answer_or_none(lambda: client.inference.predict(MODEL, images=images))
