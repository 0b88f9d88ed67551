"""The prediction log: a tenant-scoped record of predictions (input by reference, outputs, latency, version)
kept for monitoring and later labeling, and the feedback that turns a prediction into a labeled example.

What is kept: every prediction of the friendly API (`/v1/models/{name}:predict`), because any of them may
receive feedback, and feedback must hand labeling the very input; and a random `v2_log_sample_rate` share of
v2 tensor requests, for monitoring (their input is a tensor, not a text or an image, so they take no feedback).
A token-classification model's prediction is kept the same way, with its `entities` instead of a class label
(`predicted_label` null, `confidence` its least sure entity's score, never sampled for labeling); where the text
is stored redacted, the entities are moved onto the stored text (one overlapping a redacted range is dropped) and
`outputs.redacted` records how offsets move, so that span feedback, given in offsets of the text sent, lands on
the stored text's characters (`give_feedback`, checked there by `shared.entities.span_errors`).

How it is written: requests never wait for storage or the database. A friendly-API request appends one small
tuple to a bounded in-memory buffer (`RequestRecord`: references to what the request built anyway: its ids,
inputs, answers, the feeds and the sampling rate; a few microseconds under a lock held for one append), and a
writer thread, every `log_flush_interval_s`, turns those into rows (input statistics from the feeds, the
sampling draw, the PII redaction of texts whose model's dataset asks for it, UTF-8 bytes,
timestamps: all off the request path), packs the buffered inputs of each tenant into one
object in the `raw` bucket under `<tenant>/predictions/YYYY/MM/DD/<uuid>.bin` (each input a byte range with its
own sha256, like ingestion's packed items), then inserts the rows in one transaction. The object is written
before the rows, so no row names missing bytes. If storage or the database is down the buffer keeps the
predictions (bounded by `log_buffer_limit` and `log_buffer_bytes`) and the next flush retries. Beyond the bounds
the oldest are shed: never silently, each one counted in `flywheel_inference_prediction_log_shed_total` (by
reason) and logged as `prediction_log_shed`. Feedback for a prediction still in this process's buffer flushes it
first; feedback that reaches another replica first waits briefly for the row (`feedback_lookup_wait_s`).

Durability: a prediction is acknowledged as logged once its flush committed (`flywheel_inference_prediction_log_
written_total` counts them; the query API shows them). When the process stops it flushes what it holds; if that
last flush fails (storage or database down), the buffer is spooled to local disk under
`FLYWHEEL_HOME/inference/spool/` and the next process to start writes it, so a restart loses nothing either way.

The same flush writes what rides along with the predictions: their input statistics (for drift), the answers of
shadow versions (`shadow_predictions`), and, for the predictions the model's sampling policy picked, one
`prediction.sampled` event per model through the outbox, in the same transaction as the rows.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import insert, select

from services.inference.config import InferenceConfig
from services.inference.metrics import InferenceMetrics
from services.inference.models import Prediction, ShadowPrediction
from shared.artifacts import RAW_BUCKET
from shared.entities import canonical_spans, span_errors
from shared.errors import Conflict, NotFound, Unprocessable
from shared.logging import get_logger
from shared.pii import Redaction, moved_span, withheld
from shared.pii_policy import EntitiesUnavailable, PiiPolicies
from shared.runtime import Runtime
from shared.storage import ObjectNotFound

log = get_logger(__name__)

PREDICTION_PREFIX = "prd_"


class _PredictionIds:
    """Prediction ids without a random draw per request: a random 48-bit prefix per process (drawn again in a
    forked child) and a counter (`next` on `itertools.count` is atomic under the GIL): 24 hex digits, unique."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = PREDICTION_PREFIX + secrets.token_hex(6)
        self._counter = itertools.count()

    def take(self, count: int) -> list[str]:
        prefix, counter = self._prefix, self._counter
        return [f"{prefix}{next(counter):012x}" for _ in range(count)]


_ids = _PredictionIds()


def new_prediction_ids(count: int) -> list[str]:
    return _ids.take(count)


def new_prediction_id() -> str:
    return _ids.take(1)[0]


