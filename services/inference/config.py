"""Inference's tuning knobs: batching, queue bounds, ONNX Runtime threads, reconcile and logging cadence.

The defaults below serve a local run. `shared/settings.py` is the one reader of the environment; until it
carries `inference_*` fields (INFERENCE_MAX_BATCH_SIZE and friends), `InferenceConfig.from_settings` picks up
whichever of them exist and falls back to these constants, so adding the fields there needs no change here.

Memory: without `model_memory_budget_mb` a process loads every version the registry serves, eagerly (the
behaviour of a replica that serves a few models). With it, versions load on first request and the least
recently used idle ones are evicted to stay under the budget (see `repository.py` and `residency.py`).

Batching is also configurable per model, like Triton's `dynamic_batching` block: a version's registry metadata
may carry `"serving": {"max_batch_size": 8, "max_queue_delay_us": 500, "max_queue_size": 64}`, which overrides
the service defaults for that version only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from shared.settings import Settings

MAX_BATCH_SIZE = 32
"""Rows coalesced into one ONNX Runtime call at most (Triton: max_batch_size). 1 turns batching off."""
MAX_QUEUE_DELAY_US = 2000
"""How long the first queued request may wait for company before its batch runs (max_queue_delay_microseconds);
the wait ends earlier when no other request is on its way to the same version."""
MAX_QUEUE_SIZE = 256
"""Requests waiting per model version; beyond it a request is answered 503 with Retry-After at once."""
REQUEST_TIMEOUT_S = 30.0
"""A request still waiting for its batch after this long is answered 503 (and its result discarded)."""
INTRA_OP_THREADS = 0
"""ONNX Runtime intra-op threads per session; 0 = one per core."""
ALLOW_SPINNING = False
"""Let ORT worker threads spin between batches; off, so that idle spinning does not starve the HTTP threads."""
PREFER_GPU = True
"""Try the CUDA execution provider first; the CPU provider serves where CUDA does not truly load."""
RECONCILE_INTERVAL_S = 30.0
"""Safety-net poll of the registry's serving list (promotion events are the fast path)."""
REGISTRY_TIMEOUT_S = 5.0
FAILED_RETRY_S = 60.0
"""A version that failed to load is retried by the reconcile poll after this long (doubling, capped at 15 min);
a promotion event that names it again retries at once."""
V2_LOG_SAMPLE_RATE = 0.01
"""Share of v2 (tensor) requests kept in the prediction log; the friendly API keeps every prediction."""
LOG_FLUSH_INTERVAL_S = 0.25
"""How often the prediction log writes its buffer (one packed object per tenant plus one transaction)."""
USAGE_FLUSH_INTERVAL_S = 5.0
"""How often the prediction counters are published as `usage.recorded` (one transaction). Meters are read by the
hour and day, so seconds of lag cost nothing, while the flush is most of what metering costs the process: at the
prediction log's 0.25 s it was about 1.3% of a small model's server CPU (`bench/metering_bench.py --profile`)."""
LOG_BUFFER_LIMIT = 20_000
"""Predictions held in memory while storage or the database is down; beyond it the oldest are dropped."""
LOG_BUFFER_BYTES = 256 * 1024 * 1024
"""...and at most this many bytes of inputs (images are large)."""
MAX_INSTANCES_PER_REQUEST = 64
"""Texts, images or tensor rows accepted in one request."""
MAX_IMAGE_PIXELS = 40_000_000
"""Decoded image size limit (decompression-bomb guard)."""
FEEDBACK_LOOKUP_WAIT_S = 2.0
"""Feedback may arrive at another replica before this one wrote the prediction; look again for this long."""
MONITOR_INTERVAL_S = 15.0
"""How often a process looks for model policies due for evaluation (each policy's own `schedule_s` decides when
it is due; one process of all replicas evaluates it, under a Redis lock)."""
SHADOW_QUEUE_SIZE = 64
"""Shadow requests waiting for the shadow worker; beyond it a shadow request is shed (counted), never waited for."""
LOG_PREDICTIONS = True
"""Log the friendly API's predictions (and with them sampling and shadow traffic); off only in benchmarks,
to measure what monitoring costs: feedback needs the log."""
METERING = True
"""Count partner predictions for usage metering (services/inference/metering.py); off only in the benchmark that
measures what metering costs (bench/metering_bench.py): a deployment that bills needs it on."""
V2_WSGI_ROUTE = True
"""Answer `POST /v2/models/.../infer` in a plain WSGI route before Flask's dispatch (services/inference/v2_wsgi.py):
the same answers at less CPU per request. Off only to measure what it saves (bench/v2_route_bench.py), or to
rule it out."""
PREDICT_WSGI_ROUTE = True
"""Answer the friendly API's JSON `POST /v1/models/{name}:predict` in a plain WSGI route before Flask's dispatch
(services/inference/predict_wsgi.py): the same answers at less CPU per request. Off only to measure what it saves
(bench/inference_bench.py --flask-predict), or to rule it out."""
LABEL_LISTENER = True
"""Consume `prediction.labeled` from the inference queue in this process (ground truth for live accuracy)."""
MODEL_MEMORY_BUDGET_MB: float | None = None
"""Memory this process may spend on loaded model versions, in MiB (accounted, see MODEL_MEMORY_FACTOR); None or 0:
no budget, every served version is loaded eagerly. With a budget, versions load on first request."""
MODEL_MEMORY_FACTOR = 2.0
"""A loaded version is accounted as this many times the bytes of its artifacts (graph, tokenizer files)..."""
MODEL_MEMORY_OVERHEAD_MB = 4.0
"""...plus this much for what every loaded version holds whatever its size (session, thread pool, batcher)."""
COLD_START_POLICIES = ("wait", "reject")
COLD_START_POLICY = "wait"
"""A request for a version that is not loaded: `wait` for the load (up to COLD_START_WAIT_S, then 503), or
`reject` (503 with Retry-After at once, while the version loads in the background)."""
COLD_START_WAIT_S = 10.0
COLD_START_THREADS = 2
"""Versions loading on first request at once (beside the loader thread, which applies promotions)."""
PINNED_TENANTS: tuple[str, ...] = ()
"""Tenants whose production versions are loaded eagerly and never evicted (a comma-separated list in the
environment: INFERENCE_PINNED_TENANTS)."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = MAX_BATCH_SIZE
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US
    max_queue_size: int = MAX_QUEUE_SIZE

    def override(self, serving: dict[str, Any] | None) -> BatchingConfig:
        """This config with a version's `serving` block applied (unknown or invalid keys are ignored)."""
        values: dict[str, int] = {}
        for f in fields(self):
            raw = (serving or {}).get(f.name)
            if (
                isinstance(raw, int)
                and not isinstance(raw, bool)
                and raw >= (1 if f.name != "max_queue_delay_us" else 0)
            ):
                values[f.name] = raw
        return replace(self, **values)


