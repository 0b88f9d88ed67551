"""What an inference server reads and says: model versions in object storage, the registry's serving documents
from a stand-in on a real socket, and its Prometheus `/metrics`.

- ``upload_version`` puts a model folder into the `models` bucket as one version; ``serving_document`` is the
  registry's document for a model (its aliases and versions);
- ``RegistryStandIn`` speaks the registry's serving contract (`/v1/internal/serving…`) and, for keys it was
  told about, ingestion's key check (`/v1/internal/keys/verify`): what an inference server calls, and nothing
  else; tests change what it serves, or make it unavailable;
- ``metric_samples`` reads the samples of one metric from a `/metrics` page.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

from shared.auth import hash_api_key
from shared.storage import ObjectStore
from testkit.models import file_digest
from testkit.wsgi import serve


def upload_version(
    store: ObjectStore,
    tenant: str,
    folder: Path,
    version: int,
    *,
    replace_bytes: dict[str, bytes] | None = None,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload a model folder as one version; `replace_bytes` stores other bytes than the recorded sha256 says."""
    metadata = json.loads((folder / "metadata.json").read_text())
    prefix = f"{tenant}/{metadata['model_name']}/runs/run-{version}-{uuid.uuid4().hex[:6]}"
    artifacts = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        key = f"{prefix}/{path.name}"
        store.put("models", key, (replace_bytes or {}).get(path.name, data))
        artifacts[path.name] = {"bucket": "models", "key": key, **file_digest(data)}
    return {"version": version, "artifacts": artifacts, "metadata": {"serving": serving or {}}, "status": "ready"}


def serving_document(
    tenant: str,
    folder: Path,
    versions: dict[int, dict[str, Any]],
    production: int,
    weights: dict[int, int] | None = None,
    **aliases: int,
) -> dict[str, Any]:
    """The registry's serving document of the model in `folder`: `production` (split by `weights`, a canary)
    and any other `aliases`, over the uploaded `versions`."""
    metadata = json.loads((folder / "metadata.json").read_text())
    return {
        "tenant": tenant,
        "model_name": metadata["model_name"],
        "dataset_id": f"ds_{metadata['model_name']}",
        "task_type": metadata["task_type"],
        "aliases": {
            "production": {"version": production, "weights": {str(v): w for v, w in (weights or {}).items()}},
            **{alias: {"version": v, "weights": {}} for alias, v in aliases.items()},
        },
        "versions": {str(v): doc for v, doc in versions.items()},
    }


@dataclass
class RegistryStandIn:
    """Speaks the registry's serving contract over a real socket, to callers holding the internal `token`."""

    token: str
    documents: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    available: bool = True
    requests: int = 0
    url: str = ""
    stop: Callable[[], None] = lambda: None
    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # API key hash -> principal
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, document: dict[str, Any]) -> None:
        with self._lock:
            self.documents[(document["tenant"], document["model_name"])] = document

    def withdraw(self, tenant: str, model_name: str) -> None:
        with self._lock:
            self.documents.pop((tenant, model_name), None)

    def accept_key(self, api_key: str, *, tenant: str, key_id: str) -> None:
        """Answer ingestion's key check for `api_key` (a server that verifies keys through this stand-in)."""
        self.keys[hash_api_key(api_key)] = {"tenant": tenant, "key_id": key_id}

    def app(self) -> Flask:
        app = Flask("registry-stand-in")

        def unauthorized() -> tuple[Any, int] | None:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return jsonify(error={"code": "unauthorized"}), 401
            return None

        def guard() -> tuple[Any, int] | None:
            self.requests += 1
            refused = unauthorized()
            if refused is None and not self.available:
                refused = jsonify(error={"code": "unavailable"}), 503
            return refused

        @app.get("/v1/internal/serving")
        def serving_list() -> Any:
            answer = guard()
            with self._lock:
                return answer or jsonify(models=list(self.documents.values()))

        @app.get("/v1/internal/serving/<tenant>/<model_name>")
        def serving_one(tenant: str, model_name: str) -> Any:
            answer = guard()
            if answer:
                return answer
            with self._lock:
                document = self.documents.get((tenant, model_name))
            return jsonify(document) if document else (jsonify(error={"code": "not_found"}), 404)

        @app.post("/v1/internal/keys/verify")
        def verify_key() -> Any:
            refused = unauthorized()
            if refused:
                return refused
            principal = self.keys.get(request.get_json()["key_hash"])
            return jsonify(principal) if principal else (jsonify(error={"code": "not_found"}), 404)

        return app

    def start(self) -> RegistryStandIn:
        self.url, self.stop = serve(self.app())
        return self


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in a Prometheus text page: (labels, value) pairs."""
    samples = []
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
            samples.append((labels, float(match.group(2))))
    return samples