class RequestRecord(NamedTuple):
    """What a friendly-API request hands the log: references only; the writer thread makes the rows."""

    ids: list[str]
    tenant: str
    model_name: str
    model_version: int
    dataset_id: str
    input_kind: str
    inputs: list[Any]  # texts (str) or image bytes
    answers: list[Any]  # preprocess.Classification per input; a token model's entities per text (`token`)
    latency_ms: float
    trace_id: str
    created_at: float  # time.time()
    preprocessor: Any  # the version's preprocessing (for input statistics)
    feeds: dict[str, Any] | None  # what it built from the inputs, or None
    sample_rate: float
    classes: int
    subject_id: str | None = None  # the partner-given data subject of the request
    token: bool = False  # a token-classification model answered: `answers` are entity lists

    @property
    def rows(self) -> int:
        return len(self.ids)

    def size(self) -> int:
        return sum(map(len, self.inputs))

    def without_first(self, count: int) -> RequestRecord:
        """This record less its `count` oldest inputs (what shedding keeps)."""
        feeds = {name: array[count:] for name, array in self.feeds.items()} if self.feeds is not None else None
        return self._replace(
            ids=self.ids[count:], inputs=self.inputs[count:], answers=self.answers[count:], feeds=feeds
        )


def _token_answer(
    found: list[dict[str, Any]], redaction: Redaction
) -> tuple[None, float | None, dict[str, Any], list[dict[str, Any]]]:
    """A token model's answer as its row keeps it: no class label; the least sure entity's score as confidence
    (None without entities); in `outputs`, where redaction moved the text (`redacted`: per replaced range, its
    `start, end` in the text sent, then its placeholder's in the stored text); the entities moved onto the stored
    text, those overlapping a redacted range dropped (their characters are not there any more)."""
    entities = []
    for entity in found:
        moved = redaction.moved(entity["start"], entity["end"])
        if moved is not None:
            entities.append({"start": moved[0], "end": moved[1], "label": entity["label"], "score": entity["score"]})
    outputs = {"redacted": [list(replacement) for replacement in redaction.replaced]} if redaction.replaced else {}
    return None, min((entity["score"] for entity in found), default=None), outputs, entities


StatsFunction = Callable[[Any, list[Any], dict[str, Any] | None], list[dict[str, Any] | None]]
PickFunction = Callable[[tuple[str, str], float, list[float], int], list[bool]]


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
    input_stats: dict[str, Any] | None = None
    sampled: bool = False
    """Picked by the model's sampling policy: sent to labeling with this flush."""
    subject_id: str | None = None
    entities: list[dict[str, Any]] | None = None
    """A token model's entities on the stored text (None for a classifier or v2)."""

    def to_spool(self) -> dict[str, Any]:
        record = asdict(self)
        record["input_bytes"] = base64.b64encode(self.input_bytes).decode()
        record["created_at"] = self.created_at.isoformat()
        return record

    @classmethod
    def from_spool(cls, record: dict[str, Any]) -> LoggedPrediction:
        values = dict(record)
        values["input_bytes"] = base64.b64decode(values["input_bytes"])
        values["created_at"] = datetime.fromisoformat(values["created_at"])
        return cls(**values)


