"""Retries with exponential backoff and full jitter (AWS Architecture Blog, "Exponential Backoff
and Jitter"): attempt k waits a uniform random time in [0, min(max_delay, base_delay · 2^k)].

Only errors whose class says ``retryable`` are retried: throttling, a model that is not ready, 503,
507 and dropped connections. A 4xx from the container is the request's fault and fails at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import EndpointError

T = TypeVar("T")


@dataclass
class RetryPolicy:
    max_attempts: int = 6  # the first try included
    base_delay: float = 0.1
    max_delay: float = 20.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    random: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return self.random(0.0, min(self.max_delay, self.base_delay * 2**attempt))

    def call(
        self,
        fn: Callable[[], T],
        *,
        retry_if: Callable[[EndpointError], bool] | None = None,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """Run ``fn`` until it succeeds, raises an error not worth retrying, or attempts run out.

        ``retry_if`` narrows which errors are retried (default: those whose class says
        ``retryable``). With ``deadline`` (a ``clock()`` time), a retry whose backoff would end past
        it is not made: the last error is raised at once.
        """
        attempt = 0
        while True:
            try:
                return fn()
            except EndpointError as exc:
                worth = exc.retryable if retry_if is None else retry_if(exc)
                if not worth or attempt + 1 >= self.max_attempts:
                    raise
                pause = self.delay(attempt)
                if deadline is not None and clock() + pause >= deadline:
                    raise
                self.sleep(pause)
                attempt += 1
