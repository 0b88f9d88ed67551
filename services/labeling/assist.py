"""Model assistance: the production model's predictions as pre-labels, and uncertainty for the queue.

When a dataset has a production model, new tasks (and, after a promotion, open ones) are sent in batches
to the inference service's predict API with the internal token on behalf of the dataset's tenant. Each
task records the predicted label, its confidence and the model version; `uncertainty = 1 - confidence`
orders the queue (least confidence first). With `auto_accept_threshold` set, a prediction at or above it
settles an untouched task as `model_auto`, recorded as such. Inference being down never blocks labeling:
the tasks simply stay without pre-labels, and the next promotion or push tries again.
"""

from __future__ import annotations

import base64
from typing import Any

import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.labeling.models import Annotation, LabelingDataset, Task
from services.labeling.queue import settle
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

PRELABEL_TASK = "labeling.prelabel"
PRELABEL_CHUNK = 256
"""Tasks per queued pre-label job: a promotion over a large queue becomes many short jobs, not one long one."""
BATCH = 64
TIMEOUT_SECONDS = 30


def predict(runtime: Runtime, dataset: LabelingDataset, tasks: list[Task]) -> list[dict[str, Any]] | None:
    """The production model's predictions for these tasks, in order, or None when inference cannot answer."""
    inputs = [
        runtime.storage.get_range(t.bucket, t.object_key, t.offset, t.length)
        if t.offset is not None
        else runtime.storage.get_bytes(t.bucket, t.object_key)
        for t in tasks
    ]
    if dataset.task_type == "text_classification":
        body: dict[str, Any] = {"texts": [data.decode("utf-8", errors="replace") for data in inputs]}
    else:
        body = {"images": [base64.b64encode(data).decode("ascii") for data in inputs]}
    url = f"{runtime.settings.inference_url.rstrip('/')}/v1/models/{dataset.production_model}:predict"
    headers = {"Authorization": f"Bearer {runtime.settings.internal_token}", "X-Flywheel-Tenant": dataset.tenant}
    try:
        response = requests.post(url, json=body, headers=headers, timeout=TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        log.warning("prelabel_unavailable", dataset_id=dataset.id, error=str(exc)[:200])
        return None
    if response.status_code != 200:
        log.warning("prelabel_refused", dataset_id=dataset.id, status=response.status_code, body=response.text[:300])
        return None
    answer = response.json()
    return [p | {"model_version": answer.get("model_version")} for p in answer["predictions"]]


def queue_prelabels(runtime: Runtime, session: Session, task_ids: list[int]) -> None:
    """Queue pre-labeling of these tasks for a worker, in chunks of PRELABEL_CHUNK, with the caller's transaction."""
    for start in range(0, len(task_ids), PRELABEL_CHUNK):
        runtime.bus.enqueue(session, PRELABEL_TASK, [task_ids[start : start + PRELABEL_CHUNK]])


def prelabel(runtime: Runtime, task_ids: list[int]) -> int:
    """Pre-label the given tasks that are still open; returns how many got a prediction."""
    with runtime.db.session() as session:
        tasks = list(session.scalars(select(Task).where(Task.id.in_(task_ids), Task.status == "open")))
        if not tasks:
            return 0
        dataset = session.get(LabelingDataset, tasks[0].dataset_id)
    if dataset.production_model is None:
        return 0
    done = 0
    for start in range(0, len(tasks), BATCH):
        chunk = tasks[start : start + BATCH]
        predictions = predict(runtime, dataset, chunk)
        if predictions is None:
            break
        done += _record(runtime, dataset, chunk, predictions)
    log.info("tasks_prelabeled", dataset_id=dataset.id, count=done, model=dataset.production_model)
    return done


def _record(runtime: Runtime, dataset: LabelingDataset, chunk: list[Task], predictions: list[dict[str, Any]]) -> int:
    with runtime.db.session() as session:
        current = session.get(LabelingDataset, dataset.id)
        for task, prediction in zip(chunk, predictions, strict=True):
            row = session.get(Task, task.id)
            if row is None or row.status != "open":
                continue
            row.prelabel = prediction["label"]
            row.prelabel_confidence = float(prediction["confidence"])
            row.prelabel_model = dataset.production_model
            row.prelabel_version = prediction.get("model_version")
            row.uncertainty = 1.0 - row.prelabel_confidence
            threshold = current.auto_accept_threshold
            if threshold is not None and row.prelabel_confidence >= threshold and row.prelabel in current.labels:
                untouched = not session.scalar(select(func.count(Annotation.id)).where(Annotation.task_id == row.id))
                if untouched:
                    settle(runtime, session, row, current, row.prelabel, "model_auto", row.prelabel_confidence)
    return len(chunk)