@dataclass
class ShadowAnswer:
    """What a shadow version answered for one logged prediction (or why it could not)."""

    prediction_id: str
    tenant: str
    model_name: str
    model_version: int
    predicted_label: str | None
    confidence: float | None
    latency_ms: float | None
    error: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class PredictionLog:
    def __init__(
        self,
        runtime: Runtime,
        config: InferenceConfig,
        metrics: InferenceMetrics,
        *,
        input_stats: StatsFunction,
        pick: PickFunction,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self.input_stats = input_stats
        self.pick = pick
        self.pii = PiiPolicies(runtime.settings)
        self.spool_dir = Path(runtime.settings.home) / "inference" / "spool"
        self._shadow: deque[ShadowAnswer] = deque()
        self._buffer: deque[LoggedPrediction | RequestRecord] = deque()
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._pending: set[str] = set()
        metrics.prediction_log_buffered.set_function(lambda: self._buffered_rows)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- recording (request threads) -------------------------------------------------------------------

    def record(self, predictions: list[LoggedPrediction]) -> None:
        """Buffer rows made already (v2's sampled tensor requests)."""
        with self._lock:
            for prediction in predictions:
                self._buffer.append(prediction)
                self._buffered_rows += 1
                self._buffered_bytes += len(prediction.input_bytes)
            dropped = self._shed_over_bounds()
        if dropped:
            self.shed(dropped, "buffer_full")

    def record_request(self, record: RequestRecord) -> None:
        """The request path: one append (and two additions) under the lock; the writer does the rest."""
        size = record.size()
        with self._lock:
            self._buffer.append(record)
            self._buffered_rows += record.rows
            self._buffered_bytes += size
            dropped = self._shed_over_bounds() if self._over_bounds() else 0
        if dropped:
            self.shed(dropped, "buffer_full")

    def _over_bounds(self) -> bool:
        return self._buffered_rows > self.config.log_buffer_limit or self._buffered_bytes > self.config.log_buffer_bytes

    def _shed_over_bounds(self) -> int:
        """Drop the oldest rows until the buffer is within its bounds (holding the lock); how many went."""
        dropped = 0
        while self._buffer and self._over_bounds():
            oldest = self._buffer.popleft()
            if isinstance(oldest, LoggedPrediction):
                self._buffered_rows -= 1
                self._buffered_bytes -= len(oldest.input_bytes)
                dropped += 1
                continue
            excess = self._buffered_rows - self.config.log_buffer_limit
            count = oldest.rows if excess <= 0 or excess >= oldest.rows else excess
            kept = oldest.without_first(count)
            self._buffered_rows -= count
            self._buffered_bytes -= oldest.size() - kept.size()
            dropped += count
            if kept.rows:
                self._buffer.appendleft(kept)
        return dropped

    def shed(self, count: int, reason: str) -> None:
        """Count (and say) what the log could not keep: it never drops silently."""
        self.metrics.prediction_log_dropped.inc(count)
        self.metrics.prediction_log_shed.labels(reason).inc(count)
        log.warning("prediction_log_shed", shed=count, reason=reason)

    def record_shadow(self, answers: list[ShadowAnswer]) -> None:
        with self._lock:
            self._shadow.extend(answers)
            excess = len(self._shadow) - self.config.log_buffer_limit
            for _ in range(max(0, excess)):
                self._shadow.popleft()
        if excess > 0:
            self.shed(excess, "shadow_buffer_full")

    def is_pending(self, prediction_id: str) -> bool:
        with self._lock:
            if prediction_id in self._pending:
                return True
            items = list(self._buffer)
        return any(  # feedback is rare: scanned outside the lock, never held over the buffer
            prediction_id in item.ids if isinstance(item, RequestRecord) else prediction_id == item.id for item in items
        )

    def _rows_of(self, items: list[LoggedPrediction | RequestRecord]) -> list[LoggedPrediction]:
        """The writer's half of recording: the rows of what requests buffered, with their input statistics and
        sampling draws (numpy over each request's feeds; the sampler only ever runs on this thread)."""
        rows: list[LoggedPrediction] = []
        for item in items:
            if isinstance(item, LoggedPrediction):
                rows.append(item)
                continue
            try:
                stats = self.input_stats(item.preprocessor, item.inputs, item.feeds)
            except Exception as exc:  # statistics are a side dish: the predictions are logged without them
                stats = [None] * item.rows
                log.warning("prediction_input_stats_failed", model_name=item.model_name, error=repr(exc)[:300])
            created = datetime.fromtimestamp(item.created_at, UTC)
            text = item.input_kind == "text"
            redactions = self._stored_texts(item) if text else [Redaction(text="")] * item.rows
            if item.token:  # entity answers: not sampled for labeling (a sampled task takes one class label)
                picks = [False] * item.rows
                answers = [_token_answer(found, cut) for found, cut in zip(item.answers, redactions, strict=True)]
            else:
                confidences = [answer.confidence for answer in item.answers]
                picks = self.pick((item.tenant, item.model_name), item.sample_rate, confidences, item.classes)
                answers = [
                    (answer.label, answer.confidence, {"probabilities": answer.probabilities}, None)
                    for answer in item.answers
                ]
            rows.extend(
                LoggedPrediction(
                    id=prediction_id,
                    tenant=item.tenant,
                    model_name=item.model_name,
                    model_version=item.model_version,
                    dataset_id=item.dataset_id,
                    api="predict",
                    input_kind=item.input_kind,
                    input_bytes=redaction.text.encode("utf-8") if text else value,
                    predicted_label=label,
                    confidence=confidence,
                    outputs=outputs,
                    latency_ms=item.latency_ms,
                    trace_id=item.trace_id,
                    created_at=created,
                    input_stats=item_stats,
                    sampled=pick,
                    subject_id=item.subject_id,
                    entities=entities,
                )
                for prediction_id, value, redaction, (label, confidence, outputs, entities), item_stats, pick in zip(
                    item.ids, item.inputs, redactions, answers, stats, picks, strict=True
                )
            )
        return rows

    def _stored_texts(self, item: RequestRecord) -> list[Redaction]:
        """The texts as stored: redacted when the model's dataset has a PII policy on (the model saw them raw). A
        policy naming a token model (`pii_entities`) takes the entities this very prediction found when it is that
        model's, else asks inference's `:predict` for them; when that model cannot answer, the texts are withheld
        (fail closed: `[WITHHELD]`, counted `withheld`), since the policy forbids storing them unscanned."""
        served = (item.model_name, item.answers) if item.token else None
        try:
            redactions = self.pii.apply_many(item.tenant, item.dataset_id, item.inputs, served=served)
        except EntitiesUnavailable as exc:
            log.warning(
                "prediction_inputs_withheld",
                tenant=item.tenant,
                model_name=item.model_name,
                dataset_id=item.dataset_id,
                pii_model=exc.model,
                reason=exc.reason,
                rows=item.rows,
            )
            redactions = [withheld(text) for text in item.inputs]
        removed: dict[str, int] = {}
        for redaction in redactions:
            for kind, count in redaction.counts.items():
                removed[kind] = removed.get(kind, 0) + count
        if removed:
            log.info(
                "prediction_inputs_redacted",
                tenant=item.tenant,
                model_name=item.model_name,
                dataset_id=item.dataset_id,
                redactions=removed,
            )
        return redactions

    # -- writing (the writer thread, or a feedback request that needs its row now) ---------------------

    def start(self) -> None:
        self._replay_spool()
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
                items = list(self._buffer)
                self._buffer.clear()
                self._buffered_rows = 0
                self._buffered_bytes = 0
                shadows = list(self._shadow)
                self._shadow.clear()
                # while the rows are made and written, feedback must still find them pending
                for item in items:
                    self._pending.update(item.ids if isinstance(item, RequestRecord) else (item.id,))
            if not items and not shadows:
                return 0
            batch = self._rows_of(items)
            try:
                self._write(batch, shadows)
            except Exception:
                with self._lock:  # the rows made (statistics and draws included) wait for the next flush
                    self._buffer.extendleft(reversed(batch))
                    self._buffered_rows += len(batch)
                    self._buffered_bytes += sum(len(prediction.input_bytes) for prediction in batch)
                    self._shadow.extendleft(reversed(shadows))
                    dropped = self._shed_over_bounds()
                if dropped:
                    self.shed(dropped, "buffer_full")
                raise
            with self._lock:
                self._pending.difference_update(prediction.id for prediction in batch)
            self.metrics.prediction_log_written.inc(len(batch))
            return len(batch)

    def _write(self, batch: list[LoggedPrediction], shadows: list[ShadowAnswer] | None = None) -> None:
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
                        "input_stats": prediction.input_stats,
                        "sampled": prediction.sampled or None,
                        "subject_id": prediction.subject_id,
                        "entities": prediction.entities,
                    }
                )
        with self.runtime.db.session() as session:
            if rows:
                session.execute(insert(Prediction), rows)
            if shadows:
                session.execute(insert(ShadowPrediction), [asdict(answer) for answer in shadows])
            self._publish_samples(session, batch, rows)

    def _publish_samples(self, session: Any, batch: list[LoggedPrediction], rows: list[dict[str, Any]]) -> None:
        """One `prediction.sampled` per (tenant, model) for the predictions its sampling policy picked."""
        by_model: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for prediction, row in zip(batch, rows, strict=True):
            if not prediction.sampled:
                continue
            by_model.setdefault((prediction.tenant, prediction.model_name, prediction.dataset_id), []).append(
                {
                    "prediction_id": prediction.id,
                    "model_version": prediction.model_version,
                    "input": {
                        "bucket": row["input_bucket"],
                        "key": row["input_key"],
                        "sha256": row["input_sha256"],
                        "offset": row["input_offset"],
                        "length": row["input_length"],
                    },
                    "predicted_label": prediction.predicted_label or "",
                    "confidence": prediction.confidence,
                }
            )
        for (tenant, model_name, dataset_id), items in by_model.items():
            self.runtime.bus.publish(
                session,
                "prediction.sampled",
                {"model_name": model_name, "dataset_id": dataset_id, "items": items},
                tenant=tenant,
            )
            self.metrics.sampled_for_labeling.labels(tenant, model_name).inc(len(items))
            log.info("predictions_sampled_for_labeling", tenant=tenant, model_name=model_name, count=len(items))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.flush()
        except Exception as exc:
            log.warning("prediction_log_final_flush_failed", error=str(exc)[:300], buffered=len(self._buffer))
            self._spool()

    # -- the spool: what a failed last flush leaves for the next process -------------------------------

    def _spool(self) -> None:
        with self._lock:
            items = list(self._buffer)
            self._buffer.clear()
            self._buffered_rows = 0
            self._buffered_bytes = 0
        batch = self._rows_of(items)
        if not batch:
            return
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            path = self.spool_dir / f"{uuid.uuid4().hex}.jsonl"
            partial = path.with_suffix(".partial")
            partial.write_text("".join(json.dumps(prediction.to_spool()) + "\n" for prediction in batch))
            partial.rename(path)  # a half-written spool file is never replayed
        except OSError as exc:
            self.shed(len(batch), "spool_failed")
            log.error("prediction_log_spool_failed", error=str(exc)[:300])
            return
        log.warning("prediction_log_spooled", predictions=len(batch), path=str(path))

    def _replay_spool(self) -> None:
        for path in sorted(self.spool_dir.glob("*.jsonl")) if self.spool_dir.is_dir() else []:
            claimed = path.with_suffix(f".claimed-{uuid.uuid4().hex[:8]}")
            try:
                path.rename(claimed)  # another process of this replica may be replaying the same folder
            except OSError:
                continue
            try:
                records = [json.loads(line) for line in claimed.read_text().splitlines()]
                predictions = [LoggedPrediction.from_spool(record) for record in records]
                with self.runtime.db.session() as session:
                    known = set(
                        session.scalars(select(Prediction.id).where(Prediction.id.in_([p.id for p in predictions])))
                    )
                fresh = [prediction for prediction in predictions if prediction.id not in known]
                if fresh:
                    self._write(fresh)
                    self.metrics.prediction_log_written.inc(len(fresh))
                claimed.unlink()
                log.info("prediction_log_spool_replayed", predictions=len(fresh), path=str(path))
            except Exception as exc:  # storage or database still down: the next start tries again
                claimed.rename(path)
                log.warning("prediction_log_spool_replay_failed", path=str(path), error=str(exc)[:300])

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
        self,
        tenant: str,
        prediction_id: str,
        labels_for: Callable[[str, int], list[str] | None],
        *,
        label: str | None = None,
        spans: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Record the correct answer and emit `prediction.feedback` in the same transaction: a class `label` for a
        classifier's prediction, the entity `spans` (offsets of the text sent; `[]`: no entity) for a token
        model's.

        One feedback per prediction: repeating the same answer is answered again without a new event; a
        different one is a conflict. Labels are checked against the model's labels while that model is loaded
        here (`labels_for`); spans against the logged text too (`shared.entities.span_errors`).
        """
        found = self._find(tenant, prediction_id)
        if found is None:
            raise NotFound(f"prediction {prediction_id} does not exist")
        if found.input_kind not in ("text", "image"):
            raise Conflict(
                "this prediction's input is a raw tensor; feedback needs a prediction made through "
                "POST /v1/models/{name}:predict, whose text or image is kept"
            )
        known_labels = labels_for(found.model_name, found.model_version)
        if found.entities is None:
            if spans is not None or label is None:
                raise Unprocessable(
                    "this prediction is a classifier's: send its correct `label`, not `spans`",
                    {"fields": {"spans": ["spans are for a token-classification model's predictions"]}},
                )
            if known_labels is not None and label not in known_labels:
                raise Unprocessable(
                    f"label {label!r} is not one of the model's labels", {"fields": {"label": ["unknown label"]}}
                )
            return self._record_feedback(tenant, prediction_id, label=label)
        if label is not None or spans is None:
            raise Unprocessable(
                "this prediction is a token-classification model's: send the correct entity `spans`, not `label`",
                {
                    "fields": {
                        "label": ["not accepted here: send `spans` ({start, end, label} per entity; [] for none)"]
                    }
                },
            )
        stored = self._stored_spans(found, spans, known_labels)
        return self._record_feedback(tenant, prediction_id, spans=stored, sent_spans=canonical_spans(spans))

    def _stored_spans(
        self, row: Prediction, spans: list[dict[str, Any]], known_labels: list[str] | None
    ) -> list[dict[str, Any]]:
        """Spans given in offsets of the text sent, moved onto the logged (perhaps redacted) text and checked there:
        422 naming each span that does not fit (`details.fields.spans.<i>.<field>`)."""
        try:
            data = self.runtime.storage.get_range(row.input_bucket, row.input_key, row.input_offset, row.input_length)
        except ObjectNotFound:
            data = b""
        if hashlib.sha256(data).hexdigest() != row.input_sha256:
            raise Conflict(f"the logged text of prediction {row.id} is gone (erased, or past retention)")
        text = data.decode("utf-8")
        replaced = [tuple(replacement) for replacement in (row.outputs or {}).get("redacted", [])]
        errors: dict[str, Any] = {}

        def add(index: int, name: str, message: str) -> None:
            errors.setdefault(str(index), {}).setdefault(name, []).append(message)

        moved: dict[int, dict[str, Any]] = {}
        for index, span in enumerate(spans):
            start, end = span["start"], span["end"]
            place = moved_span(replaced, start, end) if start < end else (start, end)
            if place is None:
                add(index, "start", "covers text that was redacted from the log (PII): leave that entity out")
                continue
            moved[index] = {"start": place[0], "end": place[1], "label": span["label"]}
        if not errors:  # offsets in `moved` are those of the stored text, its indices those of `spans`
            errors = span_errors(text, [moved[index] for index in range(len(spans))])
        for index, span in enumerate(spans):
            if known_labels is not None and span["label"] not in known_labels:
                add(index, "label", f"{span['label']!r} is not one of the model's entity labels {sorted(known_labels)}")
        if errors:
            raise Unprocessable(
                "the spans do not fit the prediction's text; see details.fields for each bad span",
                {"fields": {"spans": errors}},
                code="validation_failed",
            )
        return canonical_spans(moved.values())

    def _record_feedback(
        self,
        tenant: str,
        prediction_id: str,
        *,
        label: str | None = None,
        spans: list[dict[str, Any]] | None = None,
        sent_spans: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        with self.runtime.db.session() as session:
            row = session.get(Prediction, prediction_id, with_for_update=not self.runtime.db.is_sqlite)
            if row is None or row.tenant != tenant:
                raise NotFound(f"prediction {prediction_id} does not exist")
            token = row.entities is not None
            predicted_spans = canonical_spans(row.entities) if token else None
            replaced = [tuple(replacement) for replacement in (row.outputs or {}).get("redacted", [])]
            result = {
                "prediction_id": row.id,
                "model_name": row.model_name,
                "model_version": row.model_version,
                "predicted_label": row.predicted_label,
                "correct_label": label,
                "predicted_spans": None if predicted_spans is None else _sent_offsets(predicted_spans, replaced),
                "correct_spans": sent_spans,
                "event_id": None,
            }
            given = row.feedback_spans if token else row.feedback_label
            if given is not None:
                if given != (spans if token else label):
                    field = "feedback_spans" if token else "feedback_label"
                    shown = _sent_offsets(given, replaced) if token else given
                    raise Conflict(f"prediction {prediction_id} already has feedback {shown!r}", {field: shown})
                return result
            if token:
                row.feedback_spans = spans
            else:
                row.feedback_label = label
            row.feedback_at = datetime.now(UTC)
            payload = {
                "prediction_id": row.id,
                "model_name": row.model_name,
                "model_version": row.model_version,
                "dataset_id": row.dataset_id,
                "input": row.input_ref(),
                "predicted_label": None if token else row.predicted_label or "",
                "correct_label": label,
                "confidence": row.confidence,
            }
            if token:
                payload.update(predicted_spans=predicted_spans, correct_spans=spans)
            envelope = self.runtime.bus.publish(session, "prediction.feedback", payload, tenant=tenant)
            result["event_id"] = envelope.event_id
        log.info(
            "prediction_feedback_recorded",
            prediction_id=prediction_id,
            model_name=result["model_name"],
            model_version=result["model_version"],
            predicted_label=result["predicted_label"],
            correct_label=label,
            correct_entities=None if spans is None else len(spans),
            event_id=result["event_id"],
        )
        return result


def _sent_offsets(spans: list[dict[str, Any]], replaced: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    """Spans of the stored text in offsets of the text sent (they never overlap a redacted range)."""
    moved = []
    for span in spans:
        start, end = moved_span(replaced, span["start"], span["end"], back=True) or (span["start"], span["end"])
        moved.append({"start": start, "end": end, "label": span["label"]})
    return moved
