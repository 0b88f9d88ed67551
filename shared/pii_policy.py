"""The PII policy of a tenant's dataset, for the services that store text of it but do not own datasets: inference
(the prediction log's copy of `:predict` inputs) and labeling (the text of feedback tasks).

Ingestion owns datasets and their `pii_policy`; the other services ask it (`GET /v1/datasets/{id}` with the
internal token acting for the tenant) and keep each answer for `KEY_CACHE_SECONDS` (like the key cache), so a
policy turned on reaches them within that time. Of two answers for one dataset the cache keeps the one of the newer
`revision`, whichever came back last. Labeling, which consumes `dataset.changed` (it carries the policy), keeps the
newest policy on its own dataset row and asks here only while no event has carried one; it passes the row's rule to
`apply_many(rule=...)`. Never asked on a request's path: inference asks on its prediction log's writer thread,
labeling in its event consumer.

Fail closed: when ingestion cannot answer (down, timing out), the text is redacted, and the unknown answer is
cached only briefly (`UNKNOWN_TTL_S`), so a policy that is on is never skipped. A dataset ingestion does not know
(404: a model registered from outside the platform) has no policy, and its text is stored as sent.

A policy may also name a token-classification model of the tenant's and which of its entity labels are PII
(`pii_entities: {"model": "people-tagger", "labels": ["PER", "LOC"]}`, used while `pii_policy` is `redact`): the
entities its production version finds are replaced too (`shared.pii.redact(..., entities=...)`). They are asked of
inference's `:predict` for the tenant over HTTP (`EntityFinder`, the internal token acting for the tenant, 64 texts
a call; such predictions are neither logged nor billed). When that model cannot answer (inference unreachable, the
model not served, no production version loaded), `EntitiesUnavailable` is raised: each caller fails closed its own
way (ingestion refuses the push with 503 and Retry-After; the prediction log stores the text withheld; labeling's
consumer retries, then dead-letters the event, replayable). While ingestion cannot say what the policy is, only the
patterns apply (the model the policy might name is unknown).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cachetools import TTLCache

from shared.auth import TENANT_HEADER
from shared.client.http import ApiError, ServiceClient
from shared.logging import get_logger
from shared.pii import Detection, Redaction, redact
from shared.settings import Settings

log = get_logger(__name__)

UNKNOWN_TTL_S = 5.0
ENTITY_BATCH = 64
"""Texts per `:predict` call: inference's default instance limit per request."""
ENTITY_TIMEOUT_S = 30.0
RETRY_AFTER_S = 30
"""What a caller refused for want of the model is told to wait: a version loading, or inference restarting."""


@dataclass(frozen=True)
class EntityPolicy:
    """The tenant's token model whose entities of these labels are PII."""

    model: str
    labels: tuple[str, ...]

    @classmethod
    def of(cls, setting: dict[str, Any] | None) -> EntityPolicy | None:
        """From a dataset's `pii_entities` (None: the policy names no model)."""
        if not setting:
            return None
        return cls(setting["model"], tuple(setting["labels"]))


@dataclass(frozen=True)
class PiiRule:
    """What a dataset's policy asks of the text stored: redact or not, and with which tenant model's entities."""

    redact: bool
    entities: EntityPolicy | None = None

    @classmethod
    def of(cls, pii_policy: str | None, pii_entities: dict[str, Any] | None) -> PiiRule:
        """From a dataset's `pii_policy` and `pii_entities`."""
        return cls(redact=True, entities=EntityPolicy.of(pii_entities)) if pii_policy == "redact" else OFF


OFF = PiiRule(redact=False)
PATTERNS_ONLY = PiiRule(redact=True)


class EntitiesUnavailable(Exception):
    """The policy's model could not scan the texts; `reason`: `unreachable`, `not_served`, `refused`."""

    def __init__(self, model: str, reason: str, message: str) -> None:
        super().__init__(f"the PII model {model!r} could not scan the text ({reason}): {message}")
        self.model = model
        self.reason = reason


