"""The shared limiter against a real Redis: a bucket admits its burst, refuses with the wait until its next token,
takes nothing from any bucket when one refuses, refills at its rate; quotas reserve all or nothing; and a Redis
that does not answer lets requests through (fail open) without being asked again for a while."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from shared.errors import RateLimited
from shared.ratelimit import Bucket, QuotaCounter, QuotaExhausted, RateLimiter
from testkit.processes import free_port


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_a_bucket_admits_its_burst_refuses_then_refills(client) -> None:
    limiter = RateLimiter(client, "tests")
    key = Bucket.per_second("key", "k1", rate=2.0)  # burst 4
    tenant = Bucket.per_second("tenant", "t1", rate=100.0)
    for _ in range(4):
        limiter.acquire([key, tenant])
    with pytest.raises(RateLimited) as refused:
        limiter.acquire([key, tenant])
    assert refused.value.details["limit"] == "key" and refused.value.retry_after == 1
    # the refused request took nothing from the tenant's bucket: 100/s, burst 200, 4 taken
    level = float(client.hget("flywheel:ratelimit:tests:tenant:t1", "tokens"))
    assert 195 <= level <= 196.5
    time.sleep(0.6)  # 2 per second: one token again
    limiter.acquire([key])
    with pytest.raises(RateLimited):
        limiter.acquire([key])
    limiter.acquire([Bucket.per_second("key", "k2", rate=0)] * 10)  # 0: no limit, nothing stored
    assert not client.exists("flywheel:ratelimit:tests:key:k2")


def test_quotas_reserve_all_or_nothing_and_release(client) -> None:
    quotas = QuotaCounter(client, "tests")
    quotas.seed("acme", "prediction_rows", 7)
    quotas.seed("acme", "prediction_rows", 0)  # a running counter is kept
    limits = {"prediction_requests": 100, "prediction_rows": 10}
    taken = quotas.reserve("acme", {"prediction_requests": 1, "prediction_rows": 3}, limits)
    assert taken == {"prediction_requests": 1, "prediction_rows": 3}
    with pytest.raises(QuotaExhausted) as exhausted:
        quotas.reserve("acme", {"prediction_requests": 1, "prediction_rows": 1}, limits)
    assert exhausted.value.details == {"meter": "prediction_rows", "limit": 10, "used": 10, "requested": 1}
    assert exhausted.value.code == "quota_exhausted"
    quotas.release("acme", taken)  # the work failed: given back
    assert quotas.reserve("acme", {"prediction_requests": 1, "prediction_rows": 3}, limits)["prediction_rows"] == 3
    # the refused reservation took nothing of prediction_requests either: 1 + 1 reserved, one released
    month = time.strftime("%Y-%m", time.gmtime())
    assert int(client.get(f"flywheel:ratelimit:quota:acme:prediction_requests:{month}")) == 1


def test_an_unreachable_redis_lets_requests_through(logs) -> None:
    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    limiter = RateLimiter(down, "tests")
    tight = Bucket.per_second("key", "k", rate=0.001)
    limiter.acquire([tight])  # asks Redis (and its client's own retries), fails, lets the request through
    started = time.monotonic()
    for _ in range(20):
        limiter.acquire([tight])
    assert time.monotonic() - started < 0.5  # not asked again while the breaker is open
    assert len(logs.find(event="ratelimit_unavailable")) == 1
    assert QuotaCounter(down, "tests").reserve("acme", {"prediction_rows": 5}, {"prediction_rows": 1}) == {}


def evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_busy_replica_takes_leases_and_spends_them_locally(client) -> None:
    limiter = RateLimiter(client, "tests")
    busy = Bucket.per_second("key", "busy", rate=1000.0)  # leases of up to 50 ms of it: 50 tokens
    key = "flywheel:ratelimit:tests:key:busy"
    before = evalsha_calls(client)
    for _ in range(300):
        limiter.acquire([busy])
    calls = evalsha_calls(client) - before
    assert calls < 20  # leases of 1, 2, 4 ... 50 tokens, not a round trip per request
    taken = 2000 - float(client.hget(key, "tokens"))  # the burst, less what was taken (refill aside)
    assert taken <= 300 + 50  # at most one lease ahead of the requests
    tight = Bucket.per_second("key", "tight", rate=1.0)  # a lease of one token: every request asks Redis
    before = evalsha_calls(client)
    limiter.acquire([tight])
    limiter.acquire([tight])
    with pytest.raises(RateLimited):
        limiter.acquire([tight])
    assert evalsha_calls(client) - before == 3


def test_request_threads_share_one_lease_and_lose_no_tokens(client) -> None:
    """32 threads, as one busy replica runs them: under the limit, none is refused, the tokens taken are the
    requests' own plus one lease, and the lease is asked for once at a time, not by every thread that found it
    spent (which took one lease per thread and dropped all but the last: 429s well under the limit)."""
    limiter = RateLimiter(client, "tests")
    bucket = Bucket.per_second("key", "threads", rate=200.0)  # burst 400, leases of up to 10 tokens
    key = "flywheel:ratelimit:tests:key:threads"
    refused: list[RateLimited] = []
    start = threading.Barrier(32)

    def requests() -> None:
        start.wait()
        for _ in range(10):
            try:
                limiter.acquire([bucket])
            except RateLimited as exc:
                refused.append(exc)

    before = evalsha_calls(client)
    threads = [threading.Thread(target=requests) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []
    taken = 400 - float(client.hget(key, "tokens"))  # refill over the run aside
    assert taken <= 320 + 10
    assert evalsha_calls(client) - before <= 320 // 2
