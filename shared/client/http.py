"""HTTP plumbing of the client: one session per service, JSON in and out, errors as `ApiError`.

`ServiceClient` is also the one client of every service-to-service call (registry lookups from inference,
partner-key checks, pre-labels from labeling): every call has a timeout, only idempotent calls are retried, and
the trace id bound to the caller's log context leaves as `X-Request-ID`, so the callee logs the same `trace_id`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from shared.logging import TRACE_HEADER, current_trace_id

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
        # A kept-alive connection the server has just closed surfaces as "remote end closed connection";
        # idempotent requests are safely retried on a fresh one. A POST that only looks something up says so
        # (`idempotent=True`) and goes through a second session that retries it the same way.
        self.session = retrying_session(IDEMPOTENT)
        self._lookup_session = retrying_session(None)

    def with_token(self, token: str | None) -> ServiceClient:
        return type(self)(self.base_url, token, timeout=self.timeout)

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        trace_id = current_trace_id()
        if trace_id:
            headers[TRACE_HEADER] = trace_id
        return headers | (extra or {})

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        idempotent: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The answer's JSON (or bytes, or None when empty); `ApiError` for a 4xx or 5xx, `requests`' own
        exceptions when the service cannot be reached. `idempotent=True` marks a POST that is safe to resend."""
        url = f"{self.base_url}{path}"
        kwargs.setdefault("timeout", self.timeout)
        session = self._lookup_session if idempotent else self.session
        response = session.request(method, url, headers=self._headers(headers), **kwargs)
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


def retrying_session(methods: frozenset[str] | None) -> requests.Session:
    """A session that retries failed connections, and reads cut short for `methods` (None: every method)."""
    retry = Retry(
        total=3, connect=3, read=2, status=0, backoff_factor=0.2, allowed_methods=methods, raise_on_status=False
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


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
