"""Inference's Prometheus metrics, registered on the service's own registry (served at /metrics).

Beside the shared per-endpoint HTTP metrics: requests and failures per model, end-to-end latency, time spent
queued for a batch, time in ONNX Runtime, the batch-size histogram, queue depth and the loaded versions; the
prediction log (written, buffered, shed by reason); monitoring (live accuracy, drift, alerts, shadow traffic,
sampling to labeling) and resource use per version (queue rejections, session memory; rows and compute
seconds are the sums of the batch-size and compute histograms).

Residency (what is loaded under the memory budget, and why): the resident versions with their reason (`pinned`,
`recent`, or `eager` without a budget), accounted bytes in use against the budget, loads by trigger, evictions,
cold starts by outcome with their latency, and lookups that found their version loaded (hit) or not (miss).
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

COLD_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "flywheel_inference_requests_total",
            "Inference requests by model, version, API and outcome",
            ["tenant", "model", "version", "api", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "flywheel_inference_failures_total",
            "Inference requests that failed, by reason",
            ["tenant", "model", "api", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "flywheel_inference_request_seconds",
            "End-to-end inference latency inside the service (decode, preprocess, queue, compute, encode)",
            ["tenant", "model", "api"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "flywheel_inference_queue_seconds",
            "Time a request waited for its batch to start",
            ["tenant", "model", "version"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.compute_time = Histogram(
            "flywheel_inference_compute_seconds",
            "Time in ONNX Runtime per batch",
            ["tenant", "model", "version"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "flywheel_inference_batch_size",
            "Rows per ONNX Runtime call",
            ["tenant", "model", "version"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "flywheel_inference_queue_depth",
            "Requests waiting for a batch",
            ["tenant", "model", "version"],
            registry=registry,
        )
        self.loaded_versions = Gauge(
            "flywheel_inference_loaded_versions",
            "Model versions loaded in this process (1 per version; role: serving, canary or loaded)",
            ["tenant", "model", "version", "role"],
            registry=registry,
        )
        self.load_failures = Counter(
            "flywheel_inference_load_failures_total",
            "Model versions refused or failed while loading, by reason",
            ["tenant", "model", "version", "reason"],
            registry=registry,
        )
        self.prediction_log_dropped = Counter(
            "flywheel_inference_prediction_log_dropped_total",
            "Predictions dropped from the log because its buffer was full",
            registry=registry,
        )
        self.prediction_log_shed = Counter(
            "flywheel_inference_prediction_log_shed_total",
            "Predictions (or shadow answers) the log could not keep, by reason: it never drops silently",
            ["reason"],
            registry=registry,
        )
        self.prediction_log_written = Counter(
            "flywheel_inference_prediction_log_written_total",
            "Predictions written to the log (acknowledged as logged)",
            registry=registry,
        )
        self.prediction_log_buffered = Gauge(
            "flywheel_inference_prediction_log_buffered",
            "Predictions waiting in this process's buffer for the next flush",
            registry=registry,
        )
        # Rows and compute seconds per version are the `_sum`s of the batch-size and compute-time histograms.
        self.queue_rejections = Counter(
            "flywheel_inference_queue_rejections_total",
            "Requests refused because the version's queue was full (503)",
            ["tenant", "model", "version"],
            registry=registry,
        )
        self.session_memory = Gauge(
            "flywheel_inference_session_memory_bytes",
            "Memory the version's loaded ONNX Runtime session holds (process RSS growth while it loaded)",
            ["tenant", "model", "version"],
            registry=registry,
        )
        self.sampled_for_labeling = Counter(
            "flywheel_inference_sampled_for_labeling_total",
            "Production predictions sent to labeling by the model's sampling policy",
            ["tenant", "model"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "flywheel_inference_shadow_requests_total",
            "Requests mirrored to a shadow version, by outcome (answered, failed, shed)",
            ["tenant", "model", "version", "outcome"],
            registry=registry,
        )
        self.labels_received = Counter(
            "flywheel_inference_ground_truth_received_total",
            "prediction.labeled events joined to the prediction log, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.live_accuracy = Gauge(
            "flywheel_monitor_live_accuracy",
            "Accuracy of a version on predictions whose ground truth arrived, over the policy window",
            ["tenant", "model", "version"],
            registry=registry,
        )
        self.drift = Gauge(
            "flywheel_monitor_drift",
            "Drift of a version over the policy window against its evaluation baseline, by signal",
            ["tenant", "model", "version", "signal"],
            registry=registry,
        )
        self.alert = Gauge(
            "flywheel_monitor_alert",
            "1 while a monitoring alert of this kind is active for the version, 0 once it cleared",
            ["tenant", "model", "version", "kind"],
            registry=registry,
        )
        self.alerts_fired = Counter(
            "flywheel_monitor_alerts_fired_total",
            "Monitoring alerts fired (each emits model.degraded)",
            ["tenant", "model", "kind"],
            registry=registry,
        )
        self.promotions = Counter(
            "flywheel_inference_promotions_received_total",
            "model.promoted events received by this process",
            registry=registry,
        )
        self.resident_versions = Gauge(
            "flywheel_inference_resident_versions",
            "Model versions loaded in this process, by why they are: pinned (a pinned tenant's production version, "
            "never evicted), recent (loaded on demand, evicted least recently used) or eager (no memory budget)",
            ["tenant", "model", "version", "reason"],
            registry=registry,
        )
        self.memory_used = Gauge(
            "flywheel_inference_model_memory_bytes",
            "Accounted bytes of the loaded model versions (and of loads in progress) in this process",
            registry=registry,
        )
        self.memory_peak = Gauge(
            "flywheel_inference_model_memory_peak_bytes",
            "The most accounted bytes of loaded and loading model versions this process has held at once",
            registry=registry,
        )
        self.memory_budget = Gauge(
            "flywheel_inference_model_memory_budget_bytes",
            "The memory budget for loaded model versions in this process (0: no budget, everything loaded)",
            registry=registry,
        )
        self.version_loads = Counter(
            "flywheel_inference_version_loads_total",
            "Model versions loaded, by trigger: eager (no budget), pinned, hot_swap (the old version was loaded), "
            "cold_start (a request asked for it)",
            ["tenant", "model", "trigger"],
            registry=registry,
        )
        self.evictions = Counter(
            "flywheel_inference_evictions_total",
            "Loaded versions evicted (least recently used, idle, unpinned) to make room under the memory budget",
            ["tenant", "model"],
            registry=registry,
        )
        self.cold_starts = Counter(
            "flywheel_inference_cold_starts_total",
            "Requests that found their version not loaded, by outcome: loaded (served after the wait), rejected "
            "(policy reject: 503 at once), timed_out (still loading after the wait), failed (the load failed), "
            "over_budget (nothing could be evicted)",
            ["tenant", "model", "outcome"],
            registry=registry,
        )
        self.cold_start_time = Histogram(
            "flywheel_inference_cold_start_seconds",
            "Time to load a version on first request (fetch, verify, session, warm-up, evictions)",
            ["tenant", "model"],
            buckets=COLD_START_BUCKETS,
            registry=registry,
        )
        self.lookups = Counter(
            "flywheel_inference_version_lookups_total",
            "Requests by whether their version was loaded (hit) or had to be loaded first (miss)",
            ["tenant", "model", "result"],
            registry=registry,
        )

        self._answered: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}

    def answered(self, tenant: str, model: str, version: int, api: str, seconds: float) -> None:
        """One request answered: its count (outcome ok) and its latency. The two series of each (tenant, model,
        version, api) are looked up once and kept: `.labels()` per request validates and locks every time. The
        series are never removed, so a kept one is the registry's own (a dict write is atomic under the GIL)."""
        key = (tenant, model, version, api)
        series = self._answered.get(key)
        if series is None:
            series = self._answered[key] = (
                self.requests.labels(tenant, model, str(version), api, "ok"),
                self.latency.labels(tenant, model, api),
            )
        series[0].inc()
        series[1].observe(seconds)

    def batch_observer(self, tenant: str, model: str, version: int) -> VersionObserver:
        return VersionObserver(self, tenant, model, str(version))


