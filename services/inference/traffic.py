"""What a production request feeds besides its answer: a sample to labeling, a mirror to a shadow version, and
the input statistics drift watches. None of it changes the request; the sampling draw and the statistics run
on the prediction log's writer thread (numpy over each request's feeds), so the request pays only its append.

**Sampling to labeling** (`sample_rate` of the model's policy): each logged prediction is picked with
probability `sample_rate * w / mean(w)`, where `w = 0.5 + (1 - confidence) / (1 - 1/k)` (k classes) lies
between 0.5 (certain) and 1.5 (as unsure as can be) and `mean(w)` is a running mean of recent predictions: on
average `sample_rate` of the traffic goes, the least confident three times as often as the most confident, and
no prediction is never a candidate (which would blind live accuracy to the confident mistakes); a rate of 1
sends every prediction. Picked
predictions travel with the log's next flush as `prediction.sampled`, tagged with their version.

**Shadow traffic** (`shadow_version`, `shadow_rate`): a sampled share of requests is handed, after its answer
is computed, to one background thread that runs the same inputs through the shadow version (its own
preprocessing and batcher) and logs its answers beside the production prediction (`shadow_predictions`).
The hand-off is a non-blocking put on a bounded queue (`shadow_queue_size`): when the queue is full the mirror
is shed and counted, never waited for. A shadow version that fails, or is not loaded, is counted and logged;
the request it mirrors has already been answered.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from services.inference.batcher import Feeds
from services.inference.metrics import InferenceMetrics
from services.inference.prediction_log import PredictionLog, ShadowAnswer
from services.inference.preprocess import classify
from services.inference.repository import ServedModel
from shared.logging import get_logger

log = get_logger(__name__)

EWMA = 0.01
SHADOW_TIMEOUT_S = 30.0


class Sampler:
    """Picks production predictions for labeling, weighted to low confidence (see the module's docstring).

    Called by the prediction log's writer thread only, once per buffered request: the draws of a request use
    the running mean as it stood before it, then the mean moves over the request's weights."""

    def __init__(self, rng: np.random.Generator | None = None) -> None:
        self._mean_weight: dict[tuple[str, str], float] = {}
        self._rng = rng or np.random.default_rng()

    def pick(self, key: tuple[str, str], rate: float, confidences: list[float], classes: int) -> list[bool]:
        if rate <= 0:
            return [False] * len(confidences)
        if rate >= 1:  # every prediction: weighting can only lower a certain one's chance below 1
            return [True] * len(confidences)
        floor = 1.0 / max(2, classes)
        weights = 0.5 + (1.0 - np.asarray(confidences, dtype=np.float64)) / (1.0 - floor)
        mean = self._mean_weight.get(key, 1.0)
        picks = self._rng.random(weights.size) < np.minimum(1.0, rate * weights / mean)
        decay = (1.0 - EWMA) ** np.arange(weights.size - 1, -1, -1)  # the EWMA over the weights, in closed form
        self._mean_weight[key] = float((1.0 - EWMA) ** weights.size * mean + (EWMA * decay * weights).sum())
        return picks.tolist()


@dataclass
class ShadowJob:
    model: ServedModel
    version: int
    inputs: list[Any]
    prediction_ids: list[str]


class ShadowRunner:
    def __init__(self, prediction_log: PredictionLog, metrics: InferenceMetrics, queue_size: int) -> None:
        self.prediction_log = prediction_log
        self.metrics = metrics
        self._queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None

    def offer(self, job: ShadowJob) -> bool:
        """Hand a request to the shadow thread without waiting; False (counted) when it is busy."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(job, "shed")
            return False
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-shadow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        self._thread.join(5)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.run(job)

    def run(self, job: ShadowJob) -> None:
        started = time.perf_counter()
        model = job.model
        try:
            answers = self._answers(job)
        except Exception as exc:  # whatever the shadow does, the request it mirrors has its answer already
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            answers = [
                ShadowAnswer(pid, model.tenant, model.name, job.version, None, None, None, error)
                for pid in job.prediction_ids
            ]
            self._count(job, "failed")
            log.warning(
                "shadow_prediction_failed", tenant=model.tenant, model_name=model.name, version=job.version, error=error
            )
        else:
            elapsed = round((time.perf_counter() - started) * 1000, 3)
            for answer in answers:
                answer.latency_ms = elapsed
            self._count(job, "answered")
        self.prediction_log.record_shadow(answers)

    def _answers(self, job: ShadowJob) -> list[ShadowAnswer]:
        model = job.model
        loaded = model.state.versions.get(job.version)
        if loaded is None or not loaded.acquire():
            raise LookupError(f"shadow version {job.version} is not loaded")
        try:
            feeds = loaded.preprocessor(job.inputs)
            outputs = loaded.batcher.submit(feeds).result(timeout=SHADOW_TIMEOUT_S)
        finally:
            loaded.release()
        return [
            ShadowAnswer(pid, model.tenant, model.name, job.version, c.label, c.confidence, None)
            for pid, c in zip(job.prediction_ids, classify(outputs["logits"], loaded.labels), strict=True)
        ]

    def _count(self, job: ShadowJob, outcome: str) -> None:
        self.metrics.shadow_requests.labels(job.model.tenant, job.model.name, str(job.version), outcome).inc()


def input_stats(preprocessor: Any, inputs: list[Any], feeds: Feeds | None) -> list[dict[str, Any] | None]:
    """Per input: text `chars`, `tokens`, `unknown_rate`; image `width`, `height`, `brightness` (0..1). Runs on
    the prediction log's writer thread, over the feeds the request built anyway (None: no statistics)."""
    if feeds is None:
        return [None] * len(inputs)
    if preprocessor.kind == "text":
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        unknown = preprocessor.tokenizer.token_to_id("[UNK]")
        tokens = mask.sum(axis=1)
        unknowns = ((ids == unknown) & (mask > 0)).sum(axis=1) if unknown is not None else np.zeros(len(inputs))
        rates = np.round(np.divide(unknowns, tokens, out=np.zeros(len(inputs)), where=tokens > 0), 6)
        return [
            {"chars": len(text), "tokens": n, "unknown_rate": rate}
            for text, n, rate in zip(inputs, tokens.tolist(), rates.tolist(), strict=True)
        ]
    pixels = feeds[preprocessor.input.name].astype(np.float32) * preprocessor.std + preprocessor.mean
    brightness = np.round(pixels.reshape(len(inputs), -1).mean(axis=1), 6).tolist()
    stats: list[dict[str, Any] | None] = []
    for data, level in zip(inputs, brightness, strict=True):
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
        except Exception:
            width = height = None
        stats.append({"width": width, "height": height, "brightness": level})
    return stats
