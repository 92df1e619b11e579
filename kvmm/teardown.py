"""KVM objects released off the caller's path.

Closing a VM fd makes the kernel destroy the VM, and on this kind of host that costs
1-25 ms (measured, docs/performance.md "A fresh VM per test"): a VM destroyed within
~15 ms of a KVM bus change (memslot, irqchip, PIT, ioeventfd) waits for an SRCU grace
period. The waiting is the kernel's, not the CPU's, so a machine hands its VM's fds to
a few background threads here and returns; a test suite that restores a VM per test pays
the destroy in parallel with its next test instead of in series.

Bounded: at most ``MAX_PENDING`` VMs wait here; beyond that the caller closes its own
(a process that closes VMs faster than the kernel destroys them must not accumulate fds
and guest RAM). :func:`wait_idle` waits until every handed-over VM is gone (tests that
count fds, a process about to fork).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

LOG = logging.getLogger(__name__)

MAX_PENDING = 8
# VM destroys mostly wait (SRCU grace periods), so a few in parallel finish sooner than
# one after another: measured in docs/performance.md ("A fresh VM per test").
THREADS = 4

_lock = threading.Condition()
_pending: deque[Callable[[], None]] = deque()
_busy = 0  # closes running now
_threads: set[threading.Thread] = set()
durations: deque[float] = deque(maxlen=1024)  # seconds each of the latest releases took (benchmarks read it)


def retire(close: Callable[[], None]) -> None:
    """Run ``close`` (which releases KVM fds and never needs the caller's state) on a
    teardown thread, or at once when ``MAX_PENDING`` wait there already."""
    with _lock:
        if len(_pending) + _busy < MAX_PENDING:
            _pending.append(close)
            if len(_threads) < THREADS and len(_pending) + _busy > len(_threads):
                thread = threading.Thread(target=_serve, name="kvmm-teardown", daemon=True)
                _threads.add(thread)
                thread.start()
            _lock.notify_all()
            return
    _run(close)


def wait_idle(timeout: float | None = None) -> bool:
    """Wait until every retired VM is closed; False if ``timeout`` seconds passed first."""
    with _lock:
        return _lock.wait_for(lambda: not _pending and not _busy, timeout)


def pending() -> int:
    """How many retired VMs are not closed yet (being closed included)."""
    with _lock:
        return len(_pending) + _busy


def _serve() -> None:
    global _busy
    while True:
        with _lock:
            if not _lock.wait_for(lambda: bool(_pending), timeout=30.0):
                _threads.discard(threading.current_thread())
                return  # idle: a process done with VMs keeps no thread; retire() starts another
            close = _pending.popleft()
            _busy += 1
        try:
            _run(close)
        finally:
            with _lock:
                _busy -= 1
                _lock.notify_all()


def _run(close: Callable[[], None]) -> None:
    started = time.perf_counter()
    try:
        close()
        durations.append(time.perf_counter() - started)
    except OSError as exc:  # closing a KVM fd does not fail in practice; never lose the thread to it
        LOG.error("releasing a VM failed: %s", exc.strerror)
