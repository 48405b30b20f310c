"""Token buckets per client address, in the worker's memory (the chat demo's posts).

Design choices:
- In process, not in Redis or the database: the demo is the only user, and a
  limit that costs a round trip per post would be worth more than the demo.
  Each gunicorn worker keeps its own buckets, so a client gets at most
  ``workers`` times the rate; that bounds a flood, which is all it is for.
- The number of buckets is bounded (``MAX_KEYS``): past it the least recently
  used one is forgotten, so a flood from many addresses cannot grow the worker.
  A forgotten key starts again with a full bucket, which is the same as a new
  client.
- Thread-safe: Django runs sync views in a thread pool.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_KEYS = 10_000


class RateLimiter:
    """``rate`` tokens per ``period`` seconds per key, up to ``burst`` at once."""

    def __init__(self, rate: int, period: float = 60.0, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = rate / period
        self.burst = float(burst if burst is not None else rate)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until one is there."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.per_second)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.per_second
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
            return wait
