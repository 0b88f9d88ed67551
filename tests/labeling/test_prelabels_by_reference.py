"""Pre-labels from the real inference service: labeling names the items by reference, inference reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.app import create_app as create_inference_app
from shared.settings import Settings
from tests.conftest import serve
from tests.helpers import eventually
from tests.inference.support import RegistryStandIn, build_text_model, serving_document, upload_version

pytestmark = pytest.mark.timeout(120)


def test_inference_prelabels_the_items_labeling_names_by_reference(
    harness_factory, settings: Settings, store, tmp_path: Path, logs
) -> None:
    registry = RegistryStandIn().start()
    inference = create_inference_app(
        Settings(**{**settings.__dict__, "registry_url": registry.url}), {"reconcile_interval_s": 300.0}
    )
    url, stop = serve(inference)
    try:
        harness = harness_factory(inference_url=url)
        dataset = harness.dataset()
        folder = build_text_model(tmp_path / "reviews")
        registry.serve(
            serving_document(harness.tenant, folder, {1: upload_version(store, harness.tenant, folder, 1)}, 1)
        )
        served = inference.extensions["inference"].repository
        served.request_reconcile()  # what the registry's model.promoted to inference would do
        eventually(lambda: served.ready and served.get(harness.tenant, "reviews"), what="inference to load the model")
        wonderful, terrible = harness.push(dataset, ["a wonderful film", "a terrible film"])
        harness.wait_tasks(dataset, 2)
        harness.promote(dataset, version=1, trace_id="trace-of-the-promotion")

        def prelabeled():
            tasks = harness.labeling.client.get(f"/v1/datasets/{dataset}/tasks", headers=harness.partner).get_json()
            return {t["item_id"]: t for t in tasks["tasks"]} if all(t["prelabel"] for t in tasks["tasks"]) else None

        tasks = eventually(prelabeled, what="pre-labels from inference")
        assert tasks[wonderful]["prelabel"] == "pos" and tasks[terrible]["prelabel"] == "neg"
        assert {t["prelabel_version"] for t in tasks.values()} == {1}
        (call,) = logs.find(event="http_request", service="inference", path="/v1/models/reviews:predict")
        assert call["status"] == 200 and call["trace_id"] == "trace-of-the-promotion"
    finally:
        stop()
        inference.extensions["inference"].close()
        inference.extensions["flywheel"].close()
        registry.stop()
