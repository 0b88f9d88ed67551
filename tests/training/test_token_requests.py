"""A `training.requested` for a token_classification dataset whose snapshot carries class labels, not spans, ends
in `training.failed` with the reason instead of failing obscurely (docs/ner.md)."""

from __future__ import annotations

import pytest

from tests.training.support import published, request_training, text_items, write_snapshot
from tests.training.test_requests import failure_reason

pytestmark = pytest.mark.timeout(120)

ENTITIES = ["PER", "ORG", "LOC"]


def test_a_token_request_on_a_snapshot_without_spans_fails_with_its_reason(worker) -> None:
    with worker("training") as training:
        items = [item | {"label": ENTITIES[i % 3]} for i, item in enumerate(text_items(per_label=2))]
        snapshot = write_snapshot(  # packed text items with class labels: no spans to train a tagger on
            training.storage,
            tenant="acme",
            dataset_id="ds_news",
            task_type="text_classification",
            labels=ENTITIES,
            items=items,
        )
        request_training(
            training,
            tenant="acme",
            dataset_id="ds_news",
            snapshot=snapshot,
            task_type="token_classification",
            labels=ENTITIES,
        )
        reason = failure_reason(training, snapshot["snapshot_id"])
        assert "carries no spans" in reason and "token_classification" in reason
        assert not published(training, "training.completed")
