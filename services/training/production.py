"""The version in production, as the registry serves it: asked over HTTP, fetched from object storage, verified.

`GET {REGISTRY_URL}/v1/internal/serving/<tenant>/<model_name>` with the internal token answers the model's
serving document (the contract is in services/registry/serving.py): its aliases and the versions they point at,
each with its artifacts `{bucket, key, sha256, size}` and metadata. 404, or no `production` alias, means nothing
is in production. During a canary the alias's `version` is its stable side, the version production serves.

The production version's files (`model.onnx`, `metadata.json` and the tokenizer files its preprocessing names)
are downloaded one by one; each must hash to the sha256 the registry recorded (and `metadata.json` records)
before anything reads it. Whatever stands in the way of scoring it raises `ProductionUnscorable` with a reason an
operator can act on; the evaluation report keeps it as `production_error` and the run goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from shared.artifacts import ModelMetadata
from shared.client.http import ApiError, ServiceClient
from shared.settings import Settings
from shared.storage import ChecksumMismatch, ObjectNotFound, ObjectStore, StorageError

PRODUCTION_ALIAS = "production"
REGISTRY_TIMEOUT_S = 10.0
GRAPH_FILE = "model.onnx"
METADATA_FILE = "metadata.json"


class ProductionUnscorable(Exception):
    """Production exists (or may) but cannot be scored: the registry did not say, or its artifact is not sound."""


@dataclass(frozen=True)
class ProductionVersion:
    version: int
    run_id: str | None
    model_sha256: str
    folder: Path
    metadata: dict[str, Any]


def serving_document(settings: Settings, tenant: str, model_name: str) -> dict[str, Any] | None:
    """The registry's serving document of the model, or None when it serves nothing (404)."""
    registry = ServiceClient(settings.service_url("registry"), settings.internal_token, timeout=REGISTRY_TIMEOUT_S)
    path = f"/v1/internal/serving/{quote(tenant, safe='')}/{quote(model_name, safe='')}"
    try:
        body = registry.get(path)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise ProductionUnscorable(f"the registry answered {exc.status} {exc.code} for {path}: {exc.message}") from exc
    except requests.RequestException as exc:
        raise ProductionUnscorable(
            f"the registry at {registry.base_url} did not answer ({exc.__class__.__name__}), so the version in "
            "production, if any, was not scored"
        ) from exc
    if not isinstance(body, dict):
        raise ProductionUnscorable(f"the registry answered {path} with something other than a JSON object")
    return body


def fetch_production(
    settings: Settings, storage: ObjectStore, *, tenant: str, model_name: str, task_type: str, folder: Path
) -> ProductionVersion | None:
    """The production version's verified files in `folder`, or None when nothing is in production."""
    document = serving_document(settings, tenant, model_name)
    alias = (document or {}).get("aliases", {}).get(PRODUCTION_ALIAS)
    if document is None or alias is None:
        return None
    number = alias.get("version")
    version = document.get("versions", {}).get(str(number))
    if not isinstance(version, dict) or not isinstance(version.get("artifacts"), dict):
        raise ProductionUnscorable(
            f"the registry's serving document names production version {number} of {model_name} but not its artifacts"
        )
    if document.get("task_type") != task_type:
        raise ProductionUnscorable(
            f"production version {number} is a {document.get('task_type')} model and the candidate a {task_type} "
            "model: they cannot be scored on the same items"
        )
    artifacts: dict[str, dict[str, Any]] = version["artifacts"]
    try:
        metadata = json.loads(_download(storage, artifacts, METADATA_FILE, folder).read_text(encoding="utf-8"))
        needed = [GRAPH_FILE, *(metadata.get("preprocessing") or {}).get("tokenizer_files", [])]
        for name in needed:
            _download(storage, artifacts, name, folder)
            recorded = (metadata.get("files") or {}).get(name, {}).get("sha256")
            if recorded != artifacts[name]["sha256"]:
                raise ProductionUnscorable(
                    f"{name} of production version {number}: its metadata.json records sha256 {recorded}, "
                    f"the registry {artifacts[name]['sha256']}"
                )
    except (ValueError, AttributeError, TypeError) as exc:
        raise ProductionUnscorable(f"metadata.json of production version {number} is not valid: {exc}") from exc
    errors = ModelMetadata().validate(metadata)
    if errors:
        raise ProductionUnscorable(f"metadata.json of production version {number} does not validate: {errors}")
    if metadata["task_type"] != task_type:
        raise ProductionUnscorable(
            f"production version {number}'s metadata.json says it is a {metadata['task_type']} model"
        )
    return ProductionVersion(
        version=int(number),
        run_id=(metadata.get("lineage") or {}).get("run_id"),
        model_sha256=artifacts[GRAPH_FILE]["sha256"],
        folder=folder,
        metadata=metadata,
    )


def _download(storage: ObjectStore, artifacts: dict[str, dict[str, Any]], name: str, folder: Path) -> Path:
    """One artifact into `folder`, once its bytes hash to the sha256 (and size) the registry recorded."""
    ref = artifacts.get(name)
    if ref is None or "/" in name or name.startswith("."):
        raise ProductionUnscorable(f"production's registered artifacts have no {name}")
    where = f"{ref.get('bucket')}/{ref.get('key')}"
    try:
        received = storage.download(ref["bucket"], ref["key"], folder / name)
    except ObjectNotFound as exc:
        raise ProductionUnscorable(f"production's {name} is missing from object storage ({where})") from exc
    except ChecksumMismatch as exc:
        raise ProductionUnscorable(f"production's {name} ({where}) failed its storage integrity check: {exc}") from exc
    except StorageError as exc:
        raise ProductionUnscorable(f"production's {name} ({where}) could not be read: {exc}") from exc
    if received.sha256 != ref.get("sha256"):
        raise ProductionUnscorable(
            f"production's {name} ({where}) hashes to sha256 {received.sha256}, but the registry recorded "
            f"{ref.get('sha256')}: the artifact changed after it was registered, so it was not scored"
        )
    if ref.get("size") is not None and received.size != ref["size"]:
        raise ProductionUnscorable(f"production's {name} is {received.size} bytes; the registry recorded {ref['size']}")
    return folder / name
