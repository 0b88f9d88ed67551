"""Configuration, read from environment variables in this one place.

Every default serves a local run on one machine; docker-compose and Kubernetes override them.
`Settings.from_env()` is the only reader of `os.environ` in the product code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

SERVICES: tuple[str, ...] = ("ingestion", "labeling", "training", "registry", "inference")
DEFAULT_PORTS: dict[str, int] = {
    "ingestion": 8001,
    "labeling": 8002,
    "training": 8003,
    "registry": 8004,
    "inference": 8005,
}
# Buckets every deployment bootstraps. Names follow the design: raw items, dataset manifests, checkpoints,
# exported models, imported base-model weights.
BUCKETS: tuple[str, ...] = ("raw", "datasets", "checkpoints", "models", "base-models")


def loopback_url(port: int) -> str:
    """A service on this machine: the default of every <SERVICE>_URL, and where `flywheel up` starts them."""
    return f"http://127.0.0.1:{port}"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """One process's configuration. Field docs double as the README's configuration table."""

    home: Path = field(default_factory=lambda: Path.home() / ".flywheel")
    """FLYWHEEL_HOME: data directory (SQLite databases, file object store, logs, run state)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """REDIS_URL: Celery broker and short-lived caches."""
    database_url: str = ""
    """DATABASE_URL (or <SERVICE>_DATABASE_URL): SQLAlchemy URL; default SQLite under FLYWHEEL_HOME."""
    s3_endpoint: str = ""
    """S3_ENDPOINT: host:port of MinIO/S3; empty means the file:// store under FLYWHEEL_HOME/objects."""
    s3_access_key: str = "minioadmin"
    """S3_ACCESS_KEY."""
    s3_secret_key: str = "minioadmin"  # noqa: S105 - MinIO's documented local default, overridden in deploys
    """S3_SECRET_KEY."""
    s3_secure: bool = False
    """S3_SECURE: use https to reach S3_ENDPOINT."""
    s3_region: str = "us-east-1"
    """S3_REGION."""
    s3_server_side_encryption: bool = False
    """S3_SERVER_SIDE_ENCRYPTION: write every object with SSE-S3 (`x-amz-server-side-encryption: AES256`); MinIO
    needs a KMS for it (MINIO_KMS_SECRET_KEY or KES). The file:// store ignores it."""
    internal_token: str = ""
    """FLYWHEEL_INTERNAL_TOKEN: operator token for internal actions (a local run generates one)."""
    internal_token_sha256: str = ""
    """FLYWHEEL_INTERNAL_TOKEN_SHA256: the hex SHA-256 of the operator token, what services compare a presented
    token against (default: computed from FLYWHEEL_INTERNAL_TOKEN at start; a service that calls no other may hold
    only the hash)."""
    ingestion_url: str = ""
    """INGESTION_URL: the ingestion service (partner pushes; where other services verify partner API keys)."""
    labeling_url: str = ""
    """LABELING_URL: the labeling service (annotators, snapshots)."""
    training_url: str = ""
    """TRAINING_URL: the training service (runs)."""
    registry_url: str = ""
    """REGISTRY_URL: the registry (models, aliases; where inference reads which versions to serve)."""
    inference_url: str = ""
    """INFERENCE_URL: the inference service (predictions; where labeling asks for pre-labels).

    Each <SERVICE>_URL defaults to the service on this machine at its <SERVICE>_PORT; the CLI, the Python client
    and every service-to-service call read these, so pointing them at a deployment is all a client needs."""
    key_cache_seconds: float = 30.0
    """KEY_CACHE_SECONDS: how long a verified partner key is trusted before asking ingestion again."""
    idempotency_in_progress_seconds: float = 300.0
    """IDEMPOTENCY_IN_PROGRESS_SECONDS: an Idempotency-Key whose request has not finished after this long (its
    process died) is taken over by the next retry, which then does the work."""
    idempotency_retention_hours: float = 24.0
    """IDEMPOTENCY_RETENTION_HOURS: how long a completed request's response is replayed; older keys are forgotten
    and purged, and a reuse after that is a new request."""
    event_max_retries: int = 5
    """EVENT_MAX_RETRIES: deliveries of a failing event before it becomes a dead letter."""
    event_retry_backoff: float = 2.0
    """EVENT_RETRY_BACKOFF: first retry delay in seconds; doubles each retry, capped at 5 minutes."""
    visibility_timeout: int = 6 * 3600
    """VISIBILITY_TIMEOUT: seconds before an unacknowledged message is redelivered (above the longest task)."""
    training_lease_seconds: float = 60.0
    """TRAINING_LEASE_SECONDS: a training run whose lease is not renewed for this long is taken for orphaned (its
    worker died) and queued again by any live training worker; it resumes from its last checkpoint."""
    training_max_queued_runs_per_tenant: int = 10
    """TRAINING_MAX_QUEUED_RUNS_PER_TENANT: a tenant's runs waiting to start; `POST /v1/runs` beyond it answers
    429 too_many_runs (a training.requested event is still recorded and waits). 0: no limit."""
    training_max_running_runs_per_tenant: int = 2
    """TRAINING_MAX_RUNNING_RUNS_PER_TENANT: a tenant's runs sent to the training queue or training at once; the
    others wait, queued, and are sent oldest first as slots free. 0: no limit."""
    outbox_relay_interval: float = 2.0
    """OUTBOX_RELAY_INTERVAL: seconds between sweeps that deliver events a failed publish left behind."""
    inference_max_batch_size: int = 32
    """INFERENCE_MAX_BATCH_SIZE: rows one ONNX Runtime call coalesces at most (1 turns batching off)."""
    inference_max_queue_delay_us: int = 2000
    """INFERENCE_MAX_QUEUE_DELAY_US: longest wait for a batch to fill (ends early when no one else is coming)."""
    inference_max_queue_size: int = 256
    """INFERENCE_MAX_QUEUE_SIZE: requests waiting per model version; beyond it 503 with Retry-After."""
    inference_request_timeout_s: float = 30.0
    """INFERENCE_REQUEST_TIMEOUT_S: a request still waiting after this long is answered 503."""
    inference_intra_op_threads: int = 0
    """INFERENCE_INTRA_OP_THREADS: ONNX Runtime threads per session (0 = all cores; cores/workers with several)."""
    inference_prefer_gpu: bool = True
    """INFERENCE_PREFER_GPU: try the CUDA execution provider first."""
    inference_reconcile_interval_s: float = 30.0
    """INFERENCE_RECONCILE_INTERVAL_S: safety-net poll of the registry's serving list."""
    inference_v2_log_sample_rate: float = 0.01
    """INFERENCE_V2_LOG_SAMPLE_RATE: share of v2 requests kept in the prediction log."""
    inference_log_predictions: bool = True
    """INFERENCE_LOG_PREDICTIONS: log the friendly API's predictions (off only to measure what logging costs)."""
    inference_metering: bool = True
    """INFERENCE_METERING: count predictions for usage metering (off only to measure what metering costs)."""
    inference_v2_wsgi_route: bool = True
    """INFERENCE_V2_WSGI_ROUTE: answer v2 inference before Flask's dispatch (the same answers, less CPU per
    request; off only to measure what it saves, or to rule it out)."""
    inference_predict_wsgi_route: bool = True
    """INFERENCE_PREDICT_WSGI_ROUTE: answer the friendly API's JSON `:predict` before Flask's dispatch (the same
    answers, less CPU per request; off only to measure what it saves, or to rule it out)."""
    inference_usage_flush_interval_s: float = 5.0
    """INFERENCE_USAGE_FLUSH_INTERVAL_S: how often counted predictions are published as usage records."""
    inference_model_memory_budget_mb: float = 0.0
    """INFERENCE_MODEL_MEMORY_BUDGET_MB: memory one process may spend on loaded model versions (MiB, accounted);
    versions then load on first request and idle ones are evicted least recently used. 0: load all, eagerly."""
    inference_cold_start_policy: str = "wait"
    """INFERENCE_COLD_START_POLICY: a request for a version not loaded `wait`s for it (up to
    INFERENCE_COLD_START_WAIT_S) or is `reject`ed at once (503 + Retry-After) while it loads."""
    inference_cold_start_wait_s: float = 10.0
    """INFERENCE_COLD_START_WAIT_S: longest wait for a cold start under the `wait` policy, then 503."""
    inference_pinned_tenants: str = ""
    """INFERENCE_PINNED_TENANTS: comma-separated tenants whose production versions stay loaded (never evicted)."""
    price_list: str = ""
    """PRICE_LIST: the price list invoices are made from, a JSON object or the path of a JSON file (see
    docs/metering.md); prices it omits keep their defaults. Empty: the default price list."""
    storage_meter_interval_s: float = 3600.0
    """STORAGE_METER_INTERVAL_S: how often the ingestion worker looks for tenants whose bytes stored today are not
    measured yet (each tenant is measured once per UTC day)."""
    rate_limit_inference_per_key: float = 5000.0
    """RATE_LIMIT_INFERENCE_PER_KEY: default predict requests per second per API key (burst: twice it); a
    tenant's own `rate_limits` override it; 0: no limit."""
    rate_limit_inference_per_tenant: float = 10000.0
    """RATE_LIMIT_INFERENCE_PER_TENANT: default predict requests per second per tenant, all keys together."""
    rate_limit_ingestion_per_key: float = 50.0
    """RATE_LIMIT_INGESTION_PER_KEY: default pushes and imports per second per API key (burst: twice it)."""
    rate_limit_ingestion_per_tenant: float = 100.0
    """RATE_LIMIT_INGESTION_PER_TENANT: default pushes and imports per second per tenant."""
    log_level: str = "INFO"
    """LOG_LEVEL."""
    log_format: str = "json"
    """LOG_FORMAT: json (default) or console."""
    max_request_bytes: int = 64 * 1024 * 1024
    """MAX_REQUEST_BYTES: largest accepted HTTP body."""
    port: int = 0
    """<SERVICE>_PORT: HTTP port of a service (defaults 8001..8005)."""
    service: str = ""

    def __post_init__(self) -> None:
        for service in SERVICES:
            if not getattr(self, f"{service}_url"):
                object.__setattr__(self, f"{service}_url", loopback_url(DEFAULT_PORTS[service]))

    def service_url(self, service: str) -> str:
        """Where `service` answers HTTP: its <SERVICE>_URL."""
        return getattr(self, f"{service}_url").rstrip("/")

    @property
    def file_store_root(self) -> Path:
        return self.home / "objects"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def for_service(self, service: str, env: Mapping[str, str] | None = None) -> Settings:
        """Settings of one service: its own DATABASE_URL and port, falling back to the shared defaults."""
        env = os.environ if env is None else env
        prefix = service.upper()
        database_url = (
            env.get(f"{prefix}_DATABASE_URL")
            or self.database_url
            or f"sqlite:///{self.home / 'db' / f'{service}.sqlite3'}"
        )
        port = int(env.get(f"{prefix}_PORT") or DEFAULT_PORTS.get(service, 0))
        return replace(self, service=service, database_url=database_url, port=port)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        names = {
            "home": "FLYWHEEL_HOME",
            "internal_token": "FLYWHEEL_INTERNAL_TOKEN",
            "internal_token_sha256": "FLYWHEEL_INTERNAL_TOKEN_SHA256",
        }
        for f in fields(cls):
            if f.name in {"port", "service"}:
                continue
            raw = env.get(names.get(f.name, f.name.upper()))
            if raw is None or raw == "":
                continue
            if f.name == "home":
                values[f.name] = Path(raw).expanduser()
            elif f.type == "bool":
                values[f.name] = _bool(raw)
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        for service in SERVICES:  # a service moved to another local port is found there without its URL
            port = env.get(f"{service.upper()}_PORT")
            if port and not values.get(f"{service}_url"):
                values[f"{service}_url"] = loopback_url(int(port))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
