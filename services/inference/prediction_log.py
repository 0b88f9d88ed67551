"""The prediction log: a tenant-scoped record of predictions (input by reference, outputs, latency, version)
kept for monitoring and later labeling, and the feedback that turns a prediction into a labeled example.

What is kept: every prediction of the friendly API (`/v1/models/{name}:predict`), because any of them may
receive feedback, and feedback must hand labeling the very input; and a random `v2_log_sample_rate` share of
v2 tensor requests, for monitoring (their input is a tensor, not a text or an image, so they take no feedback).

How it is written: requests never wait for storage or the database. They append to a bounded in-memory
buffer, and a writer thread, every `log_flush_interval_s`, packs the buffered inputs of each tenant into one
object in the `raw` bucket under `<tenant>/predictions/YYYY/MM/DD/<uuid>.bin` (each input a byte range with its
own sha256, like ingestion's packed items), then inserts the rows in one transaction. The object is written
before the rows, so no row names missing bytes. If storage or the database is down the buffer keeps the
predictions (bounded by `log_buffer_limit` and `log_buffer_bytes`; the oldest are dropped beyond them and
counted) and the next flush retries. Feedback for a prediction still in this process's buffer flushes it
first; feedback that reaches another replica first waits briefly for the row (`feedback_lookup_wait_s`).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert

from services.inference.config import InferenceConfig
from services.inference.metrics import InferenceMetrics
from services.inference.models import Prediction
from shared.artifacts import RAW_BUCKET
from shared.errors import Conflict, NotFound, Unprocessable
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

PREDICTION_PREFIX = "prd_"


def new_prediction_id() -> str:
    return f"{PREDICTION_PREFIX}{uuid.uuid4().hex[:24]}"


@dataclass
class LoggedPrediction:
    id: str
    tenant: str
    model_name: str
    model_version: int
    dataset_id: str
    api: str
    input_kind: str
    input_bytes: bytes
    predicted_label: str | None
    confidence: float | None
    outputs: dict[str, Any]
    latency_ms: float
    trace_id: str
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class PredictionLog:
    def __init__(self, runtime: Runtime, config: InferenceConfig, metrics: InferenceMetrics) -> None:
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self._buffer: deque[LoggedPrediction] = deque()
        self._buffered_bytes = 0
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- recording (request threads) -------------------------------------------------------------------

    def record(self, predictions: list[LoggedPrediction]) -> None:
        dropped = 0
        with self._lock:
            for prediction in predictions:
                self._buffer.append(prediction)
                self._pending.add(prediction.id)
                self._buffered_bytes += len(prediction.input_bytes)
            while self._buffer and (
                len(self._buffer) > self.config.log_buffer_limit or self._buffered_bytes > self.config.log_buffer_bytes
            ):
                oldest = self._buffer.popleft()
                self._buffered_bytes -= len(oldest.input_bytes)
                self._pending.discard(oldest.id)
                dropped += 1
        if dropped:
            self.metrics.prediction_log_dropped.inc(dropped)
            log.warning("prediction_log_dropped", dropped=dropped)

    def is_pending(self, prediction_id: str) -> bool:
        with self._lock:
            return prediction_id in self._pending

    # -- writing (the writer thread, or a feedback request that needs its row now) ---------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-prediction-log", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.log_flush_interval_s):
            try:
                self.flush()
            except Exception as exc:  # storage or database down: the buffer keeps them, retry next time
                log.warning("prediction_log_flush_failed", error=str(exc)[:300], buffered=len(self._buffer))

    def flush(self) -> int:
        with self._flush_lock:
            with self._lock:
                batch = list(self._buffer)
                self._buffer.clear()
                self._buffered_bytes = 0
            if not batch:
                return 0
            try:
                self._write(batch)
            except Exception:
                with self._lock:
                    self._buffer.extendleft(reversed(batch))
                    self._buffered_bytes += sum(len(prediction.input_bytes) for prediction in batch)
                raise
            with self._lock:
                self._pending.difference_update(prediction.id for prediction in batch)
            return len(batch)

    def _write(self, batch: list[LoggedPrediction]) -> None:
        by_tenant: dict[str, list[LoggedPrediction]] = {}
        for prediction in batch:
            by_tenant.setdefault(prediction.tenant, []).append(prediction)
        rows: list[dict[str, Any]] = []
        for tenant, predictions in by_tenant.items():
            blob = bytearray()
            ranges = []
            for prediction in predictions:
                ranges.append((len(blob), len(prediction.input_bytes)))
                blob += prediction.input_bytes
            day = predictions[0].created_at.strftime("%Y/%m/%d")
            key = f"{tenant}/predictions/{day}/{uuid.uuid4().hex}.bin"
            self.runtime.storage.put(RAW_BUCKET, key, bytes(blob))
            for prediction, (offset, length) in zip(predictions, ranges, strict=True):
                rows.append(
                    {
                        "id": prediction.id,
                        "tenant": tenant,
                        "model_name": prediction.model_name,
                        "model_version": prediction.model_version,
                        "dataset_id": prediction.dataset_id,
                        "api": prediction.api,
                        "input_kind": prediction.input_kind,
                        "input_bucket": RAW_BUCKET,
                        "input_key": key,
                        "input_sha256": hashlib.sha256(prediction.input_bytes).hexdigest(),
                        "input_offset": offset,
                        "input_length": length,
                        "predicted_label": prediction.predicted_label,
                        "confidence": prediction.confidence,
                        "outputs": prediction.outputs,
                        "latency_ms": prediction.latency_ms,
                        "trace_id": prediction.trace_id,
                        "created_at": prediction.created_at,
                    }
                )
        with self.runtime.db.session() as session:
            session.execute(insert(Prediction), rows)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.flush()
        except Exception as exc:
            log.warning("prediction_log_final_flush_failed", error=str(exc)[:300], lost=len(self._buffer))

    # -- feedback --------------------------------------------------------------------------------------

    def _find(self, tenant: str, prediction_id: str) -> Prediction | None:
        deadline = time.monotonic() + (
            self.config.feedback_lookup_wait_s if prediction_id.startswith(PREDICTION_PREFIX) else 0
        )
        while True:
            if self.is_pending(prediction_id):
                self.flush()
            with self.runtime.db.session() as session:
                row = session.get(Prediction, prediction_id)
            if row is not None:
                return row if row.tenant == tenant else None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def give_feedback(
        self, tenant: str, prediction_id: str, label: str, labels_for: Callable[[str, int], list[str] | None]
    ) -> dict[str, Any]:
        """Record the correct label and emit `prediction.feedback` in the same transaction.

        One feedback per prediction: repeating the same label is answered again without a new event; a
        different label is a conflict. The label is checked against the model's labels while that model
        is loaded here (`labels_for`).
        """
        if self._find(tenant, prediction_id) is None:
            raise NotFound(f"prediction {prediction_id} does not exist")
        with self.runtime.db.session() as session:
            row = session.get(Prediction, prediction_id, with_for_update=not self.runtime.db.is_sqlite)
            if row is None or row.tenant != tenant:
                raise NotFound(f"prediction {prediction_id} does not exist")
            if row.input_kind not in ("text", "image"):
                raise Conflict(
                    "this prediction's input is a raw tensor; feedback needs a prediction made through "
                    "POST /v1/models/{name}:predict, whose text or image is kept"
                )
            known_labels = labels_for(row.model_name, row.model_version)
            if known_labels is not None and label not in known_labels:
                raise Unprocessable(
                    f"label {label!r} is not one of the model's labels", {"fields": {"label": ["unknown label"]}}
                )
            result = {
                "prediction_id": row.id,
                "model_name": row.model_name,
                "model_version": row.model_version,
                "predicted_label": row.predicted_label,
                "correct_label": label,
                "event_id": None,
            }
            if row.feedback_label is not None:
                if row.feedback_label != label:
                    raise Conflict(
                        f"prediction {prediction_id} already has feedback {row.feedback_label!r}",
                        {"feedback_label": row.feedback_label},
                    )
                return result
            row.feedback_label = label
            row.feedback_at = datetime.now(UTC)
            envelope = self.runtime.bus.publish(
                session,
                "prediction.feedback",
                {
                    "prediction_id": row.id,
                    "model_name": row.model_name,
                    "model_version": row.model_version,
                    "dataset_id": row.dataset_id,
                    "input": row.input_ref(),
                    "predicted_label": row.predicted_label or "",
                    "correct_label": label,
                    "confidence": row.confidence,
                },
                tenant=tenant,
            )
            result["event_id"] = envelope.event_id
        log.info(
            "prediction_feedback_recorded",
            prediction_id=prediction_id,
            model_name=result["model_name"],
            model_version=result["model_version"],
            predicted_label=result["predicted_label"],
            correct_label=label,
            event_id=result["event_id"],
        )
        return result