@dataclass(frozen=True)
class InferenceConfig:
    batching: BatchingConfig = BatchingConfig()
    request_timeout_s: float = REQUEST_TIMEOUT_S
    intra_op_threads: int = INTRA_OP_THREADS
    allow_spinning: bool = ALLOW_SPINNING
    prefer_gpu: bool = PREFER_GPU
    reconcile_interval_s: float = RECONCILE_INTERVAL_S
    registry_timeout_s: float = REGISTRY_TIMEOUT_S
    failed_retry_s: float = FAILED_RETRY_S
    v2_log_sample_rate: float = V2_LOG_SAMPLE_RATE
    log_flush_interval_s: float = LOG_FLUSH_INTERVAL_S
    usage_flush_interval_s: float = USAGE_FLUSH_INTERVAL_S
    log_buffer_limit: int = LOG_BUFFER_LIMIT
    log_buffer_bytes: int = LOG_BUFFER_BYTES
    max_instances_per_request: int = MAX_INSTANCES_PER_REQUEST
    max_image_pixels: int = MAX_IMAGE_PIXELS
    feedback_lookup_wait_s: float = FEEDBACK_LOOKUP_WAIT_S
    monitor_interval_s: float = MONITOR_INTERVAL_S
    shadow_queue_size: int = SHADOW_QUEUE_SIZE
    label_listener: bool = LABEL_LISTENER
    log_predictions: bool = LOG_PREDICTIONS
    metering: bool = METERING
    v2_wsgi_route: bool = V2_WSGI_ROUTE
    predict_wsgi_route: bool = PREDICT_WSGI_ROUTE
    model_memory_budget_mb: float | None = MODEL_MEMORY_BUDGET_MB
    model_memory_factor: float = MODEL_MEMORY_FACTOR
    model_memory_overhead_mb: float = MODEL_MEMORY_OVERHEAD_MB
    cold_start_policy: str = COLD_START_POLICY
    cold_start_wait_s: float = COLD_START_WAIT_S
    cold_start_threads: int = COLD_START_THREADS
    pinned_tenants: tuple[str, ...] = PINNED_TENANTS

    def __post_init__(self) -> None:
        if isinstance(self.pinned_tenants, str):  # the environment's comma-separated list
            pinned = tuple(t.strip() for t in self.pinned_tenants.split(",") if t.strip())
            object.__setattr__(self, "pinned_tenants", pinned)
        else:
            object.__setattr__(self, "pinned_tenants", tuple(self.pinned_tenants))
        if self.cold_start_policy not in COLD_START_POLICIES:
            raise ValueError(f"cold_start_policy must be one of {COLD_START_POLICIES}, not {self.cold_start_policy!r}")
        if self.model_memory_budget_mb is not None and self.model_memory_budget_mb < 0:
            raise ValueError("model_memory_budget_mb must be positive (or 0 / unset: no budget)")

    @property
    def memory_budget_bytes(self) -> int | None:
        """The budget in bytes; None when versions load eagerly without one."""
        if not self.model_memory_budget_mb:
            return None
        return int(self.model_memory_budget_mb * 1024 * 1024)

    @classmethod
    def from_settings(
        cls, settings: Settings, overrides: InferenceConfig | dict[str, Any] | None = None
    ) -> InferenceConfig:
        """Defaults, then any `inference_<field>` that Settings carries, then explicit overrides (tests, bench).

        Batching fields are flat in both places: `inference_max_batch_size`, or `{"max_batch_size": 1}`.
        """
        if isinstance(overrides, InferenceConfig):
            return overrides
        values: dict[str, Any] = {}
        for f in (*fields(cls), *fields(BatchingConfig)):
            if f.name == "batching":
                continue
            value = getattr(settings, f"inference_{f.name}", None)
            if value is not None:
                values[f.name] = value
        values.update(overrides or {})
        batching = {f.name: values.pop(f.name) for f in fields(BatchingConfig) if f.name in values}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown inference settings: {', '.join(sorted(unknown))}")
        return cls(batching=BatchingConfig(**batching), **values)
