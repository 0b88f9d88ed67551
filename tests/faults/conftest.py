"""Fault-suite fixtures: partitions between a service and its dependencies, and a figures line per fault."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.faults.proxy import TcpProxy

pytestmark = pytest.mark.faults


@pytest.fixture
def proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    made: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        made.append(TcpProxy(host, port))
        return made[-1]

    yield make
    for each in made:
        each.close()
