"""HTTP plumbing of the client: one session per service, JSON in and out, errors as `ApiError`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class ApiError(Exception):
    """An API's answer that is not a success, carrying its `{"error": {code, message, details}}` body."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None, url: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.url = url


class ServiceClient:
    """One service's base URL and the credential to call it with (partner key, internal or annotator token)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        # A kept-alive connection the server has just closed surfaces as "remote end closed connection";
        # idempotent requests are safely retried on a fresh one.
        retry = Retry(
            total=3, connect=3, read=2, status=0, backoff_factor=0.2, allowed_methods=IDEMPOTENT, raise_on_status=False
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    def with_token(self, token: str | None) -> ServiceClient:
        return type(self)(self.base_url, token, timeout=self.timeout)

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return headers | (extra or {})

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        url = f"{self.base_url}{path}"
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, url, headers=self._headers(headers), **kwargs)
        if response.status_code >= 400:
            raise _error(response, url)
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.json()
        return response.content

    def stream(self, path: str, **kwargs: Any) -> Iterator[bytes]:
        url = f"{self.base_url}{path}"
        with self.session.get(
            url, headers=self._headers(None), stream=True, timeout=self.timeout, **kwargs
        ) as response:
            if response.status_code >= 400:
                raise _error(response, url)
            yield from response.iter_content(chunk_size=64 * 1024)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


def _error(response: requests.Response, url: str) -> ApiError:
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    return ApiError(
        response.status_code,
        error.get("code", "http_error"),
        error.get("message", response.text[:300] or response.reason),
        error.get("details"),
        url,
    )


def answer_or_none(call: Callable[[], T]) -> T | None:
    """The API's answer, or None when it answers with an error (what is asked for is not there yet)."""
    try:
        return call()
    except ApiError:
        return None


def wait_for(probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy and return that; TimeoutError after `timeout` seconds.

    For steps of the platform that happen asynchronously (an event consumed, a run finished, a version served)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