class EntityFinder:
    """The PII entities a tenant's token model finds, asked of inference's `:predict` acting for the tenant."""

    def __init__(self, inference_url: str, token: str, *, timeout: float = ENTITY_TIMEOUT_S) -> None:
        self.client = ServiceClient(inference_url, token, timeout=timeout) if inference_url else None

    def find(self, tenant: str, policy: EntityPolicy, texts: Sequence[str]) -> list[list[Detection]]:
        """Per text, the entities of the policy's labels; `EntitiesUnavailable` when the model cannot answer."""
        if self.client is None:
            raise EntitiesUnavailable(policy.model, "unreachable", "no inference URL is configured")
        path = f"/v1/models/{quote(policy.model, safe='')}:predict"
        found: list[list[Detection]] = []
        for start in range(0, len(texts), ENTITY_BATCH):
            chunk = list(texts[start : start + ENTITY_BATCH])
            try:
                answer = self.client.post(path, json={"texts": chunk}, headers={TENANT_HEADER: tenant}, idempotent=True)
            except ApiError as exc:
                reason = "not_served" if exc.status in (404, 503) else "refused"
                raise EntitiesUnavailable(policy.model, reason, f"{exc.status} {exc.message[:200]}") from exc
            except Exception as exc:  # unreachable, timing out
                raise EntitiesUnavailable(policy.model, "unreachable", str(exc)[:200]) from exc
            predictions = answer.get("predictions") if isinstance(answer, dict) else None
            if not isinstance(predictions, list) or len(predictions) != len(chunk):
                raise EntitiesUnavailable(policy.model, "refused", "the answer holds no entities per text")
            for prediction in predictions:
                entities = prediction.get("entities")
                if entities is None:
                    raise EntitiesUnavailable(policy.model, "refused", "not a token-classification model")
                found.append(pii_entities(policy, entities))
        return found


def pii_entities(policy: EntityPolicy, entities: Sequence[dict[str, Any]]) -> list[Detection]:
    """The entities (`{start, end, label, ...}`) of the policy's labels, as detections."""
    return [(e["start"], e["end"], e["label"]) for e in entities if e["label"] in policy.labels]


class PiiPolicies:
    def __init__(self, settings: Settings, finder: EntityFinder | None = None) -> None:
        self.client = ServiceClient(settings.ingestion_url, settings.internal_token, timeout=2.0)
        self.finder = finder or EntityFinder(settings.inference_url, settings.internal_token)
        ttl = max(1.0, settings.key_cache_seconds)
        self._known: TTLCache[tuple[str, str], tuple[int, PiiRule]] = TTLCache(maxsize=100_000, ttl=ttl)
        """(revision, rule): ingestion's answer, the revision it was of (0 for a 404, or an answer without one)."""
        self._unknown: TTLCache[tuple[str, str], PiiRule] = TTLCache(maxsize=10_000, ttl=UNKNOWN_TTL_S)
        self._lock = threading.Lock()

    def rule(self, tenant: str, dataset_id: str) -> PiiRule:
        """The dataset's rule (patterns only, redacting, while ingestion cannot say)."""
        key = (tenant, dataset_id)
        with self._lock:
            known = self._known.get(key)
            found = known[1] if known is not None else self._unknown.get(key)
        if found is not None:
            return found
        try:
            body = self.client.get(f"/v1/datasets/{dataset_id}", headers={TENANT_HEADER: tenant})
            found = PiiRule.of(body.get("pii_policy"), body.get("pii_entities"))
            revision = int(body.get("revision") or 0)
        except ApiError as exc:
            if exc.status != 404:
                return self._unknown_policy(key, exc)
            revision, found = 0, OFF
        except Exception as exc:  # ingestion unreachable: fail closed
            return self._unknown_policy(key, exc)
        with self._lock:
            held = self._known.get(key)
            if held is not None and held[0] > revision:  # a newer answer came back while this one was on its way
                return held[1]
            self._known[key] = (revision, found)
        return found

    def _unknown_policy(self, key: tuple[str, str], exc: Exception) -> PiiRule:
        log.warning("pii_policy_unavailable", tenant=key[0], dataset_id=key[1], error=str(exc)[:200])
        with self._lock:
            self._unknown[key] = PATTERNS_ONLY
        return PATTERNS_ONLY

    def apply_many(
        self,
        tenant: str,
        dataset_id: str,
        texts: Sequence[str],
        *,
        served: tuple[str, Sequence[Sequence[dict[str, Any]]]] | None = None,
        rule: PiiRule | None = None,
    ) -> list[Redaction]:
        """The texts to store: redacted when the dataset's policy says so (or ingestion cannot say), the policy's
        model asked once per 64; `EntitiesUnavailable` when that model cannot scan them. `served`: a token model's
        name and the entities it already found in these very texts (inference's own answers), used when the policy
        names it. `rule`: the dataset's rule where the caller knows it (labeling's row), else asked of ingestion."""
        rule = rule or self.rule(tenant, dataset_id)
        if not rule.redact:
            return [Redaction(text=text) for text in texts]
        if rule.entities is None:
            return [redact(text) for text in texts]
        if served is not None and served[0] == rule.entities.model:
            found = [pii_entities(rule.entities, entities) for entities in served[1]]
        else:
            found = self.finder.find(tenant, rule.entities, texts)
        return [redact(text, entities=entities) for text, entities in zip(texts, found, strict=True)]
