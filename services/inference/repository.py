"""The loaded models of one HTTP process, and how a new version replaces the old one without a failed request.

For each (tenant, model) the registry serves, the process keeps the model's serving document: every version its
aliases name (the `production` alias routes traffic, with canary weights; other aliases' versions answer pinned
requests at `/v2/models/{name}/versions/{v}`). A version is loaded beside what is serving: fetched and verified
(`model_files`), given an ONNX Runtime session (`sessions`), checked against its metadata, warmed up, and given
its own dynamic batcher. Only when every version a serving document needs is ready does the model's state
(versions + routing) change, in one reference assignment, so a request sees either the whole old state or the
whole new one.

A version that fails to fetch, verify or load is recorded with its reason (reported by `/v2/models/{name}`) and
the routing stays as it was: the old version keeps serving. Retired versions finish their in-flight requests
before their batcher and session are released; a request that picked a version just as it was retired picks
again from the new state, so a swap under load fails nothing.

**Without a memory budget** (`model_memory_budget_mb` unset, the default) every version the documents name is
loaded eagerly, on the loader thread, as described above.

**With a memory budget** (many tenants' models per replica) the documents are still tracked whole, but versions
load on demand:

- *Lazily, on first request.* A request for a version that is not loaded starts its load on a small cold-start
  pool (`cold_start_threads`; concurrent requests for the same version share one load) and, by
  `cold_start_policy`, waits for it up to `cold_start_wait_s` (`wait`) or is answered 503 `model_loading` with
  Retry-After at once (`reject`: the load goes on in the background). The loaded version is added to the
  model's state with the same one-reference swap. A routing whose versions are described by the document and
  not known to fail is applied without loading them; if such a version then fails to load, the routing goes
  back to the previous one (the old version keeps serving, as in a hot swap).
- *Within the budget.* What a version costs is accounted from its artifacts' sizes in the serving document
  (`residency.py` says how and why not from RSS). Before a load the budget reserves its bytes, evicting loaded
  versions least recently used first; only idle ones (no request in flight) and unpinned ones are candidates,
  and an evicted version is retired with the hot swap's drain, its bytes given back once released. If nothing
  can be evicted the load is refused and the request gets 503 `memory_budget_full` with Retry-After. The
  accounted total (loaded + loading) never exceeds the budget.
- *Pinned tenants* (`pinned_tenants`, e.g. paying ones): their production versions (canary included) are
  loaded eagerly when the document arrives and are never evicted.
- *Hot swap.* When the production routing changes and any version of the routing it replaces was loaded (the
  model is warm), the new versions are loaded on the loader thread before the swap, exactly as without a
  budget; a cold model's new versions load lazily. Versions already loaded whose content changed are reloaded.
- *What is loaded and why*: `/v2/models/{name}` shows each version's state (`ready` with its residency reason
  `pinned`/`recent` and accounted bytes, `unloaded` with `evicted` or `not_requested`, `loading`, `failed`), and
  the metrics (`metrics.py`) carry resident versions by reason, bytes in use against the budget, loads by
  trigger, evictions, cold starts and their latency, and lookup hits and misses.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import onnxruntime as ort

from services.inference.batcher import DynamicBatcher
from services.inference.canary import Routing
from services.inference.config import BatchingConfig, InferenceConfig
from services.inference.metrics import InferenceMetrics, VersionObserver
from services.inference.model_files import ENTITY_TASK, ArtifactRefused, fetch_version, fingerprint
from services.inference.preprocess import ImagePreprocessor, TextPreprocessor, TokenPreprocessor
from services.inference.registry_client import RegistryClient, RegistryUnavailable
from services.inference.residency import MemoryBudget, OverBudget, accounted_bytes
from services.inference.sessions import ModelRefused, TensorSpec, check_contract, create_session, graph_io, warm_up
from shared.backoff import backoff_delay
from shared.errors import NotFound, ServiceUnavailable
from shared.logging import get_logger
from shared.storage import ObjectStore, StorageError

log = get_logger(__name__)

SERVED_ALIAS = "production"
TOKEN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
MAX_FAILED_RETRY_S = 900.0
SYNC_RETRIES = 5
FAILED_LOAD_RETRY_AFTER_S = 5
MAX_COLD_RETRY_AFTER_S = 30


class ModelLoading(ServiceUnavailable):
    """The version is not loaded yet (a cold start under a memory budget): retry after Retry-After."""

    code = "model_loading"


class MemoryBudgetFull(ServiceUnavailable):
    """No room to load the version: the budget is held by pinned versions and versions serving requests."""

    code = "memory_budget_full"


def _now() -> str:
    return datetime.now(UTC).isoformat()


class LoadedVersion:
    """One model version ready to serve: its session, preprocessing, batcher and in-flight count."""

    def __init__(
        self,
        *,
        tenant: str,
        model_name: str,
        version: int,
        fingerprint: str,
        metadata: dict[str, Any],
        session: ort.InferenceSession,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        preprocessor: TextPreprocessor | ImagePreprocessor,
        batching: BatchingConfig,
        observer: VersionObserver,
        artifacts: dict[str, Any] | None = None,
        memory_bytes: int | None = None,
        memory_accounted: int = 0,
        on_released: Callable[[LoadedVersion], None] | None = None,
    ) -> None:
        self.tenant = tenant
        self.model_name = model_name
        self.version = version
        self.fingerprint = fingerprint
        self.metadata = metadata
        self.labels: list[str] = list(metadata["labels"])
        self.tags: list[str] | None = list(metadata["tags"]) if metadata["task_type"] == ENTITY_TASK else None
        """A token-classification version's IOB2 tags (its logits' last axis); None for a classifier."""
        self.session = session
        self.provider = session.get_providers()[0]
        self.inputs = inputs
        self.outputs = outputs
        self.preprocessor = preprocessor
        self.batching = batching
        self.observer = observer
        self.artifacts = dict(artifacts or {})
        """The registry's artifact references of this version (where its evaluation baseline sits, too)."""
        self.memory_bytes = memory_bytes
        """Process RSS growth while its session was created and warmed up (None where it cannot be read)."""
        self.memory_accounted = memory_accounted
        """What the version is accounted in the memory budget (0 without one; see `residency.py`)."""
        self.residency = "eager"
        """Why it is loaded: eager (no budget), pinned (never evicted) or recent (evicted least recently used)."""
        self.on_released = on_released
        self.loaded_at = _now()
        self.last_used = time.monotonic()
        output_names = [spec.name for spec in outputs]
        self.batcher = DynamicBatcher(
            lambda feeds: dict(zip(output_names, session.run(output_names, feeds), strict=True)),
            batching,
            name=f"{tenant}/{model_name}:{version}",
            observer=observer,
            padded_inputs=TOKEN_INPUTS if preprocessor.kind == "text" else frozenset(),
            padded_outputs=frozenset({"logits"}) if self.tags is not None else frozenset(),
        )
        self._lock = threading.Lock()
        self._inflight = 0
        self._closing = False
        self._drained = threading.Event()

    def acquire(self) -> bool:
        """Count a request in; False once the version is retired (the caller picks from the new state)."""
        with self._lock:
            if self._closing:
                return False
            self._inflight += 1
        self.last_used = time.monotonic()
        return True

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def retiring(self) -> bool:
        """Retired (by a swap or an eviction): its bytes are given back once it drains."""
        return self._closing

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                self._drained.set()

    def retire(self, wait: float) -> None:
        """Stop taking requests; once the in-flight ones are done, release the batcher and session."""
        with self._lock:
            self._closing = True
            if self._inflight == 0:
                self._drained.set()

        def close() -> None:
            if not self._drained.wait(wait):
                log.warning("model_version_retired_with_requests_in_flight", version=self.version)
            self.batcher.close()
            self.observer.forget()
            if self.on_released is not None:
                self.on_released(self)
            log.info("model_version_released", tenant=self.tenant, model_name=self.model_name, version=self.version)

        threading.Thread(target=close, name=f"retire-{self.model_name}-{self.version}", daemon=True).start()

    def describe(self) -> dict[str, Any]:
        return {
            "state": "ready",
            "provider": self.provider,
            "loaded_at": self.loaded_at,
            "residency": {
                "reason": self.residency,
                "memory_bytes": self.memory_accounted or None,
                "idle_s": round(time.monotonic() - self.last_used, 1),
            },
            "batching": {
                "max_batch_size": self.batching.max_batch_size,
                "max_queue_delay_us": self.batching.max_queue_delay_us,
                "max_queue_size": self.batching.max_queue_size,
            },
        }


