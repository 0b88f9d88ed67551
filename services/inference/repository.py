"""The loaded models of one HTTP process, and how a new version replaces the old one without a failed request.

For each (tenant, model) the registry serves, the process loads every version the model's aliases name (the
`production` alias routes traffic, with canary weights; other aliases' versions answer pinned requests at
`/v2/models/{name}/versions/{v}`). A version is loaded on the loader thread, beside what is serving: fetched
and verified (`model_files`), given an ONNX Runtime session (`sessions`), checked against its metadata, warmed
up, and given its own dynamic batcher. Only when every version a serving document needs is ready does the
model's state (versions + routing) change, in one reference assignment, so a request sees either the whole
old state or the whole new one.

A version that fails to fetch, verify or load is recorded with its reason (reported by `/v2/models/{name}`) and
the routing stays as it was: the old version keeps serving. Retired versions finish their in-flight requests
before their batcher and session are released; a request that picked a version just as it was retired picks
again from the new state, so a swap under load fails nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
from services.inference.sessions import ModelRefused, TensorSpec, check_contract, create_session, graph_io, warm_up
from shared.backoff import backoff_delay
from shared.logging import get_logger
from shared.storage import ObjectStore, StorageError

log = get_logger(__name__)

SERVED_ALIAS = "production"
TOKEN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
MAX_FAILED_RETRY_S = 900.0
SYNC_RETRIES = 5


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
        self.loaded_at = _now()
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
            return True

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
            log.info("model_version_released", tenant=self.tenant, model_name=self.model_name, version=self.version)

        threading.Thread(target=close, name=f"retire-{self.model_name}-{self.version}", daemon=True).start()

    def describe(self) -> dict[str, Any]:
        return {
            "state": "ready",
            "provider": self.provider,
            "loaded_at": self.loaded_at,
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
    def __init__(self, tenant: str, name: str) -> None:
        self.tenant = tenant
        self.name = name
        self.dataset_id = ""
        self.task_type = ""
        self.state = ModelState()
        self.desired: dict[str, Routing | None] = {}
        # Written only by the loader thread and always replaced whole (never mutated in place), so request
        # threads can read them without a lock.
        self.failures: MappingProxyType[int, LoadFailure] = MappingProxyType({})
        self.loading: frozenset[int] = frozenset()
        self.first_attempt_done = False
        self.withheld: Routing | None = None
        """The routing the registry wants but that could not be applied (a version failed), once logged."""

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
        self._closed = False
        self.reconciled = threading.Event()

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
        """Load what the serving document names and is not loaded yet, then swap the state in one step."""
        key = (document["tenant"], document["model_name"])
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = ServedModel(*key)
        model.dataset_id = document["dataset_id"]
        model.task_type = document["task_type"]
        model.desired = {alias: Routing.from_alias(spec) for alias, spec in document["aliases"].items()}
        wanted = set().union(*(routing.versions for routing in model.desired.values() if routing))
        state = model.state
        versions = dict(state.versions)
        for version in sorted(wanted):
            loaded = self._ensure_loaded(model, version, document["versions"].get(str(version)), force)
            if loaded is not None:
                versions[version] = loaded
        desired = model.desired.get(SERVED_ALIAS)
        if desired is None:
            routing = None  # nothing is promoted to the served alias: pinned versions only
        elif desired.versions <= versions.keys():
            routing = desired
        else:
            routing = state.routing  # a version it needs failed: the old routing keeps serving
        withheld = desired if desired is not None and routing is not desired else None
        if withheld is not None and (force or withheld != model.withheld):
            log.error(
                "model_swap_withheld",
                tenant=model.tenant,
                model_name=model.name,
                desired=desired.describe(),
                serving=routing.describe() if routing else None,
            )
        model.withheld = withheld
        keep = wanted | (routing.versions if routing else set())
        final = {version: loaded for version, loaded in versions.items() if version in keep}
        retired = [loaded for version, loaded in state.versions.items() if final.get(version) is not loaded]
        model.state = ModelState(versions=MappingProxyType(final), routing=routing)  # the atomic swap
        model.first_attempt_done = True
        model.failures = MappingProxyType({v: f for v, f in model.failures.items() if v in wanted and v not in final})
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

    def _ensure_loaded(
        self, model: ServedModel, version: int, version_doc: dict[str, Any] | None, force: bool
    ) -> LoadedVersion | None:
        """The version loaded and current, loading it if needed; None if it cannot be (failure recorded)."""
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
        model.loading = model.loading | {version}
        try:
            return self._load(model, version, version_doc, current_fingerprint)
        finally:
            model.loading = model.loading - {version}

    def _load(
        self, model: ServedModel, version: int, version_doc: dict[str, Any], version_fingerprint: str
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
        )
        if loaded.memory_bytes is not None:
            self.metrics.session_memory.labels(model.tenant, model.name, str(version)).set(loaded.memory_bytes)
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
        state, model.state = model.state, ModelState()
        for loaded in state.versions.values():
            loaded.retire(self.config.request_timeout_s + 5)
        self._clear_gauges(key)
        log.info("model_unloaded", tenant=key[0], model_name=key[1], reason=why)

    def _set_gauges(self, model: ServedModel) -> None:
        key = (model.tenant, model.name)
        self._clear_gauges(key)
        routing = model.state.routing
        labels = []
        for version in model.state.versions:
            role = "loaded"
            if routing and version == routing.version:
                role = "serving"
            elif routing and version in routing.versions:
                role = "canary"
            labels.append((model.tenant, model.name, str(version), role))
            self.metrics.loaded_versions.labels(*labels[-1]).set(1)
        self._gauges[key] = labels

    def _clear_gauges(self, key: tuple[str, str]) -> None:
        for labels in self._gauges.pop(key, []):
            with contextlib.suppress(KeyError):
                self.metrics.loaded_versions.remove(*labels)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            models = list(self._models.values())
            self._models.clear()
        self._loader.shutdown(wait=True, cancel_futures=True)
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
