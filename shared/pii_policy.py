"""The PII policy of a tenant's dataset, for the services that store text of it but do not own datasets: inference
(the prediction log's copy of `:predict` inputs) and labeling (the text of feedback tasks).

Ingestion owns datasets and their `pii_policy`; the other services ask it (`GET /v1/datasets/{id}` with the
internal token acting for the tenant) and keep each answer for `KEY_CACHE_SECONDS` (like the key cache), so a
policy turned on reaches them within that time. Never asked on a request's path: inference asks on its prediction
log's writer thread, labeling in its event consumer.

Fail closed: when ingestion cannot answer (down, timing out), the text is redacted, and the unknown answer is
cached only briefly (`UNKNOWN_TTL_S`), so a policy that is on is never skipped. A dataset ingestion does not know
(404: a model registered from outside the platform) has no policy, and its text is stored as sent.
"""

from __future__ import annotations

import threading

from cachetools import TTLCache

from shared.auth import TENANT_HEADER
from shared.client.http import ApiError, ServiceClient
from shared.logging import get_logger
from shared.pii import Redaction, redact
from shared.settings import Settings

log = get_logger(__name__)

UNKNOWN_TTL_S = 5.0


class PiiPolicies:
    def __init__(self, settings: Settings) -> None:
        self.client = ServiceClient(settings.ingestion_url, settings.internal_token, timeout=2.0)
        ttl = max(1.0, settings.key_cache_seconds)
        self._known: TTLCache[tuple[str, str], str] = TTLCache(maxsize=100_000, ttl=ttl)
        self._unknown: TTLCache[tuple[str, str], str] = TTLCache(maxsize=10_000, ttl=UNKNOWN_TTL_S)
        self._lock = threading.Lock()

    def policy(self, tenant: str, dataset_id: str) -> str:
        """`redact` or `off` for the tenant's dataset (`redact` while ingestion cannot say)."""
        key = (tenant, dataset_id)
        with self._lock:
            found = self._known.get(key) or self._unknown.get(key)
        if found is not None:
            return found
        try:
            body = self.client.get(f"/v1/datasets/{dataset_id}", headers={TENANT_HEADER: tenant})
            found = "redact" if body.get("pii_policy") == "redact" else "off"
            cache = self._known
        except ApiError as exc:
            if exc.status != 404:
                return self._unknown_policy(key, exc)
            found, cache = "off", self._known
        except Exception as exc:  # ingestion unreachable: fail closed
            return self._unknown_policy(key, exc)
        with self._lock:
            cache[key] = found
        return found

    def _unknown_policy(self, key: tuple[str, str], exc: Exception) -> str:
        log.warning("pii_policy_unavailable", tenant=key[0], dataset_id=key[1], error=str(exc)[:200])
        with self._lock:
            self._unknown[key] = "redact"
        return "redact"

    def apply(self, tenant: str, dataset_id: str, text: str) -> Redaction:
        """The text to store: redacted when the dataset's policy says so (or ingestion cannot say)."""
        if self.policy(tenant, dataset_id) != "redact":
            return Redaction(text=text)
        return redact(text)
