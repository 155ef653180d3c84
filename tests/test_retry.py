"""The retry policy: capped exponential backoff with jitter, and Retry-After. Pure."""

from __future__ import annotations

import random

from audience_server.retry import RetryPolicy


def test_retry_policy_backs_off_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=300.0, max_attempts=10)
    rng = random.Random(7)
    for attempt, backoff in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (20, 300)]:
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert backoff / 2 <= min(delays) and max(delays) <= backoff
        assert max(delays) - min(delays) > backoff / 4  # jitter spreads retries out
    assert policy.allows_another(9) and not policy.allows_another(10)


def test_retry_policy_honours_retry_after() -> None:
    policy = RetryPolicy(base=1.0, cap=300.0)
    assert policy.delay(1, retry_after=30) == 30
    assert 8 <= policy.delay(5, retry_after=0) <= 16
    assert policy.delay(1, retry_after=10**9) == 24 * 3600
