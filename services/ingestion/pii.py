"""PII redaction for the text items ingestion stores (pushes and imports of a dataset whose `pii_policy` is
`redact`): the detector lives in `shared.pii`, because inference applies the same policy to the predictions it
logs. Presidio's pattern recognizers by default; the regexes ingestion used before remain as `detector="regex"`.

A dataset's `pii_entities` names a token-classification model of the tenant's and its labels that are PII: the
texts of a batch (a push, or an import's batch) are sent to inference's `:predict` acting for the tenant, 64 a
call, and the entities found are redacted with the patterns (`shared.pii.redact(..., entities=...)`). Fail closed:
when the model cannot answer (inference unreachable, the model not served or without a production version
loaded), the batch is refused whole with 503 and `Retry-After`; nothing of it is stored, so no text the policy
says to redact is kept unscanned. An import stops `failed` with that error after the batches it had committed.

The labels are checked against the model when the registry knows it (`check_entity_labels`, on create and update):
a label its production version does not predict, or a model that is not a token model, is a 422 naming the field.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from shared.client.http import ApiError, ServiceClient
from shared.errors import ServiceUnavailable, Unprocessable
from shared.logging import get_logger
from shared.pii import Redaction, iban_valid, luhn_valid, redact, redact_with_regexes
from shared.pii_policy import RETRY_AFTER_S, EntitiesUnavailable, EntityFinder, EntityPolicy
from shared.runtime import Runtime

__all__ = [
    "Redaction",
    "check_entity_labels",
    "iban_valid",
    "luhn_valid",
    "redact",
    "redact_with_entities",
    "redact_with_regexes",
]

log = get_logger(__name__)

REGISTRY_TIMEOUT_S = 5.0


def finder(runtime: Runtime) -> EntityFinder:
    """The runtime's client of inference for the tenants' PII models, made on first use."""
    found = getattr(runtime, "pii_entity_finder", None)
    if found is None:
        found = runtime.pii_entity_finder = EntityFinder(  # type: ignore[attr-defined]
            runtime.settings.inference_url, runtime.settings.internal_token
        )
    return found


def redact_with_entities(runtime: Runtime, tenant: str, setting: dict[str, Any], texts: list[str]) -> list[Redaction]:
    """The texts redacted by the patterns and the entities the tenant's model finds; `ServiceUnavailable` (503,
    Retry-After) when the model cannot answer."""
    policy = EntityPolicy.of(setting)
    assert policy is not None
    try:
        found = finder(runtime).find(tenant, policy, texts)
    except EntitiesUnavailable as exc:
        log.warning("pii_model_unavailable", model_name=policy.model, reason=exc.reason, error=str(exc)[:300])
        raise ServiceUnavailable(
            f"the dataset's PII policy needs model {policy.model!r} to scan the text, and it cannot now "
            f"({exc.reason}); nothing was stored: retry later",
            {"pii_entities": {"model": policy.model, "reason": exc.reason}},
            retry_after=RETRY_AFTER_S,
        ) from exc
    redactions = [redact(text, entities=entities) for text, entities in zip(texts, found, strict=True)]
    removed: dict[str, int] = {}
    for redaction in redactions:
        for kind, count in redaction.counts.items():
            removed[kind] = removed.get(kind, 0) + count
    log.info("pii_model_scanned", model_name=policy.model, texts=len(texts), redactions=removed)
    return redactions


def check_entity_labels(runtime: Runtime, tenant: str, setting: dict[str, Any] | None) -> None:
    """422 naming `pii_entities.<field>` when the registry knows the model and it does not fit: not a token model,
    or labels its production version does not predict. A model the registry does not (yet) know, or a registry
    that cannot answer, leaves the labels unchecked: the pushes then fail closed until the model serves."""
    if not setting or not runtime.settings.registry_url:
        return
    model = setting["model"]
    registry = ServiceClient(runtime.settings.registry_url, runtime.settings.internal_token, timeout=REGISTRY_TIMEOUT_S)
    path = f"/v1/models/{quote(model, safe='')}"
    try:
        described = registry.get(path, params={"tenant": tenant})
        production = (described.get("aliases") or {}).get("production")
        version = (
            registry.get(f"{path}/versions/{production['version']}", params={"tenant": tenant}) if production else None
        )
    except (ApiError, OSError, ValueError) as exc:
        log.info("pii_model_unchecked", model_name=model, error=str(exc)[:200])
        return
    if described.get("task_type") != "token_classification":
        raise Unprocessable(
            "pii_entities: the model is not a token_classification model",
            {"fields": {"pii_entities": {"model": [f"{model!r} is a {described.get('task_type')} model"]}}},
        )
    if version is None:
        return
    unknown = sorted(set(setting["labels"]) - set(version.get("labels") or []))
    if unknown:
        raise Unprocessable(
            "pii_entities: labels the model does not predict",
            {"fields": {"pii_entities": {"labels": [f"not labels of {model!r}: {unknown}"]}}},
        )
