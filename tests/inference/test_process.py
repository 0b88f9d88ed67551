"""Inference as `flywheel up`, compose and the manifests run it: the WSGI app under granian, in its own process,
and no Celery worker beside it.

The other inference tests drive the app in-process. This one runs the real server command: it serves a
prediction, and when the server is stopped the prediction it just answered is in the prediction log, written
by the app's shutdown hook (granian's workers exit without running `atexit`).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from cli.launcher import http_command
from services.inference.app import SPEC
from services.inference.models import Base, Prediction
from shared.db import Database
from shared.events.catalog import CATALOG
from shared.events.consumer import EventHandlers
from shared.runtime import ServiceSpec, create_worker
from shared.settings import Settings
from tests.cli.test_launcher import free_ports
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import eventually
from tests.inference.support import serving_document, upload_version

pytestmark = pytest.mark.timeout(180)


def test_inference_runs_no_worker_its_http_processes_hear_promotions() -> None:
    """Inference's events are heard by its HTTP processes themselves: `model.promoted` is broadcast to every
    replica (test_hot_swap.py), `prediction.labeled` and `erasure.requested` are taken from the inference queue by
    one of them (test_monitoring.py, test_erasure.py); so the service declares no worker, and none can be built."""
    consumed = {name: spec.broadcast_to for name, spec in CATALOG.items() if "inference" in spec.consumers}
    assert consumed == {"model.promoted": ("inference",), "prediction.labeled": (), "erasure.requested": ()}
    assert SPEC.runs_worker is False and SPEC.handlers is None and SPEC.register_tasks is None
    with pytest.raises(ValueError, match="runs no Celery worker"):
        create_worker(SPEC)
    with pytest.raises(ValueError, match="nothing would run its event handlers"):
        ServiceSpec("inference", "t", Base.metadata, handlers=EventHandlers("inference"), runs_worker=False)


def test_the_server_process_serves_and_logs_its_last_prediction_when_stopped(
    tmp_path: Path, settings: Settings, store, registry, tenants, model_folders
) -> None:
    folder = model_folders["text"]
    registry.serve(
        serving_document(tenants.alice.tenant, folder, {4: upload_version(store, tenants.alice.tenant, folder, 4)}, 4)
    )
    home = tmp_path / "inference-process"
    env = {
        **{key: value for key, value in os.environ.items() if not key.endswith("_PORT")},
        "FLYWHEEL_HOME": str(home),
        "REDIS_URL": settings.redis_url,
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_ACCESS_KEY": settings.s3_access_key,
        "S3_SECRET_KEY": settings.s3_secret_key,
        "FLYWHEEL_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "INGESTION_URL": tenants.ingestion_url,
        "REGISTRY_URL": registry.url,
    }
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "inference.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            http_command("inference", port), env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def ready() -> bool:
            try:
                return requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                assert server.poll() is None, log_path.read_text()[-3000:]
                return False

        eventually(ready, timeout=90, what="inference under granian ready")
        response = requests.post(
            f"{url}/v1/models/reviews:predict",
            json={"texts": ["a wonderful film"]},
            headers=tenants.alice.headers,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.headers["Server"].startswith("granian")
        (prediction,) = response.json()["predictions"]
        os.killpg(server.pid, signal.SIGTERM)  # at once: well inside the log's flush interval
        assert server.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    database = Database(Settings(home=home).for_service("inference").database_url, Base.metadata)
    try:
        with database.session() as session:
            logged = {row.id: row for row in session.scalars(select(Prediction))}
    finally:
        database.dispose()
    assert prediction["prediction_id"] in logged, log_path.read_text()[-3000:]
    row = logged[prediction["prediction_id"]]
    assert (row.tenant, row.model_name, row.model_version) == (tenants.alice.tenant, "reviews", 4)
    assert row.predicted_label == prediction["label"]