class VersionObserver:
    """Metrics of one loaded version, with its labels bound once (the batcher calls these per batch)."""

    def __init__(self, metrics: InferenceMetrics, tenant: str, model: str, version: str) -> None:
        self._labels = (tenant, model, version)
        self._batch = metrics.batch_size.labels(*self._labels)
        self._queue = metrics.queue_time.labels(*self._labels)
        self._compute = metrics.compute_time.labels(*self._labels)
        self._depth = metrics.queue_depth.labels(*self._labels)
        self._hits = metrics.lookups.labels(tenant, model, "hit")
        self._metrics = metrics
        self.totals = {"batches": 0, "rows": 0, "compute_seconds": 0.0, "queue_rejections": 0}
        """This process's running totals for the version (the monitoring API's resource block)."""

    def batch_ran(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        self._batch.observe(rows)
        self._compute.observe(compute_seconds)
        self.totals["batches"] += 1
        self.totals["rows"] += rows
        self.totals["compute_seconds"] += compute_seconds
        for seconds in queue_seconds:
            self._queue.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def hit(self) -> None:
        """A request found this version loaded."""
        self._hits.inc()

    def queue_rejected(self) -> None:
        self._metrics.queue_rejections.labels(*self._labels).inc()
        self.totals["queue_rejections"] += 1

    def forget(self) -> None:
        """Drop this version's series once it is retired."""
        for metric in (
            self._metrics.batch_size,
            self._metrics.queue_time,
            self._metrics.compute_time,
            self._metrics.queue_depth,
            self._metrics.queue_rejections,
            self._metrics.session_memory,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(*self._labels)
