"""Usage metering of predictions, off the request path: a request adds to in-process counters per (tenant, model,
version) under a lock (three additions, no I/O); a thread, every `usage_flush_interval_s` (5 s), turns the counters into
usage records (`prediction_requests`, `prediction_rows`, `prediction_compute_seconds`) and publishes them as
`usage.recorded` events through the outbox, in one transaction. Ingestion keeps the meters.

Each record's id is drawn once, when its counters are taken, and kept until the publish commits: a flush that
fails is retried with the same records, and ingestion stores a (tenant, id) once, so nothing is counted twice.
What the counters hold when the process stops is flushed by `close`.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

EVENT_RECORDS = 999  # the catalog's batch limit is 1,000 records per event: a multiple of the three meters


@dataclass
class _Counter:
    requests: int = 0
    rows: int = 0
    seconds: float = 0.0


class PredictionMeter:
    def __init__(self, runtime: Runtime, interval_s: float) -> None:
        self.runtime = runtime
        self.interval_s = interval_s
        self._counters: dict[tuple[str, str, int], _Counter] = {}
        self._since = datetime.now(UTC)
        self._unsent: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self, tenant: str, model: str, version: int, rows: int, seconds: float) -> None:
        """The request path: add one request's rows and compute time to its counter."""
        key = (tenant, model, version)
        with self._lock:
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = _Counter()
            counter.requests += 1
            counter.rows += rows
            counter.seconds += seconds

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            counters, self._counters = self._counters, {}
            since, self._since = self._since, datetime.now(UTC)
        when = since.isoformat()
        records = []
        for (tenant, model, version), counter in counters.items():
            dimensions = {"model": model, "version": str(version)}
            for meter, value in (
                ("prediction_requests", counter.requests),
                ("prediction_rows", counter.rows),
                ("prediction_compute_seconds", round(counter.seconds, 6)),
            ):
                record_id = f"prdu_{uuid.uuid4().hex}"
                records.append(
                    {
                        "id": record_id,
                        "meter": meter,
                        "subject": tenant,
                        "time": when,
                        "value": value,
                        "dimensions": dimensions,
                    }
                )
        return records

    def flush(self) -> int:
        """Publish what was counted (and what an earlier flush could not); returns how many records went."""
        with self._flush_lock:
            self._unsent.extend(self._take())
            if not self._unsent:
                return 0
            records = self._unsent
            bus = self.runtime.bus
            envelopes = [
                bus.envelope(
                    "usage.recorded", {"source": "inference", "records": records[i : i + EVENT_RECORDS]}, tenant=None
                )
                for i in range(0, len(records), EVENT_RECORDS)
            ]
            with self.runtime.db.session() as session:
                for envelope in envelopes:
                    bus.publish_envelope(session, envelope)
            self._unsent = []
        log.info("prediction_usage_flushed", records=len(records), events=len(envelopes))
        return len(records)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-usage-meter", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:  # the database is down: the records wait for the next flush, ids kept
                log.warning("prediction_usage_flush_failed", error=str(exc)[:300], unsent=len(self._unsent))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.flush()
        except Exception as exc:
            log.error("prediction_usage_lost", error=str(exc)[:300], records=len(self._unsent))
