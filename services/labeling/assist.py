"""Model assistance: the production model's predictions as pre-labels, and uncertainty for the queue.

When a dataset has a production model, new tasks (and, after a promotion, open ones) are sent in batches
to the inference service's predict API with the internal token on behalf of the dataset's tenant, as
references to the items in object storage (bucket/key, byte range and sha256, as `item.ingested` gave them)
that inference reads and checks itself. The call goes through the one service-to-service client and carries
the trace id of the event that queued it, so inference logs it under the same `trace_id`. Each task records
the predicted label, its confidence and the model version; `uncertainty = 1 - confidence`
orders the queue (least confidence first). With `auto_accept_threshold` set, a prediction at or above it
settles an untouched task as `model_auto`, recorded as such. A token-classification model's entities become the
task's pre-label spans (`prelabel_spans`), their least confident entity's score its confidence; spans are never
auto-accepted. Inference being down never blocks labeling:
the tasks simply stay without pre-labels, and the next promotion or push tries again.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.labeling.models import Annotation, LabelingDataset, Task
from services.labeling.queue import settle
from services.labeling.spans import canonical
from shared.auth import TENANT_HEADER
from shared.client.http import ApiError, ServiceClient
from shared.logging import current_trace_id, get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

PRELABEL_TASK = "labeling.prelabel"
PRELABEL_CHUNK = 256
"""Tasks per queued pre-label job: a promotion over a large queue becomes many short jobs, not one long one."""
BATCH = 64
TIMEOUT_SECONDS = 30


def inference_client(runtime: Runtime) -> ServiceClient:
    """The inference service, called with the internal token (built once per worker)."""
    return ServiceClient(runtime.settings.inference_url, runtime.settings.internal_token, timeout=TIMEOUT_SECONDS)


def predict(inference: ServiceClient, dataset: LabelingDataset, tasks: list[Task]) -> list[dict[str, Any]] | None:
    """The production model's predictions for these tasks, in order, or None when inference cannot answer."""
    body = {"references": [_reference(task) for task in tasks]}
    path = f"/v1/models/{quote(dataset.production_model, safe='')}:predict"
    try:
        answer = inference.post(path, json=body, headers={TENANT_HEADER: dataset.tenant})
    except ApiError as exc:
        log.warning(
            "prelabel_refused", dataset_id=dataset.id, status=exc.status, code=exc.code, error=exc.message[:300]
        )
        return None
    except requests.RequestException as exc:
        log.warning("prelabel_unavailable", dataset_id=dataset.id, error=str(exc)[:200])
        return None
    return [p | {"model_version": answer.get("model_version")} for p in answer["predictions"]]


def _reference(task: Task) -> dict[str, Any]:
    return {
        "bucket": task.bucket,
        "key": task.object_key,
        "sha256": task.sha256,
        "offset": task.offset,
        "length": task.length,
    }


def queue_prelabels(runtime: Runtime, session: Session, task_ids: list[int]) -> None:
    """Queue pre-labeling of these tasks for a worker, in chunks of PRELABEL_CHUNK, with the caller's transaction
    and its trace id (the worker binds it again, so the calls to inference carry it)."""
    for start in range(0, len(task_ids), PRELABEL_CHUNK):
        runtime.bus.enqueue(session, PRELABEL_TASK, [task_ids[start : start + PRELABEL_CHUNK], current_trace_id()])


def prelabel(runtime: Runtime, inference: ServiceClient, task_ids: list[int]) -> int:
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
        predictions = predict(inference, dataset, chunk)
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
            if "entities" in prediction:
                _record_entities(row, current, prediction)
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


def _record_entities(row: Task, dataset: LabelingDataset, prediction: dict[str, Any]) -> None:
    """A token model's entities as the task's pre-label spans. Their confidence is the least sure entity's score
    (none without entities), which orders the queue; spans are never auto-accepted."""
    entities = [e for e in prediction["entities"] if e["label"] in dataset.labels]
    row.prelabel_spans = canonical(entities)
    row.prelabel_confidence = min((float(e["score"]) for e in entities), default=None)
    row.prelabel_model = dataset.production_model
    row.prelabel_version = prediction.get("model_version")
    row.uncertainty = None if row.prelabel_confidence is None else 1.0 - row.prelabel_confidence
