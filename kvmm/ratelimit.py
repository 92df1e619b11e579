"""Rate-limited logging for messages a guest can trigger at will.

Every log line a guest can cause (a device register write, a malformed request, a ring
error, a BAR move, an MSI-X toggle, a status write...) goes through a
:class:`RateLimitedLog`, at whatever level it is logged: a guest that repeats the action
in a loop costs at most ``burst`` lines per ``period`` seconds per message, then one line
saying how many were suppressed (docs/security.md; tests/test_guest_log_lines.py floods
each one and checks that every logging call in the guest-facing modules is one of them).
"""

from __future__ import annotations

import logging
import time

MAX_MESSAGES = 64  # distinct formats tracked per limiter (they are code literals; a bound anyway)


class _Budget:
    __slots__ = ("window_start", "count", "dropped", "level")

    def __init__(self) -> None:
        self.window_start = -1e18
        self.count = self.dropped = 0
        self.level = logging.NOTSET  # the most severe level suppressed in this window


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds of each message (its format string:
    one flood does not hide a different warning) to ``logger``, then one line with the
    count of what was dropped, so a hostile guest cannot flood kvmm's log. A level the
    logger does not emit costs one check and counts nothing."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 5.0) -> None:
        self.logger = logger
        self.burst, self.period = burst, period
        self._budgets: dict[str, _Budget] = {}
        self._overflow = _Budget()  # shared by formats beyond MAX_MESSAGES

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        b = self._budgets.get(msg)
        if b is None:
            if len(self._budgets) < MAX_MESSAGES:
                b = self._budgets[msg] = _Budget()
            else:
                b = self._overflow
        now = time.monotonic()
        if now - b.window_start > self.period:
            if b.dropped:
                logger.log(b.level, "(%d similar messages suppressed)", b.dropped)
            b.window_start, b.count, b.dropped, b.level = now, 0, 0, logging.NOTSET
        if b.count < self.burst:
            b.count += 1
            logger.log(level, msg, *args, exc_info=exc_info)
        else:
            b.dropped += 1
            b.level = max(b.level, level)

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        """An error with the current exception's traceback (in an ``except`` block)."""
        self.log(logging.ERROR, msg, *args, exc_info=True)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)

    def debug(self, msg: str, *args: object) -> None:
        self.log(logging.DEBUG, msg, *args)

    @property
    def dropped(self) -> int:
        """Lines suppressed in the current windows, over all messages."""
        return sum(b.dropped for b in self._budgets.values()) + self._overflow.dropped
