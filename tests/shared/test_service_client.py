"""The one client of service-to-service calls: the caller's trace id goes out as X-Request-ID, and only
idempotent calls are sent again when a connection drops before the answer."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from shared.client import ServiceClient
from shared.logging import log_context


@dataclass
class Received:
    method: str
    headers: dict[str, str]


@dataclass
class FlakyServer:
    """Answers `{"ok": true}`, after dropping the first `drops` connections without a word (a kept-alive
    connection the server had closed, as the client sees it)."""

    drops: int = 0
    received: list[Received] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    state = FlakyServer()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            method = self.rfile.readline().decode().split(" ")[0]
            headers = {}
            while (line := self.rfile.readline().decode().strip()) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.rfile.read(int(headers.get("content-length", 0)))
            state.received.append(Received(method, headers))
            if state.drops:
                state.drops -= 1
                return  # close without answering
            body = json.dumps({"ok": True}).encode()
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_the_bound_trace_id_goes_out_as_x_request_id(flaky: FlakyServer) -> None:
    client = ServiceClient(flaky.url, "token")
    with log_context(trace_id="trace-of-the-caller"):
        assert client.get("/thing") == {"ok": True}
    assert client.post("/thing", headers={"X-Request-ID": "explicit"}) == {"ok": True}
    client.get("/thing")
    first, explicit, unbound = flaky.received
    assert first.headers["x-request-id"] == "trace-of-the-caller" and first.headers["authorization"] == "Bearer token"
    assert explicit.headers["x-request-id"] == "explicit", "a header the caller sets wins"
    assert "x-request-id" not in unbound.headers, "no trace bound, none invented"


def test_only_idempotent_calls_are_sent_again_after_a_dropped_connection(flaky: FlakyServer) -> None:
    client = ServiceClient(flaky.url, timeout=5)
    flaky.drops = 1
    assert client.get("/thing") == {"ok": True}
    assert [r.method for r in flaky.received] == ["GET", "GET"]

    flaky.received.clear()
    flaky.drops = 1
    with pytest.raises(requests.ConnectionError):
        client.post("/thing", json={"create": 1})
    assert [r.method for r in flaky.received] == ["POST"], "a POST is never sent twice"

    flaky.received.clear()
    flaky.drops = 1
    assert client.post("/lookup", json={"key_hash": "x"}, idempotent=True) == {"ok": True}
    assert [r.method for r in flaky.received] == ["POST", "POST"], "a lookup marked idempotent is"
