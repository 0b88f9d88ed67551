"""Canary routing: which version of a model answers a request, by the served alias's weights.

The `production` alias names a version and, during a canary, weights such as `{"3": 90, "4": 10}` (percent;
any positive total is normalised). Without weights every request goes to the alias's version. A request that
carries a request key is routed by a hash of (tenant, model, key), so one caller keeps seeing one version for
as long as the weights stay; without a key the draw is random per request.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Routing:
    version: int
    weights: tuple[tuple[int, int], ...] = ()
    """(version, weight) pairs sorted by version, weight > 0; empty means all traffic to `version`."""

    @classmethod
    def from_alias(cls, alias: dict) -> Routing | None:
        version = alias.get("version")
        if version is None:
            return None
        weights = tuple(sorted((int(v), int(w)) for v, w in (alias.get("weights") or {}).items() if int(w) > 0))
        if len(weights) == 1 and weights[0][0] == int(version):
            weights = ()  # all traffic on the alias's own version: no split
        return cls(version=int(version), weights=weights)

    @property
    def versions(self) -> set[int]:
        return {self.version} | {version for version, _ in self.weights}

    def describe(self) -> dict:
        if not self.weights:
            return {"version": self.version, "weights": {str(self.version): 100}}
        return {"version": self.version, "weights": {str(v): w for v, w in self.weights}}


def choose_version(routing: Routing, *, tenant: str, model_name: str, request_key: str | None) -> int:
    if not routing.weights:
        return routing.version
    total = sum(weight for _, weight in routing.weights)
    if request_key:
        digest = hashlib.sha256(f"{tenant}\x00{model_name}\x00{request_key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
    else:
        point = random.random() * total  # noqa: S311 - traffic split, not security
    cumulative = 0
    for version, weight in routing.weights:
        cumulative += weight
        if point < cumulative:
            return version
    return routing.weights[-1][0]