@dataclass(frozen=True)
class ModelState:
    """What serves one model right now; replaced whole, never mutated."""

    versions: MappingProxyType[int, LoadedVersion] = field(default_factory=lambda: MappingProxyType({}))
    routing: Routing | None = None


@dataclass
class LoadFailure:
    version: int
    fingerprint: str
    reason: str
    message: str
    failed_at: str
    attempts: int
    retry_at: float

    def describe(self) -> dict[str, Any]:
        return {"state": "failed", "reason": self.reason, "message": self.message, "failed_at": self.failed_at}


class ServedModel:
    def __init__(self, tenant: str, name: str, *, on_demand: bool = False) -> None:
        self.tenant = tenant
        self.name = name
        self.on_demand = on_demand
        """Versions load on first request (a memory budget), not all eagerly."""
        self.dataset_id = ""
        self.task_type = ""
        self.state = ModelState()
        self.desired: dict[str, Routing | None] = {}
        # Always replaced whole (never mutated in place), under `lock` (the loader thread, cold starts and
        # evictions all write them), so request threads can read them without it.
        self.lock = threading.RLock()
        self.failures: MappingProxyType[int, LoadFailure] = MappingProxyType({})
        self.loading: frozenset[int] = frozenset()
        self.version_docs: MappingProxyType[int, dict[str, Any]] = MappingProxyType({})
        """The serving document's description of every version an alias names (what a cold start loads)."""
        self.evicted: MappingProxyType[int, str] = MappingProxyType({})
        self.fallback: Routing | None = None
        """The routing a lazily applied one replaced: it serves again if a version of the new one fails to load."""
        self.removed = False
        self.first_attempt_done = False
        self.withheld: Routing | None = None
        """The routing the registry wants but that could not be applied (a version failed), once logged."""

    def declared(self, version: int | None = None) -> dict[str, Any]:
        """The registry's metadata of a version (by default the serving one): its metadata.json as registered,
        `inputs`, `outputs`, `labels`, which describe a version that is not loaded; {} when unknown."""
        if version is None:
            routing = self.state.routing
            version = routing.version if routing else next(iter(sorted(self.version_docs)), None)
        version_doc = self.version_docs.get(version) if version is not None else None
        return dict((version_doc or {}).get("metadata") or {})

    def loads_on_demand(self, version: int) -> bool:
        """The version is not loaded but a request may load it (a memory budget, and the document names it)."""
        return self.on_demand and version in self.version_docs and version not in self.state.versions

    @property
    def ready(self) -> bool:
        return self.state.routing is not None

    def describe(self) -> dict[str, Any]:
        state = self.state
        versions: dict[str, Any] = {str(v): loaded.describe() for v, loaded in sorted(state.versions.items())}
        for version, failure in self.failures.items():
            versions.setdefault(str(version), failure.describe())
        for version in self.loading:
            versions[str(version)] = {**versions.get(str(version), {}), "state": "loading"}
        if self.on_demand:
            for version in sorted(self.version_docs):
                evicted_at = self.evicted.get(version)
                unloaded = {"state": "unloaded", "reason": "evicted" if evicted_at else "not_requested"}
                versions.setdefault(str(version), {**unloaded, **({"evicted_at": evicted_at} if evicted_at else {})})
        desired = self.desired.get(SERVED_ALIAS)
        return {
            "task_type": self.task_type,
            "dataset_id": self.dataset_id,
            "ready": self.ready,
            "serving": state.routing.describe() if state.routing else None,
            "desired": desired.describe() if desired else None,
            "aliases": {alias: routing.describe() if routing else None for alias, routing in self.desired.items()},
            "versions": versions,
        }


