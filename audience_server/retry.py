"""When to try a failed delivery again: capped exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_RETRY_AFTER = 24 * 3600.0  # a platform asking for more than a day is not taken literally


@dataclass(frozen=True)
class RetryPolicy:
    """``base`` seconds doubling per attempt up to ``cap``; ``max_attempts`` in all."""

    base: float = 1.0
    cap: float = 300.0
    max_attempts: int = 10

    def allows_another(self, attempts: int) -> bool:
        return attempts < self.max_attempts

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds before the attempt after ``attempt`` (1-based): half the backoff plus a
        random half, and never sooner than the destination's ``Retry-After``."""
        backoff = min(self.cap, self.base * 2.0 ** (attempt - 1))
        wait = backoff / 2 + (rng or random).uniform(0, backoff / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return wait
