"""kvmm/teardown.py without KVM: closes run off the caller's path, bounded, in parallel."""

from __future__ import annotations

import threading
import time

from kvmm import teardown


def test_retire_returns_before_the_close_runs_and_wait_idle_waits_for_it() -> None:
    gate = threading.Event()
    done = []
    teardown.retire(lambda: (gate.wait(5), done.append(1)))
    assert done == [] and teardown.pending() == 1
    gate.set()
    assert teardown.wait_idle(5)
    assert done == [1] and teardown.pending() == 0


def test_at_most_max_pending_wait_then_the_caller_closes_its_own() -> None:
    gate = threading.Event()
    ran_in: list[str] = []
    for _ in range(teardown.MAX_PENDING):
        teardown.retire(lambda: (gate.wait(5), ran_in.append(threading.current_thread().name)))
    teardown.retire(lambda: ran_in.append(threading.current_thread().name))  # over the bound: runs here, now
    assert ran_in == [threading.current_thread().name]
    gate.set()
    assert teardown.wait_idle(5)
    assert ran_in.count("kvmm-teardown") == teardown.MAX_PENDING


def test_destroys_that_wait_overlap() -> None:
    # VM destroys mostly wait in the kernel: THREADS of them take about as long as one.
    started = time.monotonic()
    for _ in range(teardown.THREADS):
        teardown.retire(lambda: time.sleep(0.3))
    assert teardown.wait_idle(5)
    assert time.monotonic() - started < 0.3 * teardown.THREADS * 0.75


def test_a_failing_close_is_logged_and_the_threads_go_on(caplog) -> None:  # type: ignore[no-untyped-def]
    def fail() -> None:
        raise OSError(9, "Bad file descriptor")

    teardown.retire(fail)
    assert teardown.wait_idle(5)
    assert "releasing a VM failed: Bad file descriptor" in caplog.text
    done = []
    teardown.retire(lambda: done.append(1))
    assert teardown.wait_idle(5) and done == [1]
