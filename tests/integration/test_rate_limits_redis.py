"""Rate-limit counters in a real Redis (`RedisWindows`, what `LOOM_QUEUE=celery` deployments use): two API
processes' limiters share one count, a refusal adds nothing, windows and tenants are separate, and concurrent
takers never overshoot the limit together (the check-and-add runs on the Redis server)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.rate_limits import RedisWindows
from tests.integration.scaleout import PrivateRedis


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.kill9()


def test_two_processes_limiters_share_one_count(redis_url: str) -> None:
    one, other = RedisWindows(redis_url), RedisWindows(redis_url)
    assert one.take("alice:tokens", 6, 10, 7) == (True, 6)
    assert other.take("alice:tokens", 6, 10, 7) == (False, 6)  # refused: nothing added
    assert other.take("alice:tokens", 4, 10, 7) == (True, 10)
    assert one.take("alice:tokens", 0, 10, 7) == (True, 10)  # a reading
    assert one.take("alice:tokens", 6, 10, 8) == (True, 6)  # the next window
    assert one.take("bob:tokens", 10, 10, 7) == (True, 10)  # another tenant


def test_concurrent_takers_never_overshoot(redis_url: str) -> None:
    limiters = [RedisWindows(redis_url) for _ in range(4)]
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda i: limiters[i % 4].take("alice:requests", 1, 25, 3)[0], range(100)))
    assert taken.count(True) == 25
    assert limiters[0].take("alice:requests", 0, 25, 3) == (True, 25)