class ModelRepository:
    def __init__(
        self,
        *,
        storage: ObjectStore,
        registry: RegistryClient,
        config: InferenceConfig,
        metrics: InferenceMetrics,
        work_dir: Path,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.work_dir = work_dir
        self._models: dict[tuple[str, str], ServedModel] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference-loader")
        self._pending: dict[tuple[str, str] | None, bool] = {}
        self._gauges: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        self._gauges_lock = threading.Lock()
        self._closed = False
        self.reconciled = threading.Event()
        self._pinned_tenants = frozenset(config.pinned_tenants)
        budget = config.memory_budget_bytes
        self.budget = MemoryBudget(budget, metrics, pinned=self._pinned) if budget else None
        """The memory budget of loaded versions; None: every served version is loaded eagerly."""
        self._cold = ThreadPoolExecutor(max_workers=max(1, config.cold_start_threads), thread_name_prefix="cold-start")
        self._cold_jobs: dict[tuple[str, str, int], Future] = {}
        self._cold_seconds = 1.0  # a running mean of cold-start durations: the Retry-After of a rejected request

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, tenant: str, name: str) -> ServedModel | None:
        return self._models.get((tenant, name))

    def models(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    @property
    def ready(self) -> bool:
        """The registry answered once, and every model it names has had its first load attempt."""
        return self.reconciled.is_set() and all(model.first_attempt_done for model in self.models())

    # -- the request path: a version that is not loaded ------------------------------------------------

    def lookup(self, model: ServedModel, version: int, *, routed: bool) -> LoadedVersion | None:
        """The loaded version, loading it first under a memory budget (by the cold-start policy); NotFound for a
        version the model does not serve, 503 (Retry-After) while it loads, fails or finds no room; None when a
        routed version failed and the routing went back to the old one (pick again)."""
        loaded = model.state.versions.get(version)
        if loaded is not None:
            loaded.observer.hit()
            return loaded
        failure = model.failures.get(version)
        version_doc = model.version_docs.get(version)
        if not model.on_demand or version_doc is None:
            detail = f": {failure.reason}: {failure.message}" if failure else ""
            raise NotFound(f"version {version} of model {model.name!r} is not loaded{detail}")
        if (
            failure is not None
            and failure.fingerprint == fingerprint(version_doc)
            and time.monotonic() < failure.retry_at
        ):
            if not routed:
                raise NotFound(
                    f"version {version} of model {model.name!r} is not loaded: {failure.reason}: {failure.message}"
                )
            raise ServiceUnavailable(
                f"version {version} of model {model.name!r} failed to load: {failure.reason}",
                retry_after=FAILED_LOAD_RETRY_AFTER_S,
            )
        self.metrics.lookups.labels(model.tenant, model.name, "miss").inc()
        future = self._cold_start(model, version)
        retry_after = max(1, min(MAX_COLD_RETRY_AFTER_S, math.ceil(self._cold_seconds)))
        if self.config.cold_start_policy == "reject":
            raise ModelLoading(
                f"version {version} of model {model.name!r} is loading (cold start); retry shortly",
                {"version": version},
                retry_after=retry_after,
            )
        try:
            loaded = future.result(timeout=self.config.cold_start_wait_s)
        except FutureTimeout as exc:
            raise ModelLoading(
                f"version {version} of model {model.name!r} is still loading after "
                f"{self.config.cold_start_wait_s:g}s (cold start); retry shortly",
                {"version": version},
                retry_after=retry_after,
            ) from exc
        except OverBudget as exc:
            raise MemoryBudgetFull(
                f"no room to load version {version} of model {model.name!r}: {exc}; retry shortly",
                {"version": version},
                retry_after=retry_after,
            ) from exc
        routing = model.state.routing
        if loaded is None and routed and routing is not None and version not in routing.versions:
            return None  # it failed and the routing fell back to the old version: the caller picks again
        if loaded is None:
            failure = model.failures.get(version)
            why = f": {failure.reason}: {failure.message}" if failure else ""
            raise ServiceUnavailable(
                f"version {version} of model {model.name!r} could not be loaded{why}",
                retry_after=FAILED_LOAD_RETRY_AFTER_S,
            )
        return loaded

    def _cold_start(self, model: ServedModel, version: int) -> Future:
        """The one load of this version that requests share (started now if none is running)."""
        key = (model.tenant, model.name, version)
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the server is shutting down", retry_after=1)
            future = self._cold_jobs.get(key)
            if future is None:
                future = self._cold_jobs[key] = self._cold.submit(self._cold_load, model, version)
        future.add_done_callback(
            lambda done: self._cold_jobs.pop(key, None) if self._cold_jobs.get(key) is done else None
        )
        return future

    def _cold_load(self, model: ServedModel, version: int) -> LoadedVersion | None:
        """Load a version a request asked for and add it to the model's state (cold-start thread)."""
        started = time.monotonic()
        existing = model.state.versions.get(version)
        version_doc = model.version_docs.get(version)
        if existing is not None or version_doc is None or model.removed:
            return existing
        labels = (model.tenant, model.name)
        try:
            loaded = self._ensure_loaded(model, version, version_doc, False, trigger="cold_start")
        except OverBudget as exc:
            self.metrics.cold_starts.labels(*labels, "over_budget").inc()
            log.warning(
                "model_version_not_admitted",
                tenant=model.tenant,
                model_name=model.name,
                version=version,
                error=str(exc),
            )
            raise
        if loaded is None:
            self.metrics.cold_starts.labels(*labels, "failed").inc()
            self._fall_back(model, version)
            return None
        placed = self._place(model, version, loaded)
        elapsed = time.monotonic() - started
        self._cold_seconds = 0.8 * self._cold_seconds + 0.2 * elapsed
        self.metrics.cold_starts.labels(*labels, "loaded").inc()
        self.metrics.cold_start_time.labels(*labels).observe(elapsed)
        log.info(
            "model_version_cold_started",
            tenant=model.tenant,
            model_name=model.name,
            version=version,
            duration_ms=round(elapsed * 1000, 1),
            memory_bytes=loaded.memory_accounted,
        )
        return placed

    def _place(self, model: ServedModel, version: int, loaded: LoadedVersion) -> LoadedVersion | None:
        """Add a version loaded on demand to the model's state, unless the document moved on meanwhile."""
        discard: LoadedVersion | None = None
        with model.lock:
            state = model.state
            current = model.version_docs.get(version)
            if model.removed or current is None or fingerprint(current) != loaded.fingerprint:
                discard, placed = loaded, None
            elif version in state.versions:  # loaded meanwhile by the loader thread: keep that one
                discard, placed = loaded, state.versions[version]
            else:
                versions = MappingProxyType({**state.versions, version: loaded})
                model.state = ModelState(versions=versions, routing=state.routing)  # the atomic swap
                model.evicted = MappingProxyType({v: t for v, t in model.evicted.items() if v != version})
                placed = loaded
        if discard is not None:
            discard.retire(self.config.request_timeout_s + 5)
        self._set_gauges(model)
        return placed

    def _fall_back(self, model: ServedModel, version: int) -> None:
        """A version of a lazily applied routing failed to load: the routing it replaced serves again."""
        with model.lock:
            state, fallback = model.state, model.fallback
            if state.routing is None or version not in state.routing.versions or fallback is None:
                return
            if version in fallback.versions:
                return
            model.state = ModelState(versions=state.versions, routing=fallback)
            model.withheld, model.fallback = state.routing, None
        log.error(
            "model_swap_withheld",
            tenant=model.tenant,
            model_name=model.name,
            desired=state.routing.describe(),
            serving=fallback.describe(),
            failed_version=version,
        )
        self._set_gauges(model)

    def _evict(self, victims: list[Any]) -> None:
        """Retire versions the memory budget chose (least recently used, idle, unpinned) to make room."""
        for victim in victims:
            model = self.get(victim.tenant, victim.model_name)
            removed = False
            if model is not None:
                with model.lock:
                    state = model.state
                    if state.versions.get(victim.version) is victim:
                        versions = MappingProxyType({v: lv for v, lv in state.versions.items() if lv is not victim})
                        model.state = ModelState(versions=versions, routing=state.routing)
                        model.evicted = MappingProxyType({**model.evicted, victim.version: _now()})
                        removed = True
            if not removed:
                continue  # already retired by a swap: its release gives the bytes back
            self.metrics.evictions.labels(victim.tenant, victim.model_name).inc()
            log.info(
                "model_version_evicted",
                tenant=victim.tenant,
                model_name=victim.model_name,
                version=victim.version,
                memory_bytes=victim.memory_accounted,
                idle_s=round(time.monotonic() - victim.last_used, 1),
            )
            self._set_gauges(model)
            victim.retire(self.config.request_timeout_s + 5)

    def _pinned(self, loaded: Any) -> bool:
        """A pinned tenant's production version (the routing wanted or serving, canary included)."""
        if loaded.tenant not in self._pinned_tenants:
            return False
        model = self.get(loaded.tenant, loaded.model_name)
        if model is None:
            return False
        routings = (model.desired.get(SERVED_ALIAS), model.state.routing)
        return any(routing is not None and loaded.version in routing.versions for routing in routings)

    def _released(self, loaded: LoadedVersion) -> None:
        if self.budget is not None:
            self.budget.released(loaded)

    # -- asking for work (any thread) ------------------------------------------------------------------

    def request_reconcile(self) -> Future | None:
        """Compare everything against the registry's serving list, on the loader thread (coalesced)."""
        return self._enqueue(None, False, self._reconcile_job)

    def request_sync(self, tenant: str, name: str, *, force: bool = True, attempt: int = 1) -> Future | None:
        """Fetch one model's serving document and load what changed (coalesced). `force` retries failures."""
        return self._enqueue((tenant, name), force, lambda f: self._sync_job(tenant, name, f, attempt))

    def _enqueue(self, key: tuple[str, str] | None, force: bool, job: Callable[[bool], Any]) -> Future | None:
        with self._lock:
            if self._closed:
                return None
            if key in self._pending:
                self._pending[key] = self._pending[key] or force
                return None
            self._pending[key] = force

        def run() -> Any:
            with self._lock:
                forced = self._pending.pop(key, force)
            return job(forced)

        return self._loader.submit(run)

    # -- the work (loader thread) ----------------------------------------------------------------------

    def _reconcile_job(self, _force: bool) -> bool:
        try:
            self.reconcile()
        except RegistryUnavailable as exc:
            log.warning("serving_reconcile_failed", error=str(exc)[:300])
            return False
        return True

    def reconcile(self) -> None:
        documents = self.registry.list_serving()
        listed = set()
        for document in documents:
            listed.add((document["tenant"], document["model_name"]))
            self.apply(document, force=False)
        for key in [key for key in list(self._models) if key not in listed]:
            self._unload(key, "no longer served by the registry")
        if not self.reconciled.is_set():
            log.info("serving_reconciled", models=len(documents))
        self.reconciled.set()

    def _sync_job(self, tenant: str, name: str, force: bool, attempt: int) -> None:
        try:
            document = self.registry.get_serving(tenant, name)
        except RegistryUnavailable as exc:
            if attempt >= SYNC_RETRIES:
                log.error("serving_sync_gave_up", tenant=tenant, model_name=name, error=str(exc)[:300])
                return
            delay = min(2.0**attempt, 30.0)
            log.warning("serving_sync_retry", tenant=tenant, model_name=name, delay_s=delay, error=str(exc)[:300])
            timer = threading.Timer(delay, self.request_sync, (tenant, name), {"force": force, "attempt": attempt + 1})
            timer.daemon = True
            timer.start()
            return
        if document is None:
            self._unload((tenant, name), "the registry serves nothing for it")
        else:
            self.apply(document, force=force)

    def apply(self, document: dict[str, Any], *, force: bool) -> None:
        """Load what the serving document names and is not loaded yet (under a budget: only what must be loaded
        now), then swap the state in one step."""
        key = (document["tenant"], document["model_name"])
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = ServedModel(*key, on_demand=self.budget is not None)
        desired_aliases = {alias: Routing.from_alias(spec) for alias, spec in document["aliases"].items()}
        wanted = set().union(*(routing.versions for routing in desired_aliases.values() if routing))
        described = {int(v): doc for v, doc in document["versions"].items() if int(v) in wanted}
        with model.lock:
            model.dataset_id = document["dataset_id"]
            model.task_type = document["task_type"]
            model.desired = desired_aliases
            # The serving routing's versions keep their description until it is replaced: a lazily applied
            # routing falls back on them (the registry's document names only the versions aliases point at now).
            serving = model.state.routing.versions if model.state.routing else set()
            previous = {v: doc for v, doc in model.version_docs.items() if v in serving and v not in described}
            model.version_docs = MappingProxyType({**previous, **described})
        before = model.state
        fresh: dict[int, LoadedVersion] = {}
        for version in sorted(self._load_now(model, wanted, before, force) | (wanted - described.keys())):
            try:
                loaded = self._ensure_loaded(
                    model, version, described.get(version), force, trigger=self._trigger(model, version)
                )
            except OverBudget as exc:  # loads on demand later, when room is made
                log.warning(
                    "model_version_not_admitted",
                    tenant=model.tenant,
                    model_name=model.name,
                    version=version,
                    error=str(exc),
                )
                continue
            if loaded is not None:
                fresh[version] = loaded
        desired = model.desired.get(SERVED_ALIAS)
        with model.lock:
            state = model.state  # cold starts may have added versions since `before`
            versions = {**state.versions, **fresh}
            routing = self._routing(model, desired, versions, state)
            withheld = desired if desired is not None and routing is not desired else None
            log_withheld = withheld is not None and (force or withheld != model.withheld)
            model.withheld = withheld
            keep = wanted | (routing.versions if routing else set())
            final = {version: loaded for version, loaded in versions.items() if version in keep}
            retired = [loaded for version, loaded in state.versions.items() if final.get(version) is not loaded]
            if routing != state.routing:
                lazy = routing is not None and not routing.versions <= final.keys()
                model.fallback = state.routing if lazy else None
            model.state = ModelState(versions=MappingProxyType(final), routing=routing)  # the atomic swap
            model.first_attempt_done = True
            kept = keep | (model.fallback.versions if model.fallback else set())
            model.version_docs = MappingProxyType({v: d for v, d in model.version_docs.items() if v in kept})
            model.failures = MappingProxyType(
                {v: f for v, f in model.failures.items() if v in wanted and v not in final}
            )
            model.evicted = MappingProxyType({v: t for v, t in model.evicted.items() if v in wanted and v not in final})
        if log_withheld and desired is not None:
            log.error(
                "model_swap_withheld",
                tenant=model.tenant,
                model_name=model.name,
                desired=desired.describe(),
                serving=routing.describe() if routing else None,
            )
        if routing != state.routing or retired:
            log.info(
                "model_swapped",
                tenant=model.tenant,
                model_name=model.name,
                serving=routing.describe() if routing else None,
                previous=state.routing.describe() if state.routing else None,
                loaded=sorted(final),
                retired=[loaded.version for loaded in retired],
            )
        self._set_gauges(model)
        for loaded in retired:
            loaded.retire(self.config.request_timeout_s + 5)

    def _load_now(self, model: ServedModel, wanted: set[int], before: ModelState, force: bool) -> set[int]:
        """The versions to load on the loader thread: all of them without a budget; with one, a pinned tenant's
        production versions, a warm model's new production versions (a hot swap), loaded versions (reloaded if
        their content changed), and failed production versions due for a retry."""
        if self.budget is None:
            return set(wanted)
        desired = model.desired.get(SERVED_ALIAS)
        production = desired.versions if desired else set()
        now = set(wanted) & before.versions.keys()
        warm = before.routing is not None and bool(before.routing.versions & before.versions.keys())
        if warm or model.tenant in self._pinned_tenants:
            now |= production
        for version in production:
            failure = model.failures.get(version)
            if failure is not None and (force or time.monotonic() >= failure.retry_at):
                now.add(version)
        return now

    def _trigger(self, model: ServedModel, version: int) -> str:
        if self.budget is None:
            return "eager"
        desired = model.desired.get(SERVED_ALIAS)
        pinned = model.tenant in self._pinned_tenants and desired is not None and version in desired.versions
        return "pinned" if pinned else "hot_swap"

    def _routing(
        self, model: ServedModel, desired: Routing | None, versions: dict[int, LoadedVersion], state: ModelState
    ) -> Routing | None:
        """The routing to serve: the wanted one if its versions are loaded (or, on demand, loadable), else the
        current one (a version it needs failed: the old routing keeps serving)."""
        if desired is None:
            return None  # nothing is promoted to the served alias: pinned versions only
        if desired.versions <= versions.keys():
            return desired
        if model.on_demand and all(self._loadable(model, version) for version in desired.versions - versions.keys()):
            return desired
        return state.routing

    def _loadable(self, model: ServedModel, version: int) -> bool:
        version_doc = model.version_docs.get(version)
        if version_doc is None:
            return False
        failure = model.failures.get(version)
        return failure is None or failure.fingerprint != fingerprint(version_doc)

    def _ensure_loaded(
        self, model: ServedModel, version: int, version_doc: dict[str, Any] | None, force: bool, *, trigger: str
    ) -> LoadedVersion | None:
        """The version loaded and current, loading it if needed; None if it cannot be (failure recorded).
        Raises OverBudget when the memory budget has no room for it."""
        if version_doc is None:
            known = model.failures.get(version)
            if force or known is None or known.reason != "missing_version":
                self._fail(model, version, "", "missing_version", "the serving document does not describe this version")
            return None
        current_fingerprint = fingerprint(version_doc)
        loaded = model.state.versions.get(version)
        if loaded is not None and loaded.fingerprint == current_fingerprint:
            return loaded
        failure = model.failures.get(version)
        if (
            failure is not None
            and failure.fingerprint == current_fingerprint
            and not force
            and time.monotonic() < failure.retry_at
        ):
            return None
        with model.lock:
            model.loading = model.loading | {version}
        try:
            return self._load(model, version, version_doc, current_fingerprint, trigger)
        finally:
            with model.lock:
                model.loading = model.loading - {version}

    def _load(
        self, model: ServedModel, version: int, version_doc: dict[str, Any], version_fingerprint: str, trigger: str
    ) -> LoadedVersion | None:
        """Reserve the version's room in the budget (evicting if needed), then build it."""
        size = 0
        if self.budget is not None:
            size = accounted_bytes(
                version_doc, factor=self.config.model_memory_factor, overhead_mb=self.config.model_memory_overhead_mb
            )
            self.budget.admit(size, self._evict, timeout=self.config.request_timeout_s)
        loaded = None
        try:
            loaded = self._build(model, version, version_doc, version_fingerprint, size)
        finally:
            if self.budget is not None:
                if loaded is None:
                    self.budget.cancel(size)
                else:
                    self.budget.loaded(loaded, size)
        if loaded is not None:
            self.metrics.version_loads.labels(model.tenant, model.name, trigger).inc()
        return loaded

    def _build(
        self, model: ServedModel, version: int, version_doc: dict[str, Any], version_fingerprint: str, size: int
    ) -> LoadedVersion | None:
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{model.name}-{version}-", dir=self.work_dir))
        try:
            files = fetch_version(self.storage, version_doc, folder)
            rss_before = resident_bytes()
            session = create_session(
                files.graph,
                intra_op_threads=self.config.intra_op_threads,
                allow_spinning=self.config.allow_spinning,
                prefer_gpu=self.config.prefer_gpu,
            )
            inputs, outputs = graph_io(session)
            check_contract(inputs, outputs, files.metadata)
            preprocessing = files.metadata["preprocessing"]
            per_token = files.metadata["task_type"] == ENTITY_TASK
            preprocessor: TextPreprocessor | ImagePreprocessor
            if per_token:
                preprocessor = TokenPreprocessor(folder, preprocessing, inputs)
            elif preprocessing["kind"] == "text":
                preprocessor = TextPreprocessor(folder, preprocessing, inputs)
            else:
                preprocessor = ImagePreprocessor(preprocessing, inputs, self.config.max_image_pixels)
            batching = self.config.batching.override((version_doc.get("metadata") or {}).get("serving"))
            columns = len(files.metadata["tags"] if per_token else files.metadata["labels"])
            warm_up(session, inputs, [1, batching.max_batch_size], columns, per_token=per_token)
            rss_after = resident_bytes()
        except (ArtifactRefused, ModelRefused) as exc:
            self._fail(model, version, version_fingerprint, exc.reason, exc.message)
            return None
        except StorageError as exc:
            self._fail(model, version, version_fingerprint, "storage_unavailable", str(exc)[:500], transient=True)
            return None
        except Exception as exc:
            log.exception("model_version_load_error", tenant=model.tenant, model_name=model.name, version=version)
            self._fail(model, version, version_fingerprint, "load_error", repr(exc)[:500])
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        loaded = LoadedVersion(
            tenant=model.tenant,
            model_name=model.name,
            version=version,
            fingerprint=version_fingerprint,
            metadata=files.metadata,
            session=session,
            inputs=inputs,
            outputs=outputs,
            preprocessor=preprocessor,
            batching=batching,
            observer=self.metrics.batch_observer(model.tenant, model.name, version),
            artifacts=version_doc.get("artifacts"),
            memory_bytes=max(0, rss_after - rss_before) if rss_before is not None and rss_after is not None else None,
            memory_accounted=size,
            on_released=self._released,
        )
        if loaded.memory_bytes is not None:
            self.metrics.session_memory.labels(model.tenant, model.name, str(version)).set(loaded.memory_bytes)
        with model.lock:
            model.failures = MappingProxyType({v: f for v, f in model.failures.items() if v != version})
        log.info(
            "model_version_loaded",
            tenant=model.tenant,
            model_name=model.name,
            version=version,
            provider=loaded.provider,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_us=batching.max_queue_delay_us,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return loaded

    def _fail(
        self, model: ServedModel, version: int, version_fingerprint: str, reason: str, message: str, *, transient=False
    ) -> None:
        previous = model.failures.get(version)
        attempts = previous.attempts + 1 if previous and previous.fingerprint == version_fingerprint else 1
        base = self.config.failed_retry_s * (0.25 if transient else 1.0)
        backoff = backoff_delay(attempts, base, MAX_FAILED_RETRY_S, jitter=False)
        failure = LoadFailure(
            version=version,
            fingerprint=version_fingerprint,
            reason=reason,
            message=message,
            failed_at=_now(),
            attempts=attempts,
            retry_at=time.monotonic() + backoff,
        )
        with model.lock:
            model.failures = MappingProxyType({**model.failures, version: failure})
        self.metrics.load_failures.labels(model.tenant, model.name, str(version), reason).inc()
        log.error(
            "model_version_load_failed",
            tenant=model.tenant,
            model_name=model.name,
            version=version,
            reason=reason,
            error=message,
            attempts=attempts,
        )

    def _unload(self, key: tuple[str, str], why: str) -> None:
        with self._lock:
            model = self._models.pop(key, None)
        if model is None:
            return
        with model.lock:
            model.removed = True
            state, model.state = model.state, ModelState()
        for loaded in state.versions.values():
            loaded.retire(self.config.request_timeout_s + 5)
        with self._gauges_lock:
            self._clear_gauges(key)
        log.info("model_unloaded", tenant=key[0], model_name=key[1], reason=why)

    def _set_gauges(self, model: ServedModel) -> None:
        """The loaded versions' role and residency gauges (and each version's residency reason)."""
        key = (model.tenant, model.name)
        with self._gauges_lock:
            self._clear_gauges(key)
            if model.removed:
                return
            state = model.state
            routing = state.routing
            labels = []
            for version, loaded in state.versions.items():
                role = "loaded"
                if routing and version == routing.version:
                    role = "serving"
                elif routing and version in routing.versions:
                    role = "canary"
                if self.budget is not None:
                    loaded.residency = "pinned" if self._pinned(loaded) else "recent"
                labels.append((model.tenant, model.name, str(version), role, loaded.residency))
                self.metrics.loaded_versions.labels(*labels[-1][:4]).set(1)
                self.metrics.resident_versions.labels(*labels[-1][:3], loaded.residency).set(1)
            self._gauges[key] = labels

    def _clear_gauges(self, key: tuple[str, str]) -> None:
        for labels in self._gauges.pop(key, []):
            with contextlib.suppress(KeyError):
                self.metrics.loaded_versions.remove(*labels[:4])
            with contextlib.suppress(KeyError):
                self.metrics.resident_versions.remove(*labels[:3], labels[4])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            models = list(self._models.values())
            self._models.clear()
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._cold.shutdown(wait=True, cancel_futures=True)
        for model in models:
            for loaded in model.state.versions.values():
                loaded.batcher.close(timeout=5)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def resident_bytes() -> int | None:
    """This process's resident set size, from /proc (Linux); None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def process_work_dir(home: Path) -> Path:
    """Scratch space for downloads, private to this process (gunicorn workers never share a folder)."""
    return home / "inference" / f"work-{os.getpid()}-{uuid.uuid4().hex[:8]}"
