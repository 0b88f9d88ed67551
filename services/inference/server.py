"""What one HTTP process of inference holds (loaded models, prediction log, promotion listener, metrics, and
monitoring: the ground-truth listener, policies and their schedule, sampling, shadow traffic), and the request
path every API shares: find the caller's model, route to a version, submit to its batcher."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from flask import current_app

from services.inference import erasure  # noqa: F401  (its handler joins the listener's: erasure.requested)
from services.inference.batcher import Answer, BatcherClosed, Feeds, PrepareFn, QueueFull
from services.inference.canary import choose_version
from services.inference.config import InferenceConfig
from services.inference.ground_truth import EventListener
from services.inference.metering import PredictionMeter
from services.inference.metrics import InferenceMetrics
from services.inference.policies import Monitor
from services.inference.prediction_log import PredictionLog
from services.inference.promotions import PromotionListener, Reconciler
from services.inference.registry_client import RegistryClient
from services.inference.repository import LoadedVersion, ModelRepository, ServedModel, process_work_dir
from services.inference.traffic import Sampler, ShadowRunner, input_stats
from shared.errors import NotFound, ServiceUnavailable
from shared.logging import get_logger
from shared.runtime import Runtime
from shared.schemas import ErrorSchema

log = get_logger(__name__)

PICK_ATTEMPTS = 3
UNAVAILABLE: dict[str, Any] = {
    "schema": ErrorSchema,
    "description": "The model cannot answer now; retry after `Retry-After` seconds. `error.code` says why: "
    "`model_loading` (a cold start under the replica's memory budget: the version is loading; with the wait "
    "policy, it did not load within the wait), `memory_budget_full` (no room to load it: the budget is held by "
    "pinned versions and versions serving requests), or `unavailable` (the version's queue is full, it did not "
    "answer in time, no version is ready to serve, or it failed to load).",
    "headers": {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}
"""The 503 answer of the predict and infer operations, for their OpenAPI documents."""


@dataclass(frozen=True)
class RawInputs:
    """A request's inputs as sent, for its version's batcher to prepare with the rest of the batch (a text model's
    texts and its tokenizer's `prepare`: one tokenizer call per batch, not one per request)."""

    values: list[Any]
    prepare: PrepareFn


ModelInputs = Feeds | RawInputs


@dataclass(frozen=True)
class Inference:
    version: LoadedVersion
    outputs: Feeds
    feeds: Feeds | None = None
    """The request's own feeds, where the batcher prepared them (raw inputs)."""
    extras: list[Any] | None = None
    """What preparing each input made besides the feeds (a token model's words), where the batcher prepared them."""


class InferenceServer:
    def __init__(self, runtime: Runtime, config: InferenceConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.metrics = InferenceMetrics(runtime.metrics)
        self.registry = RegistryClient(
            runtime.settings.registry_url, runtime.settings.internal_token, config.registry_timeout_s
        )
        self.repository = ModelRepository(
            storage=runtime.storage,
            registry=self.registry,
            config=config,
            metrics=self.metrics,
            work_dir=process_work_dir(runtime.settings.home),
        )
        self.sampler = Sampler()
        self.prediction_log = PredictionLog(
            runtime, config, self.metrics, input_stats=input_stats, pick=self.sampler.pick
        )
        self.usage = PredictionMeter(runtime, config.usage_flush_interval_s)
        self.promotions = PromotionListener(runtime, self.repository, self.metrics)
        self.reconciler = Reconciler(self.repository, config.reconcile_interval_s)
        self.monitor = Monitor(runtime, self.repository, self.metrics, config.monitor_interval_s)
        self.shadow = ShadowRunner(self.prediction_log, self.metrics, config.shadow_queue_size)
        self.events = EventListener(runtime, self.metrics) if config.label_listener else None
        self._closed = False

    def start(self) -> InferenceServer:
        self.prediction_log.start()
        self.usage.start()
        self.promotions.start()
        self.reconciler.start()
        self.shadow.start()
        self.monitor.start()
        if self.events is not None:
            self.events.start()
        log.info(
            "inference_started",
            registry=self.registry.base_url,
            max_batch_size=self.config.batching.max_batch_size,
            max_queue_delay_us=self.config.batching.max_queue_delay_us,
            max_queue_size=self.config.batching.max_queue_size,
        )
        return self

    def close(self) -> None:
        """Stop the background threads and write what the prediction log still holds (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.events is not None:
            self.events.stop()
        self.monitor.stop()
        self.reconciler.stop()
        self.promotions.stop()
        self.shadow.stop()
        self.repository.close()
        self.prediction_log.close()
        self.usage.close()

    # -- the request path ------------------------------------------------------------------------------

    def model(self, tenant: str, name: str) -> ServedModel:
        model = self.repository.get(tenant, name)
        if model is None:
            raise NotFound(f"model {name!r} is not served")
        return model

    def infer(
        self,
        model: ServedModel,
        *,
        version: int | None,
        request_key: str | None,
        make_feeds: Callable[[LoadedVersion], ModelInputs],
    ) -> Inference:
        """Route to a version (pinned, or by the canary weights), build its feeds (or hand over the raw inputs for
        its batcher to prepare), run them batched."""
        for _ in range(PICK_ATTEMPTS):
            loaded = self._pick(model, version, request_key)
            if loaded is None or not loaded.acquire():
                continue  # retired a moment ago: the new state is in place, pick again
            try:
                answer = self._run(model, loaded, make_feeds)
                if isinstance(answer, Answer):
                    return Inference(loaded, answer.outputs, answer.feeds, answer.extras)
                return Inference(loaded, answer)
            except BatcherClosed:
                continue
            finally:
                loaded.release()
        raise ServiceUnavailable(f"model {model.name!r} is being swapped; retry", retry_after=1)

    def _run(
        self, model: ServedModel, loaded: LoadedVersion, make_feeds: Callable[[LoadedVersion], ModelInputs]
    ) -> Feeds | Answer:
        batcher = loaded.batcher
        batcher.announce()
        try:
            inputs = make_feeds(loaded)
        except BaseException:
            batcher.withdraw()
            raise
        try:
            if isinstance(inputs, RawInputs):
                future = batcher.submit_inputs(inputs.values, inputs.prepare, announced=True)
            else:
                future = batcher.submit(inputs, announced=True)
        except QueueFull as exc:
            loaded.observer.queue_rejected()
            raise ServiceUnavailable(
                f"model {model.name!r} is at capacity: its queue is full; retry shortly",
                {"queue_limit": loaded.batching.max_queue_size},
                retry_after=1,
            ) from exc
        try:
            return future.result(timeout=self.config.request_timeout_s)
        except FutureTimeout as exc:
            future.cancel()
            raise ServiceUnavailable(
                f"model {model.name!r} did not answer within {self.config.request_timeout_s:.0f}s", retry_after=1
            ) from exc

    def _pick(self, model: ServedModel, version: int | None, request_key: str | None) -> LoadedVersion | None:
        """The version to run (None: the state changed while picking, pick again); one that is not loaded is the
        repository's to find: NotFound, or a cold start under a memory budget."""
        state = model.state
        routed = version is None
        if version is None:
            if state.routing is None:
                raise ServiceUnavailable(f"model {model.name!r} has no version ready to serve", retry_after=5)
            version = choose_version(state.routing, tenant=model.tenant, model_name=model.name, request_key=request_key)
        loaded = state.versions.get(version)
        if loaded is not None:
            loaded.observer.hit()
            return loaded
        if routed and model.state is not state:
            return None
        return self.repository.lookup(model, version, routed=routed)

    def known_labels(self, tenant: str, name: str, version: int) -> list[str] | None:
        model = self.repository.get(tenant, name)
        if model is None:
            return None
        versions = model.state.versions
        loaded = versions.get(version) or next(iter(versions.values()), None)
        if loaded is not None:
            return loaded.labels
        labels = model.declared(version).get("labels") or model.declared().get("labels")  # none loaded (a budget)
        return list(labels) if labels else None


def current_server() -> InferenceServer:
    return current_app.extensions["inference"]
