"""Rate-limited logging for messages a guest can trigger at will."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds to ``logger``, then one line with the
    count of what was dropped, so a hostile guest cannot flood kvmm's log."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 5.0) -> None:
        self.logger = logger
        self.burst, self.period = burst, period
        self.window_start = 0.0
        self.count = 0
        self.dropped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.window_start > self.period:
            if self.dropped:
                self.logger.warning("(%d similar messages suppressed)", self.dropped)
            self.window_start, self.count, self.dropped = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            self.logger.warning(msg, *args)
        else:
            self.dropped += 1
