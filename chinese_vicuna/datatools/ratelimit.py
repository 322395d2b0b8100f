"""A sliding-window request limiter: never more than `max_requests` starts in any `window` seconds.

A token bucket allows a burst of its capacity on top of its rate, so "R per minute" can be
exceeded in some 60-second window; a sliding log of start times cannot. The clock and the
sleep are injectable so tests can check the guarantee on a fake clock without waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    """Blocks `acquire()` until starting one more request keeps every window within the limit.

    Thread-safe: callers on many threads share one limiter. Each acquire records its start
    time; a start is allowed when fewer than `max_requests` starts lie in (now - window, now].
    """

    def __init__(
        self,
        max_requests: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.max_requests = max_requests
        self.window = window
        self.clock = clock
        self.sleep = sleep
        self.starts: deque[float] = deque()
        self.lock = threading.Lock()

    def wait_time(self) -> float:
        """Seconds until one more start is allowed (0: now). Drops starts that left the window."""
        now = self.clock()
        while self.starts and self.starts[0] <= now - self.window:
            self.starts.popleft()
        if len(self.starts) < self.max_requests:
            return 0.0
        return self.starts[0] + self.window - now

    def acquire(self) -> float:
        """Wait for a slot and take it; returns the start time recorded."""
        while True:
            with self.lock:
                delay = self.wait_time()
                if delay <= 0:
                    now = self.clock()
                    self.starts.append(now)
                    return now
            self.sleep(delay)
