"""What to serve, asked of the model registry over HTTP with the internal token.

`GET /v1/internal/serving` lists every model's serving document; `GET /v1/internal/serving/<tenant>/<model>`
answers one (404 when the model has nothing to serve). A document that does not validate is refused loudly.
Both go through the one service-to-service client (timeouts, retried GETs, the trace id as `X-Request-ID`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests
from marshmallow import ValidationError

from services.inference.schemas import ServingDocumentSchema
from shared.client.http import ApiError, ServiceClient
from shared.logging import get_logger

log = get_logger(__name__)

_schema = ServingDocumentSchema()


class RegistryUnavailable(Exception):
    """The registry did not answer, or answered something other than the serving contract."""


class RegistryClient:
    def __init__(self, base_url: str, internal_token: str, timeout: float) -> None:
        self.http = ServiceClient(base_url, internal_token, timeout=timeout)

    @property
    def base_url(self) -> str:
        return self.http.base_url

    def list_serving(self) -> list[dict[str, Any]]:
        body = self._get("/v1/internal/serving")
        if body is None or not isinstance(body.get("models"), list):
            raise RegistryUnavailable("the registry's serving list has no 'models' list")
        documents = []
        for raw in body["models"]:
            document = self._validate(raw)
            if document is not None:
                documents.append(document)
        return documents

    def get_serving(self, tenant: str, model_name: str) -> dict[str, Any] | None:
        """The model's serving document, or None when the registry says it serves nothing (404)."""
        body = self._get(f"/v1/internal/serving/{quote(tenant, safe='')}/{quote(model_name, safe='')}")
        if body is None:
            return None
        document = self._validate(body)
        if document is None:
            raise RegistryUnavailable(f"the registry's serving document for {tenant}/{model_name} is invalid")
        return document

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            body = self.http.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise RegistryUnavailable(f"registry answered {exc.status} for {path}") from exc
        except requests.JSONDecodeError as exc:
            raise RegistryUnavailable(f"registry answered non-JSON for {path}") from exc
        except requests.RequestException as exc:
            raise RegistryUnavailable(f"registry at {self.base_url} does not answer: {exc}") from exc
        if not isinstance(body, dict):  # also a non-JSON answer, which the client hands back as bytes
            raise RegistryUnavailable(f"registry answered a non-object for {path}")
        return body

    @staticmethod
    def _validate(raw: Any) -> dict[str, Any] | None:
        try:
            return _schema.load(raw)
        except ValidationError as exc:
            name = raw.get("model_name") if isinstance(raw, dict) else None
            log.error("serving_document_invalid", model_name=name, errors=exc.normalized_messages())
            return None
